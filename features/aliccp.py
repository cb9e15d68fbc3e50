"""Ali-CCP (the ESMM paper's public dataset) → the feature table of :mod:`contract.schema`.

The raw dataset is two pairs of files, one pair per split (``train``, ``test``):

- ``sample_skeleton_<split>.csv``: ``sample_id,click,buy,common_feature_index,feature_num,
  feature_list`` — one line per impression, with the item / ad side features;
- ``common_features_<split>.csv``: ``common_feature_index,feature_num,feature_list`` — the
  user / context features shared by many impressions.

A ``feature_list`` is features separated by ``\\x01``, each ``field_id\\x02feature_id\\x03value``.

The steps (pure DataFrame → DataFrame, Spark built-ins only, no Python UDF):

1. :func:`parse_skeleton`, :func:`parse_common_features` — split lines and feature lists,
   give each bad line a ``reason`` (:class:`features.transforms.Reason`, the codes of both
   feature jobs).
2. :func:`encode_common_features` — one row per valid ``common_feature_index`` with the
   hashed ids of every field (duplicates of an index are counted and dropped).
3. :func:`join_samples` — each valid skeleton line joined with its common features; lines
   whose index is unknown get ``unknown_common_feature``. A field is taken from the line's
   own features first, from its common features otherwise.
4. :func:`ingest_split` — counts every file's lines, then stages, checks and publishes the
   split with :func:`features.publish.stage_and_publish`, the daily job's path.

Feature values (the part after ``\\x03``) are not stored: the model is id-only. They are used
once: a multi-valued field longer than ``max_len`` keeps the ids with the largest values
(behaviour counts for the ``*_14`` bags), ties in line order. ``tests/aliccp_fixture.py``
writes a small raw dataset in exactly this format for the tests.
"""

from __future__ import annotations

from typing import Any

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, Observation, SparkSession
from pyspark.sql import functions as F

from contract.fields import FieldsConfig, FieldSpec
from contract.schema import CLICK, CONVERSION, IMPRESSION_ID
from features import publish, stats
from features.config import OutputConfig
from features.publish import PublishedPartition
from features.transforms import (
    DEDUPLICATED,
    OUTPUT,
    QUARANTINED,
    Reason,
    hash_bag,
    hash_id,
    missing_ids,
)

__all__ = [
    "COMMON",
    "SKELETON",
    "SPLITS",
    "TABLE_OUTPUTS",
    "encode_common_features",
    "encode_fields",
    "field_id",
    "ingest_split",
    "join_samples",
    "parse_common_features",
    "parse_feature_list",
    "parse_skeleton",
    "raw_file",
]

SKELETON = "sample_skeleton"
COMMON = "common_features"
SPLITS = ("train", "test")
FEATURE_SEP = "\x01"
FIELD_SEP = "\x02"
VALUE_SEP = "\x03"
# field_id (e.g. 205 or 109_14) \x02 integer feature_id \x03 numeric value
_ENTRY = r"^[0-9]+(_[0-9]+)?\x02[0-9]+\x03[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$"
_FEATURES_TYPE = "array<struct<field:string,id:string,value:double,pos:int>>"
_LABEL = r"^[01]$"
_COUNT = r"^[0-9]+$"
# The conservation rule of the table (features.stats.conservation_problems): one row per
# skeleton output.
TABLE_OUTPUTS = {SKELETON: "rows"}


def raw_file(input_dir: str, log: str, split: str) -> str:
    """Path of one raw file, e.g. ``<input>/sample_skeleton_train.csv``."""
    return f"{input_dir.rstrip('/')}/{log}_{split}.csv"


def field_id(spec: FieldSpec) -> str:
    """The Ali-CCP field id of a field list entry (``source: aliccp.109_14`` → ``109_14``)."""
    log, _, fid = spec.source.partition(".")
    if log != "aliccp" or not fid:
        raise ValueError(f"field '{spec.name}': source '{spec.source}' is not aliccp.<field_id>")
    return fid


