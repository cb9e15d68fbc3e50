"""The feature job: join, attribution, quarantine and hashing rules, and the real job end to end.

Unit tests write a handful of raw JSON lines to a temp folder, read them with
:func:`features.raw.read_log` (the job's reader) and run the pure transforms of
:mod:`features.transforms` on them; the integration tests simulate two days
with the ``tiny`` preset and run ``jobs/build_features.py``'s ``run`` on the shared session,
and one bad-argument run goes through the real ``spark-submit``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from contract import commands
from contract.config import load_config
from contract.fields import FieldsConfig, FieldSpec
from features import stats, transforms
from features.config import AttributionConfig, FeaturesConfig
from features.raw import count_lines, read_log
from features.transforms import DEDUPLICATED, OUTPUT, QUARANTINED, Reason
from tests.helpers import VENV_BIN, built_partition, run_command

# One shuffle partition and no code generation for the whole module (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("small_data_spark")

ROOT = Path(__file__).resolve().parents[1]
DAY = "2024-03-10"
NEXT = "2024-03-11"
BEFORE = "2024-03-09"
T0 = 1710028800  # 2024-03-10T00:00:00Z
HORIZON = 3
CLICK_WINDOW = 3600
CONVERSION_WINDOW = 86400


@pytest.fixture(scope="module", autouse=True)
def _lines_root(tmp_path_factory):
    """Where :func:`_read` writes its folders (one module-wide temp dir)."""
    global LINES_ROOT
    LINES_ROOT = tmp_path_factory.mktemp("lines")


LINES_ROOT: Path


def _read(spark, log, rows):
    """``[(folder_dt, record-or-raw-string)]`` → written as ``dt=`` folders of JSON lines and
    read back with the job's reader."""
    folders: dict[str, list[str]] = {}
    for day, record in rows:
        text = record if isinstance(record, str) else json.dumps(record)
        folders.setdefault(day, []).append(text)
    root = Path(tempfile.mkdtemp(dir=LINES_ROOT))
    paths = {}
    for day, lines in folders.items():
        path = root / log / f"dt={day}"
        path.mkdir(parents=True)
        (path / "part-0.txt").write_text("\n".join(lines) + "\n")
        paths[day] = str(path)
    return read_log(spark, paths, log)


def _imp(impression_id, ts=T0 + 100, user="u1", item="i1"):
    return {
        "impression_id": impression_id,
        "ts": ts,
        "user_id": user,
        "item_id": item,
        "position": 1,
        "hour": 0,
        "device": "ios",
    }


def _attribute(spark, impressions, clicks=(), conversions=(), lookback=()):
    """Run the attribution transforms for DAY; returns (valid, quarantined, clicks, conversions)."""
    parsed = _read(spark, "impressions", [(DAY, r) for r in impressions])
    valid, quarantined = transforms.classify_impressions(parsed)
    before = None
    if lookback:
        before = transforms.valid_ids(_read(spark, "impressions", list(lookback)))
    click_lines = _read(spark, "clicks", list(clicks))
    click_records = transforms.attribute_clicks(
        click_lines,
        transforms.impression_lookup(valid, DAY, before, click_lines),
        DAY,
        HORIZON,
        CLICK_WINDOW,
    )
    conversion_records = transforms.attribute_conversions(
        _read(spark, "conversions", list(conversions)),
        click_records,
        DAY,
        HORIZON,
        CONVERSION_WINDOW,
    )
    return valid, quarantined, click_records, conversion_records


def _status(records, id_column):
    """``{event id: (owned, status, reason)}`` (the first row per id, for readable asserts)."""
    rows = records.orderBy("status", "reason").collect()
    out: dict = {}
    for r in rows:
        out.setdefault(r[id_column], (r["owned"], r["status"], r["reason"]))
    return out


# --- impressions -------------------------------------------------------------------------


