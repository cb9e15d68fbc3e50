"""What to train and training it: datasets, trainings, their cache and the MLflow parent runs.

Every dataset is made by the pipeline's own jobs (``spark-submit jobs/generate_logs.py`` and
``jobs/build_features.py``) and every training is the production trainer (``horovodrun -np N
python -m esmm.train``), with the command lines of :mod:`contract.commands`.

Both are cached under the work dir: a dataset by :meth:`DataSpec.key`, a finished training by
:meth:`RunSpec.key`, a digest of everything that determines the training (the data spec,
variant, seed, the train config as the trainer reads it after the experiment's and the
run's overrides, and the field list it names, as their loaders read them (a comment or a
reordering changes nothing, a value does), the number of Horovod workers). A changed setting
therefore trains again, and two experiments that share a training (the paper table's ESMM
and the task-weights default) share its key and train it once. So do a setting given as an
override and the same setting made the train config's default: a default can change without
orphaning the trainings that measured it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contract import commands
from contract.config import ConfigError, digest_json, load_config
from contract.fields import FieldsConfig
from experiments.config import DataSpec, ExperimentConfig

__all__ = [
    "Context",
    "DatasetPaths",
    "MissingRun",
    "RunResult",
    "RunSpec",
    "close_parent",
    "fields_file",
    "kept_dataset_stats",
    "open_parent",
    "prepare_dataset",
    "resolve_context",
    "runs_dir",
    "train",
    "train_all",
]


# ---- what determines a training ----------------------------------------------------------------


def project_path(path: str | Path) -> Path:
    """``path`` as the launched commands see it: they run from the project root."""
    path = Path(path)
    return path if path.is_absolute() else commands.PROJECT_ROOT / path


def _digest(config: Any) -> str:
    """SHA-256 of a validated config (every key, defaults included, but keys added later
    while they hold their neutral value: :func:`digest_json`): what a program will read, not
    how the file and the command line spell it."""
    return hashlib.sha256(digest_json(config).encode()).hexdigest()


def _load(path: Path, model: type, what: str, overrides: Sequence[str] = ()) -> Any:
    """The config at ``path`` with ``overrides``, as ``model`` validates it. A missing or
    invalid file is a :class:`ConfigError` naming ``what``."""
    if not path.is_file():
        raise ConfigError(f"{what} {path}: file not found")
    return load_config(path, model, overrides)


def config_digest(path: Path, model: type, what: str) -> str:
    """:func:`_digest` of the config at ``path`` as ``model`` validates it (:func:`_load`)."""
    return _digest(_load(path, model, what))


def _train_config_model() -> type:
    from esmm.train import TrainConfig  # torch: imported only when a key is computed

    return TrainConfig


def train_config(cfg: ExperimentConfig, overrides: Sequence[str] = ()) -> Any:
    """The train config the trainer runs with: the file after the experiment's and the
    run's overrides. A missing or invalid file, or a bad override, is a :class:`ConfigError`."""
    path = project_path(cfg.train_config)
    overrides = [*cfg.train_overrides, *overrides]
    return _load(path, _train_config_model(), "train_config", overrides)


def fields_file(cfg: ExperimentConfig, overrides: Sequence[str] = ()) -> Path:
    """The field list the trainer reads: ``fields_config`` of :func:`train_config` (the
    driver passes no ``--fields``). Loading the train config here also validates it and the
    overrides before anything runs."""
    return project_path(train_config(cfg, overrides).fields_config)


# determinants a summary shows but the key leaves out: the train config's digest is taken
# after them (RunSpec.determinants)
NOT_IN_KEY = ("overrides", "train_overrides")

# the reference's diagnostic implementations and the --optimizer of experiments/reference.py
# each one runs with (its learning rates are the project's, scaled as np workers scale them)
REFERENCE_DIAGNOSTICS = {
    "torch-rechub+project-lr": "project",
    "torch-rechub+project-optim": "project-sparse",
}


