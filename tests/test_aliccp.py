"""Ali-CCP ingestion: parsing rules, the join with common features, accounting, the publish
path it shares with the daily job, the job itself and one epoch of training on its output.

The raw data is the fixture of :func:`tests.aliccp_fixture.write_fixture` (the exact raw
format, a few thousand lines, one line of dirt per quarantine reason); its first train line is
:data:`tests.aliccp_fixture.KNOWN_SAMPLE`, checked value by value. The fixture is ingested
once per module by ``jobs/ingest_aliccp.py``'s ``run`` on the shared SparkSession; one real
``spark-submit`` smoke test covers the command line, and the argument errors run ``main``
in-process (they must end before Spark starts).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from contract import commands
from contract.config import load_config
from contract.fields import FieldsConfig, FieldSpec
from contract.layout import partition_paths
from contract.schema import SchemaError
from features import aliccp, publish, stats
from features.cli import UsageError
from features.config import OutputConfig
from features.publish import AccountingError, PublishedPartition
from features.transforms import OUTPUT, QUARANTINED, Reason, hash_id
from jobs import ingest_aliccp
from tests.aliccp_fixture import COMMON, KNOWN_SAMPLE, SKELETON, write_fixture
from tests.helpers import VENV_BIN, run_command, sqlite_store

# One shuffle partition and no code generation for the whole module (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("small_data_spark")

ROOT = Path(__file__).resolve().parents[1]
PROG = ingest_aliccp.PROG
FIELDS = load_config(ROOT / "conf/fields_aliccp.yaml", FieldsConfig)
SEED = 7


@dataclass(frozen=True)
class Ingested:
    """The module's ingested fixture: raw files, table root, what ``run`` returned, and the
    session's skew settings before and after the run."""

    raw: Path
    out: Path
    results: list[PublishedPartition]
    settings_before: dict[str, str | None]
    settings_after: dict[str, str | None]


def _skew_settings(spark) -> dict[str, str | None]:
    return {key: spark.conf.get(key, None) for key in ingest_aliccp.SKEW_SETTINGS}


@pytest.fixture(scope="module")
def ingested(small_data_spark, tmp_path_factory) -> Ingested:
    """The fixture's raw files ingested in-process by the job's ``run``, once per module:
    every end-to-end check and the training run read this output."""
    spark = small_data_spark
    root = tmp_path_factory.mktemp("aliccp")
    raw, out = root / "raw", root / "features"
    write_fixture(raw, seed=SEED, train_samples=1600, test_samples=800)
    before = _skew_settings(spark)
    args = ingest_aliccp.parse_args(["--input", str(raw), "--out", str(out)])
    results = ingest_aliccp.run(spark, args)
    return Ingested(raw, out, results, before, _skew_settings(spark))


def _table(out: Path, split: str):
    import pyarrow.dataset as ds

    return ds.dataset(str(out / f"dt={split}"), format="parquet").to_table().to_pandas()


def _ids(spark, wanted: dict[str, list[str]]) -> dict[str, list[int]]:
    """``hash_id`` of raw feature ids per field, as the job must compute them (one query)."""
    frame = spark.range(1).select(
        *[
            F.array(
                *[
                    hash_id(F.lit(raw_id), name, FIELDS.by_name(name).num_buckets)
                    for raw_id in raw_ids
                ]
            ).alias(name)
            for name, raw_ids in wanted.items()
        ]
    )
    return frame.first().asDict()


# --- the job on the fixture, end to end ----------------------------------------------------


