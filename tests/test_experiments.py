"""The experiment driver (``experiments``): the tables from known numbers (unit), the cache
key, the command line's errors (in-process), and ``paper-table --quick`` for real: the
simulator and the feature job under spark-submit, horovodrun trainings under one MLflow parent
run on a real tracking server, then ``ranking`` from the cache."""

from __future__ import annotations

import csv
import dataclasses
import json
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
from experiments import reference as reference_module
from tests.helpers import run_command, sqlite_store

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
    assert table.rows[1][header.index("CVR AUC (clicked)") + 1] == "+3.00 ± 1.00"
    assert table.rows[1][header.index("CVR AUC (entire space)") + 1] == "+9.00 ± 1.00"
    assert table.rows[2][header.index("CTCVR AUC")] == "90.00"
    md, csv_path = table.write(tmp_path)
    assert md.read_text().count("\n|") == 5  # header, separator, 3 rows
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["model"] for r in rows] == ["base", "esmm"]
    assert float(rows[1]["cvr_auc_mean"]) == pytest.approx(0.69)
    assert rows[1]["mlflow_run_ids"] == "run-esmm-1 run-esmm-2"


def test_comparison_table_pairs_gains_by_seed_and_reports_the_seed_effect(tmp_path):
    # seed 2 adds 4 points to both methods: unpaired, the gap's error is 2.83 points; paired
    # (the same seeds), the per-seed differences are both +1, so it is 0
    results = [
        result("base", 1, cvr_auc=0.60, ctcvr_auc=0.6, entire_space_cvr_auc=0.60),
        result("base", 2, cvr_auc=0.64, ctcvr_auc=0.6, entire_space_cvr_auc=0.64),
        result("esmm", 1, cvr_auc=0.61, ctcvr_auc=0.6, entire_space_cvr_auc=0.61),
        result("esmm", 2, cvr_auc=0.65, ctcvr_auc=0.6, entire_space_cvr_auc=0.65),
        # other seeds than base's: the unpaired error
        result("aman", 3, cvr_auc=0.58, ctcvr_auc=0.6, entire_space_cvr_auc=0.58),
        result("aman", 4, cvr_auc=0.62, ctcvr_auc=0.6, entire_space_cvr_auc=0.62),
    ]
    table = tables.comparison_table("t", "title", "model", results, reference="base")
    gain = table.header.index("CVR AUC (clicked)") + 1
    assert [row[gain] for row in table.rows[:3]] == ["+0.00", "+1.00 ± 0.00", "-2.00 ± 2.83"]
    assert tables.fmt_gap(*tables.gap_with_error(results[:2], results[2:4], "cvr_auc")) == (
        "+1.00 ± 2.83"
    )
    # seeds 1 and 2 are shared by base and esmm (aman's 3 and 4 by aman alone)
    effect = next(n for n in table.notes if n.startswith("Seed effect"))
    assert "seed 1 -2.00, seed 2 +2.00, seed 3 -2.00, seed 4 +2.00" in effect
    _, csv_path = table.write(tmp_path)
    esmm = list(csv.DictReader(csv_path.open()))[1]
    assert float(esmm["gain_cvr_auc"]) == pytest.approx(0.01)
    assert float(esmm["gain_cvr_auc_stderr"]) == pytest.approx(0.0, abs=1e-12)


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
    assert "fields_config: conf/fields.yaml" in train_text and "  embedding_dim: 18 " in train_text
    assert "  sparse_lr: 0.01 " in train_text
    train_yaml.write_text(
        train_text.replace("fields_config: conf/fields.yaml", f"fields_config: {fields_yaml}")
    )
    cfg = config.load_experiment_config(CONFIG, False, [f"train_config={train_yaml}"])
    spec = runner.RunSpec("esmm", "esmm", 1, config.DataSpec())
    key = spec.key(cfg)
    assert dataclasses.replace(spec, label="(1, 0, 1)").key(cfg) == key  # a label is no setting
    # an override that restates the file's value is no setting either
    assert dataclasses.replace(spec, overrides=("optim.sparse_lr=0.01",)).key(cfg) == key
    as_override = dataclasses.replace(spec, overrides=("optim.sparse_lr=0.02",)).key(cfg)
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
    dim = train_yaml.read_text().replace("embedding_dim: 18 ", "embedding_dim: 16 ")
    train_yaml.write_text(dim)
    changed["train config contents"] = spec.key(cfg)
    fields_yaml.write_text(fields_yaml.read_text().replace("num_buckets: 8}", "num_buckets: 9}", 1))
    changed["field list contents"] = spec.key(cfg)
    assert key not in changed.values(), {k: v for k, v in changed.items() if v == key}
    assert len(set(changed.values())) == len(changed)

    # a setting made the file's default is the training it was as an override (its summary
    # stays valid), and the file's old value as an override is the training before
    dim = train_yaml.read_text().replace("embedding_dim: 16 ", "embedding_dim: 18 ")
    train_yaml.write_text(dim)
    fields_yaml.write_text(Path("conf/fields.yaml").read_text())
    assert spec.key(cfg) == key
    train_yaml.write_text(train_yaml.read_text().replace("sparse_lr: 0.01 ", "sparse_lr: 0.02 "))
    assert spec.key(cfg) == as_override
    assert dataclasses.replace(spec, overrides=("optim.sparse_lr=0.01",)).key(cfg) == key

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
        "paper_table.torch_rechub=false",
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
    # one seed: a training per variant is what this test needs (runs under one parent, the
    # tables, the cache); the spread over seeds is test_comparison_table_...'s
    seeds = [1]
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
        "--set",
        f"seeds={seeds}",
        # batches assembled in the trainer's own process (the child process costs seconds per
        # training; tests/test_data.py covers it); also shows train_overrides reach each run
        "--set",
        "train_overrides=[data.input_process=false, epochs=2]",
    ]
    env_uri = {"MLFLOW_TRACKING_URI": mlflow_server}
    command = [sys.executable, "-m", "experiments", "paper-table", *options]
    result = run_command(command, timeout=800, env=env_uri)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{len(variants) * len(seeds)} trainings run, 0 reused" in result.stderr

    out = workdir / "results" / "paper_table"
    rows = list(csv.DictReader((out / "paper_table.csv").open()))
    assert [r["model"] for r in rows] == variants
    for row in rows:
        assert int(row["seeds"]) == len(seeds)
        for metric in ("ctr_auc", "cvr_auc", "ctcvr_auc", "entire_space_cvr_auc"):
            assert 0.0 <= float(row[f"{metric}_mean"]) <= 1.0, (row["model"], metric)
            assert math.isnan(float(row[f"{metric}_std"]))  # one seed: no spread
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


