"""The funnel simulator: determinism, the oracle contract, the latent model's knobs, dirt."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from contract.config import ConfigError, load_config
from features.config import SimulatorConfig
from features.simulator import simulate, uniform

ROOT = Path(__file__).resolve().parents[1]
START = dt.date(2024, 1, 1)


def _preset(*overrides: str):
    small = ("presets.tiny.impressions_per_day=600", *overrides)
    return load_config(ROOT / "conf/simulator.yaml", SimulatorConfig, small).preset("tiny")


def _snapshot(logs) -> dict[str, list]:
    """Every output of a simulation as sorted lists of rows (layout-independent)."""
    out = {}
    for name in ("impressions", "clicks", "conversions"):
        out[name] = sorted(tuple(r) for r in getattr(logs, name).collect())
    for name in ("users", "items", "oracle"):
        frame = getattr(logs, name)
        out[name] = sorted(json.dumps(r.asDict(), sort_keys=True) for r in frame.collect())
    return out


@pytest.fixture(scope="module")
def small_run(spark):
    return _snapshot(simulate(spark, _preset(), START, 2, seed=3, partitions=1))


def test_same_seed_with_other_partitioning_gives_identical_output(spark, small_run):
    again = _snapshot(simulate(spark, _preset(), START, 2, seed=3, partitions=5))
    assert again == small_run


def test_other_seed_gives_other_data(spark, small_run):
    other = simulate(spark, _preset(), START, 2, seed=4, partitions=1)
    assert sorted(tuple(r) for r in other.impressions.collect()) != small_run["impressions"]


def test_oracle_has_exactly_the_contract_columns(spark):
    oracle = simulate(spark, _preset(), START, 1, seed=3).oracle.drop("dt")
    assert [(f.name, f.dataType.simpleString()) for f in oracle.schema.fields] == [
        ("impression_id", "string"),
        ("pctr", "double"),
        ("pcvr", "double"),
        ("click", "int"),
        ("conversion_if_clicked", "int"),
    ]


def test_observed_conversions_are_the_draw_of_clicked_impressions_only(small_run):
    oracle = [json.loads(r) for r in small_run["oracle"]]
    truth = {r["impression_id"]: r for r in oracle}
    converted = set()
    for _, line in small_run["conversions"]:
        record = json.loads(line) if line.endswith("}") else None
        if record and str(record.get("conversion_id", "")).startswith("v-"):
            converted.add(record["conversion_id"][2:])
    expected = {i for i, r in truth.items() if r["click"] == 1 and r["conversion_if_clicked"] == 1}
    assert converted == expected
    # Unclicked impressions still carry a counterfactual label, and some of them are 1.
    assert any(r["click"] == 0 and r["conversion_if_clicked"] == 1 for r in oracle)


def test_every_kind_of_dirt_is_present_at_nonzero_rates(small_run):
    clicks = [line for _, line in small_run["clicks"]]
    lines = [json.loads(line) for line in clicks if line.endswith("}")]
    assert len(lines) < len(clicks)  # malformed (truncated) lines
    ids = [r.get("click_id") for r in lines]
    assert len(ids) > len(set(ids))  # duplicated event ids
    assert any("impression_id" not in r for r in lines)  # missing key
    assert any(str(r.get("impression_id", "")).startswith("ghost-") for r in lines)  # unknown
    folders = {d for d, _ in small_run["clicks"]}
    assert "2024-01-03" in folders  # late events land after the last simulated day


def test_selection_bias_knob_separates_click_and_conversion_drivers(spark):
    def correlation(bias: float) -> float:
        preset = _preset(
            "presets.tiny.impressions_per_day=3000", f"presets.tiny.funnel.selection_bias={bias}"
        )
        oracle = simulate(spark, preset, START, 1, seed=1).oracle
        return oracle.agg(F.corr("pctr", "pcvr")).first()[0]

    assert correlation(1.0) < correlation(0.0) - 0.2


def test_uniform_draws_cover_the_unit_interval(spark):
    draws = spark.range(20000).select(F.expr(uniform(5, "s", "id")).alias("u"))
    stats = draws.agg(F.min("u"), F.max("u"), F.avg("u")).first()
    assert 0.0 <= stats[0] < 0.001 and 0.999 < stats[1] < 1.0
    assert abs(stats[2] - 0.5) < 0.01


def test_user_bags_vary_in_length_and_exceed_max_len(small_run):
    users = [json.loads(r) for r in small_run["users"]]
    lengths = {len(u["recent_categories"]) for u in users}
    assert 0 in lengths and max(lengths) > 8


def test_unknown_preset_key_is_a_config_error():
    with pytest.raises(ConfigError, match="selection_bias"):
        _preset("presets.tiny.funnel.selection_bias=2.0")
