"""esmm.experiments: the tables from known numbers (unit), and ``--quick`` for real: the
simulator, the feature job and horovodrun -np 2 trainings under one MLflow parent run on a
real tracking server."""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import mlflow
import pytest

from contract.config import ConfigError
from esmm import experiments as ex
from esmm.losses import TaskWeights
from tests.helpers import run_command

CONFIG = "conf/experiment.yaml"


def result(label: str, seed: int, **metrics: float) -> ex.RunResult:
    spec = ex.RunSpec(label, label, seed, ex.DataSpec())
    return ex.RunResult(spec, f"run-{label}-{seed}", dict(metrics), 1.0)


def test_mean_std_and_formats():
    assert ex.mean_std([0.6, 0.7]) == pytest.approx((0.65, 0.070710678))
    mean, std = ex.mean_std([0.6])
    assert mean == 0.6 and math.isnan(std)
    assert ex.fmt_auc(0.68561, 0.00371) == "68.56 ± 0.37"
    assert ex.fmt_auc(0.7, math.nan) == "70.00"
    assert ex.fmt_gain(0.7, 0.68) == "+2.00"
    assert ex.fmt_auc(math.nan, math.nan) == "n/a"


def test_comparison_table_has_gains_over_base_and_the_oracle_row(tmp_path):
    oracle = {"oracle_cvr_auc": 0.85, "oracle_ctcvr_auc": 0.9, "oracle_entire_space_cvr_auc": 0.8}
    results = [
        result("base", 1, cvr_auc=0.66, ctcvr_auc=0.62, entire_space_cvr_auc=0.60, **oracle),
        result("base", 2, cvr_auc=0.66, ctcvr_auc=0.62, entire_space_cvr_auc=0.62, **oracle),
        result("esmm", 1, cvr_auc=0.68, ctcvr_auc=0.65, entire_space_cvr_auc=0.70, **oracle),
        result("esmm", 2, cvr_auc=0.70, ctcvr_auc=0.65, entire_space_cvr_auc=0.70, **oracle),
    ]
    table = ex.comparison_table("t", "title", "model", results, reference="base")
    assert [row[0] for row in table.rows] == ["base", "esmm", "oracle (true pCTR, pCVR)"]
    header = table.header
    esmm = dict(zip(header, table.rows[1], strict=True))
    # gains are over BASE's mean, in points; each compared column is followed by its gain
    assert esmm["CVR AUC (clicked)"] == "69.00 ± 1.41"
    assert table.rows[1][header.index("CVR AUC (clicked)") + 1] == "+3.00"
    assert table.rows[1][header.index("CVR AUC (entire space)") + 1] == "+9.00"
    assert table.rows[2][header.index("CTCVR AUC")] == "90.00"
    md, csv_path = table.write(tmp_path)
    assert md.read_text().count("\n|") == 5  # header, separator, 3 rows
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["model"] for r in rows] == ["base", "esmm"]
    assert float(rows[1]["cvr_auc_mean"]) == pytest.approx(0.69)
    assert rows[1]["mlflow_run_ids"] == "run-esmm-1 run-esmm-2"


def test_ranking_table_and_kendall_tau():
    assert ex.kendall_tau([3, 2, 1], [30, 20, 10]) == 1.0
    assert ex.kendall_tau([3, 2, 1], [10, 20, 30]) == -1.0
    results = [
        result("base", 1, cvr_auc=0.70, entire_space_cvr_auc=0.60, ctcvr_auc=0.6),
        result("esmm", 1, cvr_auc=0.68, entire_space_cvr_auc=0.72, ctcvr_auc=0.7),
        result("aman", 1, cvr_auc=0.65, entire_space_cvr_auc=0.65, ctcvr_auc=0.5),
    ]
    table = ex.ranking_table(results)
    # sorted by the entire-space rank; base drops from 1st (clicked) to 3rd
    assert [row[0] for row in table.rows] == ["esmm", "aman", "base"]
    base = table.rows[2]
    assert base[2] == "3" and base[4] == "1" and base[6] == "-2"
    assert "Kendall's tau" in table.notes[0]


def test_bias_sweep_table_reports_the_gap_and_its_standard_error():
    by_bias = {
        0.0: [
            result("base", 1, cvr_auc=0.70, entire_space_cvr_auc=0.70, ctcvr_auc=0.7),
            result("esmm", 1, cvr_auc=0.70, entire_space_cvr_auc=0.70, ctcvr_auc=0.7),
        ],
        1.0: [
            result("base", 1, cvr_auc=0.60, entire_space_cvr_auc=0.55, ctcvr_auc=0.6),
            result("base", 2, cvr_auc=0.62, entire_space_cvr_auc=0.57, ctcvr_auc=0.6),
            result("esmm", 1, cvr_auc=0.66, entire_space_cvr_auc=0.66, ctcvr_auc=0.7),
            result("esmm", 2, cvr_auc=0.66, entire_space_cvr_auc=0.68, ctcvr_auc=0.7),
        ],
    }
    table = ex.bias_sweep_table(by_bias, ["base", "esmm"])
    assert [row[0] for row in table.rows] == ["0", "1"]
    gap, err = table.csv_rows[1][1], table.csv_rows[1][2]
    assert gap == pytest.approx(0.05)
    assert err == pytest.approx(math.sqrt(0.0002 / 2))
    assert table.csv_rows[0][1] == pytest.approx(0.0)