def test_named_datasets_overlay_data_and_unknown_names_are_errors():
    cfg = config.load_experiment_config(CONFIG, False, [])
    sparse = cfg.dataset("sparse")
    assert sparse.preset == "sparse" and sparse.train_days == cfg.data.train_days
    assert sparse.key() != cfg.data.key()
    assert cfg.dataset("dense") == cfg.data.model_copy(update={"preset": "demo"})
    assert set(cfg.map.levels) <= set(cfg.datasets) and cfg.map.reference in cfg.map.variants
    for sets, message in (
        (["map.levels=[dense, nope]"], r"unknown dataset\(s\) nope; known: dense, medium"),
        (["memorisation.datasets=[huge]"], r"unknown dataset\(s\) huge"),
        (["datasets.sparse.eval_dayz=2"], r"datasets: .*sparse: eval_dayz: Extra inputs"),
        (["map.reference=aman"], r"reference 'aman' is not one of variants"),
    ):
        with pytest.raises(ConfigError, match=message):
            config.load_experiment_config(CONFIG, False, sets)


def cell_results(base: list[float], other: list[float], variant: str = "esmm"):
    runs = [result("base", s, cvr_auc=v, entire_space_cvr_auc=v - 0.1) for s, v in enumerate(base)]
    runs += [
        result(variant, s, cvr_auc=v, entire_space_cvr_auc=v - 0.05, kept_epoch=2)
        for s, v in enumerate(other)
    ]
    return runs


