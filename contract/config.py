"""One loader for every YAML file in ``conf/``: YAML → validated, typed, immutable objects.

Every job and the trainer call :func:`load_config` with the pydantic model of their config.
A missing file, YAML that does not parse, an unknown key, a wrong type or a missing key
ends in one :class:`ConfigError` that names the file and the dotted key, never a traceback
from deep inside a job.

Overrides (``--set key.sub=value`` on the command lines) are applied to the raw YAML before
validation, so they are validated exactly like the file.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = [
    "ConfigError",
    "StrictModel",
    "add_override_argument",
    "digest_json",
    "load_config",
    "neutral_at",
    "parse_overrides",
]

ModelT = TypeVar("ModelT", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file or override is unusable; the message says which file and key."""


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, objects are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


NEUTRAL = "neutral_at"


def neutral_at(value: Any) -> dict[str, Any]:
    """``json_schema_extra`` of a key added to a config after results were kept under it:
    ``value`` is the one that does what the config did before the key existed.

    Example: ``Field(default=0.0, json_schema_extra=neutral_at(0.0))``. :func:`digest_json`
    leaves such a key out while it holds that value, so the digests of every config that
    does not use it (and the results cached under them) stay what they were. Changing the
    default to another value changes them, as it should.
    """
    return {NEUTRAL: value}


def _neutral_keys(config: BaseModel) -> dict[str, Any]:
    """The nested ``exclude`` of :meth:`BaseModel.model_dump_json` for the keys at their
    neutral value (:func:`neutral_at`)."""
    exclude: dict[str, Any] = {}
    for name, field in type(config).model_fields.items():
        value = getattr(config, name)
        extra = field.json_schema_extra
        if isinstance(extra, dict) and NEUTRAL in extra and value == extra[NEUTRAL]:
            exclude[name] = True
        elif isinstance(value, BaseModel) and (inner := _neutral_keys(value)):
            exclude[name] = inner
    return exclude


def digest_json(config: BaseModel) -> str:
    """The JSON of ``config`` (every key, defaults included) to take a digest of: what a
    program reads, not how its file spells it, without the keys at their neutral value.

    Example:
        >>> from pydantic import Field
        >>> class Knobs(StrictModel):
        ...     lr: float = 0.1
        ...     decay: float = Field(default=0.0, json_schema_extra=neutral_at(0.0))
        >>> digest_json(Knobs()), digest_json(Knobs(decay=0.5))
        ('{"lr":0.1}', '{"lr":0.1,"decay":0.5}')
    """
    return config.model_dump_json(exclude=_neutral_keys(config) or None)


def add_override_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """Add the repeatable ``--set KEY=VALUE`` option (into ``args.overrides``) that every
    entry point offers; :func:`parse_overrides` / :func:`load_config` apply the values."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """Turn ``["model.variant=base", "optim.lr=0.01"]`` into a nested dict.

    Values are parsed as YAML scalars/lists (``0.01`` is a float, ``[1, 0, 1]`` a list,
    ``true`` a bool), so an override is typed exactly like the same value in the file.
    """
    nested: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw_value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{pair}' is not of the form key.sub=value")
        try:
            value = yaml.safe_load(raw_value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{pair}': value does not parse as YAML ({exc})") from None
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{pair}' conflicts with another override of '{part}'")
        node[parts[-1]] = value
    return nested


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    if error["type"] == "value_error" and isinstance(error.get("input"), dict):
        # a validator of a whole section: its message names the keys; the section's every
        # value would bury it
        return f"{key}: {error['msg'].removeprefix('Value error, ')}"
    return f"{key}: {error['msg']} (got {error.get('input')!r})"


def load_config(path: str | Path, model: type[ModelT], overrides: Iterable[str] = ()) -> ModelT:
    """Read ``path`` (YAML), apply ``overrides`` and validate it as ``model``.

    Args:
        path: the YAML file.
        model: the pydantic model class the file must satisfy.
        overrides: ``key.sub=value`` strings applied on top of the file.

    Returns:
        The validated, immutable config object.

    Raises:
        ConfigError: naming the file and every bad key, for a missing or unreadable file,
            invalid YAML, unknown keys, wrong types or missing keys.

    Example:
        >>> from contract.fields import FieldsConfig
        >>> fields = load_config("conf/fields.yaml", FieldsConfig)
        >>> fields.by_name("user_id").kind
        'single'
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    raw = _deep_merge(raw, parse_overrides(overrides))
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "\n  ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"{path}: invalid {model.__name__}:\n  {problems}") from None
