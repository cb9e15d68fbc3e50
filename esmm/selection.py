"""The one rule that chooses the epoch a training keeps: best on the validation day.

Every run, whatever its variant, trains up to ``epochs`` epochs and evaluates on the validation
partition(s) after each one. The rule, written down once here:

- the kept epoch is the one with the best validation ``metric`` (higher is better unless
  ``higher_is_better`` is false); an epoch counts as better only if it beats the best so far by
  more than ``min_delta``; a tie keeps the earlier epoch;
- training stops once ``patience`` epochs in a row have not been better (``patience: 0``
  never stops early); a non-finite metric is never better;
- the test partition is evaluated once, after the loop, with the kept epoch's weights: it
  takes no part in the choice.

:class:`EpochRule` holds that state; :mod:`esmm.train` asks it after each validation.

Example:
    >>> rule = EpochRule(SelectionConfig(metric="cvr_auc", patience=1))
    >>> [rule.update(e, {"cvr_auc": v}) for e, v in enumerate([0.65, 0.70, 0.69])]
    [True, True, False]
    >>> rule.best_epoch, rule.should_stop
    (1, True)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import Field

from contract.config import StrictModel

__all__ = ["EpochRule", "SelectionConfig", "check_metric"]


class SelectionConfig(StrictModel):
    """The ``selection:`` section of the training config (used with ``--valid-date``).

    Attributes:
        metric: the validation metric the rule ranks epochs by, a key of
            :func:`esmm.metrics.evaluate_predictions` (``cvr_auc``: CVR AUC on the clicked
            impressions, the paper's metric and the one a real validation day can measure).
        higher_is_better: false for a loss-like metric (``ctcvr_logloss``).
        patience: stop after this many epochs in a row without a better one; 0 = train every
            epoch.
        min_delta: how much an epoch must beat the best so far to count as better.
    """

    metric: str = "cvr_auc"
    higher_is_better: bool = True
    patience: int = Field(default=1, ge=0)
    min_delta: float = Field(default=0.0, ge=0.0)


class EpochRule:
    """The kept epoch so far and whether to stop (see the module docstring)."""

    def __init__(self, cfg: SelectionConfig, state: Mapping[str, Any] | None = None):
        self.cfg = cfg
        self.best_epoch: int | None = None
        self.best_value = math.nan
        self.stale = 0
        self.history: list[float] = []
        self.best_metrics: dict[str, float] = {}  # every validation metric of the kept epoch
        if state:
            self.best_epoch = state["best_epoch"]
            self.best_value = float(state["best_value"])
            self.stale = int(state["stale"])
            self.history = [float(v) for v in state["history"]]
            self.best_metrics = {k: float(v) for k, v in state.get("best_metrics", {}).items()}

    def update(self, epoch: int, validation: Mapping[str, float]) -> bool:
        """Record epoch ``epoch``'s validation metrics; True when it becomes the kept epoch.

        Raises:
            KeyError: the validation metrics have no ``metric`` (a config error: the message
                lists the metrics there are).
        """
        if self.cfg.metric not in validation:
            raise KeyError(
                f"selection.metric '{self.cfg.metric}' is not a validation metric; "
                f"known: {', '.join(sorted(validation))}"
            )
        value = float(validation[self.cfg.metric])
        self.history.append(value)
        sign = 1.0 if self.cfg.higher_is_better else -1.0
        better = math.isfinite(value) and (
            self.best_epoch is None
            or not math.isfinite(self.best_value)
            or sign * (value - self.best_value) > self.cfg.min_delta
        )
        if better:
            self.best_epoch, self.best_value, self.stale = epoch, value, 0
            self.best_metrics = {k: float(v) for k, v in validation.items()}
        else:
            self.stale += 1
        return better

    @property
    def should_stop(self) -> bool:
        """Whether ``patience`` epochs in a row have not been better."""
        return self.cfg.patience > 0 and self.stale >= self.cfg.patience

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps to resume the rule."""
        return {
            "best_epoch": self.best_epoch,
            "best_value": self.best_value,
            "stale": self.stale,
            "history": list(self.history),
            "best_metrics": dict(self.best_metrics),
        }


def check_metric(cfg: SelectionConfig, with_oracle: bool) -> None:
    """Raise ValueError, naming the known ones, when ``cfg.metric`` is not a metric the
    validation day will have (checked at set-up, not after the first epoch)."""
    import numpy as np

    from esmm.metrics import evaluate_predictions

    click = np.array([1.0, 0.0, 1.0, 0.0])
    arrays = {
        "click": click,
        "conversion": np.array([1.0, 0.0, 0.0, 0.0]),
        **{name: np.array([0.4, 0.3, 0.2, 0.1]) for name in ("pctr", "pcvr", "pctcvr")},
    }
    if with_oracle:
        arrays.update(
            oracle_pctr=arrays["pctr"],
            oracle_pcvr=arrays["pcvr"],
            conversion_if_clicked=np.array([1.0, 1.0, 0.0, 0.0]),
        )
    with np.errstate(all="ignore"):
        known = evaluate_predictions(arrays)
    if cfg.metric not in known:
        raise ValueError(
            f"selection.metric '{cfg.metric}' is not a validation metric"
            + ("" if with_oracle else " without --oracle")
            + f"; known: {', '.join(sorted(known))}"
        )