@dataclass(frozen=True)
class RunSpec:
    """One training: variant and seed on a dataset, with extra trainer overrides.

    ``label`` names the run in tables and MLflow only; it is not part of the key.
    """

    label: str
    variant: str
    seed: int
    data: DataSpec
    overrides: tuple[str, ...] = ()
    # who trains it: the project's trainer ("esmm"), torch-rechub's ESMM ("torch-rechub",
    # experiments/reference.py), or that with the project's learning rates in one dense Adam
    # ("torch-rechub+project-lr") or in the project's SparseAdam + Adam
    # ("torch-rechub+project-optim"): diagnostics
    implementation: str = "esmm"

    def determinants(self, cfg: ExperimentConfig) -> dict[str, Any]:
        """Everything that determines this training under ``cfg`` (see the module docstring);
        raises :class:`ConfigError` when the train config or its field list cannot be read."""
        # the train config the trainer runs with, after both lists of overrides: a setting
        # given as an override and the same setting as the file's default are one training
        # (the two lists are shown in the summary, not part of the key)
        trainer = train_config(cfg, self.overrides)
        # the reference implementation is one process; with the project's learning rates
        # they are scaled as np workers would scale them
        implementation: dict[str, Any] = {}
        if self.implementation != "esmm":
            implementation = {"implementation": self.implementation, "np": 1}
        if self.implementation in REFERENCE_DIAGNOSTICS:
            implementation["lr_scale"] = cfg.np
        return {
            "data": self.data.model_dump(mode="json"),
            "variant": self.variant,
            "seed": self.seed,
            "overrides": list(self.overrides),
            "train_overrides": list(cfg.train_overrides),
            "train_config": _digest(trainer),
            "fields": config_digest(
                project_path(trainer.fields_config), FieldsConfig, "fields_config"
            ),
            "np": cfg.np,
            **implementation,
        }

    def key(self, cfg: ExperimentConfig) -> str:
        """The cache key of this training under ``cfg``: a digest of its
        :meth:`determinants`."""
        determinants = self.determinants(cfg)
        for shown in NOT_IN_KEY:
            determinants.pop(shown)
        payload = json.dumps(determinants, sort_keys=True)
        digest = hashlib.sha1(payload.encode()).hexdigest()[:10]
        return f"{self.variant}-s{self.seed}-{digest}"


@dataclass
class RunResult:
    spec: RunSpec
    run_id: str
    metrics: dict[str, float]
    seconds: float
    cached: bool = False


@dataclass(frozen=True)
class DatasetPaths:
    features: str
    oracle: str | None
    train_dates: str
    valid_dates: str | None
    eval_dates: str


@dataclass
class Context:
    """Where things go and how commands run, for one invocation."""

    cfg: ExperimentConfig
    workdir: Path
    tracking_uri: str
    experiment_id: str
    fresh: bool = False
    offline: bool = False
    launched: int = 0
    reused: int = 0
    datasets: dict[str, DatasetPaths] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return commands.pipeline_env(self.tracking_uri)


# ---- datasets and trainings --------------------------------------------------------------------


def _span(days: list[str]) -> str | None:
    """``A`` or ``A..B`` for consecutive days; None for none."""
    if not days:
        return None
    return days[0] if len(days) == 1 else f"{days[0]}..{days[-1]}"


