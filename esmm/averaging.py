"""Weight averaging: the model evaluated, kept and registered is an exponential moving average
of the weights over the training steps (Polyak averaging), ``optim.weight_average_decay``.

One pass of Adam over sparse data ends wherever its last few hundred noisy steps left it, so
two seeds of the same training rank the same impressions differently. The average of the
recent weights is steadier than the last one (Polyak & Juditsky 1992; TensorFlow's
``ExponentialMovingAverage``, Keras's ``use_ema``). The average after step t is

    a_t = d_t · a_{t−1} + (1 − d_t) · w_t,    d_t = min(decay, (1 + t) / (10 + t)),

with TensorFlow's warm-up of ``d_t`` so that the first steps do not leave the average near the
initial weights.

Sparse embedding tables are averaged lazily, row by row, so a step costs the rows it touches,
not the table: a row's weight is constant between two steps that touch it, so bringing its
average from step s to step t is one update with the product of the decays in between,
``a ← P · a + (1 − P) · w`` where ``P = d_{s+1} ⋯ d_t``. The rows a step touches are those of
its (allreduced) sparse gradient, the rows SparseAdam moves. :meth:`WeightAverage.applied`
brings every row up to date and swaps the average in, for evaluation or for keeping.

Every rank computes the same average: the ranks hold the same weights after every step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["WeightAverage", "step_decay"]


def step_decay(decay: float, step: int) -> float:
    """The decay of the average at ``step`` (1-based): ``min(decay, (1 + step) / (10 + step))``.

    Example:
        >>> step_decay(0.99, 1)
        0.18181818181818182
        >>> step_decay(0.99, 10_000)
        0.99
    """
    return min(decay, (1.0 + step) / (10.0 + step))


def _held(average: torch.Tensor, rows: torch.Tensor, keep: torch.Tensor, weights: torch.Tensor):
    """``rows``' average after steps in which their weights stayed ``weights``: of the old
    average, ``keep`` (the product of those steps' decays) remains. ``weights`` is consumed."""
    return average.index_select(0, rows).mul_(keep).add_(weights.mul_(1 - keep))


class WeightAverage:
    """The moving average of a model's parameters, kept beside it.

    Args:
        model: the model being trained (its parameters are averaged; buffers are not).
        sparse_params: the parameters whose gradients are sparse (the embedding tables that
            SparseAdam steps); they are averaged row by row, on the rows each step touches.
        decay: the average's decay, in (0, 1); its horizon is about ``1 / (1 − decay)`` steps.

    Use:
        ``before_step()`` after the gradients are final (allreduced) and before the optimizers
        step, ``after_step()`` right after; ``with average.applied(): evaluate(model)``.

    Example:
        >>> model = nn.Linear(2, 1)
        >>> average = WeightAverage(model, [], decay=0.5)
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(1.0)
        >>> average.before_step(); average.after_step()
        >>> average.steps
        1
    """

    def __init__(self, model: nn.Module, sparse_params: Sequence[nn.Parameter], decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"weight average decay must be in (0, 1), got {decay}")
        self.model = model
        self.decay = decay
        sparse_ids = {id(p) for p in sparse_params}
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.dense = [(name, p) for name, p in named if id(p) not in sparse_ids]
        self.sparse = [(name, p) for name, p in named if id(p) in sparse_ids]
        self.average = {name: p.detach().clone() for name, p in named}
        # the step at which each sparse row's average was last brought up to date
        self.last = {name: torch.zeros(p.shape[0], dtype=torch.long) for name, p in self.sparse}
        # log of the product of the decays of steps 1..t (index t; 0 at t = 0)
        self.log_decay = [0.0]
        self._touched: dict[str, torch.Tensor] = {}
        self._table: torch.Tensor | None = None

    @property
    def steps(self) -> int:
        """Training steps averaged so far."""
        return len(self.log_decay) - 1

    def _product(self, since: torch.Tensor, until: int) -> torch.Tensor:
        """Π d_j for j in (since, until], per row: exp of a difference of the log table."""
        if self._table is None or len(self._table) != len(self.log_decay):
            self._table = torch.tensor(self.log_decay, dtype=torch.float64)
        return torch.exp(self._table[until] - self._table[since])

    def _catch_up(self, name: str, param: torch.Tensor, rows: torch.Tensor, until: int) -> None:
        """Bring ``rows``' average to step ``until``; their weights did not move since."""
        if rows.numel() == 0:
            return
        keep = self._product(self.last[name][rows], until).to(param.dtype).unsqueeze(1)
        average = self.average[name]
        caught_up = _held(average, rows, keep, param.detach().index_select(0, rows))
        average.index_copy_(0, rows, caught_up)
        self.last[name].index_fill_(0, rows, until)

    @torch.no_grad()
    def before_step(self) -> None:
        """Record the rows this step will move, their weights and how much of their average
        to keep since they last moved (the optimizers step next). A sparse gradient is
        coalesced here, once, for the optimizer too."""
        self._touched = {}
        for name, param in self.sparse:
            grad = param.grad
            if grad is None:
                continue
            if grad.is_sparse:
                if not grad.is_coalesced():
                    grad = grad.coalesce()
                    param.grad = grad
                rows = grad.indices()[0]
            else:
                rows = torch.nonzero(grad.abs().sum(dim=tuple(range(1, grad.dim()))))[:, 0]
            if rows.numel() == 0:
                continue
            keep = self._product(self.last[name][rows], self.steps).to(param.dtype).unsqueeze(1)
            self._touched[name] = (rows, keep, param.detach().index_select(0, rows))

    @torch.no_grad()
    def after_step(self) -> None:
        """Fold the step's new weights into the average: the moved rows' average is first
        brought to the step before (with the weights they had since they last moved)."""
        step = self.steps + 1
        decay = step_decay(self.decay, step)
        self.log_decay.append(self.log_decay[-1] + math.log(decay))
        for name, param in self.dense:
            self.average[name].lerp_(param.detach(), 1.0 - decay)
        for name, param in self.sparse:
            if name not in self._touched:
                continue
            rows, keep, before = self._touched[name]
            average = self.average[name]
            rows_average = _held(average, rows, keep, before)
            rows_average.mul_(decay).add_(param.detach().index_select(0, rows), alpha=1 - decay)
            average.index_copy_(0, rows, rows_average)
            self.last[name].index_fill_(0, rows, step)
        self._touched = {}

    @torch.no_grad()
    def synchronise(self) -> None:
        """Bring every sparse row's average up to the last step. Rows no step has moved are
        skipped: their average is their weight, which has not changed."""
        for name, param in self.sparse:
            last = self.last[name]
            stale = torch.nonzero((last < self.steps) & (last > 0))[:, 0]
            self._catch_up(name, param, stale, self.steps)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The model holds the average inside the block, its own weights again after it (the
        tensors are swapped, not copied)."""
        self.synchronise()
        params = dict(self.model.named_parameters())
        own = {name: params[name].data for name in self.average}
        for name, average in self.average.items():
            params[name].data = average
        try:
            yield
        finally:
            for name, weights in own.items():
                params[name].data = weights

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """The model holds the average from now on (the weights it trained are dropped)."""
        self.synchronise()
        params = dict(self.model.named_parameters())
        for name, average in self.average.items():
            params[name].copy_(average)

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to go on averaging where this one stopped."""
        self.synchronise()
        return {"decay": self.decay, "average": self.average, "log_decay": self.log_decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["average"]) != set(self.average):
            raise ValueError("the checkpoint's weight average is of another model")
        self.average = {name: tensor.clone() for name, tensor in state["average"].items()}
        self.log_decay = list(state["log_decay"])
        self.last = {name: torch.full_like(last, self.steps) for name, last in self.last.items()}
