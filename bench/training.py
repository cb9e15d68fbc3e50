"""Training throughput: the real trainer (Petastorm input) vs. compute only (batches in memory).

    .venv/bin/python -m bench.training [--rows 400000] [--np 2] [--no-real-trainer]

Both sides use the trainer's own build_model / build_optimizers / train_step, so the only
difference is where batches come from:
  compute only: the same batches (the loop's, same rows and order) pre-loaded as tensors;
  trainer loop: esmm.data.train_batches → esmm.steps.LockStep → train_step in this process,
                timed after the same warm-up steps as the ceiling (steady state); the whole
                epoch, with the reader's start and the warm-up, is shown apart;
  real trainer: `python -m esmm.train` (1 process) and `horovodrun -np N` on the same table,
                samples/s of the training loop of the 2nd epoch as the trainer logs it
                (train_samples_per_s).
Prints samples/s and real / compute-only; the target (1 process, CPU) is >= 0.90.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

from bench.common import PROJECT_ROOT, make_table, print_table, shipped_fields
from contract.fields import FieldsConfig
from esmm.data import DataConfig, partition_urls, train_batches
from esmm.model import build_model
from esmm.steps import build_optimizers, train_step
from esmm.train import TrainConfig

VENV_BIN = Path(sys.executable).parent
# Steps left out of both timings: the first ones allocate the optimizer's state (zeroed
# buffers as big as the embedding tables) and warm the allocator.
WARMUP_STEPS = 5


class _SingleProcess:
    """The Horovod calls that build_optimizers and LockStep make, for one process without
    Horovod (with size 1 LockStep makes no collective call)."""

    @staticmethod
    def size() -> int:
        return 1

    @staticmethod
    def DistributedOptimizer(optimizer, named_parameters=None):
        return optimizer


def in_memory_batches(
    fields: FieldsConfig, rows: int, batch_size: int, source: tuple[Path, str] | None = None
) -> list[dict]:
    """Batches kept as tensors. With ``source`` (a feature root and day): the very batches
    the trainer's loop draws from that table (same rows, same shuffled order), so the ceiling
    and the loop train on identical data; without: ``rows`` rows of a new table, in order."""

    def kept(urls: list[str], cfg: DataConfig, seed: int) -> list[dict]:
        with train_batches(urls, fields, cfg, seed=seed) as batches:
            return [{k: v.clone() for k, v in batch.items()} for batch in batches]

    if source is not None:
        root, day = source
        # the trainer's input settings and the loop's seed
        return kept(partition_urls(str(root), [day]), DataConfig(batch_size=batch_size), seed=1)
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        (day,) = make_table(Path(tmp), rows, seed=11)
        cfg = DataConfig(batch_size=batch_size, shuffle_queue_rows=0, reader_workers=1)
        return kept(partition_urls(tmp, [day]), cfg, seed=0)


def compute_only_samples_per_s(
    fields: FieldsConfig,
    rows: int = 100_000,
    batch_size: int = 1024,
    hvd=None,
    device: str = "cpu",
    source: tuple[Path, str] | None = None,
    preloaded: list[dict] | None = None,
) -> float:
    """Samples/s of train_step on batches already in (device) memory: the compute ceiling.

    ``preloaded`` (from :func:`in_memory_batches`) is reused across calls; otherwise the
    batches are loaded first (see :func:`in_memory_batches` for ``rows`` and ``source``).
    """
    hvd = hvd or _SingleProcess()
    cfg = TrainConfig(data=DataConfig(batch_size=batch_size))
    torch.manual_seed(0)
    model = build_model(fields, cfg.model).to(device)
    optimizers = build_optimizers(model, cfg.optim, hvd)
    generator = torch.Generator(device=device)
    if preloaded is None:
        preloaded = in_memory_batches(fields, rows, batch_size, source)
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in preloaded]
    for batch in batches[:WARMUP_STEPS]:  # warm-up: allocator, optimizer state, kernels
        train_step(model, optimizers, batch, cfg, generator)
    _synchronize(device)
    started = time.perf_counter()
    samples = 0
    for batch in batches:
        train_step(model, optimizers, batch, cfg, generator)
        samples += int(batch["click"].shape[0])
    _synchronize(device)
    return samples / (time.perf_counter() - started)


@contextlib.contextmanager
def petastorm_loader_batches(urls, fields: FieldsConfig, cfg: DataConfig, seed: int = 0):
    """The input as it was before issue #8, for comparison: Petastorm's own list-column
    conversion (to_pandas + vstack) and its BatchedDataLoader, behind the same prefetcher.
    The batches are the same as train_batches'; only the cost differs."""
    from petastorm.arrow_reader_worker import ArrowReaderWorkerResultsQueueReader
    from petastorm.pytorch import BatchedDataLoader

    from contract import schema
    from esmm.data.batches import _to_tensors
    from esmm.data.prefetch import _Prefetcher
    from esmm.data.reader import _make_reader

    torch.manual_seed(seed)
    reader = _make_reader(urls, schema.model_columns(fields), 0, 1, True, seed, cfg.reader_workers)
    reader._results_queue_reader = ArrowReaderWorkerResultsQueueReader()
    loader = BatchedDataLoader(
        reader, batch_size=cfg.batch_size, shuffling_queue_capacity=cfg.shuffle_queue_rows
    )
    with loader:
        batches = (_to_tensors(batch, fields) for batch in loader)
        with _Prefetcher(batches, cfg.prefetch_batches) as prefetched:
            yield prefetched