@pytest.mark.integration
def test_known_line_has_every_field_hashed_from_its_raw_feature_ids(ingested, spark):
    table = _table(ingested.out, "train").set_index("impression_id")
    row = table.loc[KNOWN_SAMPLE["sample_id"]]
    assert (row.click, row.conversion) == (1, 1)
    singles = {
        f"f{fid}": [raw_id]
        for fid, raw_id in {**KNOWN_SAMPLE["item"], **KNOWN_SAMPLE["user"]}.items()
    }
    # Bags: the ids with the largest values first (ties in line order), padded with 0, and
    # truncated to max_len (20 categories in the raw line, the 16 most frequent kept).
    by_value = sorted(KNOWN_SAMPLE["intentions"], key=lambda iv: -iv[1])
    top = sorted(KNOWN_SAMPLE["categories"], key=lambda iv: -iv[1])[:16]
    expected = _ids(
        spark, {**singles, "f210": [i for i, _ in by_value], "f109_14": [i for i, _ in top]}
    )
    for name in singles:
        assert row[name] == expected[name][0], name
    # Fields absent from both the line and its common features are missing (id 0).
    assert row.f122 == 0 and row.f508 == 0 and list(row.f853) == [0] * 8
    assert list(row.f210) == expected["f210"] + [0] * 5
    assert list(row.f109_14) == expected["f109_14"]
    assert all(i > 0 for i in row.f109_14)


@pytest.mark.integration
def test_every_line_is_accounted_for_in_each_split(ingested):
    raw, out = ingested.raw, ingested.out
    for split in aliccp.SPLITS:
        split_stats = json.loads((out / "_stats" / f"dt={split}.json").read_text())
        for log in (SKELETON, COMMON):
            counts = split_stats["logs"][log]
            lines = len((raw / f"{log}_{split}.csv").read_text().splitlines())
            assert counts["input"] == lines, (split, log)
            assert (
                counts["input"] == counts["output"] + counts["quarantined"] + counts["deduplicated"]
            )
            assert counts["unclassified"] == 0
        assert (
            split_stats["logs"][SKELETON]["output"]
            == split_stats["table"]["rows"]
            == len(_table(out, split))
        )
        assert split_stats["logs"][COMMON]["deduplicated_by"] == {
            Reason.DUPLICATE_COMMON_FEATURE: 1
        }
        assert stats.conservation_problems(split_stats, aliccp.TABLE_OUTPUTS) == []


@pytest.mark.integration
def test_malformed_lines_and_unknown_common_feature_are_quarantined_with_reasons(ingested):
    import pyarrow.dataset as ds

    out = ingested.out
    for split in aliccp.SPLITS:
        quarantine = (
            ds.dataset(str(out / "_quarantine" / f"dt={split}"), partitioning="hive")
            .to_table()
            .to_pandas()
        )
        reasons = sorted(quarantine[quarantine.log == SKELETON].reason)
        assert reasons == sorted(
            [
                Reason.BAD_COLUMN_COUNT,
                Reason.BAD_LABEL,
                Reason.BUY_WITHOUT_CLICK,
                Reason.UNKNOWN_COMMON_FEATURE,
                Reason.BAD_FEATURE_ENTRY,
                Reason.BAD_FEATURE_NUM,
            ]
        )
        unknown = quarantine[quarantine.reason == Reason.UNKNOWN_COMMON_FEATURE].raw.iloc[0]
        assert unknown.split(",")[3] == "ffffffffffffff"
        assert list(quarantine[quarantine.log == COMMON].reason) == [Reason.BAD_COLUMN_COUNT]
        split_stats = json.loads((out / "_stats" / f"dt={split}.json").read_text())
        assert split_stats["logs"][SKELETON]["quarantined_by"][Reason.UNKNOWN_COMMON_FEATURE] == 1


@pytest.mark.integration
def test_train_test_split_is_preserved(ingested):
    raw, out = ingested.raw, ingested.out
    tables = {split: _table(out, split) for split in aliccp.SPLITS}
    for split, table in tables.items():
        raw_ids = {
            line.split(",")[0]
            for line in (raw / f"{SKELETON}_{split}.csv").read_text().splitlines()
        }
        assert set(table.impression_id) <= raw_ids
        assert table.impression_id.is_unique
    assert not set(tables["train"].impression_id) & set(tables["test"].impression_id)
    assert KNOWN_SAMPLE["sample_id"] in set(tables["train"].impression_id)


