"""The experiment driver (``experiments``): the tables from known numbers (unit), the cache
key, the command line's errors (in-process), and ``paper-table --quick`` for real: the
simulator and the feature job under spark-submit, horovodrun trainings under one MLflow parent
run on a real tracking server, then ``ranking`` from the cache."""

from __future__ import annotations

import csv
import dataclasses
import math
import re
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking._tracking_service import utils as mlflow_tracking_utils

from contract.config import ConfigError
from esmm.losses import TaskWeights
from experiments import cli, config, runner, tables
from tests.helpers import run_command

CONFIG = "conf/experiment.yaml"


def result(label: str, seed: int, **metrics: float) -> runner.RunResult:
    spec = runner.RunSpec(label, label, seed, config.DataSpec())
    return runner.RunResult(spec, f"run-{label}-{seed}", dict(metrics), 1.0)


def test_mean_std_and_formats():
    assert tables.mean_std([0.6, 0.7]) == pytest.approx((0.65, 0.070710678))
    mean, std = tables.mean_std([0.6])
    assert mean == 0.6 and math.isnan(std)
    assert tables.fmt_auc(0.68561, 0.00371) == "68.56 ± 0.37"
    assert tables.fmt_auc(0.7, math.nan) == "70.00"
    assert tables.fmt_gain(0.7, 0.68) == "+2.00"
    assert tables.fmt_auc(math.nan, math.nan) == "n/a"


def test_comparison_table_has_gains_over_base_and_the_oracle_row(tmp_path):
    oracle = {"oracle_cvr_auc": 0.85, "oracle_ctcvr_auc": 0.9, "oracle_entire_space_cvr_auc": 0.8}
    results = [
        result("base", 1, cvr_auc=0.66, ctcvr_auc=0.62, entire_space_cvr_auc=0.60, **oracle),
        result("base", 2, cvr_auc=0.66, ctcvr_auc=0.62, entire_space_cvr_auc=0.62, **oracle),
        result("esmm", 1, cvr_auc=0.68, ctcvr_auc=0.65, entire_space_cvr_auc=0.70, **oracle),
        result("esmm", 2, cvr_auc=0.70, ctcvr_auc=0.65, entire_space_cvr_auc=0.70, **oracle),
    ]
    table = tables.comparison_table("t", "title", "model", results, reference="base")
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
    assert tables.kendall_tau([3, 2, 1], [30, 20, 10]) == 1.0
    assert tables.kendall_tau([3, 2, 1], [10, 20, 30]) == -1.0
    results = [
        result("base", 1, cvr_auc=0.70, entire_space_cvr_auc=0.60, ctcvr_auc=0.6),
        result("esmm", 1, cvr_auc=0.68, entire_space_cvr_auc=0.72, ctcvr_auc=0.7),
        result("aman", 1, cvr_auc=0.65, entire_space_cvr_auc=0.65, ctcvr_auc=0.5),
    ]
    table = tables.ranking_table(results)
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
    table = tables.bias_sweep_table(by_bias, ["base", "esmm"])
    assert [row[0] for row in table.rows] == ["0", "1"]
    gap, err = table.csv_rows[1][1], table.csv_rows[1][2]
    assert gap == pytest.approx(0.05)
    assert err == pytest.approx(math.sqrt(0.0002 / 2))
    assert table.csv_rows[0][1] == pytest.approx(0.0)


def test_ieb_decile_table():
    metrics = {f"cvr_ieb_ctr_decile_{d}": 1.0 + d / 10 for d in range(1, 11)}
    table = tables.ieb_decile_table([result("esmm", 1, **metrics), result("esmm", 2, **metrics)])
    assert table.rows == [["esmm", *[f"{1 + d / 10:.2f}" for d in range(1, 11)]]]


def test_quick_applies_the_files_quick_overrides_then_the_command_line():
    full = config.load_experiment_config(CONFIG, quick=False, overrides=[])
    quick = config.load_experiment_config(CONFIG, quick=True, overrides=["seeds=[9]"])
    assert len(full.seeds) >= 5 and quick.seeds == [9]
    assert quick.data.impressions_per_day < 150_000
    assert quick.workdir != full.workdir
    # every paper variant plus ESCM² is compared by default
    assert set(config.PAPER_VARIANTS) <= set(full.paper_table.variants)
    assert {"escm2_ips", "escm2_dr"} <= set(full.paper_table.variants)