def test_map_table_gives_every_gap_with_its_standard_error_and_the_heatmap(tmp_path):
    from experiments.plots import plot_map

    cells = {
        ("dense", 0.0): cell_results([0.70, 0.72], [0.69, 0.69]),
        ("dense", 1.0): cell_results([0.60, 0.62], [0.64, 0.66]),
        ("sparse", 0.0): cell_results([0.55, 0.55], [0.56, 0.56]),
        ("sparse", 1.0): cell_results([0.50, 0.52], [0.55, 0.57]),
    }
    table = tables.map_table(cells, ["base", "esmm"], "base", {("dense", 0.0): "demo: 30% cold"})
    column = {name: i for i, name in enumerate(table.csv_header)}
    by_cell = {(r[0], r[1]): r for r in table.csv_rows}
    dense_1 = by_cell["dense", 1.0]
    assert dense_1[column["esmm_minus_base_cvr_auc"]] == pytest.approx(0.04)
    assert dense_1[column["esmm_minus_base_cvr_auc_stderr"]] == pytest.approx(
        math.sqrt(0.0002 / 2 + 0.0002 / 2)
    )
    # entire space: esmm's is cvr - 0.05, base's cvr - 0.1: the gap is 0.05 more
    assert dense_1[column["esmm_minus_base_entire_space_cvr_auc"]] == pytest.approx(0.09)
    assert by_cell["sparse", 0.0][column["esmm_minus_base_cvr_auc_stderr"]] == pytest.approx(0)
    assert table.rows[0][:4] == ["dense", "demo: 30% cold", "0", "2"]
    assert table.rows[0][6] == "-2.00 ± 1.00" and table.rows[0][-1] == "n/a, 2"
    png = plot_map(table, ["base", "esmm"], "base", tmp_path / "map.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_memorisation_table_judges_on_validation_metrics_only():
    def run(label, variant, seed, valid, test):
        spec = runner.RunSpec(label, variant, seed, config.DataSpec(), ())
        metrics = {"kept_valid_cvr_auc": valid, "kept_valid_ctr_auc": 0.6, "cvr_auc": test}
        return runner.RunResult(spec, "r", metrics, 1.0)

    results = [
        run("defaults", "base", 1, 0.60, 0.99),
        run("defaults", "base", 2, 0.62, 0.99),
        run("L2", "base", 1, 0.64, 0.11),
        run("L2", "base", 2, 0.66, 0.11),
    ]
    table = tables.memorisation_table({"sparse": results}, ["base"], "defaults")
    assert [row[:2] for row in table.rows] == [["sparse", "defaults"], ["sparse", "L2"]]
    assert table.rows[1][2:4] == ["65.00 ± 1.41", "+4.00 ± 1.41"]
    assert table.rows[0][3] == "-"
    # the test day's numbers (0.99, 0.11) appear nowhere: the table cannot be tuned on them
    text = table.markdown() + repr(table.csv_rows)
    assert "99" not in text and "11.00" not in text and "0.11" not in text


def test_spread_table_shows_the_validation_spread_over_seeds_and_never_the_test_day():
    def run(label, seed, valid_es, valid_cvr, test):
        spec = runner.RunSpec(label, "esmm", seed, config.DataSpec(), ())
        metrics = {
            "kept_valid_entire_space_cvr_auc": valid_es,
            "kept_valid_cvr_auc": valid_cvr,
            "entire_space_cvr_auc": test,
            "kept_epoch": 1.0,
        }
        return runner.RunResult(spec, "r", metrics, 1.0)

    results = [
        run("defaults", 1, 0.60, 0.70, 0.93),
        run("defaults", 2, 0.64, 0.70, 0.93),
        run("averaged", 1, 0.62, 0.71, 0.17),
        run("averaged", 2, 0.63, 0.71, 0.17),
    ]
    table = tables.spread_table({"sparse": results}, ["esmm"], "defaults")
    assert table.name == "spread"
    assert table.header[2:7] == [
        "esmm valid entire-space CVR AUC",
        "change",
        "esmm valid CVR AUC (clicked)",
        "change",
        "esmm kept epoch",
    ]
    assert table.rows[0][2:4] == ["62.00 ± 2.83", "-"]
    assert table.rows[1][2:6] == ["62.50 ± 0.71", "+0.50 ± 2.06", "71.00 ± 0.00", "+1.00 ± 0.00"]
    text = table.markdown() + repr(table.csv_rows)
    assert "93" not in text and "17.00" not in text and "0.17" not in text


def test_the_map_rebuilds_offline_from_kept_summaries_and_says_which_are_missing(tmp_path, capsys):
    import json

    sets = [
        f"workdir={tmp_path / 'work'}",
        f"results_dir={tmp_path / 'summaries'}",
        "map.levels=[dense, sparse]",
        "map.biases=[0.0, 1.0]",
        "map.variants=[base, esmm]",
        "seeds=[1, 2]",
    ]
    cfg = config.load_experiment_config(CONFIG, False, sets)
    runs = tmp_path / "summaries"
    (runs / "datasets").mkdir(parents=True)
    for level in cfg.map.levels:
        for bias in cfg.map.biases:
            data = cfg.dataset(level).model_copy(update={"selection_bias": bias})
            for variant in cfg.map.variants:
                for seed in cfg.seeds:
                    spec = runner.RunSpec(variant, variant, seed, data)
                    cvr = 0.6 + (0.01 * seed) + (0.02 * bias if variant == "esmm" else 0)
                    summary = {"run_id": f"r{seed}", "metrics": {"cvr_auc": cvr}, "seconds": 1}
                    (runs / f"{spec.key(cfg)}.json").write_text(json.dumps(summary))
    argv = ["map", "--config", CONFIG, "--offline", *[x for kv in sets for x in ("--set", kv)]]
    assert cli.main(argv) == 0
    out = tmp_path / "work" / "results" / "map"
    rows = list(csv.DictReader((out / "map.csv").open()))
    assert [(r["level"], float(r["selection_bias"])) for r in rows] == [
        ("dense", 0.0),
        ("dense", 1.0),
        ("sparse", 0.0),
        ("sparse", 1.0),
    ]
    assert [float(r["esmm_minus_base_cvr_auc"]) for r in rows] == pytest.approx([0, 0.02] * 2)
    assert (out / "map.png").stat().st_size > 0
    capsys.readouterr()
    assert cli.main([*argv, "--set", "seeds=[1, 2, 3]"]) == 2
    assert "no summary of training base seed 3" in capsys.readouterr().err


def regeneration_commands() -> list[list[str]]:
    """The ``--offline`` commands of docs/results/README.md, as argument lists."""
    import shlex

    text = Path("docs/results/README.md").read_text()
    found = re.findall(r"`(python -m experiments [^`]*--offline[^`]*)`", text)
    return [shlex.split(command)[3:] for command in found]


def test_the_committed_results_regenerate_from_their_summaries(tmp_path, capsys):
    """Every regeneration command of docs/results/README.md rebuilds its table from the
    committed summaries alone, and the paper table's numbers are those docs/RESULTS.md
    reports."""
    commands_ = regeneration_commands()
    assert any(c[0] == "paper-table" for c in commands_), commands_
    for argv in commands_:
        work = tmp_path / argv[0]
        assert cli.main([*argv, "--set", f"workdir={work}"]) == 0, capsys.readouterr().err
        if argv[0] != "paper-table":
            continue
        csv_path = work / "results" / "paper_table" / "paper_table.csv"
        rows = {r["model"]: r for r in csv.DictReader(csv_path.open())}
        sets = [argv[i + 1] for i, arg in enumerate(argv) if arg == "--set"]
        seeds = len(config.load_experiment_config(CONFIG, False, sets).seeds)
        assert {"base", "esmm"} <= set(rows) and int(rows["esmm"]["seeds"]) == seeds >= 3
        results_md = Path("docs/RESULTS.md").read_text()
        # a 5-seed paper table is reported whole; a diagnostic one by its ESMM rows
        shown_models = [m for m in rows if int(rows[m]["seeds"]) >= 5 or m.startswith("esmm")]
        for model in shown_models:
            row = rows[model]
            shown = tables.fmt_auc(float(row["cvr_auc_mean"]), float(row["cvr_auc_std"]))
            assert shown in results_md, (model, shown)


def test_a_paper_table_with_overrides_reuses_the_spread_runs_of_the_same_setting(tmp_path):
    sets = [f"workdir={tmp_path}", "paper_table.torch_rechub=false"]
    cfg = config.load_experiment_config(CONFIG, False, sets)
    setting = cfg.spread.settings[1]
    assert setting.sets  # the config's first candidate
    with_sets = config.load_experiment_config(
        CONFIG, False, [*sets, f"paper_table.overrides=[{', '.join(setting.sets)}]"]
    )
    data = cfg.dataset("sparse")
    spread_keys = {
        runner.RunSpec(setting.label, v, s, data, tuple(setting.sets)).key(cfg)
        for v in cfg.spread.variants
        for s in cfg.seeds_for(cfg.spread.seeds)
    }
    sparse = with_sets.model_copy(update={"data": data})
    table_keys = {spec.key(sparse) for spec in cli.paper_specs(sparse)}
    assert spread_keys <= table_keys
    # and without them the table is the defaults' (other keys)
    plain = cfg.model_copy(update={"data": data})
    assert not spread_keys & {spec.key(plain) for spec in cli.paper_specs(plain)}


def test_the_torch_rechub_reference_is_its_own_training_with_the_same_inputs(tmp_path):
    cfg = config.load_experiment_config(CONFIG, False, [f"workdir={tmp_path}"])
    assert cfg.paper_table.torch_rechub
    specs = cli.paper_specs(cfg)
    reference = [s for s in specs if s.implementation == "torch-rechub"]
    assert [s.seed for s in reference] == cfg.seeds and {s.variant for s in reference} == {"esmm"}
    ours = runner.RunSpec("esmm", "esmm", 1, cfg.data)
    assert reference[0].key(cfg) != ours.key(cfg)
    # the project's trainings keep their keys (the committed summaries stay valid)
    assert "implementation" not in ours.determinants(cfg)
    ctx = runner.Context(cfg, tmp_path, "sqlite:///unused.db", "0")
    paths = runner.DatasetPaths("/f", "/o", "2026-01-01..2026-01-03", "2026-01-04", "2026-01-05")
    command = runner.reference_command(
        ctx, reference[0], paths, "parent", tmp_path / "k.json", ["seed=1", "epochs=4"]
    )
    assert command[1:3] == ["-m", "experiments.reference"]
    joined = " ".join(command)
    for part in (
        "--config conf/train.yaml --features /f",
        "--train-dates 2026-01-01..2026-01-03 --valid-date 2026-01-04 --eval-date 2026-01-05",
        "--oracle /o --parent-run-id parent --set seed=1 --set epochs=4",
    ):
        assert part in joined, joined
    assert "--optimizer" not in command  # torch-rechub's own optimizer by default
    diagnostic = dataclasses.replace(reference[0], implementation="torch-rechub+project-lr")
    assert diagnostic.key(cfg) != reference[0].key(cfg)
    scaled = runner.reference_command(ctx, diagnostic, paths, None, tmp_path / "k.json", [])
    assert " --optimizer project --lr-scale 2 " in " ".join(scaled) + " "
    no_valid = dataclasses.replace(paths, valid_dates=None)
    with pytest.raises(ConfigError, match="needs a validation day"):
        runner.reference_command(ctx, reference[0], no_valid, None, tmp_path / "k.json", [])
    # the ablation: one change a run, its own key, torch-rechub's optimizer otherwise
    changed = dataclasses.replace(reference[0], implementation="torch-rechub+no-batchnorm")
    assert changed.key(cfg) not in {reference[0].key(cfg), diagnostic.key(cfg)}
    ablated = runner.reference_command(ctx, changed, paths, None, tmp_path / "k.json", [])
    assert " --change no-batchnorm " in " ".join(ablated) + " " and "--optimizer" not in ablated
    assert set(cfg.reference_ablation.changes) == set(reference_module.CHANGES)


def test_the_reference_ablation_table_gaps_each_change_to_torch_rechubs_defaults():
    def runs(label, cvr):
        return [
            runner.RunResult(
                runner.RunSpec(label, "esmm", seed, config.DataSpec()),
                f"{label}-{seed}",
                {"cvr_auc": c, "ctcvr_auc": 0.7, "entire_space_cvr_auc": 0.6, "kept_epoch": 1.0},
                1.0,
                False,
            )
            for seed, c in enumerate(cvr, 1)
        ]

    results = [
        *runs("rechub", [0.70, 0.72]),
        *runs("rechub + x", [0.73, 0.75]),
        *runs("esmm", [0.74, 0.74]),
    ]
    table = tables.reference_ablation_table(results, "rechub", "esmm")
    rows = {row[0]: row for row in table.rows}
    assert rows["rechub"][2] == "-"
    assert rows["rechub + x"][2] == tables.fmt_gap(0.03, math.sqrt(2 * 0.0002 / 2))
    assert rows["esmm"][1] == tables.fmt_auc(0.74, 0.0) and rows["esmm"][-1] == "1"


def test_the_torch_rechub_reference_trains_and_keeps_its_best_validation_epoch(
    tmp_path, restore_mlflow_tracking_uri
):
    """torch-rechub's ESMM for real on a small table: its summary has the trainer's metrics,
    the kept epoch's validation metrics, and the test day's entire-space ones."""
    import json

    import yaml

    from experiments import reference
    from tests.feature_fixtures import small_fields, write_feature_day

    fields = small_fields()
    fields_yaml = tmp_path / "fields.yaml"
    fields_yaml.write_text(yaml.safe_dump({"fields": [f.model_dump() for f in fields.fields]}))
    for seed, day in enumerate(("2026-01-01", "2026-01-02", "2026-01-03")):
        write_feature_day(
            tmp_path / "features", day, fields, rows=2000, seed=seed, oracle_root=tmp_path / "o"
        )
    summary = tmp_path / "summary.json"
    store = sqlite_store(tmp_path / "m.db")
    argv = [
        *("--features", str(tmp_path / "features"), "--train-dates", "2026-01-01"),
        *("--valid-date", "2026-01-02", "--eval-date", "2026-01-03"),
        *("--oracle", str(tmp_path / "o"), "--summary-json", str(summary)),
        *("--set", f"fields_config={fields_yaml}", "--set", "epochs=3"),
        *(
            "--set",
            "selection.patience=0",
            "--set",
            f"tracking.tracking_uri={store}",
        ),
    ]
    previous = mlflow.get_tracking_uri()
    try:
        assert reference.main(argv) == 0
    finally:
        mlflow.set_tracking_uri(previous)
    metrics = json.loads(summary.read_text())["metrics"]
    assert metrics["epochs_trained"] == 3 and metrics["kept_epoch"] in {1, 2, 3}
    for name in ("cvr_auc", "ctr_auc", "entire_space_cvr_auc", "kept_valid_cvr_auc"):
        assert 0.0 <= metrics[name] <= 1.0, name
    client = mlflow.MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("esmm").experiment_id])
    history = client.get_metric_history(run.info.run_id, "valid_cvr_auc")
    best = max(history, key=lambda m: (m.value, -m.step))
    assert best.step == metrics["kept_epoch"] and best.value == metrics["kept_valid_cvr_auc"]
    assert run.data.tags["implementation"] == "torch-rechub"
    assert run.data.params["optimizer"].startswith("Adam lr=1e-3 weight_decay=1e-5")

    # the diagnostic: the same model with the project's learning rates (x2 for 2 workers);
    # an MLFLOW_TRACKING_URI in the environment (MLflow may set one) wins over the config's
    for optimizer in ("project", "project-sparse"):
        restore_mlflow_tracking_uri.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert reference.main([*argv, "--optimizer", optimizer, "--lr-scale", "2"]) == 0
    runs = client.search_runs([client.get_experiment_by_name("esmm").experiment_id])
    assert len(runs) == 3
    assert {r.data.params["optimizer"] for r in runs} >= {
        "Adam lr=0.002 (towers), 0.02 (embeddings) (the project's)",
        "Adam lr=0.002 (towers), SparseAdam lr=0.02 (embeddings) (the project's)",
    }


