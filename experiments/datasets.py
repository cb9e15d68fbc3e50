"""What a dataset of an experiment is like: its splits' sizes and positives, and how sparse it is.

:func:`dataset_stats` reads the feature tables of a dataset's train, validation and test
partitions (pyarrow, the label and id columns only) and returns, per split, the impressions,
clicks, conversions and their rates, and for the test split the share of impressions whose
item (``item_field``) had fewer than ``cold_clicks`` clicks in the training days: the cold
tail where an id-based model has nothing to go on. The experiments print it with every
dataset and keep it beside the runs' summaries, so every table can say what data it is from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from contract.dates import parse_partitions
from contract.layout import as_url, partition_dir
from contract.schema import CLICK, CONVERSION

__all__ = ["auc_standard_error", "dataset_stats", "describe"]


def auc_standard_error(auc: float, positives: int, negatives: int) -> float:
    """Hanley & McNeil's (1982) standard error of an AUC estimated from ``positives`` and
    ``negatives``: how precisely a test split can measure a model at that AUC.

    Example:
        >>> round(auc_standard_error(0.7, 850, 30000), 4)
        0.0102
    """
    if positives < 1 or negatives < 1:
        return float("nan")
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    var = (auc * (1 - auc) + (positives - 1) * (q1 - auc**2) + (negatives - 1) * (q2 - auc**2)) / (
        positives * negatives
    )
    return float(np.sqrt(var))


def _read(features: str, partitions: Sequence[str], columns: list[str]) -> dict[str, np.ndarray]:
    """The ``columns`` (those the table has) of ``partitions``, concatenated."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    root = as_url(features)
    datasets = [ds.dataset(partition_dir(root, p), format="parquet") for p in partitions]
    present = [c for c in columns if c in datasets[0].schema.names]
    table = pa.concat_tables([d.to_table(columns=present) for d in datasets])
    return {name: table.column(name).to_numpy() for name in present}


def _split(labels: dict[str, np.ndarray], partitions: Sequence[str]) -> dict[str, Any]:
    impressions = int(labels[CLICK].size)
    clicks = int(labels[CLICK].sum())
    conversions = int(labels[CONVERSION].sum())
    return {
        "partitions": list(partitions),
        "impressions": impressions,
        "clicks": clicks,
        "conversions": conversions,
        "ctr": clicks / impressions if impressions else float("nan"),
        "cvr_given_click": conversions / clicks if clicks else float("nan"),
        # how precisely this split measures a clicked CVR AUC of 0.70
        "cvr_auc_se_at_0.7": auc_standard_error(0.7, conversions, clicks - conversions),
    }


def dataset_stats(
    features: str,
    train_dates: str,
    valid_dates: str | None,
    eval_dates: str,
    item_field: str = "item_id",
    cold_clicks: int = 5,
) -> dict[str, Any]:
    """Sizes, positives and the cold share of one dataset (see the module docstring).

    Args:
        features: the feature table root (path or URL).
        train_dates, valid_dates, eval_dates: the splits (``A..B``, ``A,B`` or ``A``;
            ``valid_dates`` may be None).
        item_field: the id column whose training clicks define "cold".
        cold_clicks: an item with fewer training clicks than this is cold.

    Returns:
        ``{"train": {...}, "valid": {...} (when given), "test": {...}, "cold": {...}}``;
        each split has ``impressions``, ``clicks``, ``conversions``, ``ctr``,
        ``cvr_given_click``; ``cold`` has ``cold_clicks``, ``item_field`` and
        ``test_impressions_share`` (test impressions whose item is cold).
    """
    columns = [CLICK, CONVERSION, item_field]
    splits = {"train": train_dates, "valid": valid_dates, "test": eval_dates}
    out: dict[str, Any] = {}
    data: dict[str, dict[str, np.ndarray]] = {}
    for name, spec in splits.items():
        if spec is None:
            continue
        partitions = parse_partitions(spec, name)
        data[name] = _read(features, partitions, columns)
        out[name] = _split(data[name], partitions)
    if item_field not in data["train"]:  # a table without that field (e.g. Ali-CCP's)
        out["cold"] = {
            "item_field": item_field,
            "cold_clicks": cold_clicks,
            "test_impressions_share": float("nan"),
        }
        return out
    train_items = data["train"][item_field]
    clicked = train_items[data["train"][CLICK] == 1]
    test_items = data["test"][item_field]
    size = int(max(train_items.max(initial=0), test_items.max(initial=0))) + 1
    clicks_per_item = np.bincount(clicked, minlength=size)
    cold = clicks_per_item[test_items] < cold_clicks
    out["cold"] = {
        "item_field": item_field,
        "cold_clicks": cold_clicks,
        "test_impressions_share": float(cold.mean()) if cold.size else float("nan"),
    }
    return out


def describe(stats: dict[str, Any]) -> str:
    """One line per split and one for the cold share, for the experiments' log.

    Example:
        >>> split = {"impressions": 1000, "clicks": 50, "conversions": 1, "ctr": 0.05,
        ...          "cvr_given_click": 0.02}
        >>> print(describe({"train": split, "test": split,
        ...                 "cold": {"item_field": "item_id", "cold_clicks": 5,
        ...                          "test_impressions_share": 0.4}}))
        train: 1000 impressions, 50 clicks (CTR 0.0500), 1 conversions (CVR|click 0.0200)
        test: 1000 impressions, 50 clicks (CTR 0.0500), 1 conversions (CVR|click 0.0200)
        cold: 40.0% of test impressions are of an item_id with < 5 training clicks
    """
    lines = [
        f"{name}: {s['impressions']} impressions, {s['clicks']} clicks (CTR {s['ctr']:.4f}), "
        f"{s['conversions']} conversions (CVR|click {s['cvr_given_click']:.4f})"
        + (
            f"; a clicked CVR AUC of 0.70 has a standard error of "
            f"{100 * s['cvr_auc_se_at_0.7']:.2f} points here"
            if name == "test" and "cvr_auc_se_at_0.7" in s
            else ""
        )
        for name, s in stats.items()
        if name != "cold"
    ]
    cold = stats["cold"]
    lines.append(
        f"cold: {100 * cold['test_impressions_share']:.1f}% of test impressions are of an "
        f"{cold['item_field']} with < {cold['cold_clicks']} training clicks"
    )
    return "\n".join(lines)