def prepare_dataset(ctx: Context, spec: DataSpec) -> DatasetPaths:
    """The feature tables of ``spec``: simulated and built once (cached by its key), or the
    existing table ``spec.features`` as it is."""
    key = spec.key()
    if key in ctx.datasets:
        return ctx.datasets[key]
    days = spec.days()
    train, rest = days[: spec.train_days], days[spec.train_days :]
    valid, test = rest[: spec.valid_days], rest[spec.valid_days :]
    train_dates, valid_dates, eval_dates = (_span(part) for part in (train, valid, test))
    if spec.features is not None:
        paths = DatasetPaths(spec.features, spec.oracle, train_dates, valid_dates, eval_dates)
        ctx.datasets[key] = paths
        _keep_dataset_stats(ctx, key, paths)
        return paths
    root = ctx.workdir / "data" / key
    raw = root / "raw"
    paths = DatasetPaths(
        str(root / "features"), str(raw / "oracle"), train_dates, valid_dates, eval_dates
    )
    ready = root / "READY"
    if ctx.fresh or not ready.is_file():
        shutil.rmtree(root, ignore_errors=True)
        sets = [f"presets.{spec.preset}.funnel.selection_bias={spec.selection_bias}"]
        if spec.impressions_per_day:
            sets.append(f"presets.{spec.preset}.impressions_per_day={spec.impressions_per_day}")
        # One day more of raw logs than of features: the last day's late events land in D+1.
        simulate = commands.spark_job(
            commands.BIN,
            "generate_logs",
            commands.generate_logs_args(raw, days[0], len(days) + 1, spec.preset, spec.seed, sets),
        )
        build = commands.spark_job(
            commands.BIN,
            "build_features",
            commands.build_features_args(raw, paths.features, days[0], days[-1]),
        )
        logs = ctx.workdir / "logs"
        print(f"dataset {key}: simulating {len(days) + 1} days", file=sys.stderr, flush=True)
        commands.run_step(f"simulate {key}", simulate, ctx.env, log=logs / f"{key}-simulate.log")
        print(f"dataset {key}: building {len(days)} feature days", file=sys.stderr, flush=True)
        commands.run_step(f"features {key}", build, ctx.env, log=logs / f"{key}-features.log")
        root.mkdir(parents=True, exist_ok=True)
        ready.write_text(json.dumps(spec.model_dump(mode="json"), indent=1))
    ctx.datasets[key] = paths
    _keep_dataset_stats(ctx, key, paths)
    return paths


def _keep_dataset_stats(ctx: Context, key: str, paths: DatasetPaths) -> None:
    """Print the dataset's sizes, positives and cold share, and keep them beside the runs'
    summaries (``<results_dir>/datasets/<key>.json``)."""
    from experiments.datasets import dataset_stats, describe

    stats = dataset_stats(paths.features, paths.train_dates, paths.valid_dates, paths.eval_dates)
    path = runs_dir(ctx) / "datasets" / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stats, indent=1, sort_keys=True))
    print(f"dataset {key}:\n{describe(stats)}", file=sys.stderr, flush=True)


def kept_dataset_stats(ctx: Context, spec: DataSpec) -> dict[str, Any] | None:
    """The statistics kept for dataset ``spec`` (see :func:`prepare_dataset`), None if none."""
    path = runs_dir(ctx) / "datasets" / f"{spec.key()}.json"
    return json.loads(path.read_text()) if path.is_file() else None


class MissingRun(ConfigError):
    """``--offline`` and a training has no summary yet."""


def runs_dir(ctx: Context) -> Path:
    """Where the trainings' summaries live (``results_dir``, else ``<workdir>/runs``)."""
    return project_path(ctx.cfg.results_dir) if ctx.cfg.results_dir else ctx.workdir / "runs"


