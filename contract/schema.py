"""The feature table's columns and Arrow schema, written once for both sides.

A feature table is Parquet partitioned by ``dt=YYYY-MM-DD``, one row per impression:

============== ======================= ==================================================
column         type                    meaning
============== ======================= ==================================================
impression_id  string                  the impression's event id (join key to the oracle)
click          int32 (0/1)             the impression was clicked
conversion     int32 (0/1)             the click converted (never 1 where click is 0)
<single field> int64                   an id in ``0 .. num_buckets-1``; 0 = missing
<multi field>  list<int64>, max_len    ids padded with 0 to exactly ``max_len``
============== ======================= ==================================================

Multi-valued fields are stored padded to a fixed length so that Petastorm's batch reader
stacks them into one ``[batch, max_len]`` array without a Python loop per row, and the
model's ``EmbeddingBag(padding_idx=0)`` ignores the padding when it sums.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from contract.fields import FieldsConfig

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "CLICK",
    "CONVERSION",
    "IMPRESSION_ID",
    "LABELS",
    "PADDING_ID",
    "PARTITION",
    "SchemaError",
    "arrow_schema",
    "check_table_schema",
    "feature_columns",
    "model_columns",
    "schema_problems",
]

IMPRESSION_ID = "impression_id"
CLICK = "click"
CONVERSION = "conversion"
PARTITION = "dt"
LABELS = (CLICK, CONVERSION)
PADDING_ID = 0


def feature_columns(fields: FieldsConfig) -> list[str]:
    """Names of the sparse feature columns, in field-list order."""
    return [f.name for f in fields.fields]


def model_columns(fields: FieldsConfig) -> list[str]:
    """The columns the trainer reads: labels then features (the id column is not needed)."""
    return [*LABELS, *feature_columns(fields)]


def arrow_schema(fields: FieldsConfig) -> pa.Schema:
    """The pyarrow schema of a feature-table file (the ``dt`` partition column excluded)."""
    import pyarrow as pa

    columns = [
        pa.field(IMPRESSION_ID, pa.string(), nullable=False),
        pa.field(CLICK, pa.int32(), nullable=False),
        pa.field(CONVERSION, pa.int32(), nullable=False),
    ]
    for spec in fields.fields:
        dtype = pa.int64() if spec.kind == "single" else pa.list_(pa.int64())
        columns.append(pa.field(spec.name, dtype, nullable=False))
    return pa.schema(columns)


class SchemaError(ValueError):
    """A written or read table does not have the feature table's schema."""


def schema_problems(actual: pa.Schema, fields: FieldsConfig) -> list[str]:
    """How ``actual`` differs from :func:`arrow_schema` (empty when it matches).

    Column order and nullability flags are not compared: Spark writes every column as
    nullable and may order them its own way; the names and types are the contract.

    Example:
        >>> from contract.fields import FieldSpec, FieldsConfig
        >>> import pyarrow as pa
        >>> fields = FieldsConfig(fields=[FieldSpec(name="u", kind="single", source="users.u",
        ...                                         num_buckets=8)])
        >>> schema_problems(arrow_schema(fields), fields)
        []
        >>> schema_problems(pa.schema([("impression_id", pa.string()), ("click", pa.int64()),
        ...                            ("conversion", pa.int32())]), fields)
        ['click: int64, expected int32', 'u: missing (int64)']
    """
    expected = arrow_schema(fields)
    have = {f.name: f.type for f in actual}
    problems = []
    for field in expected:
        if field.name not in have:
            problems.append(f"{field.name}: missing ({field.type})")
        elif not have[field.name].equals(field.type):
            # A list's item name differs between writers (Spark: "element", pyarrow: "item").
            both_lists = _is_list(have[field.name]) and _is_list(field.type)
            if not (both_lists and have[field.name].value_type.equals(field.type.value_type)):
                problems.append(f"{field.name}: {have[field.name]}, expected {field.type}")
    extra = sorted(set(have) - set(expected.names) - {PARTITION})
    problems.extend(f"{name}: not a column of the feature table" for name in extra)
    return problems


def check_table_schema(actual: pa.Schema, fields: FieldsConfig, where: str) -> None:
    """Raise :class:`SchemaError` naming ``where`` and every difference from the contract."""
    problems = schema_problems(actual, fields)
    if problems:
        raise SchemaError(
            f"{where} does not have the feature table's schema: " + "; ".join(problems)
        )


def _is_list(dtype: pa.DataType) -> bool:
    import pyarrow as pa

    return pa.types.is_list(dtype) or pa.types.is_large_list(dtype)
