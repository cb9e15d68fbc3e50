"""GPU throughput: the trainer's loop with the real Petastorm input vs. compute only, on CUDA.

    .venv/bin/python -m bench.gpu [--rows 1000000] [--batch-size 4096] [--baseline]

Run by bench/gpu.sh on a machine with an NVIDIA GPU and a CUDA build of PyTorch. Prints
samples/s of compute only (batches already on the GPU) and of the real input pipeline feeding
the same model, and their ratio ("does the input keep up with the model?").
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench.common import make_table, print_table, shipped_fields
from bench.training import (
    compute_only_samples_per_s,
    petastorm_loader_batches,
    pipeline_samples_per_s,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--reader-workers", type=int, default=4)
    # Hidden: run the same code path on another device (a CPU check of the imports it needs).
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also time the input as it was before issue #8 (Petastorm's BatchedDataLoader)",
    )
    args = parser.parse_args()
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench.gpu: no CUDA device visible to torch; run it on a GPU machine")
    fields = shipped_fields()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        (day,) = make_table(Path(tmp), args.rows)
        compute = compute_only_samples_per_s(
            fields, batch_size=args.batch_size, device=device, source=(Path(tmp), day)
        )
        rows = []
        for workers in sorted({1, args.reader_workers}):
            rate = pipeline_samples_per_s(
                fields, Path(tmp), day, args.batch_size, device, reader_workers=workers
            )
            rows.append([f"Petastorm input, {workers} reader thread(s)", rate, rate / compute])
            if args.baseline:
                rate = pipeline_samples_per_s(
                    fields,
                    Path(tmp),
                    day,
                    args.batch_size,
                    device,
                    reader_workers=workers,
                    batches=petastorm_loader_batches,
                )
                rows.append(["  same, input before #8", rate, rate / compute])
    print_table(
        f"training throughput on {_device_name(device)}, batch {args.batch_size}",
        ["setting", "samples/s", "vs compute only"],
        [[f"compute only (batches on {device})", f"{compute:,.0f}", "1.00"]]
        + [[name, f"{rate:,.0f}", f"{ratio:.2f}"] for name, rate, ratio in rows],
    )


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else device


if __name__ == "__main__":
    main()