@pytest.mark.integration
def test_table_matches_the_schema_contract_with_row_groups_for_two_ranks(ingested):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from contract.schema import arrow_schema

    out = ingested.out
    expected = arrow_schema(FIELDS)

    def value_type(t):  # Spark names a list's value field "element", pyarrow "item"
        return ("list", t.value_type) if pa.types.is_list(t) else t

    for split in aliccp.SPLITS:
        row_groups = 0
        for path in sorted((out / f"dt={split}").glob("*.parquet")):
            meta = pq.ParquetFile(path)
            row_groups += meta.num_row_groups
            schema = meta.schema_arrow
            assert schema.names == expected.names
            assert [value_type(schema.field(n).type) for n in schema.names] == [
                value_type(expected.field(n).type) for n in expected.names
            ]
        assert row_groups >= 2, split
        table = _table(out, split)
        for spec in FIELDS.fields:
            if spec.kind == "multi":
                assert set(table[spec.name].map(len)) == {spec.max_len}, spec.name
            ids = table[spec.name].explode() if spec.kind == "multi" else table[spec.name]
            assert ids.between(0, spec.num_buckets - 1).all(), spec.name
        assert not ((table.conversion == 1) & (table.click == 0)).any()
        assert table.click.sum() > 0 and table.conversion.sum() > 0


@pytest.mark.integration
def test_run_returns_each_published_split_and_restores_the_session(ingested):
    out = ingested.out
    assert [r.partition for r in ingested.results] == list(aliccp.SPLITS)
    for result in ingested.results:
        paths = partition_paths(str(out), result.partition)
        assert (result.table_path, result.quarantine_path, result.stats_path) == (
            paths.table,
            paths.quarantine,
            paths.stats,
        )
        assert result.stats == json.loads(Path(result.stats_path).read_text())
    test = ingested.results[1]
    assert ingest_aliccp.summary_line(test, 1.0).startswith("ingest_aliccp.py: test: 800 rows")
    # The skew settings held only during run; nothing staged is left behind.
    assert ingested.settings_after == ingested.settings_before
    assert not list((out / "_tmp").glob("*"))


# --- parsing rules on single lines ---------------------------------------------------------


def _skeleton(spark, *lines: str):
    frame = spark.createDataFrame([(line,) for line in lines], "value string")
    return {r.sample_id: r for r in aliccp.parse_skeleton(frame).collect()}


def test_bad_skeleton_lines_get_the_first_failing_reason(spark):
    entry = "205\x02123\x031.0"
    rows = _skeleton(
        spark,
        f"ok,1,0,k,1,{entry}",
        "cols,1,0,k,1",
        f"label,2,0,k,1,{entry}",
        f"float,1.0,0,k,1,{entry}",
        f"buy,0,1,k,1,{entry}",
        f"nokey,1,0,,1,{entry}",
        "entry,1,0,k,1,205\x02123",
        "nonint,1,0,k,1,205\x02abc\x031",
        f"count,1,0,k,2,{entry}",
        "empty,0,0,k,0,",
    )
    assert {k: r.reason for k, r in rows.items()} == {
        "ok": None,
        "cols": Reason.BAD_COLUMN_COUNT,
        "label": Reason.BAD_LABEL,
        "float": Reason.BAD_LABEL,
        "buy": Reason.BUY_WITHOUT_CLICK,
        "nokey": Reason.MISSING_KEY,
        "entry": Reason.BAD_FEATURE_ENTRY,
        "nonint": Reason.BAD_FEATURE_ENTRY,
        "count": Reason.BAD_FEATURE_NUM,
        "empty": None,
    }
    assert [tuple(f) for f in rows["ok"].features] == [("205", "123", 1.0, 0)]
    assert rows["empty"].features == []