def test_malformed_impression_line_is_quarantined(spark):
    valid, quarantined, _, _ = _attribute(spark, [_imp("a"), '{"impression_id": "b", "ts"'])
    assert [r.impression_id for r in valid.collect()] == ["a"]
    assert [(r.reason, r.raw) for r in quarantined.collect()] == [
        (Reason.MALFORMED, '{"impression_id": "b", "ts"')
    ]


def test_impression_without_id_or_time_is_quarantined_as_missing_key(spark):
    _, quarantined, _, _ = _attribute(spark, [_imp(None), _imp("x", ts=None), _imp("ok")])
    assert sorted(r.reason for r in quarantined.collect()) == [Reason.MISSING_KEY] * 2


def _ranked(spark, records, partitions=3):
    return transforms.rank_impressions(
        _read(spark, "impressions", [(DAY, r) for r in records]), partitions
    )


def test_duplicate_impression_is_deduplicated(spark):
    copies = [_imp("a", ts=T0 + 7, item="late"), _imp("a", ts=T0 + 5, item="early"), _imp("b")]
    ranked = _ranked(spark, [*copies, '{"impression_id": "a", "ts"', _imp("a", ts=None)])
    kept = {
        r.impression_id: r.item_id for r in transforms.deduplicate_impressions(ranked).collect()
    }
    assert kept == {"a": "early", "b": "i1"}  # the copy with the smallest (ts, ...) wins
    metrics = ranked.agg(*stats.impression_metrics()).first().asDict()
    counts = stats.impression_counts(metrics, lines=5)
    assert (counts["output"], counts["deduplicated"], counts["quarantined"]) == (2, 1, 2)
    assert counts["quarantined_by"] == {Reason.MALFORMED: 1, Reason.MISSING_KEY: 1}
    assert counts["unclassified"] == 0 and counts["records"] == 5


def test_a_line_the_parser_did_not_return_fails_the_accounting():
    metrics = {"records": 4, "output": 3, "deduplicated": 1, Reason.MALFORMED: 0, "missing_key": 0}
    counts = stats.impression_counts(metrics, lines=5)
    log = {"input": 5, "output": 3, "quarantined": 0, "deduplicated": 1, "unclassified": 0}
    assert {k: counts[k] for k in log} == log
    table = {"rows": 3, "clicks": 0, "conversions": 0, "conversion_without_click": 0}
    zero = {"input": 0, "output": 0, "quarantined": 0, "deduplicated": 0, "unclassified": 0}
    day = {"logs": {"impressions": counts, "clicks": zero, "conversions": zero}, "table": table}
    (problem,) = stats.conservation_problems(day)
    assert problem.startswith("impressions: input 5 != output 3")


def test_deduplicated_impressions_are_partitioned_by_id_in_a_deterministic_order(spark):
    ids = [f"imp-{i:03d}" for i in range(40)]
    ranked = _ranked(spark, [_imp(i) for i in reversed(ids)] + [_imp("imp-007")], partitions=4)
    # both copies of imp-007 meet in one partition, where the window numbers them 1 and 2
    copies = ranked.rdd.glom().map(
        lambda rows: [r.copy for r in rows if r.impression_id == "imp-007"]
    )
    assert [sorted(part) for part in copies.collect() if part] == [[1, 2]]
    deduplicated = transforms.deduplicate_impressions(ranked)
    assert deduplicated.rdd.getNumPartitions() == 4
    parts = deduplicated.rdd.glom().map(lambda rows: [r.impression_id for r in rows]).collect()
    assert sorted(i for part in parts for i in part) == ids
    again = _ranked(spark, [_imp(i) for i in ids] + [_imp("imp-007")], partitions=4)
    assert (
        transforms.deduplicate_impressions(again)
        .rdd.glom()
        .map(lambda rows: [r.impression_id for r in rows])
        .collect()
        == parts
    )


