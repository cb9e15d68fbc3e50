"""One loader for every YAML file in `conf/`: YAML → validated, typed, immutable objects.

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
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "ConfigError",
    "FieldSpec",
    "FieldsConfig",
    "StrictModel",
    "load_config",
    "parse_overrides",
]

ModelT = TypeVar("ModelT", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file or override is unusable; the message says which file and key."""


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, objects are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class FieldSpec(StrictModel):
    """One sparse feature field of the feature table.

    Attributes:
        name: column name in the feature table (also the embedding table's name).
        kind: ``single`` (one integer id per row) or ``multi`` (a bag of ids, padded with 0
            to ``max_len`` in the table and sum-pooled by the model).
        source: where the raw value comes from, ``<log>.<column>``; the log is one of
            ``impressions``, ``users``, ``items`` (synthetic data) or the Ali-CCP field id.
        num_buckets: size of the id space, id 0 included. Id 0 means missing / padding; real
            values hash into ``1 .. num_buckets - 1``.
        max_len: for ``multi`` fields, the bag length in the table (longer bags are
            truncated, shorter ones padded with 0). Must be unset for ``single`` fields.
    """

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    kind: Literal["single", "multi"]
    source: str
    num_buckets: int = Field(ge=2)
    max_len: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _max_len_matches_kind(self) -> FieldSpec:
        if self.kind == "multi" and self.max_len is None:
            raise ValueError(f"field '{self.name}' is multi-valued and needs max_len")
        if self.kind == "single" and self.max_len is not None:
            raise ValueError(f"field '{self.name}' is single-valued and must not set max_len")
        return self


class FieldsConfig(StrictModel):
    """The field list: the one definition of the feature table's sparse columns."""

    fields: list[FieldSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _names_unique(self) -> FieldsConfig:
        names = [f.name for f in self.fields]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"duplicate field names: {', '.join(duplicated)}")
        return self

    def by_name(self, name: str) -> FieldSpec:
        """The field called ``name``; KeyError naming the known fields otherwise."""
        for spec in self.fields:
            if spec.name == name:
                return spec
        raise KeyError(f"no field '{name}'; known: {', '.join(f.name for f in self.fields)}")


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
        >>> from esmm.config import FieldsConfig, load_config
        >>> fields = load_config("conf/fields.yaml", FieldsConfig)  # doctest: +SKIP
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