def test_sample_feature_wins_over_common_feature_and_unknown_index_is_quarantined(spark):
    fields = FieldsConfig(
        fields=[
            {"name": "f205", "kind": "single", "source": "aliccp.205", "num_buckets": 1000},
            {"name": "f101", "kind": "single", "source": "aliccp.101", "num_buckets": 1000},
        ]
    )
    lines = [
        "s,0,0,k,2,205\x0211\x031\x01205\x0212\x031",  # 205 twice: the first one counts
        "u,1,0,ghost,1,205\x0211\x031",
    ]
    skeleton = spark.createDataFrame([(line,) for line in lines], "value string")
    common = spark.createDataFrame([("k,2,205\x0299\x031\x01101\x027\x031",)], "value string")
    encoded = aliccp.encode_common_features(aliccp.parse_common_features(common), fields)
    joined = aliccp.join_samples(aliccp.parse_skeleton(skeleton), encoded, fields)
    rows = {r.impression_id: r for r in joined.collect()}
    expected = spark.range(1).select(
        hash_id(F.lit("11"), "f205", 1000).alias("item"), hash_id(F.lit("7"), "f101", 1000)
    )
    assert (rows["s"].reason, rows["s"].f205, rows["s"].f101, rows["s"].raw) == (
        None,
        *expected.first(),
        None,
    )
    assert (rows["u"].reason, rows["u"].raw) == (Reason.UNKNOWN_COMMON_FEATURE, lines[1])


def test_fixture_is_deterministic_by_seed(tmp_path):
    write_fixture(tmp_path / "a", seed=3, train_samples=50, test_samples=20)
    write_fixture(tmp_path / "b", seed=3, train_samples=50, test_samples=20)
    write_fixture(tmp_path / "c", seed=4, train_samples=50, test_samples=20)
    name = f"{SKELETON}_train.csv"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
    assert b"\x01" in (tmp_path / "a" / name).read_bytes()


# --- the shared publish path (features.publish) --------------------------------------------

TINY_FIELDS = FieldsConfig(
    fields=[
        FieldSpec(name="u", kind="single", source="aliccp.1", num_buckets=8),
        FieldSpec(name="b", kind="multi", source="aliccp.2", num_buckets=8, max_len=2),
    ]
)
ONE_ROW_PER_FILE = OutputConfig(rows_per_row_group=1, min_row_groups=1)


def _tiny(spark, ddl: str, rows: list[tuple]):
    return spark.createDataFrame(rows, ddl)


def _tiny_table(spark):
    return _tiny(
        spark,
        "impression_id string, click int, conversion int, u bigint, b array<bigint>",
        [("a", 1, 1, 3, [1, 2]), ("b", 0, 0, 0, [0, 0])],
    )


def _tiny_quarantine(spark):
    return _tiny(spark, "log string, reason string, raw string", [("x", Reason.BAD_LABEL, "?")])


def _tiny_stats(output: int = 2) -> dict:
    statuses = [(OUTPUT, None, output), (QUARANTINED, Reason.BAD_LABEL, 1)]
    table = {"rows": 2, "clicks": 1, "conversions": 1, "conversion_without_click": 0}
    return {"dt": "p", "logs": {"x": stats.log_counts(output + 1, statuses)}, "table": table}


def _jobs_of(spark, group: str, action):
    """Run ``action()`` in job group ``group``; return (its result or exception, job ids)."""
    context = spark.sparkContext
    context.setJobGroup(group, group)
    try:
        try:
            outcome = action()
        except Exception as exc:
            outcome = exc
    finally:
        context.setLocalProperty("spark.jobGroup.id", None)
        context.setLocalProperty("spark.job.description", None)
    context._jsc.sc().listenerBus().waitUntilEmpty(30_000)  # the status store is updated async
    return outcome, list(context.statusTracker().getJobIdsForGroup(group))


def test_publish_refuses_a_table_off_the_schema_contract_before_any_spark_job(spark, tmp_path):
    root = tmp_path / "table"
    table = _tiny(
        spark,
        "impression_id string, click bigint, conversion int, u bigint, raw string",
        [("a", 1, 0, 3, "?")],
    )
    outcome, jobs = _jobs_of(
        spark,
        "publish-bad-schema",
        lambda: publish.stage_and_publish(
            spark,
            str(root),
            "p",
            table,
            _tiny_quarantine(spark),
            _tiny_stats,
            TINY_FIELDS,
            ONE_ROW_PER_FILE,
            table_outputs={"x": "rows"},
        ),
    )
    assert isinstance(outcome, SchemaError)
    message = str(outcome)
    assert message.startswith(f"the table for {root}/dt=p does not have the feature table's schema")
    for problem in ("click: int64, expected int32", "b: missing", "raw: not a column"):
        assert problem in message
    assert message.endswith("nothing is published")
    assert jobs == []  # checked on the plan: not even the staging write started
    assert not root.exists()