def test_reader_flags_every_kind_of_bad_line_and_counts_lines(spark, tmp_path):
    folder = tmp_path / "impressions" / f"dt={DAY}"
    folder.mkdir(parents=True)
    lines = [
        json.dumps(_imp("ok")),
        '{"impression_id": "cut", "ts"',  # truncated
        "",  # blank
        "   ",  # blank
        "\t ",  # blank (a tab: the JSON reader skips it too)
        "not json",
        "42",  # JSON, not an object
        json.dumps({**_imp("typed"), "ts": "yesterday"}),  # wrong type
        json.dumps({"ts": T0}),  # parses, key missing: not malformed
    ]
    (folder / "part-0.txt").write_text("\n".join(lines) + "\n")
    rows = read_log(spark, {DAY: str(folder)}, "impressions").collect()
    assert count_lines(spark, str(folder)) == (len(lines), 3) and len(rows) == len(lines)
    without_blank = read_log(spark, {DAY: str(folder)}, "impressions", blank_lines=False)
    assert without_blank.count() == len(lines) - 3
    blank = [r for r in rows if r.raw is not None and r.raw.strip() == ""]
    assert sorted(r.raw for r in blank) == ["", "\t ", "   "] and all(r.malformed for r in blank)
    malformed = sorted(r.raw for r in rows if r.malformed)
    assert malformed == sorted(lines[1:8])
    assert {r.impression_id for r in rows if not r.malformed} == {"ok", None}
    assert all(r.folder_dt == DAY for r in rows)


def test_quarantined_record_keeps_its_line_or_its_parsed_fields(spark):
    _, quarantined, _, _ = _attribute(spark, ['{"impression_id": "b", "ts"', {"ts": T0}])
    raws = {r.raw for r in quarantined.collect()}
    assert raws == {'{"impression_id": "b", "ts"', json.dumps({"ts": T0}, separators=(",", ":"))}


# --- clicks ------------------------------------------------------------------------------


def test_click_in_window_is_joined(spark):
    _, _, clicks, _ = _attribute(
        spark, [_imp("a")], clicks=[(DAY, {"click_id": "c", "impression_id": "a", "ts": T0 + 160})]
    )
    assert _status(clicks, "click_id") == {"c": (True, OUTPUT, None)}


def test_duplicate_click_is_deduplicated(spark):
    click = {"click_id": "c", "impression_id": "a", "ts": T0 + 160}
    _, _, clicks, _ = _attribute(spark, [_imp("a")], clicks=[(DAY, click), (DAY, click)])
    statuses = sorted((r.status, r.reason) for r in clicks.collect())
    assert statuses == [(DEDUPLICATED, Reason.DUPLICATE_EVENT), (OUTPUT, None)]


def test_second_click_on_an_impression_counts_once(spark):
    _, _, clicks, _ = _attribute(
        spark,
        [_imp("a")],
        clicks=[
            (DAY, {"click_id": "c1", "impression_id": "a", "ts": T0 + 160}),
            (DAY, {"click_id": "c2", "impression_id": "a", "ts": T0 + 170}),
        ],
    )
    assert _status(clicks, "click_id") == {
        "c1": (True, OUTPUT, None),
        "c2": (True, DEDUPLICATED, Reason.REPEAT_CLICK),
    }


def test_click_for_unknown_impression_is_quarantined(spark):
    _, _, clicks, _ = _attribute(
        spark,
        [_imp("a")],
        clicks=[(DAY, {"click_id": "c", "impression_id": "ghost", "ts": T0 + 160})],
    )
    assert _status(clicks, "click_id") == {"c": (True, QUARANTINED, Reason.UNKNOWN_IMPRESSION)}


def test_click_before_its_impression_is_quarantined(spark):
    _, _, clicks, _ = _attribute(
        spark, [_imp("a")], clicks=[(DAY, {"click_id": "c", "impression_id": "a", "ts": T0 + 50})]
    )
    assert _status(clicks, "click_id") == {"c": (True, QUARANTINED, Reason.CLICK_BEFORE_IMPRESSION)}


def test_click_outside_attribution_window_is_quarantined(spark):
    late_ts = T0 + 100 + CLICK_WINDOW + 1
    _, _, clicks, _ = _attribute(
        spark, [_imp("a")], clicks=[(DAY, {"click_id": "c", "impression_id": "a", "ts": late_ts})]
    )
    assert _status(clicks, "click_id") == {"c": (True, QUARANTINED, Reason.OUTSIDE_WINDOW)}


