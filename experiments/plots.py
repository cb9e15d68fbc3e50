"""The plots of the result tables (matplotlib, headless ``Agg`` backend), written as PNG.

:func:`plot_comparison` (grouped bars of the compared AUCs with the oracle's ceilings),
:func:`plot_ieb_deciles` (pCVR's estimation bias by pCTR decile) and
:func:`plot_bias_sweep` (the gap of the last variant over the first as the selection bias
grows) and :func:`plot_map` (heatmaps of each method's gain by sparsity × selection bias).
matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from experiments.tables import COMPARED, ORACLE, Table, group, stat

if TYPE_CHECKING:
    from experiments.runner import RunResult

__all__ = ["plot_bias_sweep", "plot_comparison", "plot_ieb_deciles", "plot_map"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_comparison(results: Sequence[RunResult], path: Path, title: str) -> Path:
    """Grouped bars: mean ± std of the compared AUCs per model, oracle ceilings dashed."""
    plt = _pyplot()
    grouped = group(results)
    labels = list(grouped)
    x = np.arange(len(labels))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(labels)), 4.2))
    for k, ((metric, name), (_, oracle)) in enumerate(zip(COMPARED, ORACLE, strict=True)):
        means = [100 * stat(grouped[label], metric)[0] for label in labels]
        stds = [100 * np.nan_to_num(stat(grouped[label], metric)[1]) for label in labels]
        bars = ax.bar(x + (k - 1) * width, means, width, yerr=stds, capsize=3, label=name)
        ceiling = 100 * stat(list(results), oracle)[0]
        if not math.isnan(ceiling):
            ax.axhline(ceiling, ls="--", lw=1, color=bars.patches[0].get_facecolor())
    finite = [
        100 * stat(grouped[label], metric)[0]
        for label in labels
        for metric, _ in COMPARED
        if not math.isnan(stat(grouped[label], metric)[0])
    ]
    ceilings = [100 * stat(list(results), oracle)[0] for _, oracle in ORACLE]
    tops = [v for v in [*finite, *ceilings] if not math.isnan(v)]
    if finite:
        ax.set_ylim(min(finite) - 3, max(tops) + 2)
    ax.set_xticks(x, labels, rotation=20)
    ax.set_ylabel("AUC (points), mean ± std over seeds")
    ax.set_title(title + "\n(dashed: oracle ceilings)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ieb_deciles(results: Sequence[RunResult], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    deciles = np.arange(1, 11)
    for label, group_results in group(results).items():
        means = [stat(group_results, f"cvr_ieb_ctr_decile_{d}")[0] for d in deciles]
        ax.plot(deciles, means, marker="o", label=label)
    ax.axhline(1.0, color="k", lw=1, ls="--")
    ax.set_xlabel("decile of the model's pCTR (1 = lowest)")
    ax.set_ylabel("mean pCVR / mean true pCVR")
    ax.set_title("Where pCVR's estimation bias lives")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bias_sweep(table: Table, variants: list[str], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    biases = [row[0] for row in table.csv_rows]
    for k, (_metric, name) in enumerate(
        (
            ("cvr_auc", "CVR AUC (clicked)"),
            ("entire_space_cvr_auc", "CVR AUC (entire space)"),
            ("ctcvr_auc", "CTCVR AUC"),
        )
    ):
        gaps = [100 * row[1 + 2 * k] for row in table.csv_rows]
        errs = [100 * row[2 + 2 * k] for row in table.csv_rows]
        ax.errorbar(biases, gaps, yerr=errs, marker="o", capsize=3, label=name)
    ax.axhline(0.0, color="k", lw=1)
    ax.set_xlabel("simulator selection_bias")
    ax.set_ylabel(f"{variants[-1]} − {variants[0]} (AUC points)")
    ax.set_title(f"{variants[-1]}'s gain over {variants[0]} as selection bias grows")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_map(table: Table, variants: Sequence[str], reference: str, path: Path) -> Path:
    """Heatmaps of :func:`experiments.tables.map_table`: one panel per (method, CVR AUC on
    clicked / entire space), sparsity levels down, selection bias across; each cell is
    coloured by its gap (red: the method loses to the reference) and reads "gap ± se"."""
    from experiments.tables import MAP_METRICS

    plt = _pyplot()
    others = [v for v in variants if v != reference]
    levels = list(dict.fromkeys(row[0] for row in table.csv_rows))
    biases = sorted({row[1] for row in table.csv_rows})
    column = {name: i for i, name in enumerate(table.csv_header)}
    panels = [(v, m, where) for v in others for m, where in MAP_METRICS]
    grids = []
    for v, metric, _ in panels:
        gap = np.full((len(levels), len(biases)), np.nan)
        err = np.full_like(gap, np.nan)
        for row in table.csv_rows:
            i, j = levels.index(row[0]), biases.index(row[1])
            gap[i, j] = 100 * row[column[f"{v}_minus_{reference}_{metric}"]]
            err[i, j] = 100 * row[column[f"{v}_minus_{reference}_{metric}_stderr"]]
        grids.append((gap, err))
    finite = [abs(x) for g, _ in grids for x in g.ravel() if not math.isnan(x)]
    limit = max(finite, default=1.0) or 1.0
    cols = len(MAP_METRICS)
    fig, axes = plt.subplots(
        len(others),
        cols,
        figsize=(4.2 * cols, 0.9 + 1.2 * len(levels) * len(others)),
        squeeze=False,
    )
    for (v, _, where), (gap, err), ax in zip(panels, grids, axes.ravel(), strict=True):
        image = ax.imshow(gap, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
        for i in range(len(levels)):
            for j in range(len(biases)):
                text = "n/a" if math.isnan(gap[i, j]) else f"{gap[i, j]:+.2f}\n± {err[i, j]:.2f}"
                dark = not math.isnan(gap[i, j]) and abs(gap[i, j]) > 0.6 * limit
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if dark else "black",
                )
        ax.set_xticks(range(len(biases)), [f"{b:g}" for b in biases])
        ax.set_yticks(range(len(levels)), levels)
        ax.set_xlabel("selection bias")
        ax.set_title(f"{v} − {reference}, CVR AUC ({where})", fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8, label="AUC points")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
