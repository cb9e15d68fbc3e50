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
import socket
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from contract.config import ConfigError, StrictModel, add_override_argument, load_config
from contract.dates import DateError, parse_partitions
from contract.fields import FieldsConfig
from esmm.admission import admission_summary, admission_tables, allreduce_counts, count_ids
from esmm.averaging import WeightAverage
from esmm.checkpoint import save_checkpoint
from esmm.data import (
    DataConfig,
    DataError,
    count_rows,
    partition_urls,
    start_input_server,
    train_batches,
)
from esmm.evaluation import evaluate, load_oracle
from esmm.losses import LossConfig
from esmm.metrics import evaluate_predictions
from esmm.model import ModelConfig, build_model
from esmm.selection import EpochRule, SelectionConfig, check_metric
from esmm.steps import LockStep, OptimConfig, TrainingError, build_optimizers, train_step
from esmm.tracking import TrackingConfig, TrackingError

EXIT_USAGE = 2


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
    selection: SelectionConfig = SelectionConfig()
    tracking: TrackingConfig = TrackingConfig()


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
    parser.add_argument(
        "--eval-date",
        required=True,
        help="partition(s) to evaluate on: with --valid-date the test day, evaluated once with "
        "the kept epoch's weights; without, evaluated after every epoch and the last is kept",
    )
    parser.add_argument(
        "--valid-date",
        help="validation partition(s): evaluated after every epoch to choose the epoch the run "
        "keeps (config 'selection': metric, patience); must not overlap the train or eval ones",
    )
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
        valid_parts = parse_partitions(args.valid_date, "--valid-date") if args.valid_date else []
        check_disjoint(parse_partitions(args.train_dates, "--train-dates"), valid_parts, eval_parts)
        valid_urls = partition_urls(args.features, valid_parts) if valid_parts else []
        # Reads every file's footer: a damaged file is one error here, not a reader traceback.
        train_rows = count_rows(train_urls)
        count_rows(eval_urls + valid_urls)
        oracle_root = args.oracle or cfg.oracle
        oracle = load_oracle(oracle_root, eval_parts + valid_parts) if oracle_root else None
        if valid_parts:
            check_metric(cfg.selection, with_oracle=oracle is not None)
    except (ConfigError, DataError, DateError, ValueError) as exc:
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
    admission_stats: dict[str, float] = {}
    if cfg.model.min_id_count > 1:
        # Every id's count over all ranks' shares of the training partitions; ids seen fewer
        # than min_id_count times are looked up as their field's OOV row from now on.
        counts = allreduce_counts(
            count_ids(train_urls, fields, rank, size, cfg.data.reader_workers), hvd
        )
        model.set_admission(admission_tables(counts, cfg.model.min_id_count))
        for name, (admitted, seen) in admission_summary(counts, cfg.model.min_id_count).items():
            admission_stats[f"ids_admitted.{name}"] = float(admitted)
            admission_stats[f"ids_seen.{name}"] = float(seen)
        del counts
        if is_chief:
            kept = sum(v for k, v in admission_stats.items() if k.startswith("ids_admitted."))
            total = sum(v for k, v in admission_stats.items() if k.startswith("ids_seen."))
            print(
                f"id admission (min_id_count={cfg.model.min_id_count}): {kept:.0f} of "
                f"{total:.0f} ids seen in training keep their own row",
                file=sys.stderr,
            )
    optimizers = build_optimizers(model, cfg.optim, hvd)

    start_epoch = 0
    state = None
    best_state = None  # the kept epoch's weights, with --valid-date (every rank holds them)
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
        if state.get("best_model") is not None:
            best_state = state["best_model"]
    # Every rank starts from rank 0's weights and optimizer state.
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    for optimizer in optimizers:
        if optimizer.state_dict()["state"]:
            optimizer.load_state_dict(
                hvd.broadcast_object(optimizer.state_dict(), root_rank=0, name="opt_state")
            )
    # The weights evaluated, kept and registered: their moving average (optim:), or the last.
    average = None
    if cfg.optim.weight_average_decay > 0:
        average = WeightAverage(model, model.sparse_parameters(), cfg.optim.weight_average_decay)
        if state is not None and state.get("weight_average") is not None:
            average.load_state_dict(state["weight_average"])

    # Which host each rank ran on, in rank order: the run's tag ``hosts`` (a slow or failed
    # host of a multi-host run is then one look away).
    hosts = hvd.allgather_object(socket.gethostname(), name="hosts")
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
            hosts=hosts,
            train_dates=args.train_dates,
            eval_date=args.eval_date,
            valid_date=args.valid_date,
            features=args.features,
            train_rows=train_rows,
            resumed_from_epoch=start_epoch if args.resume else None,
        )
        if admission_stats:
            tracker.log_metrics(admission_stats)

    # ---- the epoch loop -------------------------------------------------------------------
    # With a validation day, it chooses the epoch the run keeps (esmm/selection.py) and the
    # eval (test) day is read once, after the loop; without one, the eval day is evaluated
    # after every epoch and the last epoch is kept.
    rule = None
    if valid_urls:
        rule = EpochRule(cfg.selection, state.get("selection") if state else None)
    per_epoch_urls, per_epoch_prefix = (valid_urls, "valid_") if rule else (eval_urls, "")
    loss_generator = torch.Generator(device=device)
    metrics: dict[str, float] = {}
    arrays: dict[str, np.ndarray] = {}
    example_batch = None
    epochs_trained = start_epoch
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
                    loss, parts = train_step(model, optimizers, batch, cfg, loss_generator, average)
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
            epochs_trained = epoch + 1
            if progress is not None:
                progress.close()

            # ---- evaluation over the whole validation (or eval) set, across all ranks ----
            epoch_train = {
                "train_loss": float(running_loss) if running_loss is not None else float("nan"),
                "train_samples_per_s": samples * size / max(elapsed, 1e-9),
                "train_steps": float(steps),
            }
            # (with weight averaging, of the average: what a kept epoch keeps)
            with average.applied() if average is not None else nullcontext():
                arrays = evaluate(model, per_epoch_urls, fields, cfg.data, hvd, device, oracle)
                kept, stop = False, False
                if is_chief:
                    metrics = evaluate_predictions(arrays)
                    if rule is not None:
                        kept, stop = rule.update(epoch, metrics), rule.should_stop
                    named = {per_epoch_prefix + k: v for k, v in metrics.items()}
                    tracker.log_epoch(epoch, {**epoch_train, **named})
                    print(
                        epoch_line(epoch, cfg.epochs, named, per_epoch_prefix, kept),
                        file=sys.stderr,
                    )
                if rule is not None:
                    # Rank 0's decision holds for every rank (they hold the same weights).
                    kept, stop = hvd.broadcast_object((kept, stop), root_rank=0, name="selection")
                    if kept:
                        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if is_chief:
                extra = {"selection": rule.state(), "best_model": best_state} if rule else {}
                if average is not None:
                    extra["weight_average"] = average.state_dict()
                save_checkpoint(
                    checkpoint_dir, epoch, model, optimizers, tracker.run_id, cfg, extra
                )
            if stop:
                break

        # ---- the test day, once, with the kept epoch's weights ---------------------------
        if average is not None and (rule is None or best_state is None):
            average.copy_to_model()  # the last epoch is kept: its average
        if rule is not None:
            best_epoch = hvd.broadcast_object(rule.best_epoch, root_rank=0, name="best_epoch")
            if best_state is not None:
                model.load_state_dict(best_state)
            elif is_chief:
                print(
                    f"esmm.train: warning: no finite validation {cfg.selection.metric}; "
                    "keeping the last epoch",
                    file=sys.stderr,
                )
            arrays = evaluate(model, eval_urls, fields, cfg.data, hvd, device, oracle)
            if is_chief:
                metrics = evaluate_predictions(arrays)
                kept_epoch = (epochs_trained - 1) if best_epoch is None else best_epoch
                metrics["kept_epoch"] = float(kept_epoch + 1)
                metrics["epochs_trained"] = float(epochs_trained)
                # the kept epoch's validation metrics: what the choice (and any comparison
                # of settings, experiments' memorisation) rests on, never the test day's
                metrics.update(
                    {f"kept_valid_{k}": v for k, v in rule.best_metrics.items() if k in KEPT}
                )
                tracker.log_epoch(kept_epoch, metrics)
                print(
                    f"kept epoch {kept_epoch + 1} of {epochs_trained} (best validation "
                    f"{cfg.selection.metric}); test: "
                    + " ".join(f"{k}={metrics[k]:.4f}" for k in HEADLINE if k in metrics),
                    file=sys.stderr,
                )
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


