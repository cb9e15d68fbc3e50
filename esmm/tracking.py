"""MLflow: where runs go, the logged model (a pyfunc), plots, and the registry.

Only rank 0 of a Horovod job calls into this module. The tracking URI follows MLflow's own
convention: ``MLFLOW_TRACKING_URI`` when set, else the config's ``tracking.tracking_uri``,
else a local SQLite store under ``var/mlflow/`` of the working directory. A remote server
works unchanged; one that cannot be reached fails the run before any training step.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

import contract
import esmm
from contract.config import StrictModel
from contract.dates import parse_partitions
from contract.layout import read_stats

__all__ = [
    "TrackingConfig",
    "TrackingError",
    "check_reachable",
    "code_version",
    "flatten",
    "resolve_tracking_uri",
]

DEFAULT_STORE_DIR = Path("var") / "mlflow"


class TrackingError(RuntimeError):
    """The MLflow tracking server or registry cannot be used as configured."""


class TrackingConfig(StrictModel):
    """The ``tracking:`` section of the training config.

    Attributes:
        tracking_uri: MLflow tracking URI; ``MLFLOW_TRACKING_URI`` wins when set; default a
            local SQLite store ``var/mlflow/mlflow.db``.
        experiment: MLflow experiment name.
        registered_model_name: registry name of the trained model; ``null`` = do not register.
        log_model: log the model (pyfunc) at the end of training.
        run_name: MLflow run name (``--run-name`` wins).
        parent_run_id: nest this run under that MLflow run (``mlflow.parentRunId``), as the
            experiment driver (:mod:`experiments`) does for each training it launches.
    """

    tracking_uri: str | None = None
    experiment: str = "esmm"
    registered_model_name: str | None = "esmm"
    log_model: bool = True
    run_name: str | None = Field(default=None)
    parent_run_id: str | None = None


def resolve_tracking_uri(cfg: TrackingConfig, environ: Mapping[str, str] = os.environ) -> str:
    """The tracking URI this run uses (env, then config, then the local SQLite default)."""
    uri = environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri
    if uri:
        return uri
    DEFAULT_STORE_DIR.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(DEFAULT_STORE_DIR / 'mlflow.db').resolve()}"


def default_artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a local SQLite store; the server's choice
    for a remote one."""
    if tracking_uri.startswith("sqlite:///"):
        db_path = Path(tracking_uri.removeprefix("sqlite:///"))
        return (db_path.parent / "artifacts").resolve().as_uri()
    return None


def check_reachable(tracking_uri: str, timeout_s: float = 10.0) -> None:
    """Raise TrackingError unless the tracking server answers (HTTP) or the store can be used.

    MLflow's own client retries for minutes before giving up; a run should not train for an
    hour and then find that nothing can be logged.
    """
    if tracking_uri.startswith(("http://", "https://")):
        url = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                if response.status != 200:
                    raise TrackingError(f"MLflow server {tracking_uri} answered {response.status}")
        except (urllib.error.URLError, OSError) as exc:
            raise TrackingError(
                f"MLflow tracking server {tracking_uri} cannot be reached ({exc}); start it, fix "
                "MLFLOW_TRACKING_URI / tracking.tracking_uri, or unset both for the local store"
            ) from None
    elif tracking_uri.startswith("sqlite:///"):
        parent = Path(tracking_uri.removeprefix("sqlite:///")).parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(f"cannot create the MLflow store folder {parent}: {exc}") from None


def code_version() -> str:
    """The package version plus the git commit of the working tree, when there is one."""
    from esmm import __version__

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"model": {"variant": "esmm"}}`` → ``{"model.variant": "esmm"}`` for mlflow params."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return flat


