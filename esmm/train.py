"""Train an ESMM-family model with Horovod on Petastorm input; track and register it in MLflow.

    horovodrun -np 2 python -m esmm.train --config conf/train.yaml \\
        --features var/demo/features --train-dates 2026-01-01..2026-01-03 --eval-date 2026-01-04

Reads top to bottom: set-up (config and data checks, then Horovod and device), model,
optimizers, tracking, the epoch loop (train, evaluate, checkpoint), then the model is logged
and registered. Every rank runs this file; rank 0 alone talks to MLflow and writes
checkpoints. A bad config, date or partition is reported (exit code 2) before Horovod starts,
so it needs no horovodrun to be found.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from contract.config import ConfigError, StrictModel, add_override_argument, load_config
from contract.dates import DateError, parse_partitions
from contract.fields import FieldsConfig
from esmm.data import (
    DataConfig,
    DataError,
    count_rows,
    eval_batches,
    partition_urls,
    start_input_server,
    train_batches,
)
from esmm.losses import LossConfig, compute_loss
from esmm.metrics import evaluate_predictions
from esmm.model import ModelConfig, build_model
from esmm.model_input import numpy_batch_to_tensors
from esmm.tracking import TrackingConfig, TrackingError

EXIT_USAGE = 2


class OptimConfig(StrictModel):
    """The ``optim:`` section. Adam with the paper's settings for the dense parameters and
    SparseAdam (same betas/eps) for sparse embedding tables.

    Attributes:
        lr: learning rate of one worker.
        sparse_lr: learning rate of the sparse embedding tables (default: ``lr``).
        betas, eps: Adam's (paper: 0.9, 0.999, 1e-8).
        scale_lr_by_workers: multiply the learning rates by the number of Horovod workers
            (the global batch grows with them; Goyal et al.'s linear scaling rule).
    """

    lr: float = Field(default=1e-3, gt=0)
    sparse_lr: float | None = Field(default=None, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(default=1e-8, gt=0)
    scale_lr_by_workers: bool = True


class TrainConfig(StrictModel):
    """The training config (``conf/train.yaml``)."""

    fields_config: str = "conf/fields.yaml"
    epochs: int = Field(default=1, ge=1)
    max_steps_per_epoch: int | None = Field(default=None, ge=1)
    seed: int = 2018
    checkpoint_dir: str = "var/checkpoints/esmm"
    oracle: str | None = None
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    tracking: TrackingConfig = TrackingConfig()


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN/inf loss); nothing is registered."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line. Every option has a config-file counterpart except the data paths."""
    parser = argparse.ArgumentParser(
        prog="python -m esmm.train",
        description=(
            "Train an ESMM-family model (variant from the config) on feature-table partitions, "
            "with Horovod when run under horovodrun. Rank 0 logs params, per-epoch AUCs, plots "
            "and the model to MLflow (MLFLOW_TRACKING_URI, else tracking.tracking_uri, else "
            "var/mlflow/mlflow.db) and registers it."
        ),
        epilog="Example: horovodrun -np 2 python -m esmm.train --config conf/train.yaml "
        "--features var/demo/features --train-dates 2026-01-01..2026-01-03 --eval-date 2026-01-04",
    )
    parser.add_argument("--config", default="conf/train.yaml", help="training config YAML")
    parser.add_argument("--features", required=True, help="feature table root (path or URL)")
    parser.add_argument(
        "--train-dates", required=True, help="partitions to train on: A..B, A,B,C or A"
    )
    parser.add_argument("--eval-date", required=True, help="partition(s) to evaluate on")
    parser.add_argument(
        "--oracle",
        help="simulator oracle table root (raw/oracle) for entire-space CVR AUC; "
        "default: config 'oracle' (none)",
    )
    parser.add_argument("--fields", help="field list YAML (default: config 'fields_config')")
    parser.add_argument("--checkpoint-dir", help="default: config 'checkpoint_dir'")
    parser.add_argument(
        "--resume", action="store_true", help="continue from <checkpoint-dir>/last.pt"
    )
    parser.add_argument("--run-name", help="MLflow run name")
    add_override_argument(
        parser,
        "override a config key, e.g. --set model.variant=base --set epochs=2 (repeatable)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (logs line per epoch)"
    )
    parser.add_argument(
        "--summary-json",
        metavar="PATH",
        help="rank 0 writes the MLflow run id, registered version and final metrics here "
        "(JSON) when training succeeds; for drivers such as experiments and Airflow",
    )
    return parser.parse_args(argv)


def launcher_rank() -> int:
    """This process's rank as its launcher set it (horovodrun: ``HOROVOD_RANK``; mpirun:
    ``OMPI_COMM_WORLD_RANK`` or ``PMI_RANK``), 0 when none is set. Only decides who prints
    an error found before ``hvd.init()``, which knows the rank for sure."""
    for name in ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def load_oracle(oracle_root: str, partitions: list[str]):
    """The oracle rows of the evaluation partitions as a pandas frame indexed by impression."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    tables = [
        ds.dataset(url, format="parquet").to_table(
            columns=["impression_id", "pctr", "pcvr", "conversion_if_clicked"]
        )
        for url in partition_urls(oracle_root, partitions)
    ]
    return pa.concat_tables(tables).to_pandas().set_index("impression_id")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    # ---- set-up: config and data checks, before Horovod -----------------------------------
    is_chief = launcher_rank() == 0  # hvd.rank() once Horovod runs

    def fail(message: str, code: int = EXIT_USAGE) -> int:
        if is_chief:
            print(f"esmm.train: error: {message}", file=sys.stderr)
        return code

    try:
        cfg = load_config(args.config, TrainConfig, args.overrides)
        fields = load_config(args.fields or cfg.fields_config, FieldsConfig)
        train_urls = partition_urls(
            args.features, parse_partitions(args.train_dates, "--train-dates")
        )
        eval_parts = parse_partitions(args.eval_date, "--eval-date")
        eval_urls = partition_urls(args.features, eval_parts)
        # Reads every file's footer: a damaged file is one error here, not a reader traceback.
        train_rows = count_rows(train_urls)
        count_rows(eval_urls)
        oracle_root = args.oracle or cfg.oracle
        oracle = load_oracle(oracle_root, eval_parts) if oracle_root else None
    except (ConfigError, DataError, DateError) as exc:
        return fail(str(exc))
    start_input_server(cfg.data)  # its imports overlap the set-up below

    # ---- set-up: Horovod, device ----------------------------------------------------------
    import horovod.torch as hvd

    hvd.init()
    rank, size = hvd.rank(), hvd.size()
    is_chief = rank == 0

    if torch.cuda.is_available():
        torch.cuda.set_device(hvd.local_rank())
        device = torch.device("cuda", hvd.local_rank())
    else:
        device = torch.device("cpu")
        # Share the cores among the ranks of this host, less one for the input (a process or
        # a thread per rank, data.input_process): oversubscribed, the step and the input slow
        # each other down (bench/training.py: 7.3k vs 17k samples/s with 2 torch threads on 2
        # cores).
        cores_per_rank = (os.cpu_count() or 1) // hvd.local_size()
        torch.set_num_threads(max(1, cores_per_rank - 1))
    torch.manual_seed(cfg.seed + rank)
    checkpoint_dir = Path(args.checkpoint_dir or cfg.checkpoint_dir)

    # ---- tracking: fail before any work if MLflow cannot be used ------------------------
    problem = None
    if is_chief:
        from esmm.tracking import check_reachable, resolve_tracking_uri

        try:
            check_reachable(resolve_tracking_uri(cfg.tracking))
        except TrackingError as exc:
            problem = str(exc)
    problem = hvd.broadcast_object(problem, root_rank=0, name="tracking_check")
    if problem:
        return fail(problem, code=1)

    # ---- model and optimizers -------------------------------------------------------------
    model = build_model(fields, cfg.model).to(device)
    optimizers = build_optimizers(model, cfg.optim, hvd)

    start_epoch = 0
    state = None
    if args.resume:
        if is_chief:
            path = checkpoint_dir / "last.pt"
            if not path.is_file():
                problem = f"--resume: no checkpoint at {path}"
            else:
                state = torch.load(path, map_location="cpu", weights_only=False)
        problem = hvd.broadcast_object(problem, root_rank=0, name="resume_check")
        if problem:
            return fail(problem)
        state = hvd.broadcast_object(state, root_rank=0, name="resume_state")
        model.load_state_dict(state["model"])
        for optimizer, opt_state in zip(optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(opt_state)
        start_epoch = state["epoch"] + 1
    # Every rank starts from rank 0's weights and optimizer state.
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    for optimizer in optimizers:
        if optimizer.state_dict()["state"]:
            optimizer.load_state_dict(
                hvd.broadcast_object(optimizer.state_dict(), root_rank=0, name="opt_state")
            )

    tracker = None
    if is_chief:
        from esmm.tracking import RunTracker

        tracker = RunTracker.open(
            cfg.tracking,
            run_name=args.run_name,
            resume_run_id=state["run_id"] if args.resume else None,
        )
        tracker.log_start(
            cfg=cfg,
            fields=fields,
            workers=size,
            train_dates=args.train_dates,
            eval_date=args.eval_date,
            features=args.features,
            train_rows=train_rows,
            resumed_from_epoch=start_epoch if args.resume else None,
        )

    # ---- the epoch loop -------------------------------------------------------------------
    loss_generator = torch.Generator(device=device)
    metrics: dict[str, float] = {}
    arrays: dict[str, np.ndarray] = {}
    example_batch = None
    try:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            loss_generator.manual_seed(cfg.seed * 1000 + epoch * 10 + rank)
            steps_estimate = math.ceil(train_rows / (cfg.data.batch_size * size))
            if cfg.max_steps_per_epoch:
                steps_estimate = min(steps_estimate, cfg.max_steps_per_epoch)
            progress = None
            if is_chief and not args.no_progress:
                from tqdm import tqdm

                progress = tqdm(
                    total=steps_estimate * cfg.data.batch_size * size,
                    desc=f"epoch {epoch + 1}/{cfg.epochs}",
                    unit="samples",
                    unit_scale=True,
                    dynamic_ncols=True,
                    file=sys.stderr,
                    # under horovodrun stderr is a pipe: fewer, coarser updates keep logs short
                    mininterval=0.1 if sys.stderr.isatty() else 5.0,
                )
            running_loss, steps, samples, started = None, 0, 0, time.monotonic()
            seed = cfg.seed + 7919 * epoch + rank
            with train_batches(train_urls, fields, cfg.data, rank, size, seed) as batches:
                lockstep = LockStep(hvd, device)
                for batch in lockstep.batches(batches, cfg.max_steps_per_epoch):
                    if example_batch is None:
                        example_batch = {k: v[:3].cpu().numpy() for k, v in batch.items()}
                    loss, parts = train_step(model, optimizers, batch, cfg, loss_generator)
                    lockstep.check(loss, parts, f"epoch {epoch + 1}, step {steps + 1}")
                    steps += 1
                    samples += int(batch["click"].shape[0])
                    running_loss = (
                        loss if running_loss is None else 0.98 * running_loss + 0.02 * loss
                    )
                    if progress is not None:
                        progress.update(int(batch["click"].shape[0]) * size)
                        if steps % 10 == 0:
                            progress.set_postfix(step=steps, loss=f"{running_loss:.4f}")
            elapsed = time.monotonic() - started
            if progress is not None:
                progress.close()

            # ---- evaluation over the whole eval set, across all ranks --------------------
            arrays = evaluate(model, eval_urls, fields, cfg.data, hvd, device, oracle)
            epoch_train = {
                "train_loss": float(running_loss) if running_loss is not None else float("nan"),
                "train_samples_per_s": samples * size / max(elapsed, 1e-9),
                "train_steps": float(steps),
            }
            if is_chief:
                metrics = evaluate_predictions(arrays)
                tracker.log_epoch(epoch, {**epoch_train, **metrics})
                print(
                    f"epoch {epoch + 1}/{cfg.epochs}: "
                    + " ".join(
                        f"{k}={metrics[k]:.4f}"
                        for k in ("ctr_auc", "cvr_auc", "ctcvr_auc", "entire_space_cvr_auc")
                        if k in metrics
                    ),
                    file=sys.stderr,
                )
                save_checkpoint(checkpoint_dir, epoch, model, optimizers, tracker.run_id, cfg)
    except TrainingError as exc:
        if is_chief:
            tracker.finish(status="FAILED")
        return fail(str(exc), code=1)

    # ---- log and register the model -------------------------------------------------------
    if is_chief:
        version = tracker.log_model_and_finish(
            model=model,
            cfg=cfg,
            fields=fields,
            metrics=metrics,
            arrays=arrays,
            example_batch=example_batch,
            train_dates=args.train_dates,
            eval_date=args.eval_date,
        )
        print(tracker.summary(metrics, version))
        if args.summary_json:
            write_summary(Path(args.summary_json), tracker.run_id, version, metrics)
    hvd.join()
    return 0


def write_summary(path: Path, run_id: str, version: str | None, metrics: dict) -> None:
    """The run's outcome as JSON (NaN metrics as null), written atomically."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "run_id": run_id,
        "registered_version": version,
        "metrics": {k: (float(v) if math.isfinite(v) else None) for k, v in metrics.items()},
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
    tmp.replace(path)


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
            eps=optim.eps,
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
) -> tuple[float, dict[str, float]]:
    """One optimisation step: forward, the variant's loss, backward (gradients allreduced by
    the DistributedOptimizer hooks), update.

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
    for optimizer in optimizers:
        optimizer.zero_grad()
    loss.backward()
    for optimizer in optimizers:
        optimizer.step()
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


@torch.no_grad()
def evaluate(model, urls, fields, data_cfg, hvd, device, oracle) -> dict[str, np.ndarray]:
    """Predict this rank's shard of the eval set and allgather every rank's predictions.

    Returns numpy arrays over the WHOLE eval set (on every rank): ``click``, ``conversion``,
    ``pctr``, ``pcvr``, ``pctcvr`` and, with an oracle, ``oracle_pctr``, ``oracle_pcvr``,
    ``conversion_if_clicked``. Gathering the scores (not histograms) keeps AUCs exact.
    """
    model.eval()
    columns = ["click", "conversion", "pctr", "pcvr", "pctcvr"]
    if oracle is not None:
        columns += ["oracle_pctr", "oracle_pcvr", "conversion_if_clicked"]
    pieces = []
    for batch in eval_batches(urls, fields, hvd.rank(), hvd.size(), data_cfg.reader_workers):
        ids = batch["impression_id"]
        for start in range(0, len(ids), data_cfg.eval_batch_size):
            part = {k: v[start : start + data_cfg.eval_batch_size] for k, v in batch.items()}
            outputs = model(numpy_batch_to_tensors(part, fields, device))
            block = [
                np.asarray(part["click"], dtype=np.float64),
                np.asarray(part["conversion"], dtype=np.float64),
                *(outputs[k].double().cpu().numpy() for k in ("pctr", "pcvr", "pctcvr")),
            ]
            if oracle is not None:
                truth = oracle.reindex(part["impression_id"])
                missing = int(truth["pctr"].isna().sum())
                if missing:
                    raise DataError(f"{missing} eval impressions have no oracle row")
                block += [
                    truth["pctr"].to_numpy(np.float64),
                    truth["pcvr"].to_numpy(np.float64),
                    truth["conversion_if_clicked"].to_numpy(np.float64),
                ]
            pieces.append(np.stack(block, axis=1))
    local = np.concatenate(pieces) if pieces else np.zeros((0, len(columns)))
    gathered = hvd.allgather(torch.from_numpy(local), name="eval_predictions").numpy()
    return {name: gathered[:, i] for i, name in enumerate(columns)}


def save_checkpoint(directory: Path, epoch: int, model, optimizers, run_id: str, cfg) -> Path:
    """Write ``last.pt`` atomically (temp file + rename): a crash mid-write keeps the previous."""
    directory.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizers": [optimizer.state_dict() for optimizer in optimizers],
        "run_id": run_id,
        "config": cfg.model_dump(mode="json"),
    }
    tmp = directory / ".last.pt.tmp"
    torch.save(state, tmp)
    final = directory / "last.pt"
    os.replace(tmp, final)
    return final


if __name__ == "__main__":
    sys.exit(main())