def test_click_without_impression_id_is_quarantined_as_missing_key(spark):
    _, _, clicks, _ = _attribute(spark, [_imp("a")], clicks=[(DAY, {"click_id": "c", "ts": T0})])
    assert _status(clicks, "click_id") == {"c": (True, QUARANTINED, Reason.MISSING_KEY)}


def test_late_click_in_next_days_folder_is_attributed_to_its_impression_day(spark):
    _, _, clicks, _ = _attribute(
        spark, [_imp("a")], clicks=[(NEXT, {"click_id": "c", "impression_id": "a", "ts": T0 + 160})]
    )
    assert _status(clicks, "click_id") == {"c": (True, OUTPUT, None)}


def test_orphan_click_in_next_days_folder_is_left_to_that_days_build(spark):
    _, _, clicks, _ = _attribute(
        spark, [_imp("a")], clicks=[(NEXT, {"click_id": "c", "impression_id": "ghost", "ts": T0})]
    )
    assert _status(clicks, "click_id") == {"c": (False, None, None)}


def test_click_on_previous_days_impression_is_left_to_that_days_build(spark):
    _, _, clicks, _ = _attribute(
        spark,
        [_imp("a")],
        clicks=[(DAY, {"click_id": "c", "impression_id": "old", "ts": T0 + 10})],
        lookback=[(BEFORE, _imp("old", ts=T0 - 60))],
    )
    assert _status(clicks, "click_id") == {"c": (False, None, None)}


def test_click_on_an_id_repeated_across_days_is_owned_by_its_day_within_reach(spark):
    # "rep" was shown 3 days before DAY and again on DAY; its click lands in NEXT's folder, 4
    # days after the first showing: out of reach of that day, so DAY's build owns it (the
    # builds of NEXT and of 3 days before see the same parent day and leave it alone).
    _, _, clicks, _ = _attribute(
        spark,
        [_imp("rep")],
        clicks=[(NEXT, {"click_id": "c", "impression_id": "rep", "ts": T0 + 200})],
        lookback=[("2024-03-07", _imp("rep", ts=T0 - 3 * 86400))],
    )
    assert _status(clicks, "click_id") == {"c": (True, OUTPUT, None)}


# --- conversions -------------------------------------------------------------------------


def _funnel(spark, conversion, click_ts=T0 + 160, folder=DAY):
    return _attribute(
        spark,
        [_imp("a"), _imp("b")],
        clicks=[(DAY, {"click_id": "c", "impression_id": "a", "ts": click_ts})],
        conversions=[(folder, conversion)],
    )


def test_conversion_after_its_click_is_joined(spark):
    _, _, _, conversions = _funnel(spark, {"conversion_id": "v", "click_id": "c", "ts": T0 + 999})
    assert _status(conversions, "conversion_id") == {"v": (True, OUTPUT, None)}


def test_conversion_before_its_click_is_quarantined(spark):
    _, _, _, conversions = _funnel(spark, {"conversion_id": "v", "click_id": "c", "ts": T0 + 150})
    assert _status(conversions, "conversion_id") == {
        "v": (True, QUARANTINED, Reason.CONVERSION_BEFORE_CLICK)
    }


def test_conversion_outside_attribution_window_is_quarantined(spark):
    ts = T0 + 160 + CONVERSION_WINDOW + 1
    _, _, _, conversions = _funnel(
        spark, {"conversion_id": "v", "click_id": "c", "ts": ts}, folder=NEXT
    )
    assert _status(conversions, "conversion_id") == {
        "v": (True, QUARANTINED, Reason.OUTSIDE_WINDOW)
    }


def test_conversion_for_unknown_click_is_quarantined(spark):
    _, _, _, conversions = _funnel(
        spark, {"conversion_id": "v", "click_id": "ghost", "ts": T0 + 999}
    )
    assert _status(conversions, "conversion_id") == {"v": (True, QUARANTINED, Reason.UNKNOWN_CLICK)}


