"""Reading and parsing the raw logs: JSON lines per ``<log>/dt=YYYY-MM-DD/`` folder.

Lines are parsed by Spark's JSON reader with the log's schema, in PERMISSIVE mode with a
corrupt-record column: a line that does not parse (not JSON, not an object, a value of the
wrong type) keeps its text in ``raw`` and is flagged ``malformed`` instead of being dropped.
The reader skips blank lines, so they are read back from the text and flagged too. The JSON
reader parses from bytes; ``from_json`` over a text column goes through a character reader
and costs about three times as much, which is why it is not used here.

``raw`` holds the line only where the record is malformed; for a record that parses, the
quarantine writes :func:`record_text` (the record re-serialised from the log's schema).

Event times (``ts``) are epoch seconds (UTC).
"""

from __future__ import annotations

from functools import reduce

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

__all__ = [
    "CLICK_SCHEMA",
    "CONVERSION_SCHEMA",
    "IMPRESSION_SCHEMA",
    "LOG_KEYS",
    "LOG_SCHEMAS",
    "READ_COLUMNS",
    "count_lines",
    "read_log",
    "record_text",
]

_CORRUPT = "_corrupt_record"
# The columns read_log returns besides the log's own fields.
READ_COLUMNS = ("folder_dt", "raw", "malformed")

IMPRESSION_SCHEMA = T.StructType(
    [
        T.StructField("impression_id", T.StringType()),
        T.StructField("ts", T.LongType()),
        T.StructField("user_id", T.StringType()),
        T.StructField("item_id", T.StringType()),
        T.StructField("position", T.StringType()),
        T.StructField("hour", T.StringType()),
        T.StructField("device", T.StringType()),
    ]
)
CLICK_SCHEMA = T.StructType(
    [
        T.StructField("click_id", T.StringType()),
        T.StructField("impression_id", T.StringType()),
        T.StructField("ts", T.LongType()),
    ]
)
CONVERSION_SCHEMA = T.StructType(
    [
        T.StructField("conversion_id", T.StringType()),
        T.StructField("click_id", T.StringType()),
        T.StructField("ts", T.LongType()),
    ]
)
LOG_SCHEMAS = {
    "impressions": IMPRESSION_SCHEMA,
    "clicks": CLICK_SCHEMA,
    "conversions": CONVERSION_SCHEMA,
}
# The columns a record of each log cannot do without (null → quarantined as missing_key).
LOG_KEYS = {
    "impressions": ("impression_id", "ts"),
    "clicks": ("click_id", "impression_id", "ts"),
    "conversions": ("conversion_id", "click_id", "ts"),
}


def _blank() -> Column:
    """A line of ``spark.read.text`` (column ``value``) that the JSON reader skips: empty, or
    only the whitespace its parser skips (space, tab, carriage return). ``trim`` would miss
    the tabs, and a tab-only line would vanish from the parse without being counted."""
    return F.col("value").rlike("^[ \\t\\r]*$")


def count_lines(spark: SparkSession, path: str) -> tuple[int, int]:
    """Lines in the text files of ``path``, and how many of them are blank: the input count
    the accounting starts from, in one pass over the text."""
    row = spark.read.text(path).agg(F.count(F.lit(1)), F.sum(_blank().cast("long"))).first()
    return row[0], row[1] or 0


def read_log(
    spark: SparkSession, folders: dict[str, str], log: str, blank_lines: bool = True
) -> DataFrame:
    """Parse the JSON lines of several ``dt=`` folders of ``log``, each tagged with its day.

    Args:
        folders: ``{"YYYY-MM-DD": path}``; every path must exist.
        log: ``impressions``, ``clicks`` or ``conversions`` (see :data:`LOG_SCHEMAS`).
        blank_lines: also return the blank lines (a second, cheap pass over the text); a
            caller that counts them with :func:`count_lines` may skip them.

    Returns:
        ``folder_dt`` (string), ``raw`` (the line when malformed, else null), every column of
        the log's schema (null where absent) and ``malformed`` (bool): not JSON, not an
        object, a value of the wrong type, or blank. One row per line, except that a line
        holding a JSON array gives one row per element (Spark's JSON reader); the accounting
        counts lines (:func:`count_lines`), so such a line fails the day's check loudly.
    """
    schema = LOG_SCHEMAS[log]
    with_corrupt = T.StructType([*schema.fields, T.StructField(_CORRUPT, T.StringType())])
    frames = []
    for day, path in sorted(folders.items()):
        parsed = (
            spark.read.schema(with_corrupt)
            .option("mode", "PERMISSIVE")
            .option("columnNameOfCorruptRecord", _CORRUPT)
            .json(path)
        )
        frames.append(
            parsed.select(
                F.lit(day).alias("folder_dt"),
                F.col(_CORRUPT).alias("raw"),
                *[F.col(field.name) for field in schema.fields],
                F.col(_CORRUPT).isNotNull().alias("malformed"),
            )
        )
        if not blank_lines:
            continue
        blank = spark.read.text(path).where(_blank())
        frames.append(
            blank.select(
                F.lit(day).alias("folder_dt"),
                F.col("value").alias("raw"),
                *[F.lit(None).cast(field.dataType).alias(field.name) for field in schema.fields],
                F.lit(True).alias("malformed"),
            )
        )
    if not frames:
        empty = T.StructType(
            [
                T.StructField("folder_dt", T.StringType()),
                T.StructField("raw", T.StringType()),
                *schema.fields,
                T.StructField("malformed", T.BooleanType()),
            ]
        )
        return spark.createDataFrame([], empty)
    return reduce(DataFrame.unionByName, frames)


def record_text(log: str) -> Column:
    """The text a quarantined record is kept as: its line when malformed, else the record
    re-serialised as JSON from the log's schema (fields outside the schema are not kept)."""
    fields = [field.name for field in LOG_SCHEMAS[log].fields]
    return F.coalesce(F.col("raw"), F.to_json(F.struct(*fields)))