def plot_roc_and_calibration(arrays: Mapping[str, np.ndarray], out_dir: Path) -> list[Path]:
    """ROC curves per task and calibration curves, as PNGs in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from esmm.metrics import calibration_curve, roc_curve

    click = arrays["click"]
    conversion = arrays["conversion"]
    clicked = click > 0
    tasks = [
        ("CTR (all impressions)", click, arrays["pctr"]),
        ("CVR (clicked)", conversion[clicked], arrays["pcvr"][clicked]),
        ("CTCVR (all impressions)", click * conversion, arrays["pctcvr"]),
    ]
    if "conversion_if_clicked" in arrays:
        tasks.append(
            ("CVR (entire space, counterfactual)", arrays["conversion_if_clicked"], arrays["pcvr"])
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for title, labels, scores in tasks:
        if labels.size and 0 < labels.sum() < labels.size:
            fpr, tpr = roc_curve(labels, scores)
            ax.plot(fpr, tpr, label=title)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax.legend(fontsize=8)
    paths.append(out_dir / "roc.png")
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for title, labels, scores in tasks:
        if labels.size:
            curve = calibration_curve(labels, scores, bins=10)
            ax.plot(curve.mean_predicted, curve.observed_rate, marker="o", label=title)
    upper = max(1e-6, float(ax.get_xlim()[1]), float(ax.get_ylim()[1]))
    ax.plot([0, upper], [0, upper], "k:", lw=0.8)
    ax.set(xlabel="mean predicted", ylabel="observed rate", title="Calibration (deciles)")
    ax.legend(fontsize=8)
    paths.append(out_dir / "calibration.png")
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)
    return paths


def temp_dir() -> Path:
    """A fresh temporary folder for files on their way to MLflow."""
    return Path(tempfile.mkdtemp(prefix="esmm-mlflow-"))


class RunTracker:
    """One MLflow run of the trainer (rank 0 only): start, per-epoch metrics, model, registry."""

    def __init__(self, tracking_uri: str, experiment_id: str, run_id: str, cfg: TrackingConfig):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.run_id = run_id
        self.cfg = cfg

    @classmethod
    def open(
        cls, cfg: TrackingConfig, run_name: str | None = None, resume_run_id: str | None = None
    ) -> RunTracker:
        """Connect, get or create the experiment, start (or resume) the run."""
        import mlflow

        uri = resolve_tracking_uri(cfg)
        check_reachable(uri)
        mlflow.set_tracking_uri(uri)
        try:
            experiment = mlflow.get_experiment_by_name(cfg.experiment)
            if experiment is None:
                experiment_id = mlflow.create_experiment(
                    cfg.experiment, artifact_location=default_artifact_location(uri)
                )
            else:
                experiment_id = experiment.experiment_id
            run = mlflow.start_run(
                run_id=resume_run_id,
                experiment_id=None if resume_run_id else experiment_id,
                run_name=None if resume_run_id else (run_name or cfg.run_name),
                tags=(
                    {"mlflow.parentRunId": cfg.parent_run_id}
                    if cfg.parent_run_id and not resume_run_id
                    else None
                ),
            )
        except mlflow.exceptions.MlflowException as exc:
            raise TrackingError(f"MLflow at {uri}: {exc.message}") from None
        return cls(uri, experiment_id, run.info.run_id, cfg)

    def log_start(
        self,
        cfg: StrictModel,
        fields: StrictModel,
        workers: int,
        train_dates: str,
        eval_date: str,
        features: str,
        train_rows: int,
        resumed_from_epoch: int | None,
        valid_date: str | None = None,
        hosts: Sequence[str] = (),
    ) -> None:
        """Params (the whole resolved config), data tags and the training partitions' stats.

        ``valid_date`` (tag ``valid_date``, when given) is the partition that chose the epoch;
        per-epoch metrics on it are logged as ``valid_*``, the eval day's once as the rest.
        ``hosts`` (tag ``hosts``, comma-separated) is the host name of each rank, in rank order.
        """
        import mlflow

        if resumed_from_epoch is None:
            params = flatten(cfg.model_dump(mode="json"))
            params["workers"] = str(workers)
            params["fields"] = ",".join(f.name for f in fields.fields)  # type: ignore[attr-defined]
            # MLflow limits one log_params call to 100 params.
            items = sorted(params.items())
            for start in range(0, len(items), 100):
                mlflow.log_params(dict(items[start : start + 100]))
            mlflow.log_dict(cfg.model_dump(mode="json"), "config/train.json")
            mlflow.log_dict(fields.model_dump(mode="json"), "config/fields.json")
        else:
            mlflow.set_tag("resumed_from_epoch", str(resumed_from_epoch))
        mlflow.set_tags(
            {
                "train_dates": train_dates,
                "eval_date": eval_date,
                **({"valid_date": valid_date} if valid_date else {}),
                "features": features,
                "code_version": code_version(),
                "variant": cfg.model.variant,  # type: ignore[attr-defined]
                **({"hosts": ",".join(hosts)} if hosts else {}),
            }
        )
        mlflow.log_metric("train_rows", train_rows)
        # Through pyarrow's filesystems, so an hdfs:// or s3:// table's stats are logged too.
        for partition in parse_partitions(train_dates, "--train-dates"):
            partition_stats = read_stats(features, partition)
            if partition_stats is not None:
                mlflow.log_dict(partition_stats, f"train_partition_stats/dt={partition}.json")

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        """Metrics of the run as a whole (no epoch), e.g. how many ids id admission kept."""
        import mlflow

        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Per-epoch metrics, step = epoch number (1-based); NaN metrics are skipped."""
        import mlflow

        finite = {k: float(v) for k, v in metrics.items() if np.isfinite(v)}
        mlflow.log_metrics(finite, step=epoch + 1)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run with ``status``."""
        import mlflow

        mlflow.end_run(status=status)

    def log_model_and_finish(
        self,
        model,
        cfg: StrictModel,
        fields: StrictModel,
        metrics: Mapping[str, float],
        arrays: Mapping[str, np.ndarray],
        example_batch: Mapping[str, np.ndarray] | None,
        train_dates: str,
        eval_date: str,
    ) -> str | None:
        """Plots, the pyfunc model with signature + input example, the registry version.

        Returns:
            The registered model version (None when registration is off).
        """
        import mlflow
        import torch
        from mlflow.models import infer_signature

        from esmm.pyfunc import ESMMPyfunc, StaticContext, input_example

        work = temp_dir()
        for path in plot_roc_and_calibration(arrays, work / "plots"):
            mlflow.log_artifact(str(path), artifact_path="plots")
        version = None
        if self.cfg.log_model and example_batch is not None:
            checkpoint = work / "esmm_model.pt"
            torch.save(
                {
                    "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
                    "fields": fields.model_dump(mode="json"),
                    "model_config": cfg.model.model_dump(mode="json"),  # type: ignore[attr-defined]
                },
                checkpoint,
            )
            names = [f.name for f in fields.fields]  # type: ignore[attr-defined]
            example = input_example(example_batch, names)
            wrapper = ESMMPyfunc()
            wrapper.load_context(StaticContext({"checkpoint": str(checkpoint)}))
            with warnings.catch_warnings():
                # ids are never missing (0 encodes missing), so MLflow's hint about integer
                # columns with missing values does not apply here.
                warnings.filterwarnings("ignore", message=".*integer column", category=UserWarning)
                signature = infer_signature(example, wrapper.predict(None, example))
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=ESMMPyfunc(),
                artifacts={"checkpoint": str(checkpoint)},
                # The model's code: the torch side and the contract it reads, nothing else (the
                # experiment drivers and the Spark side stay out of every registered model).
                code_paths=[str(Path(esmm.__file__).parent), str(Path(contract.__file__).parent)],
                signature=signature,
                input_example=example,
                registered_model_name=self.cfg.registered_model_name,
                pip_requirements=_pip_requirements(),
            )
            if self.cfg.registered_model_name:
                version = str(info.registered_model_version)
                client = mlflow.MlflowClient()
                tags = {"train_dates": train_dates, "eval_date": eval_date}
                tags.update({k: f"{v:.6f}" for k, v in metrics.items() if np.isfinite(v)})
                for key, value in tags.items():
                    client.set_model_version_tag(
                        self.cfg.registered_model_name, version, key, value
                    )
        mlflow.end_run()
        return version

    def summary(self, metrics: Mapping[str, float], version: str | None) -> str:
        """A small table of the final AUCs and where to look in MLflow."""
        rows = [
            ("CTR AUC (all impressions)", "ctr_auc"),
            ("CVR AUC (clicked, paper protocol)", "cvr_auc"),
            ("CTCVR AUC (all impressions)", "ctcvr_auc"),
            ("CVR AUC (entire space, counterfactual)", "entire_space_cvr_auc"),
            ("  oracle CVR AUC (entire space, ceiling)", "oracle_entire_space_cvr_auc"),
            ("  oracle CVR AUC (clicked, ceiling)", "oracle_cvr_auc"),
            ("  oracle CTCVR AUC (ceiling)", "oracle_ctcvr_auc"),
        ]
        lines = ["", f"{'metric':<42} {'value':>8}", "-" * 51]
        lines += [f"{label:<42} {metrics[key]:>8.4f}" for label, key in rows if key in metrics]
        lines.append("")
        lines.append(f"MLflow run:   {self.run_id} (experiment {self.cfg.experiment})")
        lines.append(f"Tracking URI: {self.tracking_uri}")
        if version:
            lines.append(f"Registered:   models:/{self.cfg.registered_model_name}/{version}")
        if self.tracking_uri.startswith("sqlite:///"):
            lines.append(f"Open the UI:  mlflow ui --backend-store-uri {self.tracking_uri}")
        else:
            lines.append(f"Open the UI:  {self.tracking_uri}/#/experiments/{self.experiment_id}")
        return "\n".join(lines)


def _pip_requirements() -> list[str]:
    # The model needs torch, pandas and numpy at the versions it was trained with; spelling
    # them out saves MLflow from guessing (slowly) by importing every module in sight.
    from importlib.metadata import version

    return [
        f"{name}=={version(name)}" for name in ("torch", "numpy", "pandas", "pyyaml", "pydantic")
    ]