def parse_feature_list(feature_list: Column) -> Column:
    """A raw ``feature_list`` → ``array<struct<field, id, value, pos>>``, null when unparsable.

    ``field`` and ``id`` stay strings (ids are hashed later), ``value`` is a double, ``pos`` the
    0-based position in the line. An empty list gives an empty array; a list with any entry
    that is not ``field_id\\x02feature_id\\x03value`` gives null.
    """
    entries = F.split(feature_list, FEATURE_SEP)
    parsed = F.transform(
        entries,
        lambda e, i: F.struct(
            F.split(e, FIELD_SEP)[0].alias("field"),
            F.split(F.split(e, FIELD_SEP)[1], VALUE_SEP)[0].alias("id"),
            F.split(F.split(e, FIELD_SEP)[1], VALUE_SEP)[1].cast("double").alias("value"),
            i.alias("pos"),
        ),
    )
    empty = F.array().cast(_FEATURES_TYPE)
    return (
        F.when(feature_list == "", empty)
        .when(F.forall(entries, lambda e: e.rlike(_ENTRY)), parsed)
        .otherwise(F.lit(None))
    )


def _first_reason(checks: list[tuple[Column, str]]) -> Column:
    reason = F.lit(None).cast("string")
    for failed, code in reversed(checks):
        reason = F.when(failed, F.lit(code)).otherwise(reason)
    return reason


def _feature_checks() -> list[tuple[Column, str]]:
    """Checks of the parsed ``features`` against the line's ``_num`` (feature_num)."""
    return [
        (~F.col("_num").rlike(_COUNT), Reason.BAD_FEATURE_NUM),
        (F.col("features").isNull(), Reason.BAD_FEATURE_ENTRY),
        (F.size("features") != F.col("_num").cast("int"), Reason.BAD_FEATURE_NUM),
    ]


def parse_skeleton(lines: DataFrame) -> DataFrame:
    """Skeleton lines (``value``) → ``raw``, ``sample_id``, ``click``, ``buy`` (int),
    ``common_feature_index``, ``features`` (see :func:`parse_feature_list`) and ``reason``
    (null for a good line, else the first failed check).

    A line with ``buy = 1`` and ``click = 0`` is quarantined (``buy_without_click``) rather
    than forced to ``buy = 0``: the dataset documents buy as post-click, so such a line is
    corrupt, and forcing it would hide the corruption from the stats.
    """
    parts = F.split(F.col("value"), ",")
    # Two projections: the feature list is parsed once, then checked.
    checks = [
        (F.col("_columns") != 6, Reason.BAD_COLUMN_COUNT),
        ((F.col("sample_id") == "") | (F.col("common_feature_index") == ""), Reason.MISSING_KEY),
        (~F.col("_click").rlike(_LABEL) | ~F.col("_buy").rlike(_LABEL), Reason.BAD_LABEL),
        ((F.col("_buy") == "1") & (F.col("_click") == "0"), Reason.BUY_WITHOUT_CLICK),
        *_feature_checks(),
    ]
    return lines.select(
        F.col("value").alias("raw"),
        parts[0].alias("sample_id"),
        parts[1].cast("int").alias("click"),
        parts[2].cast("int").alias("buy"),
        parts[3].alias("common_feature_index"),
        parts[4].alias("_num"),
        parse_feature_list(parts[5]).alias("features"),
        F.size(parts).alias("_columns"),
        parts[1].alias("_click"),
        parts[2].alias("_buy"),
    ).select(
        "raw",
        "sample_id",
        "click",
        "buy",
        "common_feature_index",
        "features",
        _first_reason(checks).alias("reason"),
    )


def parse_common_features(lines: DataFrame) -> DataFrame:
    """Common-feature lines (``value``) → ``raw``, ``common_feature_index``, ``features``,
    ``reason`` (null for a good line)."""
    parts = F.split(F.col("value"), ",")
    checks = [
        (F.col("_columns") != 3, Reason.BAD_COLUMN_COUNT),
        (F.col("common_feature_index") == "", Reason.MISSING_KEY),
        *_feature_checks(),
    ]
    return lines.select(
        F.col("value").alias("raw"),
        parts[0].alias("common_feature_index"),
        parts[1].alias("_num"),
        parse_feature_list(parts[2]).alias("features"),
        F.size(parts).alias("_columns"),
    ).select("raw", "common_feature_index", "features", _first_reason(checks).alias("reason"))