def test_conversion_of_a_quarantined_click_is_quarantined(spark):
    late_click = T0 + 100 + CLICK_WINDOW + 5
    _, _, _, conversions = _funnel(
        spark, {"conversion_id": "v", "click_id": "c", "ts": late_click + 10}, click_ts=late_click
    )
    assert _status(conversions, "conversion_id") == {
        "v": (True, QUARANTINED, Reason.CLICK_NOT_ATTRIBUTED)
    }


def test_duplicate_conversion_is_deduplicated(spark):
    conversion = {"conversion_id": "v", "click_id": "c", "ts": T0 + 999}
    _, _, _, conversions = _attribute(
        spark,
        [_imp("a")],
        clicks=[(DAY, {"click_id": "c", "impression_id": "a", "ts": T0 + 160})],
        conversions=[(DAY, conversion), (NEXT, conversion)],
    )
    statuses = sorted((r.status, r.reason) for r in conversions.collect())
    assert statuses == [(DEDUPLICATED, Reason.DUPLICATE_EVENT), (OUTPUT, None)]


def test_conversion_never_set_without_click(spark):
    valid, _, clicks, conversions = _attribute(
        spark,
        [_imp("a"), _imp("b")],
        clicks=[
            (DAY, {"click_id": "c", "impression_id": "a", "ts": T0 + 160}),
            (DAY, {"click_id": "late", "impression_id": "b", "ts": T0 + 100 + CLICK_WINDOW + 9}),
        ],
        conversions=[
            (DAY, {"conversion_id": "v", "click_id": "c", "ts": T0 + 999}),
            (DAY, {"conversion_id": "w", "click_id": "late", "ts": T0 + CLICK_WINDOW + 999}),
        ],
    )
    labels = {
        r.impression_id: (r.click, r.conversion)
        for r in transforms.label_impressions(valid, clicks, conversions).collect()
    }
    assert labels == {"a": (1, 1), "b": (0, 0)}


# --- ids ---------------------------------------------------------------------------------


def test_hash_ids_are_stable_and_in_range(spark):
    values = spark.createDataFrame([("x",), ("y",), (None,), ("x",)], "v string")
    ids = [
        r.id for r in values.select(transforms.hash_id(F.col("v"), "f", 10).alias("id")).collect()
    ]
    assert ids[0] == ids[3]
    assert ids[2] == 0
    assert all(1 <= i <= 9 for i in (ids[0], ids[1], ids[3]))
    # Same value, other field: a different hash stream, so (almost surely) another id.
    other = values.select(transforms.hash_id(F.col("v"), "g", 1 << 30).alias("id")).first().id
    again = values.select(transforms.hash_id(F.col("v"), "f", 1 << 30).alias("id")).first().id
    assert other != again
    # Pinned value: the mapping must never change across releases (train/serve skew).
    pinned = spark.range(1).select(transforms.hash_id(F.lit("u1"), "user_id", 400000).alias("id"))
    assert (
        pinned.first().id
        == spark.range(1)
        .select(
            (F.lit(1) + F.pmod(F.xxhash64(F.lit("user_id"), F.lit("u1")), F.lit(399999))).alias(
                "id"
            )
        )
        .first()
        .id
    )


def test_multi_valued_field_is_padded_to_max_len(spark):
    bags = spark.createDataFrame(
        [(["a", "b"],), ([str(i) for i in range(12)],), ([],), (None,), (["a", None],)],
        "bag array<string>",
    )
    rows = [
        r.ids
        for r in bags.select(transforms.hash_bag(F.col("bag"), "f", 100, 8).alias("ids")).collect()
    ]
    assert all(len(r) == 8 for r in rows)
    assert rows[0][2:] == [0] * 6 and all(i > 0 for i in rows[0][:2])
    assert all(i > 0 for i in rows[1])  # 12 values truncated to 8
    assert rows[2] == [0] * 8 and rows[3] == [0] * 8
    assert rows[4][0] == rows[0][0] and rows[4][1] == 0


