"""Exact AUC (against a brute-force pair count), log loss, calibration, the evaluation protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest

from esmm.metrics import (
    calibration,
    calibration_curve,
    evaluate_predictions,
    logloss,
    roc_auc,
)


def brute_force_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> float:
    won = total = 0.0
    for i in np.flatnonzero(labels == 1):
        for j in np.flatnonzero(labels == 0):
            pair = weights[i] * weights[j]
            total += pair
            if scores[i] > scores[j]:
                won += pair
            elif scores[i] == scores[j]:
                won += 0.5 * pair
    return won / total


def test_auc_matches_brute_force_pair_count_with_many_ties() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = rng.integers(0, 8, 300).astype(float) + 0.5 * labels  # few distinct scores
    expected = brute_force_auc(labels, scores, np.ones(300))
    assert roc_auc(labels, scores) == pytest.approx(expected, abs=1e-12)


def test_weighted_auc_matches_brute_force_weighted_pair_count() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    scores = rng.integers(0, 5, 200).astype(float)
    weights = rng.uniform(0.1, 3.0, 200)
    expected = brute_force_auc(labels, scores, weights)
    assert roc_auc(labels, scores, weights) == pytest.approx(expected, abs=1e-12)


def test_auc_of_perfect_reversed_and_constant_scores() -> None:
    labels = np.array([0, 0, 1, 1])
    assert roc_auc(labels, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert roc_auc(labels, np.array([0.4, 0.3, 0.2, 0.1])) == 0.0
    assert roc_auc(labels, np.full(4, 0.7)) == 0.5


@pytest.mark.parametrize("labels", [np.zeros(5), np.ones(5), np.zeros(0)])
def test_auc_is_nan_when_only_one_class_is_present(labels: np.ndarray) -> None:
    assert math.isnan(roc_auc(labels, np.linspace(0, 1, labels.size)))


def test_auc_is_nan_when_a_score_is_nan() -> None:
    assert math.isnan(roc_auc(np.array([0, 1, 1]), np.array([0.1, np.nan, 0.9])))


def test_logloss_matches_hand_computation_and_clips_certain_mistakes() -> None:
    expected = -(math.log(0.8) + math.log(1 - 0.3)) / 2
    assert logloss(np.array([1, 0]), np.array([0.8, 0.3])) == pytest.approx(expected)
    assert logloss(np.array([1]), np.array([0.0])) == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_calibration_is_mean_prediction_over_positive_rate() -> None:
    assert calibration(np.array([1, 0, 0, 1]), np.array([0.2, 0.1, 0.1, 0.4])) == pytest.approx(
        0.2 / 0.5
    )
    assert math.isnan(calibration(np.zeros(3), np.array([0.1, 0.2, 0.3])))


def test_calibration_curve_quantile_bins_hold_equal_counts() -> None:
    scores = np.array([0.01, 0.02, 0.03, 0.04, 0.5, 0.6, 0.7, 0.8])
    labels = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    curve = calibration_curve(labels, scores, bins=2)
    assert curve.count.tolist() == [4, 4]
    np.testing.assert_allclose(curve.mean_predicted, [0.025, 0.65])
    np.testing.assert_allclose(curve.observed_rate, [0.25, 0.75])


def test_calibration_curve_uniform_bins_drop_empty_bins() -> None:
    curve = calibration_curve(
        np.array([0, 1, 1]), np.array([0.05, 0.95, 1.0]), bins=10, strategy="uniform"
    )
    assert curve.count.tolist() == [1, 2]
    np.testing.assert_allclose(curve.observed_rate, [0.0, 1.0])


def funnel_arrays() -> dict[str, np.ndarray]:
    # Clicked impressions 0-3, unclicked 4-7. The model's pCVR ranks the clicked ones
    # perfectly but gets the unclicked ones' counterfactual conversions backwards.
    return {
        "click": np.array([1, 1, 1, 1, 0, 0, 0, 0]),
        "conversion": np.array([1, 0, 1, 0, 0, 0, 0, 0]),
        "pctr": np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]),
        "pcvr": np.array([0.9, 0.1, 0.8, 0.2, 0.05, 0.95, 0.04, 0.96]),
        "pctcvr": np.array([0.81, 0.08, 0.56, 0.12, 0.02, 0.38, 0.01, 0.19]),
        "conversion_if_clicked": np.array([1, 0, 1, 0, 1, 0, 1, 0]),
        "oracle_pctr": np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]),
        "oracle_pcvr": np.array([0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.6, 0.4]),
    }


def test_evaluate_predictions_cvr_auc_uses_clicked_impressions_only() -> None:
    arrays = funnel_arrays()
    metrics = evaluate_predictions(arrays)
    assert metrics["cvr_auc"] == 1.0
    assert metrics["cvr_calibration"] == pytest.approx((0.9 + 0.1 + 0.8 + 0.2) / 2)
    expected_logloss = -(math.log(0.9) + math.log(0.9) + math.log(0.8) + math.log(0.8)) / 4
    assert metrics["cvr_logloss"] == pytest.approx(expected_logloss)
    assert metrics["ctr_auc"] == 1.0
    ctcvr = arrays["click"] * arrays["conversion"]
    assert metrics["ctcvr_auc"] == pytest.approx(
        brute_force_auc(ctcvr, arrays["pctcvr"], np.ones(8))
    )


def test_evaluate_predictions_entire_space_cvr_auc_sees_the_unclicked_impressions() -> None:
    arrays = funnel_arrays()
    metrics = evaluate_predictions(arrays)
    expected = brute_force_auc(arrays["conversion_if_clicked"], arrays["pcvr"], np.ones(8))
    assert metrics["entire_space_cvr_auc"] == pytest.approx(expected)
    assert metrics["entire_space_cvr_auc"] < metrics["cvr_auc"]
    assert metrics["oracle_entire_space_cvr_auc"] == 1.0
    assert metrics["oracle_cvr_auc"] == 1.0
    oracle_pctcvr = arrays["oracle_pctr"] * arrays["oracle_pcvr"]
    ctcvr = arrays["click"] * arrays["conversion"]
    assert metrics["oracle_ctcvr_auc"] == pytest.approx(
        brute_force_auc(ctcvr, oracle_pctcvr, np.ones(8))
    )
    assert metrics["oracle_ctr_auc"] == 1.0


def test_evaluate_predictions_without_oracle_reports_only_the_papers_metrics() -> None:
    paper_arrays = ("click", "conversion", "pctr", "pcvr", "pctcvr")
    arrays = {k: v for k, v in funnel_arrays().items() if k in paper_arrays}
    assert set(evaluate_predictions(arrays)) == {
        f"{task}_{metric}"
        for task in ("ctr", "cvr", "ctcvr")
        for metric in ("auc", "logloss", "calibration")
    }


def test_evaluate_predictions_names_missing_arrays() -> None:
    arrays = funnel_arrays()
    del arrays["pcvr"]
    with pytest.raises(KeyError, match="pcvr"):
        evaluate_predictions(arrays)


def test_roc_curve_area_matches_roc_auc_with_ties():
    from esmm.metrics import roc_auc, roc_curve

    labels = np.array([0, 1, 0, 1, 1, 0, 0, 1])
    scores = np.array([0.1, 0.4, 0.4, 0.8, 0.2, 0.3, 0.8, 0.9])
    fpr, tpr = roc_curve(labels, scores)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))  # trapezoids = ties averaged
    assert area == pytest.approx(roc_auc(labels, scores))


def test_estimation_bias_is_mean_prediction_over_mean_truth() -> None:
    from esmm.metrics import estimation_bias

    assert estimation_bias(np.array([0.1, 0.3]), np.array([0.05, 0.15])) == pytest.approx(2.0)
    assert estimation_bias(np.array([0.2, 0.2]), np.array([0.4, 0.4])) == pytest.approx(0.5)
    assert math.isnan(estimation_bias(np.array([0.2]), np.array([0.0])))
    assert math.isnan(estimation_bias(np.zeros(0), np.zeros(0)))


def ieb_arrays() -> dict[str, np.ndarray]:
    # True pCVR 0.1 everywhere; the model predicts 0.3 on the 2 clicked impressions and 0.1 on
    # the 2 unclicked ones (where ESMM-style bias would hide from the clicked-only metrics).
    return {
        "click": np.array([1, 1, 0, 0]),
        "conversion": np.array([1, 0, 0, 0]),
        "pctr": np.array([0.8, 0.6, 0.3, 0.1]),
        "pcvr": np.array([0.3, 0.3, 0.1, 0.1]),
        "pctcvr": np.array([0.24, 0.18, 0.03, 0.01]),
        "oracle_pctr": np.array([0.8, 0.6, 0.3, 0.1]),
        "oracle_pcvr": np.array([0.1, 0.1, 0.1, 0.1]),
        "conversion_if_clicked": np.array([1, 0, 0, 0]),
    }


def test_cvr_ieb_compares_mean_pcvr_with_true_pcvr_over_all_and_clicked_impressions() -> None:
    metrics = evaluate_predictions(ieb_arrays())
    assert metrics["cvr_ieb"] == pytest.approx(0.2 / 0.1)  # mean 0.2 vs true 0.1
    assert metrics["cvr_ieb_clicked"] == pytest.approx(0.3 / 0.1)
    # one counterfactual conversion in 4 impressions: 0.2 / 0.25
    assert metrics["cvr_ieb_vs_counterfactual"] == pytest.approx(0.8)


def test_cvr_ieb_deciles_follow_the_models_pctr_from_lowest_to_highest() -> None:
    rng = np.random.default_rng(3)
    n = 40  # 4 impressions per decile
    pctr = np.linspace(0.01, 0.8, n)
    decile = np.arange(n) // 4 + 1  # 1 = lowest pCTR
    oracle_pcvr = rng.uniform(0.02, 0.08, n)
    # within decile k the model predicts k × the truth on average (per impression too)
    pcvr = decile * oracle_pcvr
    shuffle = rng.permutation(n)  # the metric must sort by pCTR, not trust the input order
    click = (rng.uniform(size=n) < pctr).astype(int)
    arrays = {
        "click": click[shuffle],
        "conversion": np.zeros(n, dtype=int),
        "pctr": pctr[shuffle],
        "pcvr": pcvr[shuffle],
        "pctcvr": (pctr * pcvr)[shuffle],
        # the oracle pCTR ranks the impressions in reverse: the deciles must not use it
        "oracle_pctr": pctr[::-1][shuffle],
        "oracle_pcvr": oracle_pcvr[shuffle],
    }
    metrics = evaluate_predictions(arrays)
    for k in range(1, 11):
        assert metrics[f"cvr_ieb_ctr_decile_{k}"] == pytest.approx(float(k)), k
    assert f"cvr_ieb_ctr_decile_{11}" not in metrics


def test_ieb_deciles_stay_equal_count_when_pctr_is_tied() -> None:
    from esmm.metrics import estimation_bias_by_quantile

    predicted = np.arange(1, 21, dtype=float) / 100  # 20 impressions, all with the same pCTR
    ratios = estimation_bias_by_quantile(predicted, np.full(20, 0.01), by=np.full(20, 0.5))
    # ties are split in input order: decile k holds impressions 2k-1 and 2k
    np.testing.assert_allclose(ratios, [(2 * k - 1 + 2 * k) / 2 for k in range(1, 11)])


def test_ieb_metrics_need_the_oracle_pcvr() -> None:
    arrays = ieb_arrays()
    del arrays["oracle_pcvr"]
    metrics = evaluate_predictions(arrays)
    assert not any(name.startswith("cvr_ieb_ctr") for name in metrics)
    assert "cvr_ieb" not in metrics and "cvr_ieb_clicked" not in metrics