def _encode(spec: FieldSpec, features: Column) -> Column:
    """One field's hashed id (single) or padded bag of ids (multi) from a parsed feature list.

    A single field repeated in one line keeps its first occurrence; a bag keeps the ids with
    the largest values first (ties in line order), then :func:`hash_bag` truncates / pads.
    """
    fid = field_id(spec)
    own = F.filter(features, lambda e: e["field"] == fid)
    if spec.kind == "single":
        return hash_id(F.get(own, 0)["id"], spec.name, spec.num_buckets)
    ranked = F.sort_array(
        F.transform(
            own,
            lambda e: F.struct((-e["value"]).alias("k"), e["pos"].alias("p"), e["id"].alias("id")),
        )
    )
    return hash_bag(
        F.transform(ranked, lambda e: e["id"]), spec.name, spec.num_buckets, spec.max_len or 1
    )


def encode_fields(features: Column, fields: FieldsConfig, prefix: str = "") -> list[Column]:
    """Every field of ``fields`` encoded from a parsed feature list, named ``prefix + name``."""
    return [_encode(spec, features).alias(prefix + spec.name) for spec in fields.fields]


def encode_common_features(parsed: DataFrame, fields: FieldsConfig) -> DataFrame:
    """Valid parsed common-feature lines → one row per ``common_feature_index``.

    Returns:
        ``common_feature_index``, ``copies`` (lines with that index; ``copies - 1`` were
        dropped as duplicates, keeping the smallest row of ids, a deterministic choice) and
        one ``_c_<field>`` column per field.
    """
    names = [f"_c_{spec.name}" for spec in fields.fields]
    encoded = parsed.where(F.col("reason").isNull()).select(
        "common_feature_index", *encode_fields(F.col("features"), fields, "_c_")
    )
    return (
        encoded.groupBy("common_feature_index")
        .agg(F.min(F.struct(*names)).alias("_ids"), F.count(F.lit(1)).alias("copies"))
        .select("common_feature_index", "copies", "_ids.*")
    )


def join_samples(skeleton: DataFrame, common: DataFrame, fields: FieldsConfig) -> DataFrame:
    """Parsed skeleton lines + encoded common features → classified feature-table rows.

    Args:
        skeleton: output of :func:`parse_skeleton`.
        common: output of :func:`encode_common_features`.
        fields: the Ali-CCP field list.

    Returns:
        One row per skeleton line: ``impression_id`` (= sample_id), ``click``, ``conversion``
        (= buy), one column per field, ``reason`` (null = goes to the table) and ``raw`` (kept
        only for quarantined lines). Only good lines take part in the join, so malformed lines
        (null keys) cannot pile up in one join partition.
    """
    good = skeleton.where(F.col("reason").isNull()).select(
        "raw",
        "sample_id",
        "click",
        "buy",
        "common_feature_index",
        *encode_fields(F.col("features"), fields, "_s_"),
    )
    joined = good.join(
        common.drop("copies").withColumn("_found", F.lit(True)), "common_feature_index", "left"
    )
    columns = []
    for spec in fields.fields:
        own, shared = F.col(f"_s_{spec.name}"), F.col(f"_c_{spec.name}")
        found = own[0] != 0 if spec.kind == "multi" else own != 0
        value = F.when(found, own).otherwise(F.coalesce(shared, missing_ids(spec)))
        columns.append(value.alias(spec.name))
    reason = F.when(F.col("_found").isNull(), F.lit(Reason.UNKNOWN_COMMON_FEATURE))
    rows = joined.select(
        F.col("sample_id").alias(IMPRESSION_ID),
        F.col("click").cast("int").alias(CLICK),
        F.col("buy").cast("int").alias(CONVERSION),
        *columns,
        reason.alias("reason"),
        F.when(reason.isNotNull(), F.col("raw")).alias("raw"),
    )
    bad = skeleton.where(F.col("reason").isNotNull()).select(
        F.col("sample_id").alias(IMPRESSION_ID),
        F.lit(0).alias(CLICK),
        F.lit(0).alias(CONVERSION),
        *[missing_ids(spec).alias(spec.name) for spec in fields.fields],
        "reason",
        "raw",
    )
    return rows.unionByName(bad)


