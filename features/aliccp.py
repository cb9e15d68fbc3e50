"""Ali-CCP (the ESMM paper's public dataset) → the feature table of :mod:`contract.schema`.

The raw dataset is two pairs of files, one pair per split (``train``, ``test``):

- ``sample_skeleton_<split>.csv``: ``sample_id,click,buy,common_feature_index,feature_num,
  feature_list`` — one line per impression, with the item / ad side features;
- ``common_features_<split>.csv``: ``common_feature_index,feature_num,feature_list`` — the
  user / context features shared by many impressions.

A ``feature_list`` is features separated by ``\\x01``, each ``field_id\\x02feature_id\\x03value``.

The steps (pure DataFrame → DataFrame, Spark built-ins only, no Python UDF):

1. :func:`parse_skeleton`, :func:`parse_common_features` — split lines and feature lists,
   give each bad line a ``reason``.
2. :func:`encode_common_features` — one row per valid ``common_feature_index`` with the
   hashed ids of every field (duplicates of an index are counted and dropped).
3. :func:`join_samples` — each valid skeleton line joined with its common features; lines
   whose index is unknown get ``unknown_common_feature``. A field is taken from the line's
   own features first, from its common features otherwise.

Feature values (the part after ``\\x03``) are not stored: the model is id-only. They are used
once: a multi-valued field longer than ``max_len`` keeps the ids with the largest values
(behaviour counts for the ``*_14`` bags), ties in line order. :func:`write_fixture` writes a
small raw dataset in exactly this format for the tests.
"""

from __future__ import annotations

import json
import math
import random
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from contract.fields import FieldsConfig, FieldSpec
from contract.schema import CLICK, CONVERSION, IMPRESSION_ID
from features import io, stats
from features.transforms import hash_bag, hash_id

__all__ = [
    "COMMON",
    "KNOWN_SAMPLE",
    "SKELETON",
    "SPLITS",
    "AccountingError",
    "Reason",
    "SplitResult",
    "conservation_problems",
    "encode_common_features",
    "encode_fields",
    "field_id",
    "ingest_split",
    "join_samples",
    "parse_common_features",
    "parse_feature_list",
    "parse_skeleton",
    "raw_file",
    "write_fixture",
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


class Reason:
    """Reason codes of quarantined lines (the ``reason`` column) and of dropped duplicates."""

    BAD_COLUMN_COUNT = "bad_column_count"
    BAD_LABEL = "bad_label"  # click or buy not 0/1
    BUY_WITHOUT_CLICK = "buy_without_click"
    MISSING_KEY = "missing_key"  # empty sample_id or common_feature_index
    BAD_FEATURE_NUM = "bad_feature_num"  # not an integer, or != the number of features
    BAD_FEATURE_ENTRY = "bad_feature_entry"  # an entry not field\x02id\x03value
    UNKNOWN_COMMON_FEATURE = "unknown_common_feature"
    DUPLICATE_COMMON_FEATURE = "duplicate_common_feature_index"


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
        if spec.kind == "multi":
            zeros = F.array_repeat(F.lit(0).cast("long"), spec.max_len or 1)
            value = F.when(own[0] != 0, own).otherwise(F.coalesce(shared, zeros))
        else:
            value = F.when(own != 0, own).otherwise(F.coalesce(shared, F.lit(0).cast("long")))
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
        *[_missing(spec).alias(spec.name) for spec in fields.fields],
        "reason",
        "raw",
    )
    return rows.unionByName(bad)


def _missing(spec: FieldSpec) -> Column:
    if spec.kind == "multi":
        return F.array_repeat(F.lit(0).cast("long"), spec.max_len or 1)
    return F.lit(0).cast("long")


# --- fixture -----------------------------------------------------------------------------

# The first train line of the fixture, pinned so tests can check parsing end to end.
# Its bag 109_14 has 20 entries (more than max_len) with distinct values, 210 has 3.
KNOWN_SAMPLE = {
    "sample_id": "1",
    "common_feature_index": "a0000000000001",
    "item": {"205": "205001", "206": "206001", "207": "207001", "216": "216001", "301": "1"},
    "intentions": [("210001", 1.0), ("210002", 3.0), ("210003", 2.0)],
    "user": {"101": "101001", "121": "121001", "124": "2", "125": "3"},
    "categories": [(str(109000 + k), float(k)) for k in range(1, 21)],
}

_USER_SINGLE = ("121", "122", "124", "125", "126", "127", "128", "129")
_USER_BAGS = ("109_14", "110_14", "127_14", "150_14")


def _entry(field: str, feature_id: str, value: float = 1.0) -> str:
    return f"{field}{FIELD_SEP}{feature_id}{VALUE_SEP}{value:g}"


def _join(entries: list[str]) -> str:
    return FEATURE_SEP.join(entries)