def test_bad_experiment_config_is_one_clear_error(capsys, tmp_path):
    with pytest.raises(ConfigError, match=r"paper_table\.variants"):
        config.load_experiment_config(CONFIG, False, ["paper_table.variants=[esmm, nope]"])
    # the command line, in-process: exit code 2 and one line on stderr, no traceback
    for overrides, message in (
        (["np=0", "seeds=[]"], r"invalid ExperimentConfig: np: .*; seeds: "),
        ([f"train_config={tmp_path / 'missing.yaml'}"], r"train_config .*missing\.yaml: file not"),
        (["train_overrides=[optim.lr=-1]"], r"invalid TrainConfig: optim\.lr"),
    ):
        sets = [part for kv in overrides for part in ("--set", kv)]
        assert cli.main(["paper-table", "--config", CONFIG, *sets]) == 2, overrides
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith("experiments: error: ") and "Traceback" not in err
        assert re.search(message, err), err


def test_shared_trainings_have_one_cache_key():
    cfg = config.load_experiment_config(CONFIG, False, [])
    data = config.DataSpec()
    paper_esmm = runner.RunSpec("esmm", "esmm", 1, data)
    weights_default = runner.RunSpec("(1, 0, 1)", "esmm", 1, data)
    stop_gradient_both = runner.RunSpec("CTCVR grad into both", "esmm", 1, data)
    assert paper_esmm.key(cfg) == weights_default.key(cfg) == stop_gradient_both.key(cfg)
    other_bias = runner.RunSpec("esmm", "esmm", 1, data.model_copy(update={"selection_bias": 0.9}))
    other_seed = runner.RunSpec("esmm", "esmm", 2, data)
    other_variant = runner.RunSpec("esmm", "base", 1, data)
    keys = {k.key(cfg) for k in (paper_esmm, other_bias, other_seed, other_variant)}
    assert len(keys) == 4
    assert TaskWeights() == TaskWeights(ctr=1.0, cvr=0.0, ctcvr=1.0)


def test_cache_key_changes_with_every_setting_that_changes_a_training(tmp_path):
    """Reusing a finished training is right only if nothing that determines it changed."""
    fields_yaml = tmp_path / "fields.yaml"
    fields_yaml.write_bytes(Path("conf/fields.yaml").read_bytes())
    train_yaml = tmp_path / "train.yaml"
    train_text = Path("conf/train.yaml").read_text()
    assert "fields_config: conf/fields.yaml" in train_text and "\nepochs: 1 " in train_text
    train_yaml.write_text(
        train_text.replace("fields_config: conf/fields.yaml", f"fields_config: {fields_yaml}")
    )
    cfg = config.load_experiment_config(CONFIG, False, [f"train_config={train_yaml}"])
    spec = runner.RunSpec("esmm", "esmm", 1, config.DataSpec())
    key = spec.key(cfg)
    assert dataclasses.replace(spec, label="(1, 0, 1)").key(cfg) == key  # a label is no setting
    assert runner.fields_file(cfg) == fields_yaml

    changed = {
        "train_overrides": spec.key(cfg.model_copy(update={"train_overrides": ["optim.lr=0.01"]})),
        "np": spec.key(cfg.model_copy(update={"np": cfg.np + 1})),
        "run overrides": dataclasses.replace(spec, overrides=("loss.ctcvr_grad_into=cvr",)).key(
            cfg
        ),
        "data": dataclasses.replace(spec, data=config.DataSpec(impressions_per_day=3000)).key(cfg),
    }
    train_yaml.write_text(train_yaml.read_text() + "\n# a comment changes no training\n")
    fields_yaml.write_text(fields_yaml.read_text().replace("fields:", "fields:  # same\n", 1))
    assert spec.key(cfg) == key
    train_yaml.write_text(train_yaml.read_text().replace("\nepochs: 1 ", "\nepochs: 2 "))
    changed["train config contents"] = spec.key(cfg)
    fields_yaml.write_text(fields_yaml.read_text().replace("num_buckets: 8}", "num_buckets: 9}", 1))
    changed["field list contents"] = spec.key(cfg)
    assert key not in changed.values(), {k: v for k, v in changed.items() if v == key}
    assert len(set(changed.values())) == len(changed)

    missing = cfg.model_copy(update={"train_config": str(tmp_path / "missing.yaml")})
    with pytest.raises(ConfigError, match=r"train_config .*missing\.yaml: file not found"):
        spec.key(missing)