def test_publish_stages_checks_then_publishes_the_table_last(spark, tmp_path):
    root = tmp_path / "table"
    seen = {}

    def stats_after_the_write() -> dict:
        seen["staged"] = sorted(p.name for p in root.glob("_tmp/p-*/*"))
        seen["published"] = sorted(p.name for p in root.iterdir() if not p.name.startswith("_"))
        return _tiny_stats()

    result, jobs = _jobs_of(
        spark,
        "publish-good",
        lambda: publish.stage_and_publish(
            spark,
            str(root),
            "p",
            _tiny_table(spark),
            _tiny_quarantine(spark),
            stats_after_the_write,
            TINY_FIELDS,
            ONE_ROW_PER_FILE,
            table_outputs={"x": "rows"},
        ),
    )
    assert isinstance(result, PublishedPartition), result
    assert jobs  # the job group does see the writes (so the test above can fail)
    assert seen == {"staged": ["table"], "published": []}  # called after the write only
    paths = partition_paths(str(root), "p")
    assert (result.partition, result.table_path, result.stats_path) == (
        "p",
        paths.table,
        paths.stats,
    )
    assert json.loads(Path(paths.stats).read_text()) == result.stats == _tiny_stats()
    assert len(list(Path(paths.table).glob("*.parquet"))) == 2  # one row per file
    assert spark.read.parquet(paths.quarantine).select("log", "raw").collect() == [("x", "?")]
    assert not list((root / "_tmp").glob("*"))


def test_publish_fails_the_accounting_and_deletes_what_it_staged(spark, tmp_path):
    root = tmp_path / "table"
    with pytest.raises(AccountingError) as failure:
        publish.stage_and_publish(
            spark,
            str(root),
            "p",
            _tiny_table(spark),
            _tiny_quarantine(spark),
            _tiny_stats(output=3),  # 3 outputs, 2 rows in the table
            TINY_FIELDS,
            ONE_ROW_PER_FILE,
            table_outputs={"x": "rows"},
        )
    assert str(failure.value) == "p: x: output 3 != 2 in the table"
    assert failure.value.partition == "p"
    assert sorted(p.name for p in root.iterdir()) == ["_tmp"]
    assert not list((root / "_tmp").glob("*"))


# --- the command line ----------------------------------------------------------------------


