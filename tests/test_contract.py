"""The contract package: dates, the table's schema check, the layout, and the layering rule
that keeps the Spark side and the torch side apart (both import only ``contract``)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from contract import layout, schema
from contract.dates import DateError, parse_day, parse_partitions
from tests.feature_fixtures import small_fields

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("contract", "esmm", "features")
MAX_LINES = 600


def test_date_specs_expand_to_partitions():
    assert parse_partitions("2026-01-30..2026-02-02") == [
        "2026-01-30",
        "2026-01-31",
        "2026-02-01",
        "2026-02-02",
    ]
    assert parse_partitions("train,test") == ["train", "test"]
    with pytest.raises(DateError, match="end is before the start"):
        parse_partitions("2026-02-02..2026-02-01")
    with pytest.raises(DateError, match="'2026-13-01' is not a date"):
        parse_partitions("2026-13-01")


def test_a_bad_day_names_the_option():
    with pytest.raises(DateError, match="--date '2026-1-1' is not a date of the form YYYY-MM-DD"):
        parse_day("2026-1-1", "--date")
    assert parse_day(" 2026-01-01 ").isoformat() == "2026-01-01"


def test_schema_check_names_every_difference():
    fields = small_fields()
    expected = schema.arrow_schema(fields)
    assert schema.schema_problems(expected, fields) == []
    multi = next(f for f in fields.fields if f.kind == "multi")
    single = next(f for f in fields.fields if f.kind == "single")
    broken = expected.remove(expected.get_field_index(single.name))
    at = broken.get_field_index(multi.name)
    broken = broken.set(at, pa.field(multi.name, pa.list_(pa.int32())))
    broken = broken.append(pa.field("stray", pa.string()))
    with pytest.raises(schema.SchemaError) as caught:
        schema.check_table_schema(broken, fields, "dt=2026-01-01")
    message = str(caught.value)
    assert message.startswith("dt=2026-01-01 does not have the feature table's schema")
    assert f"{single.name}: missing (int64)" in message
    assert f"{multi.name}: list<item: int32>, expected list<item: int64>" in message
    assert "stray: not a column of the feature table" in message


def test_layout_keeps_url_schemes_and_reads_stats(tmp_path):
    paths = layout.partition_paths("hdfs://nn:8020/features/", "2026-01-02")
    assert paths.table == "hdfs://nn:8020/features/dt=2026-01-02"
    assert paths.quarantine == "hdfs://nn:8020/features/_quarantine/dt=2026-01-02"
    assert paths.stats == "hdfs://nn:8020/features/_stats/dt=2026-01-02.json"
    stats_file = Path(layout.partition_paths(str(tmp_path), "2026-01-02").stats)
    stats_file.parent.mkdir(parents=True)
    stats_file.write_text(json.dumps({"dt": "2026-01-02"}))
    assert layout.read_stats(str(tmp_path), "2026-01-02") == {"dt": "2026-01-02"}
    assert layout.read_stats(f"file://{tmp_path}", "2026-01-02") == {"dt": "2026-01-02"}
    assert layout.read_stats(str(tmp_path), "2026-01-03") is None


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("features", {"esmm", "torch", "horovod", "experiments"}),
        ("esmm", {"features", "pyspark", "experiments"}),
        ("contract", {"esmm", "features", "torch", "pyspark", "horovod", "experiments"}),
    ],
)
def test_each_side_imports_only_the_contract_of_the_other(package, forbidden):
    offenders = {
        str(path.relative_to(PROJECT_ROOT)): sorted(_imported_packages(path) & forbidden)
        for path in sorted((PROJECT_ROOT / package).rglob("*.py"))
        if _imported_packages(path) & forbidden
    }
    assert offenders == {}


def test_contract_imports_without_torch_or_pyspark():
    code = (
        "import sys, contract.config, contract.fields, contract.schema, contract.layout, "
        "contract.dates; print(sorted(m for m in ('torch', 'pyspark', 'esmm', 'features') "
        "if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "[]"


def test_no_module_of_the_packages_is_over_600_lines():
    long_files = {
        str(path.relative_to(PROJECT_ROOT)): n
        for package in PACKAGES
        for path in (PROJECT_ROOT / package).rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long_files == {}
