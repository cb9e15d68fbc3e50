"""One optimisation step of the trainer and what keeps the ranks in step around it.

- :class:`OptimConfig` and :func:`build_optimizers`: Adam for the dense parameters and
  SparseAdam for the embedding tables, each wrapped in ``hvd.DistributedOptimizer``;
- :func:`train_step`: forward, the variant's loss (plus the optional touched-row L2 of the
  embeddings), backward, update;
- :class:`LockStep`: one tiny allreduce per step so that uneven shards end an epoch together
  and a NaN on any rank stops every rank (:class:`TrainingError`).

:mod:`esmm.train` runs them in its epoch loop.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from pydantic import Field

from contract.config import StrictModel, neutral_at
from esmm.losses import compute_loss

if TYPE_CHECKING:
    from esmm.averaging import WeightAverage
    from esmm.train import TrainConfig

__all__ = ["LockStep", "OptimConfig", "TrainingError", "build_optimizers", "train_step"]


class OptimConfig(StrictModel):
    """The ``optim:`` section. Adam with the paper's settings for the dense parameters and
    SparseAdam (same betas/eps) for sparse embedding tables.

    Attributes:
        lr: learning rate of one worker.
        sparse_lr: learning rate of the sparse embedding tables (default: ``lr``).
        betas, eps: Adam's (paper: 0.9, 0.999, 1e-8).
        sparse_eps: SparseAdam's eps (default: ``eps``). Adam's step is about ``lr`` in the
            sign of the gradient whatever its size, so a row that one or two samples touch
            moves as far as a row that thousands do; with an eps near the size of a rare row's
            gradient its step shrinks with the gradient, as Adagrad's initial accumulator
            makes it.
        scale_lr_by_workers: multiply the learning rates by the number of Horovod workers
            (the global batch grows with them; Goyal et al.'s linear scaling rule).
        embedding_l2: coefficient of the touched-row ("lazy") L2 of the embeddings,
            ``Σ_fields Σ_{distinct ids of the batch} ||E[id]||² / batch_size``
            (:meth:`esmm.model.ESMMModel.embedding_l2`), added to the loss; rows not in the
            batch are not decayed and sparse gradients stay sparse. 0 = off.
        weight_average_decay: evaluate, keep and register the exponential moving average of
            the weights over the training steps with this decay (:mod:`esmm.averaging`;
            its horizon is about ``1 / (1 − decay)`` steps). 0 = off: the last weights.
    """

    lr: float = Field(default=1e-3, gt=0)
    sparse_lr: float | None = Field(default=None, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)
    sparse_eps: float | None = Field(default=None, gt=0, json_schema_extra=neutral_at(None))
    scale_lr_by_workers: bool = True
    embedding_l2: float = Field(default=0.0, ge=0)
    weight_average_decay: float = Field(default=0.0, ge=0, lt=1, json_schema_extra=neutral_at(0.0))


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN/inf loss); nothing is registered."""


def build_optimizers(model: torch.nn.Module, optim: OptimConfig, hvd) -> list:
    """Adam for the dense parameters and SparseAdam for sparse embedding tables, each wrapped
    in ``hvd.DistributedOptimizer``; learning rates scaled by the number of workers."""
    lr_scale = hvd.size() if optim.scale_lr_by_workers else 1
    names_of = {id(p): n for n, p in model.named_parameters()}
    optimizers = []
    dense_params = list(model.dense_parameters())
    if dense_params:
        dense = torch.optim.Adam(
            dense_params, lr=optim.lr * lr_scale, betas=optim.betas, eps=optim.eps
        )
        optimizers.append(
            hvd.DistributedOptimizer(
                dense, named_parameters=[(names_of[id(p)], p) for p in dense_params]
            )
        )
    sparse_params = list(model.sparse_parameters())
    if sparse_params:
        sparse = torch.optim.SparseAdam(
            sparse_params,
            lr=(optim.sparse_lr or optim.lr) * lr_scale,
            betas=optim.betas,
            eps=optim.sparse_eps or optim.eps,
        )
        # Sparse gradients are allgathered (indices + rows touched), never densified.
        optimizers.append(
            hvd.DistributedOptimizer(
                sparse, named_parameters=[(names_of[id(p)], p) for p in sparse_params]
            )
        )
    return optimizers


def train_step(
    model: torch.nn.Module,
    optimizers: list,
    batch: dict[str, torch.Tensor],
    cfg: TrainConfig,
    generator: torch.Generator,
    average: WeightAverage | None = None,
) -> tuple[float, dict[str, float]]:
    """One optimisation step: forward, the variant's loss, backward (gradients allreduced by
    the DistributedOptimizer hooks), update. With ``optim.embedding_l2 > 0`` the loss also
    has ``embedding_l2 ×`` :meth:`~esmm.model.ESMMModel.embedding_l2`, logged (without the
    coefficient) as the part ``embedding_l2``. With a weight ``average``, the gradients are
    allreduced first (``synchronize``), so that it sees the rows the step will move, and the
    step's weights are folded into it afterwards.

    Every rank always takes the step, even when its loss is not finite: skipping the backward
    pass would leave the other ranks waiting for this rank's gradients. The caller checks the
    returned loss (:class:`LockStep`) and stops every rank together.

    Returns:
        This rank's loss and its parts, as floats.
    """
    outputs = model(batch)
    loss, parts = compute_loss(
        outputs,
        batch["click"],
        batch["conversion"],
        cfg.loss,
        cfg.model.variant,
        generator=generator,
    )
    if cfg.optim.embedding_l2 > 0:
        penalty = model.embedding_l2(batch)
        loss = loss + cfg.optim.embedding_l2 * penalty
        parts["embedding_l2"] = penalty.detach()
    for optimizer in optimizers:
        optimizer.zero_grad()
    loss.backward()
    if average is None:
        for optimizer in optimizers:
            optimizer.step()
    else:
        for optimizer in optimizers:
            optimizer.synchronize()
        average.before_step()
        for optimizer in optimizers:
            with optimizer.skip_synchronize():
                optimizer.step()
        average.after_step()
    return float(loss.detach()), {name: float(part) for name, part in parts.items()}


class LockStep:
    """Keeps the ranks of an epoch in step, with ONE tiny allreduce per training step.

    Shards hold whole row groups, so their sizes differ: without this, a rank that ran out of
    rows would leave the others waiting forever in the gradient allreduce. Before each step
    the ranks allreduce (min) two flags: "I have a batch" and "my previous loss was finite".
    The epoch ends for all when any rank is out of data; training stops on all, with one
    error, when any rank's loss was NaN/inf. A single process skips the allreduce.
    """

    def __init__(self, hvd, device: torch.device):
        self.hvd = hvd
        self.device = device
        self.finite = True
        self.problem = ""

    def check(self, loss: float, parts: dict[str, float], where: str) -> None:
        """Record this rank's loss of the step just taken."""
        if not math.isfinite(loss):
            self.finite = False
            self.problem = (
                f"non-finite loss at {where} (loss {loss:.4g}; "
                + ", ".join(f"{k}={v:.4g}" for k, v in parts.items())
                + "). Lower optim.lr or check the input."
            )

    def batches(self, batches, max_steps: int | None):
        """Yield batches (on the device) while every rank has one and max_steps is not hit."""
        steps = 0
        iterator = iter(batches)
        while True:
            batch = next(iterator, None) if max_steps is None or steps < max_steps else None
            have, finite = batch is not None, self.finite
            if self.hvd.size() > 1:
                flags = torch.tensor([float(have), float(finite)])
                flags = self.hvd.allreduce(flags, op=self.hvd.Min, name="lockstep")
                have, finite = bool(flags[0] > 0), bool(flags[1] > 0)
            if not finite:
                raise TrainingError(self.problem or "non-finite loss on another rank")
            if not have:
                return
            steps += 1
            yield {
                name: tensor.to(self.device, non_blocking=True) for name, tensor in batch.items()
            }
