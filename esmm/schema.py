"""The feature table's schema: the one contract between the Spark side and the torch side.

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

from esmm.config import FieldsConfig

if TYPE_CHECKING:
    import pyarrow as pa

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