def test_a_simulated_dataset_is_made_by_the_pipelines_own_jobs_once(tmp_path, monkeypatch):
    steps, described = [], []
    monkeypatch.setattr(runner.commands, "run_step", lambda title, cmd, *a, **k: steps.append(cmd))
    monkeypatch.setattr(runner, "_keep_dataset_stats", lambda ctx, key, p: described.append(key))
    cfg = config.load_experiment_config(CONFIG, True, [f"workdir={tmp_path}"])
    ctx = runner.Context(cfg, tmp_path, "sqlite:///unused.db", "0")
    spec = config.DataSpec(preset="tiny", selection_bias=0.9, impressions_per_day=3000, seed=3)
    paths = runner.prepare_dataset(ctx, spec)
    simulate, build = steps
    raw = str(tmp_path / "data" / spec.key() / "raw")
    assert simulate[simulate.index("jobs/generate_logs.py") + 1 :] == [
        *("--preset", "tiny", "--start-date", "2026-01-01", "--days", "6", "--seed", "3"),
        *("--out", raw, "--set", "presets.tiny.funnel.selection_bias=0.9"),
        *("--set", "presets.tiny.impressions_per_day=3000"),
    ]
    assert build[build.index("jobs/build_features.py") + 1 :] == [
        *("--raw", raw, "--out", paths.features),
        *("--start-date", "2026-01-01", "--end-date", "2026-01-05"),
    ]
    # 3 train days, then the validation day, then the test day
    assert (paths.train_dates, paths.valid_dates, paths.eval_dates) == (
        "2026-01-01..2026-01-03",
        "2026-01-04",
        "2026-01-05",
    )
    assert paths.oracle == f"{raw}/oracle"
    assert runner.prepare_dataset(ctx, spec) == paths and len(steps) == 2  # made once
    assert described == [spec.key()]  # its statistics kept once

    given = config.DataSpec(features="hdfs://nn/features", train_days=2, valid_days=0, eval_days=2)
    table = runner.prepare_dataset(ctx, given)
    assert (table.features, table.oracle) == ("hdfs://nn/features", None)
    assert (table.train_dates, table.valid_dates, table.eval_dates) == (
        "2026-01-01..2026-01-02",
        None,
        "2026-01-03..2026-01-04",
    )
    assert len(steps) == 2  # nothing simulated for a given table
    assert given.key() != given.model_copy(update={"features": "hdfs://nn/other"}).key()


def test_dataset_statistics_count_positives_per_split_and_the_cold_test_items(tmp_path):
    import numpy as np
    import pyarrow.dataset as ds

    from experiments.datasets import dataset_stats
    from tests.feature_fixtures import small_fields, write_feature_day

    fields = small_fields()
    days = ["2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"]
    for seed, day in enumerate(days):
        write_feature_day(tmp_path, day, fields, rows=400 + 100 * seed, seed=seed)

    def read(*parts):
        tables = [ds.dataset(tmp_path / f"dt={d}", format="parquet").to_table() for d in parts]
        return {
            k: np.concatenate([t[k].to_numpy() for t in tables]) for k in tables[0].schema.names
        }

    stats = dataset_stats(str(tmp_path), "2026-01-01..2026-01-02", "2026-01-03", "2026-01-04")
    train, test = read(*days[:2]), read(days[3])
    assert stats["train"]["impressions"] == 900 and stats["valid"]["impressions"] == 600
    assert stats["train"]["clicks"] == train["click"].sum()
    assert stats["test"]["conversions"] == test["conversion"].sum()
    assert stats["test"]["cvr_given_click"] == pytest.approx(
        test["conversion"].sum() / test["click"].sum()
    )
    clicks = {i: int(((train["item_id"] == i) & (train["click"] == 1)).sum()) for i in range(64)}
    cold = np.mean([clicks.get(int(i), 0) < 5 for i in test["item_id"]])
    assert stats["cold"]["test_impressions_share"] == pytest.approx(cold)
    assert 0 < cold < 1  # the fixture has both kinds, so the count is really tested
    assert "valid" not in dataset_stats(str(tmp_path), "2026-01-01", None, "2026-01-02")