def _user_line(rng: random.Random, index: str, user: int) -> str:
    entries = [_entry("101", str(101000 + user))]
    entries += [_entry(f, str(rng.randrange(1, 9))) for f in _USER_SINGLE]
    for bag in _USER_BAGS:
        for _ in range(rng.randrange(0, 21)):
            entries.append(_entry(bag, str(rng.randrange(1, 500)), rng.randrange(1, 50) / 10))
    return f"{index},{len(entries)},{_join(entries)}"


def _sample_line(rng: random.Random, sample_id: int, index: str, user: int) -> str:
    item = rng.randrange(1, 300)
    entries = [
        _entry("205", str(205000 + item)),
        _entry("206", str(206000 + item % 40)),
        _entry("207", str(207000 + item % 90)),
        _entry("216", str(216000 + item % 70)),
        _entry("301", str(rng.randrange(1, 4))),
        _entry("508", str(rng.randrange(1, 1000)), rng.randrange(1, 9) / 2),
        _entry("509", str(rng.randrange(1, 1000)), rng.randrange(1, 9) / 2),
        _entry("702", str(rng.randrange(1, 1000)), rng.randrange(1, 9) / 2),
    ]
    for _ in range(rng.randrange(1, 4)):
        node = rng.randrange(1, 200)
        entries.append(_entry("210", str(210000 + node)))
        entries.append(_entry("853", str(853000 + node), rng.randrange(1, 9) / 2))
    # Labels with some signal (item and user groups), so AUCs are measurable.
    click = int(rng.random() < (0.35 if item % 3 == 0 else 0.12))
    buy = int(click == 1 and rng.random() < (0.4 if user % 2 == 0 else 0.12))
    return f"{sample_id},{click},{buy},{index},{len(entries)},{_join(entries)}"


def _known_lines() -> tuple[str, str]:
    k = KNOWN_SAMPLE
    item = [_entry(f, v) for f, v in k["item"].items()]
    item += [_entry("210", i, v) for i, v in k["intentions"]]
    skeleton = f"{k['sample_id']},1,1,{k['common_feature_index']},{len(item)},{_join(item)}"
    user = [_entry(f, v) for f, v in k["user"].items()]
    user += [_entry("109_14", i, v) for i, v in k["categories"]]
    common = f"{k['common_feature_index']},{len(user)},{_join(user)}"
    return skeleton, common