@pytest.fixture
def no_spark(monkeypatch):
    """Make starting Spark an error: the argument checks must end before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("get_spark was called: the error path started Spark")

    monkeypatch.setattr("features.spark.get_spark", refuse)


def _main_exit(capsys, *argv: str) -> tuple[int, list[str], str]:
    with pytest.raises(SystemExit) as exited:
        ingest_aliccp.main(list(argv))
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    return exited.value.code, errors, stderr


def test_missing_input_folder_exits_2_with_one_line(tmp_path, capsys, no_spark):
    code, errors, stderr = _main_exit(
        capsys, "--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o")
    )
    assert code == 2
    assert errors == [f"ingest_aliccp.py: error: --input {tmp_path / 'nope'} is not a directory"]
    assert "Traceback" not in stderr


def test_missing_raw_file_exits_2_naming_it(tmp_path, capsys, no_spark):
    write_fixture(tmp_path, seed=SEED, train_samples=20, test_samples=20)
    (tmp_path / f"{COMMON}_test.csv").unlink()
    code, errors, stderr = _main_exit(
        capsys, "--input", str(tmp_path), "--out", str(tmp_path / "o")
    )
    assert code == 2
    assert len(errors) == 1 and f"{COMMON}_test.csv" in errors[0]
    assert errors[0].startswith("ingest_aliccp.py: error: missing raw file")
    assert "Traceback" not in stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--splits", "train,valid", "--splits must name some of train, test, got 'train,valid'"),
        ("--splits", " , ", "--splits must name some of train, test, got ' , '"),
        ("--min-row-groups", "0", "--rows-per-row-group and --min-row-groups must be at least 1"),
        ("--fields", "nope.yaml", "nope.yaml: config file not found"),
    ],
)
def test_bad_options_exit_2_before_spark_starts(tmp_path, capsys, no_spark, option, value, message):
    write_fixture(tmp_path, seed=SEED, train_samples=20, test_samples=20)
    code, errors, _ = _main_exit(
        capsys, "--input", str(tmp_path), "--out", str(tmp_path / "o"), option, value
    )
    assert (code, errors) == (2, [f"ingest_aliccp.py: error: {message}"])


def test_run_checks_the_raw_files_with_spark_too(spark, tmp_path):
    """Remote inputs are only checked by ``run`` (through Hadoop's filesystem)."""
    write_fixture(tmp_path, seed=SEED, train_samples=20, test_samples=20)
    args = ingest_aliccp.parse_args(["--input", str(tmp_path), "--out", str(tmp_path / "o")])
    plan = ingest_aliccp.check_args(args)
    (tmp_path / f"{SKELETON}_train.csv").unlink()
    with pytest.raises(UsageError, match=f"missing raw file.*{SKELETON}_train"):
        ingest_aliccp.run(spark, args, plan)
    assert not (tmp_path / "o").exists()


@pytest.mark.integration
def test_spark_submit_ingests_and_prints_one_line_per_split(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "features"
    write_fixture(raw, seed=SEED, train_samples=20, test_samples=20)
    args = ["--input", str(raw), "--out", str(out), "--splits", "test", "--shuffle-partitions", "2"]
    result = run_command(commands.spark_job(VENV_BIN, "ingest_aliccp", args), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith(f"{PROG}: ")]
    assert len(lines) == 1 and lines[0].startswith("ingest_aliccp.py: test: 20 rows"), lines
    assert f"→ {out}/dt=test;" in lines[0]
    assert list((out / "dt=test").glob("*.parquet")) and (out / "_stats/dt=test.json").is_file()
    assert not (out / "dt=train").exists()


# --- training on the ingested table --------------------------------------------------------

# The fixture's clicks follow tests.aliccp_fixture.click_probability (field 301, the item's
# group): on the test split the Bayes-optimal scorer's CTR AUC is 0.81. A model trained with
# the settings below reaches 0.74-0.78 (seeds 1, 2, 2018); one that learnt nothing scores
# 0.5 ± 0.03 (the shipped 1024-row batches, one step: 0.50; labels shuffled in dt=train:
# 0.50), and a label leaked into a feature gives 1.0.
CTR_AUC_RANGE = (0.65, 0.9)


@pytest.mark.integration
def test_ingested_fixture_trains_one_epoch_under_horovod_and_learns_the_clicks(
    ingested, tmp_path, run_horovod
):
    sets = [
        "epochs=1",
        "data.batch_size=32",
        "optim.lr=0.01",
        "optim.sparse_lr=0.1",
        "tracking.registered_model_name=null",
    ]
    trained = run_horovod(
        "esmm.train",
        *commands.train_args(
            "conf/train_aliccp.yaml",
            ingested.out,
            "train",
            "test",
            checkpoint_dir=tmp_path / "ckpt",
            no_progress=True,
            sets=sets,
        ),
        module=True,
        np=2,
        env={"MLFLOW_TRACKING_URI": sqlite_store(tmp_path / "mlflow.db")},
        timeout=600,
    )
    assert trained.returncode == 0, trained.output[-4000:]
    line = re.search(r"epoch 1/1: ctr_auc=([0-9.]+) cvr_auc=([0-9.]+)", trained.output)
    assert line, trained.output[-4000:]
    # No bound on cvr_auc: 58 conversions on the test split, and ESMM's CVR tower barely sees
    # the fixture's user signal in one epoch (0.44-0.51 over the seeds above).
    low, high = CTR_AUC_RANGE
    assert low <= float(line.group(1)) <= high, line.group(0)
