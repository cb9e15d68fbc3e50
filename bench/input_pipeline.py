"""Input pipeline throughput: Petastorm as the trainer uses it vs. a plain pyarrow scan.

    .venv/bin/python -m bench.input_pipeline [--rows 1000000]

Measures, on the same freshly written feature table:
  (a) pyarrow.dataset scan of the model's columns into numpy (the baseline: no sharding,
      no shuffling, no torch);
  (b) the trainer's input: esmm.data.train_batches (Petastorm make_batch_reader, shard 0 of
      1, shuffled row groups + shuffling buffer, multi-valued fields stacked, torch tensors);
  (c) the rate the trainer consumes: compute-only training samples/s of the default ESMM on
      in-memory batches (bench/training.py measures it the same way).
Prints rows/s and the ratios (b)/(a) and (b)/(c); the target is (b)/(c) >= 5.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pyarrow as pa
import pyarrow.dataset as ds

from bench.common import best_of, make_table, print_table, shipped_fields, timed
from bench.training import compute_only_samples_per_s
from contract import schema
from esmm.data import DataConfig, partition_urls, train_batches


def pyarrow_scan(path: Path, columns: list[str], batch_size: int) -> int:
    rows = 0
    for batch in ds.dataset(path, format="parquet").to_batches(
        columns=columns, batch_size=batch_size
    ):
        arrays = {}
        for name, column in zip(batch.schema.names, batch.columns, strict=True):
            if pa.types.is_list(column.type):
                flat = column.flatten().to_numpy(zero_copy_only=False)
                arrays[name] = flat.reshape(len(column), -1)
            else:
                arrays[name] = column.to_numpy(zero_copy_only=False)
        rows += len(next(iter(arrays.values())))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument(
        "--workers", type=int, default=DataConfig().reader_workers, help="Petastorm reader threads"
    )
    args = parser.parse_args()

    fields = shipped_fields()
    columns = schema.model_columns(fields)
    with tempfile.TemporaryDirectory(prefix="bench-input-") as tmp:
        root = Path(tmp)
        (day,) = make_table(root, args.rows)
        path = root / f"dt={day}"
        urls = partition_urls(str(root), [day])
        cfg = DataConfig(batch_size=args.batch_size, reader_workers=args.workers)

        def run_pyarrow() -> float:
            return timed(lambda: pyarrow_scan(path, columns, args.batch_size))

        def run_petastorm() -> float:
            def consume() -> None:
                seen = 0
                with train_batches(urls, fields, cfg, seed=1) as batches:
                    for batch in batches:
                        seen += int(batch["click"].shape[0])
                assert seen == args.rows, seen

            return timed(consume)

        arrow_s = best_of(args.repeats, run_pyarrow)
        petastorm_s = best_of(args.repeats, run_petastorm)
        consume_rate = compute_only_samples_per_s(fields, rows=min(args.rows, 100_000))

    arrow_rate = args.rows / arrow_s
    petastorm_rate = args.rows / petastorm_s
    print_table(
        f"input pipeline, {args.rows:,} rows, batch {args.batch_size}, "
        f"{args.workers} reader threads",
        ["path", "rows/s", "vs pyarrow"],
        [
            ["pyarrow.dataset scan (baseline)", f"{arrow_rate:,.0f}", "1.00"],
            [
                "petastorm train_batches (trainer)",
                f"{petastorm_rate:,.0f}",
                f"{petastorm_rate / arrow_rate:.2f}",
            ],
            [
                "trainer consumption (compute only)",
                f"{consume_rate:,.0f}",
                f"{consume_rate / arrow_rate:.2f}",
            ],
        ],
    )
    ratio = petastorm_rate / consume_rate
    verdict = "OK" if ratio >= 5 else "BELOW TARGET"
    print(f"\ninput / consumption = {ratio:.1f}x  (target >= 5x: {verdict})")


if __name__ == "__main__":
    main()