def ingest_split(
    spark: SparkSession,
    input_dir: str,
    out: str,
    split: str,
    fields: FieldsConfig,
    output: OutputConfig | None = None,
) -> PublishedPartition:
    """Parse, join, check and publish one split as ``<out>/dt=<split>/``.

    Also writes ``<out>/_quarantine/dt=<split>/log=<file>/`` (``reason``, ``raw``) and
    ``<out>/_stats/dt=<split>.json``, through :func:`features.publish.stage_and_publish`: the
    table is published last, only when the accounting check passes.

    Args:
        output: the table's files (rows per row group, at least ``min_row_groups``); the
            defaults of :class:`features.config.OutputConfig` when None.

    Raises:
        AccountingError: some input line is not accounted for (nothing is published).
    """
    output = output or OutputConfig()
    keep = StorageLevel.MEMORY_AND_DISK
    skeleton_path, common_path = (raw_file(input_dir, log, split) for log in (SKELETON, COMMON))

    common_parsed = parse_common_features(spark.read.text(common_path)).persist(keep)
    common = encode_common_features(common_parsed, fields).persist(keep)
    rows = join_samples(parse_skeleton(spark.read.text(skeleton_path)), common, fields)
    rows = rows.persist(keep)

    # Input counts come from the raw text, independently of the classification above.
    common_input = spark.read.text(common_path).count()
    skeleton_input = spark.read.text(skeleton_path).count()
    common_reasons = {
        r["reason"]: r["count"]
        for r in common_parsed.where(F.col("reason").isNotNull())
        .groupBy("reason")
        .count()
        .collect()
    }
    common_out = common.agg(F.count(F.lit(1)), F.sum(F.col("copies") - 1)).first()
    by_reason = {r["reason"]: r["count"] for r in rows.groupBy("reason").count().collect()}
    skeleton_out = by_reason.pop(None, 0)
    common_statuses = [(OUTPUT, None, common_out[0])]
    common_statuses += [(QUARANTINED, r, n) for r, n in common_reasons.items()]
    if common_out[1]:
        common_statuses.append((DEDUPLICATED, Reason.DUPLICATE_COMMON_FEATURE, common_out[1]))
    skeleton_statuses = [(OUTPUT, None, skeleton_out)]
    skeleton_statuses += [(QUARANTINED, r, n) for r, n in by_reason.items()]
    logs = {
        SKELETON: stats.log_counts(skeleton_input, skeleton_statuses),
        COMMON: stats.log_counts(common_input, common_statuses),
    }

    # The table's stats are observed while it is written, as in the daily job.
    table_seen = Observation(f"aliccp-{split}")
    table = (
        rows.where(F.col("reason").isNull())
        .drop("reason", "raw")
        .repartition(publish.file_count(skeleton_out, output), IMPRESSION_ID)
        .observe(table_seen, *stats.table_metrics(fields))
    )
    quarantine = rows.where(F.col("reason").isNotNull()).select(
        F.lit(SKELETON).alias("log"), "reason", "raw"
    )
    quarantine = quarantine.unionByName(
        common_parsed.where(F.col("reason").isNotNull()).select(
            F.lit(COMMON).alias("log"), "reason", "raw"
        )
    )

    def split_stats() -> dict[str, Any]:
        return {
            "dt": split,
            "logs": logs,
            "table": stats.table_stats(table_seen.get, fields),
            "inputs": {SKELETON: skeleton_path, COMMON: common_path},
        }

    result = publish.stage_and_publish(
        spark,
        out,
        split,
        table,
        quarantine,
        split_stats,
        fields,
        output,
        table_outputs=TABLE_OUTPUTS,
    )
    for frame in (rows, common, common_parsed):
        frame.unpersist()
    return result
