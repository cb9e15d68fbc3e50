"""Reading and parsing the raw logs: JSON lines per ``<log>/dt=YYYY-MM-DD/`` folder.

Lines are read as text and parsed with the built-in ``from_json`` so that the raw line is kept
next to the parsed columns: a record that ends in quarantine is written with its raw line,
and a line that does not parse is recognised as such instead of being dropped silently.

Event times (``ts``) are epoch seconds (UTC).
"""

from __future__ import annotations

from functools import reduce

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

__all__ = [
    "CLICK_SCHEMA",
    "CONVERSION_SCHEMA",
    "IMPRESSION_SCHEMA",
    "LOG_KEYS",
    "LOG_SCHEMAS",
    "parse_lines",
    "read_lines",
]

_CORRUPT = "_corrupt_record"

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


def read_lines(spark: SparkSession, folders: dict[str, str]) -> DataFrame:
    """Raw lines of several ``dt=`` folders, each tagged with its folder's day.

    Args:
        folders: ``{"YYYY-MM-DD": path}``; every path must exist.

    Returns:
        ``folder_dt`` (string) and ``raw`` (string, the line).
    """
    frames = [
        spark.read.text(path).select(F.lit(day).alias("folder_dt"), F.col("value").alias("raw"))
        for day, path in sorted(folders.items())
    ]
    if not frames:
        empty = T.StructType(
            [T.StructField("folder_dt", T.StringType()), T.StructField("raw", T.StringType())]
        )
        return spark.createDataFrame([], empty)
    return reduce(DataFrame.unionByName, frames)


def parse_lines(lines: DataFrame, schema: T.StructType) -> DataFrame:
    """Parse JSON lines against ``schema``, flagging the lines that do not parse.

    Args:
        lines: ``folder_dt``, ``raw``.
        schema: the log's record schema (see :data:`LOG_SCHEMAS`).

    Returns:
        ``folder_dt``, ``raw``, every column of ``schema`` (null where absent) and
        ``malformed`` (bool): not JSON, not an object, a value of the wrong type, or blank.
    """
    with_corrupt = T.StructType([*schema.fields, T.StructField(_CORRUPT, T.StringType())])
    parsed = lines.withColumn("_record", F.from_json("raw", with_corrupt))
    malformed = (
        F.col("_record").isNull()
        | F.col(f"_record.{_CORRUPT}").isNotNull()
        | (F.trim(F.col("raw")) == "")
    )
    return parsed.select(
        "folder_dt",
        "raw",
        *[F.col(f"_record.{field.name}").alias(field.name) for field in schema.fields],
        malformed.alias("malformed"),
    )