def test_user_missing_from_snapshot_gets_id_zero(spark):
    fields = FieldsConfig(
        fields=[
            FieldSpec(name="user_id", kind="single", source="users.user_id", num_buckets=100),
            FieldSpec(name="bag", kind="multi", source="users.bag", num_buckets=100, max_len=3),
            FieldSpec(name="device", kind="single", source="impressions.device", num_buckets=8),
        ]
    )
    users = spark.createDataFrame([("u1", ["a"])], "user_id string, bag array<string>")
    impressions = spark.createDataFrame(
        [("a", "u1", "ios", 1, 0), ("b", "u2", "pc", 0, 0), ("c", None, None, 0, 0)],
        "impression_id string, user_id string, device string, click int, conversion int",
    )
    hashed = transforms.hash_profile(users, "users", "user_id", fields)
    table = transforms.encode_features(impressions, {"users": (hashed, "user_id")}, fields)
    rows = {r.impression_id: r for r in table.collect()}
    assert rows["a"].user_id > 0 and rows["a"].bag[0] > 0
    assert rows["b"].user_id == 0 and rows["b"].bag == [0, 0, 0] and rows["b"].device > 0
    assert rows["c"].user_id == 0 and rows["c"].device == 0
    assert table.columns == ["impression_id", "click", "conversion", "user_id", "bag", "device"]


# --- accounting and config ---------------------------------------------------------------


def _stats(clicks_input: int) -> dict:
    log = {"input": 10, "output": 7, "quarantined": 2, "deduplicated": 1, "unclassified": 0}
    table = {"rows": 7, "clicks": 7, "conversions": 7, "conversion_without_click": 0}
    return {
        "logs": {"impressions": log, "clicks": {**log, "input": clicks_input}, "conversions": log},
        "table": table,
    }


def test_conservation_check_flags_an_unaccounted_record():
    assert stats.conservation_problems(_stats(10)) == []
    problems = stats.conservation_problems(_stats(11))
    assert len(problems) == 1 and problems[0].startswith("clicks: input 11")


def test_horizon_covers_both_windows_and_late_arrivals():
    assert (
        AttributionConfig(
            click_window_s=3600, conversion_window_s=86400, late_arrival_days=1
        ).horizon_days
        == 3
    )
    assert (
        AttributionConfig(
            click_window_s=60, conversion_window_s=600, late_arrival_days=0
        ).horizon_days
        == 1
    )


# --- integration -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_built_days(raw_logs, built_features):
    """Two simulated tiny days (dirt at non-zero rates) built by the job's ``run`` on the
    shared session (tests/conftest.py); read-only."""
    from features.config import SimulatorConfig

    preset = load_config(ROOT / "conf/simulator.yaml", SimulatorConfig).preset("tiny")
    assert all(rate > 0 for rate in preset.dirt.model_dump().values())
    raw = raw_logs("tiny", "2024-01-01", 2, 7)
    return raw, built_features(raw, "2024-01-01", "2024-01-02")


def _build_args(raw, out, day: str):
    from jobs import build_features

    return build_features.parse_args(["--raw", str(raw), "--out", str(out), "--date", day])


@pytest.mark.integration
def test_job_accounts_for_every_raw_line_across_days(two_built_days):
    raw, out = two_built_days
    for log in ("impressions", "clicks", "conversions"):
        lines = sum(
            len(f.read_text(encoding="utf-8").splitlines()) for f in (raw / log).glob("dt=*/part-*")
        )
        owned = 0
        for day in ("2024-01-01", "2024-01-02"):
            counts = json.loads((out / "_stats" / f"dt={day}.json").read_text())["logs"][log]
            assert (
                counts["input"] == counts["output"] + counts["quarantined"] + counts["deduplicated"]
            )
            owned += counts["input"]
        # Every line of every folder (late ones included) is counted by exactly one day.
        assert owned == lines, log