def test_ieb_decile_table():
    metrics = {f"cvr_ieb_ctr_decile_{d}": 1.0 + d / 10 for d in range(1, 11)}
    table = ex.ieb_decile_table([result("esmm", 1, **metrics), result("esmm", 2, **metrics)])
    assert table.rows == [["esmm", *[f"{1 + d / 10:.2f}" for d in range(1, 11)]]]


def test_quick_applies_the_files_quick_overrides_then_the_command_line():
    full = ex.load_experiment_config(CONFIG, quick=False, overrides=[])
    quick = ex.load_experiment_config(CONFIG, quick=True, overrides=["seeds=[9]"])
    assert len(full.seeds) >= 5 and quick.seeds == [9]
    assert quick.data.impressions_per_day < 150_000
    assert quick.workdir != full.workdir
    # every paper variant plus ESCM² is compared by default
    assert set(ex.PAPER_VARIANTS) <= set(full.paper_table.variants)
    assert {"escm2_ips", "escm2_dr"} <= set(full.paper_table.variants)


def test_bad_experiment_config_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"paper_table\.variants"):
        ex.load_experiment_config(CONFIG, False, ["paper_table.variants=[esmm, nope]"])
    result = run_command(
        [sys.executable, "-m", "esmm.experiments", "paper-table", "--set", "np=0"], timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("esmm.experiments: error:")
    assert "Traceback" not in result.stderr


def test_shared_trainings_have_one_cache_key():
    data = ex.DataSpec()
    paper_esmm = ex.RunSpec("esmm", "esmm", 1, data)
    weights_default = ex.RunSpec("(1, 0, 1)", "esmm", 1, data)
    assert paper_esmm.key() == weights_default.key()
    other_bias = ex.RunSpec("esmm", "esmm", 1, data.model_copy(update={"selection_bias": 0.9}))
    other_seed = ex.RunSpec("esmm", "esmm", 2, data)
    assert len({paper_esmm.key(), other_bias.key(), other_seed.key()}) == 3
    assert TaskWeights() == TaskWeights(ctr=1.0, cvr=0.0, ctcvr=1.0)


@pytest.mark.integration
@pytest.mark.timeout(1800)
def test_quick_paper_table_trains_every_run_under_one_parent(tmp_path, mlflow_server):
    workdir = tmp_path / "exp"
    variants = ["base", "esmm", "escm2_dr"]
    command = [
        sys.executable,
        "-m",
        "esmm.experiments",
        "paper-table",
        "--config",
        CONFIG,
        "--quick",
        "--set",
        f"workdir={workdir}",
        "--set",
        f"paper_table.variants=[{', '.join(variants)}]",
        "--set",
        "experiment=experiments-it",
        "--set",
        "data.train_days=1",  # the smallest time split: one day trains, the next evaluates
    ]
    env_uri = {"MLFLOW_TRACKING_URI": mlflow_server}
    result = run_command(command, timeout=1500, env=env_uri)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    seeds = ex.load_experiment_config(CONFIG, True, []).seeds
    assert len(seeds) >= 2

    out = workdir / "results" / "paper_table"
    rows = list(csv.DictReader((out / "paper_table.csv").open()))
    assert [r["model"] for r in rows] == variants
    for row in rows:
        assert int(row["seeds"]) == len(seeds)
        for metric in ("ctr_auc", "cvr_auc", "ctcvr_auc", "entire_space_cvr_auc"):
            assert 0.0 <= float(row[f"{metric}_mean"]) <= 1.0, (row["model"], metric)
            assert float(row[f"{metric}_std"]) >= 0.0
        assert float(row["cvr_ieb_mean"]) > 0.0
    markdown = (out / "paper_table.md").read_text()
    assert "oracle (true pCTR, pCVR)" in markdown and "gain vs base" in markdown
    for name in ("paper_table.png", "ieb_by_ctr_decile.png", "ieb_by_ctr_decile.csv"):
        assert (out / name).stat().st_size > 0

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    experiment_id = client.get_experiment_by_name("experiments-it").experiment_id
    (parent,) = client.search_runs([experiment_id], "tags.esmm.experiment_command = 'paper-table'")
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == len(variants) * len(seeds)
    assert {c.data.tags["variant"] for c in children} == set(variants)
    assert all("entire_space_cvr_auc" in c.data.metrics for c in children)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"paper_table.md", "paper_table.csv", "paper_table.png"} <= artifacts
    # the CSV's run ids are those children
    ids = {i for r in rows for i in r["mlflow_run_ids"].split()}
    assert ids == {c.info.run_id for c in children}

    # ranking reuses the same trainings (cache) and adds its table under a new parent
    ranking = run_command([*command[:3], "ranking", *command[4:]], timeout=300, env=env_uri)
    assert ranking.returncode == 0, ranking.stderr[-3000:]
    assert "0 trainings run, 6 reused" in ranking.stderr
    table = Path(workdir / "results" / "ranking" / "ranking.csv").read_text().splitlines()
    assert len(table) == 1 + len(variants)
