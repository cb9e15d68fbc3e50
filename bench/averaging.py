"""What weight averaging (``optim.weight_average_decay``, esmm/averaging.py) costs a training step.

    .venv/bin/python -m bench.averaging [--rows 60000] [--rounds 3] [--variant base]

The trainer's own build_model / build_optimizers / train_step, in one Horovod process, on the
same in-memory batches (the production field list, so the tables have their full 1.7M rows):
rounds alternate between the last weights (the default) and the average with decay 0.99, and
it prints each side's samples/s, the median ratio (averaged / last weights) with the rounds'
range, and how long one read of the average (``applied()``, done before every evaluation)
takes. Same process, same batches, alternating: the ratio is what to read on a noisy machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from bench.common import print_table, shipped_fields
from bench.training import in_memory_batches
from esmm.averaging import WeightAverage
from esmm.data import DataConfig
from esmm.model import ModelConfig, build_model
from esmm.steps import OptimConfig, build_optimizers, train_step
from esmm.train import TrainConfig

DECAY = 0.99


def samples_per_s(batches: list[dict], variant: str, decay: float, hvd) -> tuple[float, float]:
    """Samples/s of one pass over ``batches`` (after 5 warm-up steps), and the seconds of one
    ``applied()`` at its end (0 without an average)."""
    fields = shipped_fields()
    cfg = TrainConfig(
        model=ModelConfig(variant=variant),
        optim=OptimConfig(weight_average_decay=decay),
        data=DataConfig(batch_size=int(batches[0]["click"].shape[0])),
    )
    torch.manual_seed(0)
    model = build_model(fields, cfg.model)
    optimizers = build_optimizers(model, cfg.optim, hvd)
    average = WeightAverage(model, model.sparse_parameters(), decay) if decay else None
    generator = torch.Generator()
    for batch in batches[:5]:
        train_step(model, optimizers, batch, cfg, generator, average)
    started = time.perf_counter()
    for batch in batches[5:]:
        train_step(model, optimizers, batch, cfg, generator, average)
    elapsed = time.perf_counter() - started
    samples = sum(int(b["click"].shape[0]) for b in batches[5:])
    read = 0.0
    if average is not None:
        started = time.perf_counter()
        with average.applied():
            pass
        read = time.perf_counter() - started
    return samples / elapsed, read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=60_000, help="rows of the synthetic table")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variant", default="base", help="base: two embedding collections")
    args = parser.parse_args()

    import horovod.torch as hvd

    hvd.init()
    torch.set_num_threads(1)
    batches = in_memory_batches(shipped_fields(), args.rows, args.batch_size)
    rows, ratios = [], []
    for round_ in range(1, args.rounds + 1):
        last, _ = samples_per_s(batches, args.variant, 0.0, hvd)
        averaged, read = samples_per_s(batches, args.variant, DECAY, hvd)
        ratios.append(averaged / last)
        rows.append(
            [round_, f"{last:,.0f}", f"{averaged:,.0f}", f"{averaged / last:.2f}", f"{read:.2f}"]
        )
    print_table(
        f"train_step, {args.variant}, {len(batches) - 5} steps of {args.batch_size} "
        f"(samples/s, 1 process)",
        ["round", "last weights", f"average {DECAY}", "ratio", "applied() s"],
        rows,
    )
    print(
        f"\naveraged / last weights: median {statistics.median(ratios):.2f} "
        f"(rounds {min(ratios):.2f}-{max(ratios):.2f})"
    )


if __name__ == "__main__":
    main()