def train(ctx: Context, spec: RunSpec, parent_run_id: str | None) -> RunResult:
    """One training through the production trainer (horovodrun), or its kept summary.

    Raises:
        MissingRun: with ``ctx.offline``, when the training has no summary (nothing runs).
    """
    key = spec.key(ctx.cfg)
    summary_path = runs_dir(ctx) / f"{key}.json"
    if summary_path.is_file() and not ctx.fresh:
        summary = json.loads(summary_path.read_text())
        ctx.reused += 1
        return RunResult(spec, summary["run_id"], _metrics(summary), summary["seconds"], True)
    if ctx.offline:
        raise MissingRun(
            f"--offline: no summary of training {spec.label} seed {spec.seed} "
            f"({summary_path}); run without --offline to train it"
        )
    data = prepare_dataset(ctx, spec.data)
    checkpoints = ctx.workdir / "checkpoints" / key
    overrides = [
        f"seed={spec.seed}",
        f"model.variant={spec.variant}",
        "tracking.log_model=false",
        "tracking.registered_model_name=null",
        f"tracking.experiment={ctx.cfg.experiment}",
        f"tracking.parent_run_id={parent_run_id}",
        *ctx.cfg.train_overrides,
        *spec.overrides,
    ]
    if spec.implementation.startswith("torch-rechub"):
        command = reference_command(ctx, spec, data, parent_run_id, summary_path, overrides)
    else:
        # An interrupted training (killed, machine gone) goes on from its last finished epoch:
        # the checkpoint holds the weights, optimizers, the epoch rule's state and its MLflow
        # run. (torch-rechub's reference keeps no checkpoint.)
        resume = (checkpoints / "last.pt").is_file()
        command = commands.trainer(
            commands.BIN,
            ctx.cfg.np,
            commands.train_args(
                ctx.cfg.train_config,
                data.features,
                data.train_dates,
                data.eval_dates,
                valid_date=data.valid_dates,
                oracle=data.oracle,
                checkpoint_dir=checkpoints,
                run_name=f"{spec.label} seed {spec.seed}",
                summary_json=summary_path.with_suffix(".trainer.json"),
                no_progress=True,
                sets=overrides,
            )
            + (["--resume"] if resume else []),
        )
        if resume:
            print(f"train {spec.label} seed {spec.seed}: resuming from {checkpoints / 'last.pt'}")
    seconds = commands.run_step(
        f"train {spec.label} seed {spec.seed}",
        command,
        ctx.env,
        log=ctx.workdir / "logs" / f"{key}.log",
        echo=False,
    )
    summary = json.loads(summary_path.with_suffix(".trainer.json").read_text())
    summary.update(
        seconds=seconds,
        key=key,
        spec={"label": spec.label, "variant": spec.variant, "seed": spec.seed},
        determinants=spec.determinants(ctx.cfg),
        dataset=spec.data.key(),
    )
    summary_path.write_text(json.dumps(summary, indent=1, sort_keys=True))
    summary_path.with_suffix(".trainer.json").unlink()
    shutil.rmtree(checkpoints, ignore_errors=True)  # a finished run needs no resume point
    ctx.launched += 1
    return RunResult(spec, summary["run_id"], _metrics(summary), seconds)


def reference_command(
    ctx: Context,
    spec: RunSpec,
    data: DatasetPaths,
    parent_run_id: str | None,
    summary_path: Path,
    overrides: Sequence[str],
) -> list[str]:
    """The command line of torch-rechub's ESMM on the dataset (experiments/reference.py):
    the same train config and overrides (sizes, epochs, seed, the selection rule)."""
    if data.valid_dates is None:
        raise ConfigError("the torch-rechub reference needs a validation day (data.valid_days)")
    command = [
        str(commands.BIN / "python"),
        "-m",
        "experiments.reference",
        *("--config", str(ctx.cfg.train_config), "--features", data.features),
        *("--train-dates", data.train_dates, "--valid-date", data.valid_dates),
        *("--eval-date", data.eval_dates),
        *("--summary-json", str(summary_path.with_suffix(".trainer.json"))),
        *("--run-name", f"{spec.label} seed {spec.seed}"),
    ]
    if spec.implementation in REFERENCE_DIAGNOSTICS:
        command += ["--optimizer", REFERENCE_DIAGNOSTICS[spec.implementation]]
        command += ["--lr-scale", str(ctx.cfg.np)]
    elif spec.implementation.startswith("torch-rechub+"):  # one change (reference.CHANGES)
        command += ["--change", spec.implementation.removeprefix("torch-rechub+")]
    if data.oracle:
        command += ["--oracle", data.oracle]
    if parent_run_id:
        command += ["--parent-run-id", parent_run_id]
    return command + [part for item in overrides for part in ("--set", item)]


def _metrics(summary: dict) -> dict[str, float]:
    return {k: (math.nan if v is None else float(v)) for k, v in summary["metrics"].items()}