def test_ceiling_table_reports_the_share_of_the_gap_to_the_oracle_that_data_closes():
    oracle = {"oracle_cvr_auc": 0.80, "oracle_entire_space_cvr_auc": 0.70}
    one = [result("esmm", s, cvr_auc=0.70, entire_space_cvr_auc=0.60, **oracle) for s in (1, 2)]
    ten = [result("esmm", s, cvr_auc=0.75, entire_space_cvr_auc=0.61, **oracle) for s in (1, 2)]
    table = tables.ceiling_table(one, ten, ["esmm"], 10)
    (row,) = table.csv_rows
    assert row[1:5] == pytest.approx([0.70, 0.75, 0.80, 0.5])
    assert row[5:9] == pytest.approx([0.60, 0.61, 0.70, 0.1])
    assert table.rows[0][4] == "50%" and table.header[2] == "10x"
    assert cli.preset_volume("sparse") == 250_000
    with pytest.raises(ConfigError, match="no preset 'huge'"):
        cli.preset_volume("huge")


def test_ceiling_gains_compare_each_model_with_base_at_both_volumes():
    def runs(label, clicked, everywhere):
        return [
            result(label, s, cvr_auc=clicked + d, entire_space_cvr_auc=everywhere + d)
            for s, d in ((1, -0.01), (2, 0.01))
        ]

    one = runs("base", 0.70, 0.60) + runs("esmm", 0.72, 0.59)
    ten = runs("base", 0.78, 0.70) + runs("esmm", 0.785, 0.705)
    table = tables.ceiling_gain_table(one, ten, ["base", "esmm"], 10)
    (row,) = table.csv_rows  # no row for base itself
    assert row[0] == "esmm"
    se = math.sqrt(2 * 0.01414214**2 / 2)  # each side: std 0.01414 over 2 seeds
    assert row[1:7] == pytest.approx([0.02, se, 0.005, se, -0.015, math.hypot(se, se)])
    assert row[7:13] == pytest.approx([-0.01, se, 0.005, se, 0.015, math.hypot(se, se)])
    assert table.rows[0][1] == "+2.00 ± 1.41" and table.header[2] == "− base, 10x"


