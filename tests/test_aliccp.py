"""Ali-CCP ingestion: parsing rules, the join with common features, accounting, and the real
job (spark-submit) followed by one epoch of training under horovodrun.

The raw data is the fixture of :func:`features.aliccp.write_fixture` (the exact raw format,
a few thousand lines, one line of dirt per quarantine reason); its first train line is
:data:`features.aliccp.KNOWN_SAMPLE`, checked value by value.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from contract.config import load_config
from contract.fields import FieldsConfig
from features import aliccp
from features.aliccp import COMMON, KNOWN_SAMPLE, SKELETON, Reason
from features.transforms import hash_id
from tests.helpers import run_command

# One shuffle partition and no code generation for the whole module (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("small_data_spark")

ROOT = Path(__file__).resolve().parents[1]
FIELDS = load_config(ROOT / "conf/fields_aliccp.yaml", FieldsConfig)
SEED = 7


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    """The fixture's raw files ingested by the real job (spark-submit): (raw, out, job result).

    Run once per module: every end-to-end check and the training run read this output.
    """
    root = tmp_path_factory.mktemp("aliccp")
    raw, out = root / "raw", root / "features"
    aliccp.write_fixture(raw, seed=SEED, train_samples=1600, test_samples=800)
    result = _ingest_job("--input", str(raw), "--out", str(out), spark_submit=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return raw, out, result


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


# --- the real job on the fixture, end to end ----------------------------------------------


@pytest.mark.integration
def test_known_line_has_every_field_hashed_from_its_raw_feature_ids(ingested, spark):
    _, out, _ = ingested
    table = _table(out, "train").set_index("impression_id")
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
    raw, out, _ = ingested
    for split in aliccp.SPLITS:
        stats = json.loads((out / "_stats" / f"dt={split}.json").read_text())
        for log in (SKELETON, COMMON):
            counts = stats["logs"][log]
            lines = len((raw / f"{log}_{split}.csv").read_text().splitlines())
            assert counts["input"] == lines, (split, log)
            assert (
                counts["input"] == counts["output"] + counts["quarantined"] + counts["deduplicated"]
            )
        assert (
            stats["logs"][SKELETON]["output"] == stats["table"]["rows"] == len(_table(out, split))
        )
        assert stats["logs"][COMMON]["deduplicated_by"] == {Reason.DUPLICATE_COMMON_FEATURE: 1}
        assert aliccp.conservation_problems(stats) == []


@pytest.mark.integration
def test_malformed_lines_and_unknown_common_feature_are_quarantined_with_reasons(ingested):
    import pyarrow.dataset as ds

    _, out, _ = ingested
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
        stats = json.loads((out / "_stats" / f"dt={split}.json").read_text())
        assert stats["logs"][SKELETON]["quarantined_by"][Reason.UNKNOWN_COMMON_FEATURE] == 1


@pytest.mark.integration
def test_train_test_split_is_preserved(ingested):
    raw, out, _ = ingested
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

    _, out, _ = ingested
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
    aliccp.write_fixture(tmp_path / "a", seed=3, train_samples=50, test_samples=20)
    aliccp.write_fixture(tmp_path / "b", seed=3, train_samples=50, test_samples=20)
    aliccp.write_fixture(tmp_path / "c", seed=4, train_samples=50, test_samples=20)
    name = f"{SKELETON}_train.csv"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()
    assert b"\x01" in (tmp_path / "a" / name).read_bytes()


# --- the job -------------------------------------------------------------------------------


def _ingest_job(*args: str, spark_submit: bool = False):
    command = [sys.executable, "jobs/ingest_aliccp.py"]
    if spark_submit:
        spark_submit_bin = str(Path(sys.executable).parent / "spark-submit")
        command = [spark_submit_bin, "--master", "local[2]", "jobs/ingest_aliccp.py"]
        command += ["--shuffle-partitions", "2"]
    return run_command([*command, *args], timeout=600)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower()]


def test_missing_input_folder_exits_2_with_one_line(tmp_path):
    result = _ingest_job("--input", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2
    assert _error_lines(result.stderr) == [
        f"ingest_aliccp.py: error: --input {tmp_path / 'nope'} is not a directory"
    ]
    assert "Traceback" not in result.stderr


@pytest.mark.integration
def test_missing_raw_file_exits_2_naming_it(tmp_path):
    aliccp.write_fixture(tmp_path, seed=SEED, train_samples=20, test_samples=20)
    (tmp_path / f"{COMMON}_test.csv").unlink()
    result = _ingest_job("--input", str(tmp_path), "--out", str(tmp_path / "o"), spark_submit=True)
    assert result.returncode == 2
    errors = _error_lines(result.stderr)
    assert len(errors) == 1 and f"{COMMON}_test.csv" in errors[0]
    assert errors[0].startswith("ingest_aliccp.py: error: missing raw file")
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()


@pytest.mark.integration
def test_ingested_fixture_trains_one_epoch_under_horovod(ingested, tmp_path, run_horovod):
    _, out, result = ingested
    assert "ingest_aliccp.py: test: 800 rows" in result.stdout
    trained = run_horovod(
        "esmm.train",
        "--config",
        "conf/train_aliccp.yaml",
        "--features",
        str(out),
        "--train-dates",
        "train",
        "--eval-date",
        "test",
        "--no-progress",
        "--set",
        "epochs=1",
        "--set",
        "tracking.registered_model_name=null",
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
        module=True,
        np=2,
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"},
        timeout=600,
    )
    assert trained.returncode == 0, trained.output[-4000:]
    line = re.search(r"epoch 1/1: ctr_auc=([0-9.]+) cvr_auc=([0-9.]+)", trained.output)
    assert line, trained.output[-4000:]
    assert 0.0 <= float(line.group(1)) <= 1.0 and 0.0 <= float(line.group(2)) <= 1.0