def test_offline_rebuilds_the_tables_from_the_kept_summaries_alone(tmp_path, capsys):
    """Results as data: the summaries a run keeps (results_dir) are enough to rebuild its
    tables on a machine that trained nothing and has no MLflow store."""
    import json

    sets = [
        f"workdir={tmp_path / 'work'}",
        f"results_dir={tmp_path / 'summaries'}",
        "paper_table.variants=[base, esmm]",
        "seeds=[1, 2]",
    ]
    cfg = config.load_experiment_config(CONFIG, False, sets)
    ctx = runner.Context(cfg, tmp_path / "work", "", "", offline=True)
    runs = runner.runs_dir(ctx)
    runs.mkdir(parents=True)
    cvr = {("base", 1): 0.60, ("base", 2): 0.62, ("esmm", 1): 0.64, ("esmm", 2): 0.68}
    for spec in cli.paper_specs(cfg):
        metrics = {"cvr_auc": cvr[spec.variant, spec.seed], "kept_epoch": spec.seed}
        summary = {"run_id": f"r-{spec.variant}-{spec.seed}", "metrics": metrics, "seconds": 1}
        (runs / f"{spec.key(cfg)}.json").write_text(json.dumps(summary))
    argv = [
        "paper-table",
        "--config",
        CONFIG,
        "--offline",
        *[x for kv in sets for x in ("--set", kv)],
    ]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "0 trainings run, 4 reused" in err and "MLflow:" not in err
    out = tmp_path / "work" / "results" / "paper_table"
    rows = {r["model"]: r for r in csv.DictReader((out / "paper_table.csv").open())}
    assert float(rows["base"]["cvr_auc_mean"]) == pytest.approx(0.61)
    assert float(rows["esmm"]["cvr_auc_mean"]) == pytest.approx(0.66)
    assert float(rows["esmm"]["kept_epoch_mean"]) == pytest.approx(1.5)
    assert rows["esmm"]["mlflow_run_ids"] == "r-esmm-1 r-esmm-2"
    assert not (tmp_path / "work" / "mlflow").exists()  # no MLflow store was made

    (runs / f"{cli.paper_specs(cfg)[-1].key(cfg)}.json").unlink()
    assert cli.main(argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar's
    assert line.startswith("experiments: error: --offline: no summary of training esmm seed 2")


@pytest.fixture
def restore_mlflow_tracking_uri(monkeypatch):
    """The driver, run in-process, sets MLflow's global tracking URI (and the environment
    variable); put both back for the tests that follow."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    previous = mlflow_tracking_utils._tracking_uri
    yield monkeypatch
    mlflow.set_tracking_uri(previous)


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_quick_paper_table_trains_every_run_under_one_parent(
    tmp_path, mlflow_server, restore_mlflow_tracking_uri, capsys, raw_logs, built_features
):
    workdir = tmp_path / "exp"
    # The session's shared tiny dataset (tests/conftest.py): the runs read its feature tables
    # as a user's own tables are read (data.features), nothing is simulated again.
    raw = raw_logs()
    features = built_features(raw, "2026-01-02", "2026-01-04")
    variants = ["base", "esmm"]
    options = [
        "--config",
        CONFIG,
        "--quick",
        "--set",
        f"workdir={workdir}",
        "--set",
        f"paper_table.variants=[{', '.join(variants)}]",
        "--set",
        "experiment=experiments-it",
        # the smallest real run: one day trains, the next chooses the epoch, the third is the
        # test day; 3000 impressions a day (about 200 clicks and 40 conversions), up to two
        # epochs, one Horovod worker (still horovodrun)
        "--set",
        f"data.features={features}",
        "--set",
        f"data.oracle={raw / 'oracle'}",
        "--set",
        "data.start_date=2026-01-02",
        "--set",
        "data.train_days=1",
        "--set",
        "np=1",
        # batches assembled in the trainer's own process (the child process costs seconds per
        # training; tests/test_data.py covers it); also shows train_overrides reach each run
        "--set",
        "train_overrides=[data.input_process=false, epochs=2]",
    ]
    env_uri = {"MLFLOW_TRACKING_URI": mlflow_server}
    command = [sys.executable, "-m", "experiments", "paper-table", *options]
    result = run_command(command, timeout=800, env=env_uri)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    seeds = config.load_experiment_config(CONFIG, True, []).seeds
    assert len(seeds) >= 2
    assert f"{len(variants) * len(seeds)} trainings run, 0 reused" in result.stderr

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
    assert {c.data.params["data.input_process"] for c in children} == {"False"}
    # the protocol: each run validated on 2026-01-03, kept its best epoch of up to two, and
    # reports the test day 2026-01-04
    assert {c.data.tags["valid_date"] for c in children} == {"2026-01-03"}
    assert {c.data.tags["eval_date"] for c in children} == {"2026-01-04"}
    assert {c.data.metrics["kept_epoch"] for c in children} <= {1.0, 2.0}
    for row in rows:
        assert 1.0 <= float(row["kept_epoch_mean"]) <= 2.0
    assert "kept epoch" in markdown
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"paper_table.md", "paper_table.csv", "paper_table.png"} <= artifacts
    # the CSV's run ids are those children
    ids = {i for r in rows for i in r["mlflow_run_ids"].split()}
    assert ids == {c.info.run_id for c in children}

    # ranking reuses the same trainings (cache) and adds its table under a new parent; it
    # launches nothing, so it runs in-process
    restore_mlflow_tracking_uri.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    capsys.readouterr()
    assert cli.main(["ranking", *options]) == 0
    err = capsys.readouterr().err
    assert f"0 trainings run, {len(variants) * len(seeds)} reused" in err, err[-3000:]
    table = Path(workdir / "results" / "ranking" / "ranking.csv").read_text().splitlines()
    assert len(table) == 1 + len(variants)
    (ranking_parent,) = client.search_runs(
        [experiment_id], "tags.esmm.experiment_command = 'ranking'"
    )
    assert ranking_parent.info.status == "FINISHED"
    assert "ranking.csv" in {a.path for a in client.list_artifacts(ranking_parent.info.run_id)}