@pytest.mark.integration
def test_labels_equal_the_oracle_and_never_convert_without_click(two_built_days):
    import pyarrow.dataset as ds

    raw, out = two_built_days
    table = ds.dataset(str(out), format="parquet", partitioning="hive").to_table().to_pandas()
    oracle = (
        ds.dataset(str(raw / "oracle"), format="parquet", partitioning="hive")
        .to_table()
        .to_pandas()
    )
    merged = table.merge(oracle, on="impression_id", suffixes=("", "_true"))
    assert len(merged) == len(table) == len(oracle)
    assert not ((table.conversion == 1) & (table.click == 0)).any()
    assert (merged.click == merged.click_true).all()
    assert (merged.conversion == merged.click_true * merged.conversion_if_clicked).all()
    assert table.click.sum() > 0 and table.conversion.sum() > 0


def _value_type(arrow_type):
    import pyarrow as pa

    return ("list", arrow_type.value_type) if pa.types.is_list(arrow_type) else arrow_type


@pytest.mark.integration
def test_written_parquet_matches_the_schema_contract_with_enough_row_groups(two_built_days):
    import pyarrow.parquet as pq

    from contract.schema import arrow_schema

    _, out = two_built_days
    fields = load_config(ROOT / "conf/fields.yaml", FieldsConfig)
    expected = arrow_schema(fields)
    for day in ("2024-01-01", "2024-01-02"):
        files = sorted((out / f"dt={day}").glob("*.parquet"))
        row_groups = 0
        for f in files:
            meta = pq.ParquetFile(f)
            row_groups += meta.num_row_groups
            schema = meta.schema_arrow
            assert schema.names == expected.names
            # Spark names a list's value field "element", pyarrow "item": compare value types.
            assert [_value_type(schema.field(n).type) for n in schema.names] == [
                _value_type(expected.field(n).type) for n in expected.names
            ]
        assert row_groups >= 4
        lengths = pq.read_table(files[0], columns=["user_recent_categories"]).column(0).to_pylist()
        assert {len(bag) for bag in lengths} == {8}


@pytest.mark.integration
def test_rerunning_a_day_replaces_it_with_identical_rows(two_built_days, spark, tmp_path):
    import shutil

    import pyarrow.dataset as ds

    from jobs import build_features

    raw, built = two_built_days
    out = tmp_path / "features"
    shutil.copytree(built, out)  # the shared table stays as built
    day_dir = out / "dt=2024-01-01"
    before = ds.dataset(str(day_dir), format="parquet").to_table().to_pandas()
    files_before = sorted(p.name for p in day_dir.glob("*.parquet"))
    lines = []
    build_features.run(
        spark,
        _build_args(raw, out, "2024-01-01"),
        on_day=lambda result, seconds: lines.append(build_features.summary_line(result, seconds)),
    )
    (line,) = lines
    assert line.startswith(f"build_features.py: 2024-01-01: {len(before)} rows (CTR ")
    assert f"→ {day_dir}; impressions in=" in line
    after = ds.dataset(str(day_dir), format="parquet").to_table().to_pandas()
    key = "impression_id"
    assert (
        before.sort_values(key)
        .reset_index(drop=True)
        .equals(after.sort_values(key).reset_index(drop=True))
    )
    # A one-day run of day 1 equals the two-day run's day 1: stats and quarantine too.
    assert built_partition(out, "2024-01-01")[1:] == built_partition(built, "2024-01-01")[1:]
    assert sorted(p.name for p in day_dir.glob("*.parquet")) != files_before  # really rewritten
    assert not list((out / "_tmp").glob("*"))  # nothing staged is left behind
    assert (out / "dt=2024-01-02").is_dir()  # the other day is untouched