def test_an_interrupted_training_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """A training whose checkpoint survives (the run was killed) is started with --resume;
    one without a checkpoint starts afresh."""
    from tests.feature_fixtures import small_fields, write_feature_day

    commands_run = []

    def run_step(title, command, *args, **kwargs):
        commands_run.append(command)
        summary = Path(command[command.index("--summary-json") + 1])
        summary.write_text(json.dumps({"run_id": "r", "metrics": {"cvr_auc": 0.7}}))
        return 1.0

    monkeypatch.setattr(runner.commands, "run_step", run_step)
    for day in ("2026-01-01", "2026-01-02", "2026-01-03", "2026-01-04"):
        write_feature_day(tmp_path / "f", day, small_fields(), rows=8)
    given = config.DataSpec(features=str(tmp_path / "f"), train_days=2, valid_days=1, eval_days=1)
    cfg = config.load_experiment_config(CONFIG, True, [f"workdir={tmp_path}"])
    ctx = runner.Context(cfg, tmp_path, "sqlite:///unused.db", "0")
    fresh, killed = (runner.RunSpec("esmm", "esmm", seed, given) for seed in (1, 2))
    checkpoint = tmp_path / "checkpoints" / killed.key(cfg) / "last.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"weights of a finished epoch")
    runner.train(ctx, fresh, None)
    runner.train(ctx, killed, None)
    assert "--resume" not in commands_run[0]
    assert commands_run[1][-1] == "--resume"
    assert commands_run[1][commands_run[1].index("--checkpoint-dir") + 1] == str(checkpoint.parent)
