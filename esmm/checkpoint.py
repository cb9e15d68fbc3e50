"""Checkpoints of the trainer: ``last.pt`` (resume) written atomically by rank 0 after every
epoch, with the epoch rule's state and the kept epoch's weights when a validation day chooses."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_checkpoint"]


def save_checkpoint(
    directory: Path,
    epoch: int,
    model,
    optimizers,
    run_id: str,
    cfg,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``last.pt`` atomically (temp file + rename): a crash mid-write keeps the previous.

    ``extra`` adds entries (the epoch rule's state and the kept epoch's weights) that a
    resumed run reads back.
    """
    directory.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizers": [optimizer.state_dict() for optimizer in optimizers],
        "run_id": run_id,
        "config": cfg.model_dump(mode="json"),
        **(extra or {}),
    }
    tmp = directory / ".last.pt.tmp"
    torch.save(state, tmp)
    final = directory / "last.pt"
    os.replace(tmp, final)
    return final