def train_batches_in_thread(urls, fields: FieldsConfig, cfg: DataConfig, seed: int = 0):
    """train_batches with the input in a thread of this process (data.input_process=false)."""
    return train_batches(urls, fields, cfg.model_copy(update={"input_process": False}), seed=seed)


def pipeline_samples_per_s(
    fields: FieldsConfig,
    features: Path,
    day: str,
    batch_size: int = 1024,
    device: str = "cpu",
    reader_workers: int = 1,
    batches=train_batches,
    timings: dict[str, float] | None = None,
) -> float:
    """Samples/s of the trainer's loop (Petastorm input → LockStep → train_step) in process,
    after :data:`WARMUP_STEPS` steps, as the ceiling is timed (steady state); ``batches`` is
    train_batches or :func:`petastorm_loader_batches`.

    The time before the first batch (opening the reader and filling the shuffling buffer,
    ``shuffle_queue_rows`` rows, once per epoch) goes to ``timings["first_batch_s"]``, and
    the rate over the whole epoch, start and warm-up included, to
    ``timings["with_start_samples_per_s"]``.
    """
    from esmm.steps import LockStep

    hvd = _SingleProcess()
    cfg = TrainConfig(data=DataConfig(batch_size=batch_size, reader_workers=reader_workers))
    torch.manual_seed(0)
    model = build_model(fields, cfg.model).to(device)
    optimizers = build_optimizers(model, cfg.optim, hvd)
    generator = torch.Generator(device=device)
    urls = partition_urls(str(features), [day])
    samples = steady_samples = steps = 0
    opened = time.perf_counter()
    first = steady = None
    with batches(urls, fields, cfg.data, seed=1) as batches:
        lockstep = LockStep(hvd, torch.device(device))
        for batch in lockstep.batches(batches, None):
            if first is None:
                first = time.perf_counter()
            if steps == WARMUP_STEPS:
                _synchronize(device)
                steady = time.perf_counter()
            loss, parts = train_step(model, optimizers, batch, cfg, generator)
            lockstep.check(loss, parts, "bench")
            steps += 1
            samples += int(batch["click"].shape[0])
            if steady is not None:
                steady_samples += int(batch["click"].shape[0])
    _synchronize(device)
    ended = time.perf_counter()
    if timings is not None:
        timings["first_batch_s"] = first - opened
        timings["with_start_samples_per_s"] = samples / (ended - opened)
    return steady_samples / (ended - steady)


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def real_trainer_samples_per_s(root: Path, day: str, np_workers: int, batch_size: int) -> float:
    """Run the real trainer on ``day`` for two epochs and read the second epoch's samples/s
    of the training loop from MLflow (the first one's includes the warm-up: the optimizer's
    state allocated, the allocator and caches warmed, on a day of a few seconds' training)."""
    import mlflow

    store = f"sqlite:///{root / f'mlflow-{np_workers}.db'}"
    train = [
        sys.executable,
        "-m",
        "esmm.train",
        "--features",
        str(root),
        "--train-dates",
        day,
        "--eval-date",
        day,
        "--no-progress",
        "--checkpoint-dir",
        str(root / f"ckpt-{np_workers}"),
        "--set",
        "epochs=2",
        "--set",
        f"data.batch_size={batch_size}",
        "--set",
        "tracking.log_model=false",
        "--set",
        "tracking.registered_model_name=null",
    ]
    if np_workers > 1:
        train = [
            str(VENV_BIN / "horovodrun"),
            "-np",
            str(np_workers),
            "-H",
            f"localhost:{np_workers}",
            "--gloo",
            *train,
        ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONPATH": str(PROJECT_ROOT)}
    subprocess.run(train, cwd=PROJECT_ROOT, env=env, check=True, capture_output=True)
    client = mlflow.MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("esmm").experiment_id])
    history = client.get_metric_history(run.info.run_id, "train_samples_per_s")
    return max(history, key=lambda metric: metric.step).value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=400_000, help="training rows")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--np", type=int, default=2, help="workers of the horovodrun run")
    parser.add_argument(
        "--repeats", type=int, default=5, help="rounds, each timing every setting; median kept"
    )
    parser.add_argument(
        "--no-real-trainer",
        dest="real_trainer",
        action="store_false",
        help="skip `python -m esmm.train` and horovodrun (in-process measurements only)",
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also time the input as it was before issue #8 (Petastorm's BatchedDataLoader)",
    )
    args = parser.parse_args()

    fields = shipped_fields()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp)
        (day,) = make_table(root, args.rows)
        # The ceiling trains on the very batches the loop draws (same rows, same order), kept
        # in memory. Machine noise here moves whole rounds by +-20%: each round times every
        # setting back to back, and a setting's ratio is the median of its per-round ratios
        # to that round's ceiling (samples/s shown: the median too).
        preloaded = in_memory_batches(fields, args.rows, args.batch_size, source=(root, day))
        sources = {"loop": train_batches, "thread": train_batches_in_thread}
        if args.baseline:
            sources["before"] = petastorm_loader_batches
        rates: dict[str, list[float]] = {
            "compute": [],
            "with_start": [],
            **{k: [] for k in sources},
        }
        first_batch = float("inf")
        for _ in range(args.repeats):
            rates["compute"].append(
                compute_only_samples_per_s(fields, batch_size=args.batch_size, preloaded=preloaded)
            )
            for name, source in sources.items():
                timings: dict[str, float] = {}
                rates[name].append(
                    pipeline_samples_per_s(
                        fields, root, day, args.batch_size, batches=source, timings=timings
                    )
                )
                if name == "loop":
                    rates["with_start"].append(timings["with_start_samples_per_s"])
                    first_batch = min(first_batch, timings["first_batch_s"])

        def ratios(name: str) -> list[float]:
            return [r / c for r, c in zip(rates[name], rates["compute"], strict=True)]

        def row(title: str, name: str) -> list[str]:
            return [
                title,
                f"{statistics.median(rates[name]):,.0f}",
                f"{statistics.median(ratios(name)):.2f}",
                f"{min(ratios(name)):.2f}-{max(ratios(name)):.2f}",
            ]

        compute = statistics.median(rates["compute"])
        loop_ratio = statistics.median(ratios("loop"))
        rows = [
            row("compute only, 1 process (ceiling)", "compute"),
            row("trainer loop + Petastorm, 1 process", "loop"),
            row(f"  same, whole epoch ({first_batch:.1f}s to 1st batch, warm-up)", "with_start"),
            row("  same, input in a thread (data.input_process=false)", "thread"),
        ]
        if args.baseline:
            rows.append(row("  same, input before #8", "before"))
        if args.real_trainer:
            real_1 = real_trainer_samples_per_s(root, day, 1, args.batch_size)
            real_n = real_trainer_samples_per_s(root, day, args.np, args.batch_size)
            rows += [
                [
                    "python -m esmm.train, 1 process, 2nd epoch",
                    f"{real_1:,.0f}",
                    f"{real_1 / compute:.2f}",
                    "1 run",
                ],
                [
                    f"horovodrun -np {args.np} esmm.train, 2nd epoch",
                    f"{real_n:,.0f}",
                    f"{real_n / compute:.2f}",
                    "1 run",
                ],
            ]
    print_table(
        f"training throughput, {args.rows:,} rows, batch {args.batch_size}, default ESMM",
        ["setting", "samples/s", "vs compute only", "rounds"],
        rows,
    )
    verdict = "OK" if loop_ratio >= 0.9 else "BELOW TARGET"
    print(
        f"\nPetastorm loop / compute only (1 process, median of {args.repeats} rounds)"
        f" = {loop_ratio:.2f}  (target >= 0.90: {verdict})"
    )


if __name__ == "__main__":
    main()