HEADLINE = ("ctr_auc", "cvr_auc", "ctcvr_auc", "entire_space_cvr_auc")
# validation metrics of the kept epoch that the final metrics carry as kept_valid_<name>
KEPT = (*HEADLINE, "ctr_logloss", "cvr_logloss", "ctcvr_logloss")


def epoch_line(epoch: int, epochs: int, metrics: dict[str, float], prefix: str, kept: bool) -> str:
    """One line per epoch on stderr: the headline AUCs (of the validation day when
    ``prefix`` is ``valid_``) and whether the epoch is the one kept so far."""
    shown = " ".join(
        f"{prefix}{k}={metrics[prefix + k]:.4f}" for k in HEADLINE if prefix + k in metrics
    )
    return f"epoch {epoch + 1}/{epochs}: {shown}" + (" (kept so far)" if kept else "")


def check_disjoint(train: list[str], valid: list[str], evaluation: list[str]) -> None:
    """A validation or test partition that is also trained on (or a test day that also
    validates) would leak into the choice or the result: a clear error instead."""
    for first, second, names in (
        (train, valid, "--train-dates and --valid-date"),
        (train, evaluation, "--train-dates and --eval-date"),
        (valid, evaluation, "--valid-date and --eval-date"),
    ):
        shared = sorted(set(first) & set(second))
        if shared:
            raise DateError(f"{names} share {', '.join(shared)}: they must not overlap")


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


if __name__ == "__main__":
    sys.exit(main())
