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
    "read_blank_lines",
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


def _blank_lines(
    spark: SparkSession, base: str, paths: dict[str, str], schema: T.StructType
) -> DataFrame:
    """The blank lines of ``paths`` as :func:`read_log` rows (malformed, ``raw`` = the line)."""
    blank = (
        spark.read.schema("value string, dt string")
        .option("basePath", base)
        .text(list(paths.values()))
        .where(_blank())
    )
    return blank.select(
        F.col("dt").alias("folder_dt"),
        F.col("value").alias("raw"),
        *[F.lit(None).cast(field.dataType).alias(field.name) for field in schema.fields],
        F.lit(True).alias("malformed"),
    )


def read_blank_lines(spark: SparkSession, folders: dict[str, str], log: str) -> DataFrame:
    """Only the blank lines of :func:`read_log` (``blank_lines=True`` adds them to the parse):
    for a caller that parsed with ``blank_lines=False`` and found some with
    :func:`count_lines`."""
    frames = [
        _blank_lines(spark, base, paths, LOG_SCHEMAS[log])
        for base, paths in _by_base(folders).items()
    ]
    return reduce(DataFrame.unionByName, frames)


def _by_base(folders: dict[str, str]) -> dict[str, dict[str, str]]:
    """``{day: ".../<log>/dt=<day>"}`` grouped by the folder above the ``dt=`` folders."""
    groups: dict[str, dict[str, str]] = {}
    for day, path in sorted(folders.items()):
        base, _, name = path.rstrip("/").rpartition("/")
        if name != f"dt={day}":
            raise ValueError(f"{path} is not a dt={day} folder")
        groups.setdefault(base, {})[day] = path
    return groups


def read_log(
    spark: SparkSession, folders: dict[str, str], log: str, blank_lines: bool = True
) -> DataFrame:
    """Parse the JSON lines of several ``dt=`` folders of ``log``, each tagged with its day.

    All the folders of one log are read by one JSON reader (and, for the blank lines, one
    text reader): ``folder_dt`` is the ``dt`` partition column, so reading 7 folders costs
    one file listing and one scan, not 7.

    Args:
        folders: ``{"YYYY-MM-DD": ".../dt=YYYY-MM-DD"}``; every path must exist.
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
    # A user schema that names the partition column fixes its type (no date inference).
    with_corrupt = T.StructType(
        [
            *schema.fields,
            T.StructField(_CORRUPT, T.StringType()),
            T.StructField("dt", T.StringType()),
        ]
    )
    frames = []
    for base, paths in _by_base(folders).items():
        parsed = (
            spark.read.schema(with_corrupt)
            .option("mode", "PERMISSIVE")
            .option("columnNameOfCorruptRecord", _CORRUPT)
            .option("basePath", base)
            .json(list(paths.values()))
        )
        frames.append(
            parsed.select(
                F.col("dt").alias("folder_dt"),
                F.col(_CORRUPT).alias("raw"),
                *[F.col(field.name) for field in schema.fields],
                F.col(_CORRUPT).isNotNull().alias("malformed"),
            )
        )
        if blank_lines:
            frames.append(_blank_lines(spark, base, paths, schema))
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
