"""The field list (``conf/fields.yaml``): the feature table's sparse columns, defined once.

The Spark side hashes raw values into each field's id space and writes one column per field;
the torch side builds one embedding table per field from the same specs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from contract.config import StrictModel

__all__ = ["FieldSpec", "FieldsConfig"]


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
