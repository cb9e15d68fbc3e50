"""The promotion gate's rule (pure, no MLflow) and its config file."""

from __future__ import annotations

import math

import pytest

from contract.config import ConfigError, load_config
from esmm.promotion import (
    NAN_PREDICTIONS,
    GateConfig,
    PipelineConfig,
    decide,
    decision_tags,
)
from tests.helpers import PROJECT_ROOT, sqlite_store

SANE = {
    "ctr_auc": 0.70,
    "cvr_auc": 0.72,
    "ctcvr_auc": 0.71,
    "ctr_calibration": 1.05,
    "cvr_calibration": 0.95,
    "ctcvr_calibration": 1.1,
    NAN_PREDICTIONS: 0.0,
}
CFG = GateConfig(metric="cvr_auc", min_improvement=0.01, calibration_bounds=(0.5, 2.0))


def test_first_sane_model_becomes_champion():
    decision = decide(SANE, None, CFG)
    assert decision.promote and decision.label == "promoted"
    assert decision.champion_value is None
    assert "no champion" in decision.reason


def test_worse_challenger_keeps_the_champion():
    decision = decide({**SANE, "cvr_auc": 0.70}, SANE, CFG)
    assert not decision.promote and decision.label == "rejected"
    assert decision.challenger_value == 0.70 and decision.champion_value == 0.72


def test_better_challenger_is_promoted():
    assert decide({**SANE, "cvr_auc": 0.75}, SANE, CFG).promote


def test_margin_is_respected():
    # +0.009 is below the 0.01 margin, +0.011 above it
    assert not decide({**SANE, "cvr_auc": 0.729}, SANE, CFG).promote
    assert decide({**SANE, "cvr_auc": 0.731}, SANE, CFG).promote
    assert decide({**SANE, "cvr_auc": 0.729}, SANE, CFG.model_copy(update={"min_improvement": 0}))


def test_lower_is_better_metric_is_compared_the_other_way():
    cfg = CFG.model_copy(update={"metric": "cvr_logloss", "higher_is_better": False})
    assert decide({**SANE, "cvr_logloss": 0.40}, {**SANE, "cvr_logloss": 0.45}, cfg).promote
    assert not decide({**SANE, "cvr_logloss": 0.45}, {**SANE, "cvr_logloss": 0.40}, cfg).promote


def test_nan_challenger_is_refused_even_without_a_champion():
    decision = decide({**SANE, NAN_PREDICTIONS: 12.0, "cvr_auc": math.nan}, None, CFG)
    assert not decision.promote
    assert "12 NaN/inf predictions" in decision.reason
    assert "cvr_auc=nan" in decision.reason


@pytest.mark.parametrize("calibration", [0.3, 2.5, math.nan])
def test_calibration_out_of_bounds_is_refused(calibration):
    decision = decide({**SANE, "cvr_auc": 0.9, "ctr_calibration": calibration}, SANE, CFG)
    assert not decision.promote
    assert "ctr_calibration" in decision.reason


def test_auc_at_chance_is_refused():
    decision = decide({**SANE, "ctcvr_auc": 0.5}, None, CFG)
    assert not decision.promote and "ctcvr_auc" in decision.reason


def test_decision_tags_record_both_values_and_the_champion_version():
    tags = decision_tags(decide({**SANE, "cvr_auc": 0.70}, SANE, CFG), "3", "2026-01-05")
    assert tags["decision"] == "rejected"
    assert tags["challenger_cvr_auc"] == "0.700000"
    assert tags["champion_cvr_auc"] == "0.720000"
    assert tags["champion_version_compared"] == "3"
    assert tags["decision_eval_date"] == "2026-01-05"
    assert all(isinstance(v, str) for v in tags.values())


def test_shipped_pipeline_config_validates():
    cfg = load_config(PROJECT_ROOT / "conf" / "pipeline.yaml", PipelineConfig)
    assert cfg.promotion.alias == "champion"
    assert cfg.dag["train_window_days"] >= 1


def test_unordered_calibration_bounds_are_a_config_error(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text("promotion:\n  calibration_bounds: [2.0, 0.5]\n")
    with pytest.raises(ConfigError, match="calibration_bounds"):
        load_config(path, PipelineConfig)


@pytest.mark.integration
def test_gate_glue_promotes_the_first_model_and_tags_the_second_decision(tmp_path):
    import mlflow

    from esmm.promotion import run_gate
    from tests.feature_fixtures import register_untrained_model, small_fields, write_feature_day

    fields = small_fields()
    write_feature_day(tmp_path / "features", "2026-01-05", fields, rows=800, seed=1)
    uri = sqlite_store(tmp_path / "mlflow.db")
    first = register_untrained_model(uri, "gated", fields, seed=1)
    second = register_untrained_model(uri, "gated", fields, seed=2)
    client = mlflow.MlflowClient(tracking_uri=uri)
    # untrained models: the sanity bounds are opened so that the plumbing is what is tested
    cfg = GateConfig(min_auc=0.0, calibration_bounds=(0.0, 1000.0), min_improvement=1.0)
    features = str(tmp_path / "features")

    decision = run_gate(client, "gated", first, features, "2026-01-05", cfg)
    assert decision.promote
    assert str(client.get_model_version_by_alias("gated", "champion").version) == first
    # a retried task must not demote the champion it just promoted
    assert run_gate(client, "gated", first, features, "2026-01-05", cfg).promote

    decision = run_gate(client, "gated", second, features, "2026-01-05", cfg)
    assert not decision.promote  # a margin of 1.0 AUC cannot be met
    tags = client.get_model_version("gated", second).tags
    assert tags["decision"] == "rejected"
    assert tags["champion_version_compared"] == first
    assert float(tags["champion_cvr_auc"]) == pytest.approx(decision.champion_value, abs=1e-6)
    assert str(client.get_model_version_by_alias("gated", "champion").version) == first


def test_cli_bad_config_key_is_one_line_and_exit_2(capsys):
    from esmm.promotion import main

    args = ["--model", "m", "--version", "1", "--features", "x", "--eval-date", "2026-01-01"]
    code = main([*args, "--set", "promotion.bogus=1"])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("esmm.promotion: error:") and "promotion.bogus: unknown key" in line