def train_all(
    ctx: Context, specs: Sequence[RunSpec], parent_run_id: str, day: str = "test"
) -> list[RunResult]:
    """Train ``specs`` in order with a progress bar and one line per finished run, showing
    the test day's AUCs, or with ``day="valid"`` the kept epoch's validation AUCs (where a
    choice is being made, the test day is not shown)."""
    from tqdm import tqdm

    prefix = "kept_valid_" if day == "valid" else ""
    results = []
    with tqdm(total=len(specs), desc="trainings", unit="run", file=sys.stderr) as bar:
        for spec in specs:
            result = train(ctx, spec, parent_run_id)
            results.append(result)
            m = result.metrics
            name = spec.label if spec.label == spec.variant else f"{spec.variant} {spec.label}"
            shown = " ".join(
                f"{day}_{short}={m.get(prefix + metric, math.nan):.4f}"
                for metric, short in (
                    ("cvr_auc", "cvr_auc"),
                    ("ctcvr_auc", "ctcvr_auc"),
                    ("entire_space_cvr_auc", "es_cvr_auc"),
                )
            )
            bar.write(
                f"{name:<32} seed {spec.seed:<3} {shown} "
                + ("(cached)" if result.cached else f"({result.seconds:.0f}s)"),
                file=sys.stderr,
            )
            bar.update(1)
    return results


# ---- MLflow: the experiment and the parent runs ------------------------------------------------


def _client(tracking_uri: str):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.MlflowClient(tracking_uri)


def resolve_context(cfg: ExperimentConfig, fresh: bool, offline: bool = False) -> Context:
    """The work dir (made), the tracking URI (``MLFLOW_TRACKING_URI``, the config's, else a
    SQLite store in the work dir; checked reachable) and the MLflow experiment (made).

    ``offline``: tables from the kept summaries only; MLflow is not touched.
    """
    from esmm.tracking import check_reachable, default_artifact_location

    workdir = Path(cfg.workdir)
    if not workdir.is_absolute():
        workdir = commands.PROJECT_ROOT / workdir
    workdir.mkdir(parents=True, exist_ok=True)
    if offline:
        return Context(cfg, workdir, "", "", fresh=False, offline=True)
    uri = (
        os.environ.get("MLFLOW_TRACKING_URI")
        or cfg.tracking_uri
        or f"sqlite:///{workdir / 'mlflow' / 'mlflow.db'}"
    )
    check_reachable(uri)
    client = _client(uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(
            cfg.experiment, artifact_location=default_artifact_location(uri)
        )
    )
    return Context(cfg, workdir, uri, experiment_id, fresh=fresh)


def open_parent(ctx: Context, name: str, parent: str | None, params: dict[str, str]) -> str | None:
    """A new MLflow run ``name`` (under ``parent`` when given) with ``params``; its id (None
    offline)."""
    from mlflow.entities import Param

    if ctx.offline:
        return None
    client = _client(ctx.tracking_uri)
    tags = {"esmm.experiment_command": name}
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(ctx.experiment_id, run_name=name, tags=tags)
    items = sorted(params.items())
    for start in range(0, len(items), 100):
        client.log_batch(
            run.info.run_id, params=[Param(k, v) for k, v in items[start : start + 100]]
        )
    return run.info.run_id


def close_parent(
    ctx: Context,
    run_id: str | None,
    seconds: float,
    files: Sequence[Path] | None,
    trainings: int = 0,
) -> None:
    """Log ``files`` as artifacts and finish the run; ``files=None`` marks it FAILED."""
    if ctx.offline or run_id is None:
        return
    client = _client(ctx.tracking_uri)
    if files is not None:
        for path in files:
            client.log_artifact(run_id, str(path))
        client.log_metric(run_id, "trainings", trainings)
        client.log_metric(run_id, "wall_clock_s", seconds)
    client.set_terminated(run_id, status="FINISHED" if files is not None else "FAILED")