@pytest.mark.integration
def test_a_multi_day_build_equals_single_day_builds_row_for_row(two_built_days, spark, tmp_path):
    import shutil

    from jobs import build_features

    raw, built = two_built_days  # one run over both days
    # Day 2 on its own after day 1 was published (day 1 on its own: the rerun test below)...
    after_day_1, alone = tmp_path / "after-day-1", tmp_path / "alone"
    shutil.copytree(built, after_day_1)
    shutil.rmtree(after_day_1 / "dt=2024-01-02")
    shutil.rmtree(after_day_1 / "_quarantine" / "dt=2024-01-02")
    (after_day_1 / "_stats" / "dt=2024-01-02.json").unlink()
    build_features.run(spark, _build_args(raw, after_day_1, "2024-01-02"))
    # ...and with nothing published before it: its look-back ids come from the raw logs.
    build_features.run(spark, _build_args(raw, alone, "2024-01-02"))
    want_rows, want_stats, want_records, want_sources = built_partition(built, "2024-01-02")
    # The multi-day run read day 1's ids from the table it had just published.
    assert want_sources == {"2024-01-01": "table"}
    for out, lookback in ((after_day_1, "table"), (alone, "raw")):
        rows, day_stats, records, sources = built_partition(out, "2024-01-02")
        assert rows.equals(want_rows), out.name
        assert day_stats == want_stats and records == want_records, out.name
        assert sources == {"2024-01-01": lookback}


@pytest.mark.integration
def test_blank_lines_in_a_day_are_quarantined_with_their_text(two_built_days, spark, tmp_path):
    import shutil

    from features.pipeline import build_day

    raw, out = two_built_days
    copy = tmp_path / "raw"
    shutil.copytree(raw, copy)
    day = "2024-01-01"
    (copy / "impressions" / f"dt={day}" / "part-blank.txt").write_text("\n  \n\t\n")
    config = load_config(ROOT / "conf/features.yaml", FeaturesConfig)
    fields = load_config(ROOT / "conf/fields.yaml", FieldsConfig)
    before = json.loads((out / "_stats" / f"dt={day}.json").read_text())["logs"]["impressions"]
    result = build_day(spark, str(copy), str(tmp_path / "out"), day, config, fields)
    after = result.stats["logs"]["impressions"]
    assert after["input"] == before["input"] + 3 and after["output"] == before["output"]
    malformed = Reason.MALFORMED
    assert after["quarantined_by"][malformed] == before["quarantined_by"].get(malformed, 0) + 3
    quarantine = spark.read.parquet(result.quarantine_path).where(F.col("log") == "impressions")
    assert {"", "  ", "\t"} <= {r.raw for r in quarantine.select("raw").collect()}


@pytest.mark.integration
def test_bad_date_exits_2_with_one_line(tmp_path):
    args = ["--raw", str(tmp_path), "--out", str(tmp_path / "o"), "--date", "2024-13-01"]
    result = run_command(commands.spark_job(VENV_BIN, "build_features", args))
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        "build_features.py: error: --date '2024-13-01' is not a date of the form YYYY-MM-DD"
    ]
    assert "Traceback" not in result.stderr and "Exception" not in result.stderr


def _main_exit(capsys, *argv: str) -> tuple[int, str]:
    """Run the job's ``main`` in-process (no JVM: these errors come before Spark starts)."""
    from jobs import build_features

    with pytest.raises(SystemExit) as exited:
        build_features.main(list(argv))
    return exited.value.code, capsys.readouterr().err


def test_bad_config_value_exits_2_naming_the_key(tmp_path, capsys):
    code, stderr = _main_exit(
        capsys,
        *("--raw", str(tmp_path), "--out", str(tmp_path / "o"), "--date", "2024-01-05"),
        *("--set", "output.min_row_groups=0"),
    )
    assert code == 2
    assert "output.min_row_groups" in stderr
    assert "Traceback" not in stderr


def test_date_without_impressions_exits_2(tmp_path, capsys):
    (tmp_path / "impressions").mkdir()
    code, stderr = _main_exit(
        capsys, "--raw", str(tmp_path), "--out", str(tmp_path / "o"), "--date", "2024-01-05"
    )
    assert code == 2
    assert "no impressions for 2024-01-05" in stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1
