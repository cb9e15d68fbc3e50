"""Evaluation metrics in plain numpy: exact AUC, log loss, calibration, and the paper's protocol.

The paper (Ma et al., SIGIR 2018, §3.1) reports the AUC of the CVR task on the clicked
impressions of the test set and the AUC of the CTCVR task on all impressions.
:func:`evaluate_predictions` computes those and, when the synthetic data's oracle is given,
what the paper could not: the CVR AUC over the ENTIRE impression space against the
counterfactual conversion label (would this impression have converted, had it been
clicked?), plus the same metrics for the true probabilities, the Bayes ceiling no model can
beat on average. With the oracle's true pCVR it also measures ESMM's Inherent Estimation
Bias (Wang et al., ESCM², SIGIR 2022) directly: mean predicted / mean true pCVR over the
entire impression space, over clicks, and within deciles of the model's pCTR.

The AUC is exact (rank-based, ties count one half) so that small differences between
variants are not artefacts of binning; it needs no scikit-learn.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = [
    "CalibrationCurve",
    "calibration",
    "calibration_curve",
    "estimation_bias",
    "estimation_bias_by_quantile",
    "evaluate_predictions",
    "logloss",
    "roc_auc",
    "roc_curve",
]

# Clip of probabilities in the log loss: a confident wrong prediction costs -log(1e-7) ≈ 16
# instead of infinity, so one such impression cannot turn the whole metric into inf.
LOGLOSS_EPS = 1e-7


def roc_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Exact area under the ROC curve: P(score of a positive > score of a negative).

    Tied scores count one half, which is the average over every order of the ties. With
    weights, each positive–negative pair counts ``w_pos · w_neg``.

    Args:
        labels: array ``[N]`` of 0/1.
        scores: array ``[N]``, higher means more likely positive.
        weights: optional non-negative array ``[N]``.

    Returns:
        The AUC in [0, 1]; NaN when only one class is present (the AUC is undefined) or
        when a score is NaN (a diverged model should show as NaN, not as a number).

    Example:
        >>> roc_auc(np.array([0, 1, 0, 1]), np.array([0.1, 0.8, 0.8, 0.9]))
        0.875
    """
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if np.isnan(s).any():
        return float("nan")
    positive = w * y
    negative = w * (1.0 - y)
    total_positive, total_negative = positive.sum(), negative.sum()
    if total_positive <= 0 or total_negative <= 0:
        return float("nan")

    order = np.argsort(s, kind="stable")
    s, positive, negative = s[order], positive[order], negative[order]
    group_starts = np.concatenate(([0], np.flatnonzero(np.diff(s)) + 1))
    positive_per_score = np.add.reduceat(positive, group_starts)
    negative_per_score = np.add.reduceat(negative, group_starts)
    negative_below = np.cumsum(negative_per_score) - negative_per_score
    wins = positive_per_score * (negative_below + 0.5 * negative_per_score)
    return float(wins.sum() / (total_positive * total_negative))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct score threshold (for the ROC plot).

    Args:
        labels: 0/1 array ``[N]`` with both classes present.
        scores: array ``[N]``; higher means more likely positive.

    Returns:
        ``(fpr, tpr)``, each starting at 0 and ending at 1.

    Example:
        >>> fpr, tpr = roc_curve(np.array([0, 1]), np.array([0.2, 0.9]))
        >>> fpr.tolist(), tpr.tolist()
        ([0.0, 0.0, 1.0], [0.0, 1.0, 1.0])
    """
    labels = np.asarray(labels, dtype=np.float64)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    sorted_scores = np.asarray(scores, dtype=np.float64)[order]
    true_pos = np.cumsum(labels[order])
    false_pos = np.cumsum(1.0 - labels[order])
    # one point per distinct threshold: the last index of each run of tied scores
    last_of_run = np.r_[np.flatnonzero(np.diff(sorted_scores)), labels.size - 1]
    tpr = np.r_[0.0, true_pos[last_of_run] / max(true_pos[-1], 1.0)]
    fpr = np.r_[0.0, false_pos[last_of_run] / max(false_pos[-1], 1.0)]
    return fpr, tpr


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary cross-entropy, probabilities clipped to [1e-7, 1 − 1e-7].

    Args:
        labels: array ``[N]`` of 0/1.
        probs: array ``[N]`` of predicted probabilities.

    Returns:
        The mean log loss; NaN for an empty array.

    Example:
        >>> round(logloss(np.array([1, 0]), np.array([0.5, 0.5])), 4)
        0.6931
    """
    y = np.asarray(labels, dtype=np.float64).ravel()
    if y.size == 0:
        return float("nan")
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), LOGLOSS_EPS, 1.0 - LOGLOSS_EPS)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def calibration(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean predicted probability / observed positive rate (1 = calibrated on average).

    Args:
        labels: array ``[N]`` of 0/1.
        probs: array ``[N]`` of predicted probabilities.

    Returns:
        The ratio; NaN when there is no positive (or no sample).

    Example:
        >>> calibration(np.array([1, 0, 0, 0]), np.array([0.5, 0.5, 0.5, 0.5]))
        2.0
    """
    observed = np.asarray(labels, dtype=np.float64).sum()
    if observed <= 0:
        return float("nan")
    return float(np.asarray(probs, dtype=np.float64).sum() / observed)


@dataclass(frozen=True)
class CalibrationCurve:
    """Points of a reliability plot, one per non-empty bin.

    Attributes:
        mean_predicted: mean predicted probability in each bin (the x axis).
        observed_rate: positive rate in each bin (the y axis; the diagonal is calibrated).
        count: samples in each bin.
    """

    mean_predicted: np.ndarray
    observed_rate: np.ndarray
    count: np.ndarray


def calibration_curve(
    labels: np.ndarray,
    scores: np.ndarray,
    bins: int = 10,
    strategy: Literal["quantile", "uniform"] = "quantile",
) -> CalibrationCurve:
    """Bin predictions and compare each bin's mean prediction with its observed rate.

    ``quantile`` bins hold equal numbers of samples, which suits CVR and CTCVR scores
    crowded near 0 (``uniform`` bins of [0, 1] would put almost everything in the first).

    Args:
        labels: array ``[N]`` of 0/1.
        scores: array ``[N]`` of predicted probabilities.
        bins: number of bins.
        strategy: ``quantile`` (equal counts) or ``uniform`` (equal widths on [0, 1]).

    Returns:
        A :class:`CalibrationCurve`; empty bins (ties or gaps) are left out.

    Example:
        >>> curve = calibration_curve(np.array([0, 0, 1, 1]), np.array([.1, .2, .7, .9]), bins=2)
        >>> curve.observed_rate.tolist()
        [0.0, 1.0]
    """
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if strategy == "quantile":
        edges = np.quantile(s, np.linspace(0.0, 1.0, bins + 1)) if s.size else np.zeros(1)
    else:
        edges = np.linspace(0.0, 1.0, bins + 1)
    # Inner edges only: the first and last bins are open, so every score lands in a bin.
    bin_of = np.searchsorted(edges[1:-1], s, side="right")
    count = np.bincount(bin_of, minlength=bins)
    filled = count > 0
    predicted_sum = np.bincount(bin_of, weights=s, minlength=bins)
    positive_sum = np.bincount(bin_of, weights=y, minlength=bins)
    return CalibrationCurve(
        mean_predicted=predicted_sum[filled] / count[filled],
        observed_rate=positive_sum[filled] / count[filled],
        count=count[filled],
    )


def estimation_bias(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Mean predicted probability / mean true probability (ESCM²'s Inherent Estimation Bias).

    Compared with :func:`calibration` the denominator is the true probability, not a 0/1
    label: no label noise, and it exists for impressions whose label was never observed.
    Above 1 the model over-estimates on average.

    Args:
        predicted: array ``[N]`` of predicted probabilities.
        truth: array ``[N]`` of true probabilities (or labels) of the same impressions.

    Returns:
        The ratio; NaN for no sample or a true mean of 0.

    Example:
        >>> estimation_bias(np.array([0.1, 0.3]), np.array([0.1, 0.1]))
        2.0
    """
    t = np.asarray(truth, dtype=np.float64).ravel()
    if t.size == 0 or t.sum() <= 0:
        return float("nan")
    return float(np.asarray(predicted, dtype=np.float64).sum() / t.sum())


def estimation_bias_by_quantile(
    predicted: np.ndarray, truth: np.ndarray, by: np.ndarray, bins: int = 10
) -> np.ndarray:
    """:func:`estimation_bias` within equal-count bins of ``by``, lowest ``by`` first.

    Bins are cut by rank (a stable sort of ``by``), so each holds ⌊N/bins⌋ or ⌈N/bins⌉
    impressions even where ``by`` has ties (ties at a bin edge are split in input order):
    quantile edges on tied scores would leave bins empty.

    Args:
        predicted: array ``[N]`` of predicted probabilities.
        truth: array ``[N]`` of true probabilities.
        by: array ``[N]`` that orders the impressions (e.g. the model's pCTR).
        bins: number of bins.

    Returns:
        Array ``[bins]`` of ratios; NaN for an empty bin (N < bins) or a true mean of 0.

    Example:
        >>> estimation_bias_by_quantile(np.array([.2, .2, .1, .1]), np.array([.1, .1, .1, .1]),
        ...                             by=np.array([.9, .8, .2, .1]), bins=2).tolist()
        [1.0, 2.0]
    """
    p = np.asarray(predicted, dtype=np.float64).ravel()
    t = np.asarray(truth, dtype=np.float64).ravel()
    order = np.argsort(np.asarray(by, dtype=np.float64).ravel(), kind="stable")
    return np.array(
        [estimation_bias(p[part], t[part]) for part in np.array_split(order, bins)],
        dtype=np.float64,
    )


# pCTR deciles of the IEB metrics: cvr_ieb_ctr_decile_1 (lowest pCTR) ... _10.
IEB_CTR_BINS = 10

REQUIRED_ARRAYS = ("click", "conversion", "pctr", "pcvr", "pctcvr")


def evaluate_predictions(arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The paper's metrics, and the entire-space ones when the oracle is given.

    Args:
        arrays: numpy arrays ``[N]`` over the same impressions: ``click``, ``conversion``,
            ``pctr``, ``pcvr``, ``pctcvr`` (the model's), and optionally the synthetic
            data's oracle: ``oracle_pctr``, ``oracle_pcvr`` (true probabilities) and
            ``conversion_if_clicked`` (the counterfactual label of every impression).

    Returns:
        ``ctr_auc``, ``ctr_logloss``, ``ctr_calibration`` (all impressions);
        ``cvr_auc``, ``cvr_logloss``, ``cvr_calibration`` (clicked impressions, the paper's
        protocol); ``ctcvr_auc``, ``ctcvr_logloss``, ``ctcvr_calibration`` (all impressions,
        label click ∧ conversion). With the oracle arrays, each where its inputs are given:
        ``entire_space_cvr_auc`` (model pCVR vs ``conversion_if_clicked`` over all
        impressions), and the Bayes ceilings ``oracle_ctr_auc``, ``oracle_cvr_auc``
        (clicked), ``oracle_ctcvr_auc`` (true pCTR × true pCVR),
        ``oracle_entire_space_cvr_auc``; the Inherent Estimation Bias of pCVR (ESCM²)
        against ``oracle_pcvr``, see :func:`estimation_bias`: ``cvr_ieb`` (all impressions),
        ``cvr_ieb_clicked`` (clicked ones) and ``cvr_ieb_ctr_decile_1`` (lowest model pCTR)
        … ``cvr_ieb_ctr_decile_10``; and against ``conversion_if_clicked``:
        ``cvr_ieb_vs_counterfactual`` (mean pCVR / counterfactual conversion rate, all
        impressions). Deciles are of the MODEL's pCTR, because ESMM's pCVR is in effect
        pCTCVR / pCTR, so its CVR bias follows the errors of its own pCTR; the model's pCTR
        is also what ESCM² takes as propensity and what exists on real data.

    Raises:
        KeyError: naming the required arrays that are missing.

    Example:
        >>> metrics = evaluate_predictions({
        ...     "click": np.array([1, 1, 0, 0]), "conversion": np.array([1, 0, 0, 0]),
        ...     "pctr": np.array([.9, .6, .4, .1]), "pcvr": np.array([.5, .2, .3, .3]),
        ...     "pctcvr": np.array([.45, .12, .12, .03])})
        >>> metrics["cvr_auc"], metrics["ctr_auc"]
        (1.0, 1.0)
    """
    missing = [name for name in REQUIRED_ARRAYS if name not in arrays]
    if missing:
        raise KeyError(f"evaluate_predictions needs arrays {', '.join(missing)}")
    click = np.asarray(arrays["click"], dtype=np.float64)
    conversion = np.asarray(arrays["conversion"], dtype=np.float64)
    ctcvr_label = click * conversion
    clicked = click > 0
    pctr, pcvr, pctcvr = (np.asarray(arrays[name]) for name in ("pctr", "pcvr", "pctcvr"))

    metrics = {
        "ctr_auc": roc_auc(click, pctr),
        "ctr_logloss": logloss(click, pctr),
        "ctr_calibration": calibration(click, pctr),
        "cvr_auc": roc_auc(conversion[clicked], pcvr[clicked]),
        "cvr_logloss": logloss(conversion[clicked], pcvr[clicked]),
        "cvr_calibration": calibration(conversion[clicked], pcvr[clicked]),
        "ctcvr_auc": roc_auc(ctcvr_label, pctcvr),
        "ctcvr_logloss": logloss(ctcvr_label, pctcvr),
        "ctcvr_calibration": calibration(ctcvr_label, pctcvr),
    }

    counterfactual = arrays.get("conversion_if_clicked")
    oracle_pctr = arrays.get("oracle_pctr")
    oracle_pcvr = arrays.get("oracle_pcvr")
    if counterfactual is not None:
        metrics["entire_space_cvr_auc"] = roc_auc(counterfactual, pcvr)
        metrics["cvr_ieb_vs_counterfactual"] = estimation_bias(pcvr, counterfactual)
    if oracle_pctr is not None:
        metrics["oracle_ctr_auc"] = roc_auc(click, oracle_pctr)
    if oracle_pcvr is not None:
        oracle_pcvr = np.asarray(oracle_pcvr)
        metrics["oracle_cvr_auc"] = roc_auc(conversion[clicked], oracle_pcvr[clicked])
        metrics["cvr_ieb"] = estimation_bias(pcvr, oracle_pcvr)
        metrics["cvr_ieb_clicked"] = estimation_bias(pcvr[clicked], oracle_pcvr[clicked])
        deciles = estimation_bias_by_quantile(pcvr, oracle_pcvr, by=pctr, bins=IEB_CTR_BINS)
        for decile, ratio in enumerate(deciles, start=1):
            metrics[f"cvr_ieb_ctr_decile_{decile}"] = float(ratio)
        if counterfactual is not None:
            metrics["oracle_entire_space_cvr_auc"] = roc_auc(counterfactual, oracle_pcvr)
        if oracle_pctr is not None:
            oracle_pctcvr = np.asarray(oracle_pctr) * oracle_pcvr
            metrics["oracle_ctcvr_auc"] = roc_auc(ctcvr_label, oracle_pctcvr)
    return metrics