def write_fixture(
    folder: str | Path, seed: int = 7, train_samples: int = 3000, test_samples: int = 1500
) -> dict[str, dict[str, int]]:
    """Write a small Ali-CCP raw dataset (the four files) in exactly the raw format.

    Per split: ``samples`` skeleton lines over 120 users' common features, one user index
    used by ~30 % of the lines (a hot key, as in the real data), multi-valued bags longer than
    their ``max_len``, and the dirt each quarantine reason needs: a line with 5 columns, a
    non-integer click, a buy without click, an unknown common-feature index, a bad feature
    entry, a wrong feature_num; in the common file a malformed line and a duplicate index.
    The first train line is :data:`KNOWN_SAMPLE`. Deterministic for a given ``seed``.

    Returns:
        ``{split: {"skeleton_lines": n, "common_lines": m}}``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {}
    for split, samples in (("train", train_samples), ("test", test_samples)):
        rng = random.Random(f"{seed}-{split}")
        indexes = [f"{split[:2]}{rng.getrandbits(48):012x}" for _ in range(120)]
        common = [_user_line(rng, index, user) for user, index in enumerate(indexes)]
        common.append(common[5])  # a duplicate index (identical copy)
        common.append(f"{indexes[0]}-broken,7")  # two columns
        skeleton = []
        if split == "train":
            known_skeleton, known_common = _known_lines()
            skeleton.append(known_skeleton)
            common.insert(0, known_common)
        base = 1 if split == "train" else 10_000_001
        for n in range(len(skeleton), samples):
            user = 0 if rng.random() < 0.3 else rng.randrange(len(indexes))
            skeleton.append(_sample_line(rng, base + n, indexes[user], user))
        good = _sample_line(rng, 0, indexes[1], 1).split(",", 1)[1]  # a valid tail to damage
        click, buy, index, num, features = good.split(",")
        dirt = [
            f"{base + samples},{click},{buy},{index},{num}",  # 5 columns
            f"{base + samples + 1},yes,0,{index},{num},{features}",  # non-integer click
            f"{base + samples + 2},0,1,{index},{num},{features}",  # buy without click
            f"{base + samples + 3},{click},{buy},ffffffffffffff,{num},{features}",  # unknown key
            f"{base + samples + 4},{click},{buy},{index},{int(num) + 1},"
            f"{features}{FEATURE_SEP}205{FIELD_SEP}oops",  # bad entry
            f"{base + samples + 5},{click},{buy},{index},{int(num) + 3},{features}",  # bad count
        ]
        # Spread the dirt through the file instead of leaving it at the end.
        for offset, line in enumerate(dirt):
            skeleton.insert(rng.randrange(1, len(skeleton)) + offset, line)
        (folder / f"{SKELETON}_{split}.csv").write_text("\n".join(skeleton) + "\n")
        (folder / f"{COMMON}_{split}.csv").write_text("\n".join(common) + "\n")
        counts[split] = {"skeleton_lines": len(skeleton), "common_lines": len(common)}
    return counts


# --- one split, end to end ---------------------------------------------------------------


class AccountingError(Exception):
    """Input lines are not all accounted for: the split is not published."""


@dataclass(frozen=True)
class SplitResult:
    """What the ingestion of one split wrote."""

    split: str
    table_path: str
    quarantine_path: str
    stats_path: str
    stats: dict[str, Any]


def _log_counts(input_rows: int, output: int, reasons: dict[str, int], dedup: int) -> dict:
    return {
        "input": input_rows,
        "output": output,
        "quarantined": sum(reasons.values()),
        "quarantined_by": dict(sorted(reasons.items())),
        "deduplicated": dedup,
        "deduplicated_by": {Reason.DUPLICATE_COMMON_FEATURE: dedup} if dedup else {},
    }


def conservation_problems(split_stats: dict[str, Any]) -> list[str]:
    """Every violated accounting rule of a split's stats (empty when all hold).

    Rules: per file, input = output + quarantined + deduplicated; the table has one row per
    skeleton output; no conversion without a click.
    """
    problems = []
    for log, c in split_stats["logs"].items():
        if c["input"] != c["output"] + c["quarantined"] + c["deduplicated"]:
            problems.append(
                f"{log}: input {c['input']} != output {c['output']} + quarantined "
                f"{c['quarantined']} + deduplicated {c['deduplicated']}"
            )
    table = split_stats["table"]
    if split_stats["logs"][SKELETON]["output"] != table["rows"]:
        problems.append(
            f"{SKELETON}: output {split_stats['logs'][SKELETON]['output']} != {table['rows']} "
            "rows in the table"
        )
    if table["conversion_without_click"]:
        problems.append(f"{table['conversion_without_click']} rows convert without a click")
    return problems


def ingest_split(
    spark: SparkSession,
    input_dir: str,
    out: str,
    split: str,
    fields: FieldsConfig,
    rows_per_row_group: int = 100_000,
    min_row_groups: int = 4,
) -> SplitResult:
    """Parse, join, check and publish one split as ``<out>/dt=<split>/``.

    Also writes ``<out>/_quarantine/dt=<split>/log=<file>/`` (``reason``, ``raw``) and
    ``<out>/_stats/dt=<split>.json``; the table is published last, only when the accounting
    check passes.

    Raises:
        AccountingError: some input line is not accounted for (nothing is published).
    """
    out = out.rstrip("/")
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

    run = f"{out}/_tmp/{split}-{uuid.uuid4().hex[:8]}"
    files = max(min_row_groups, math.ceil(skeleton_out / rows_per_row_group))
    table = rows.where(F.col("reason").isNull()).drop("reason", "raw")
    (
        table.repartition(files, IMPRESSION_ID)
        .write.option("maxRecordsPerFile", rows_per_row_group)
        .mode("overwrite")
        .parquet(f"{run}/table")
    )
    split_stats: dict[str, Any] = {
        "dt": split,
        "logs": {
            SKELETON: _log_counts(skeleton_input, skeleton_out, by_reason, 0),
            COMMON: _log_counts(
                common_input, common_out[0], common_reasons, int(common_out[1] or 0)
            ),
        },
        "table": stats.table_stats(
            spark.read.parquet(f"{run}/table").agg(*stats.table_metrics(fields)).first().asDict(),
            fields,
        ),
        "inputs": {SKELETON: skeleton_path, COMMON: common_path},
    }
    problems = conservation_problems(split_stats)
    if problems:
        io.delete(spark, run)
        raise AccountingError(f"{split}: " + "; ".join(problems))
    quarantine = rows.where(F.col("reason").isNotNull()).select(
        F.lit(SKELETON).alias("log"), "reason", "raw"
    )
    quarantine = quarantine.unionByName(
        common_parsed.where(F.col("reason").isNotNull()).select(
            F.lit(COMMON).alias("log"), "reason", "raw"
        )
    )
    quarantine.write.mode("overwrite").partitionBy("log").parquet(f"{run}/quarantine")
    io.write_text(spark, f"{run}/stats.json", json.dumps(split_stats, indent=2, sort_keys=True))

    paths = io.publish_partition(spark, run, out, split)
    result = SplitResult(
        split=split,
        table_path=paths.table,
        quarantine_path=paths.quarantine,
        stats_path=paths.stats,
        stats=split_stats,
    )
    for frame in (rows, common, common_parsed):
        frame.unpersist()
    return result
