"""The command lines of the pipeline's entry points, built in one place.

The demo, the experiments, the Airflow DAG and the tests all run the commands a user types:
``spark-submit jobs/<job>.py ...``, ``horovodrun ... python -m esmm.train ...`` and
``python -m esmm.promotion ...``. Their options are spelled here once, so a renamed flag is
one change. Only the standard library is used: the DAG imports this module in the Airflow
environment, where neither torch nor pyspark is installed, and passes Jinja templates as
values.

Example:
    >>> spark_job("/venv/bin", "build_features", build_features_args(
    ...     raw="raw", out="features", start_date="2026-01-01", end_date="2026-01-02"))
    ... # doctest: +NORMALIZE_WHITESPACE
    ['/venv/bin/spark-submit', '--master', 'local[2]', '--driver-memory', '4g', '--conf',
     'spark.ui.showConsoleProgress=false', 'jobs/build_features.py', '--raw', 'raw',
     '--out', 'features', '--start-date', '2026-01-01', '--end-date', '2026-01-02']
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "BIN",
    "PROJECT_ROOT",
    "StepFailed",
    "build_features_args",
    "gate",
    "generate_logs_args",
    "horovodrun",
    "job_script",
    "model_server",
    "pipeline_env",
    "promotion_args",
    "run_step",
    "score_args",
    "set_args",
    "spark_job",
    "spark_submit",
    "train_args",
    "trainer",
]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The environment this interpreter runs in: its bin/ holds spark-submit, horovodrun, mlflow.
BIN = Path(sys.executable).parent
JOBS = ("generate_logs", "build_features", "ingest_aliccp", "score")


def set_args(overrides: Sequence[str]) -> list[str]:
    """``["a=1", "b=2"]`` → ``["--set", "a=1", "--set", "b=2"]``."""
    return [part for kv in overrides for part in ("--set", kv)]


def _options(**values: object) -> list[str]:
    """``--flag value`` for every value that is not None; ``--flag`` alone for True."""
    parts: list[str] = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if value is None or value is False:
            continue
        parts += [flag] if value is True else [flag, str(value)]
    return parts


def job_script(name: str, project_root: str | Path | None = None) -> str:
    """The path of ``jobs/<name>.py``, relative unless ``project_root`` is given."""
    if name not in JOBS:
        raise ValueError(f"no job '{name}'; known: {', '.join(JOBS)}")
    script = f"jobs/{name}.py"
    return script if project_root is None else f"{str(project_root).rstrip('/')}/{script}"


def spark_submit(
    bin_dir: str | Path = BIN, master: str | None = "local[2]", driver_memory: str = "4g"
) -> list[str]:
    """``spark-submit`` with the embedded defaults: a local master, no console progress bar.

    ``master=None`` leaves the master to ``spark-defaults.conf`` (a cluster's setting).
    """
    command = [f"{bin_dir}/spark-submit"]
    if master:
        command += ["--master", master]
    return [
        *command,
        "--driver-memory",
        driver_memory,
        "--conf",
        "spark.ui.showConsoleProgress=false",
    ]


def spark_job(
    bin_dir: str | Path,
    name: str,
    args: Sequence[str],
    master: str | None = "local[2]",
    project_root: str | Path | None = None,
) -> list[str]:
    """``spark-submit [...] jobs/<name>.py ARGS``."""
    return [*spark_submit(bin_dir, master), job_script(name, project_root), *args]


def horovodrun(
    bin_dir: str | Path = BIN,
    np: int | str = 2,
    hosts: str | None = None,
    options: Sequence[str] = (),
) -> list[str]:
    """``horovodrun -np N -H HOSTS --gloo [OPTIONS] PYTHON`` (``HOSTS`` default ``localhost:N``);
    the workers run that environment's python (this very interpreter for the default ``BIN``).
    ``options`` are more horovodrun flags, e.g. a multi-host run's ``--ssh-port 2222
    --network-interface eth0`` (docs/OPERATIONS.md, "Training on several hosts").

    Example:
        >>> horovodrun("/venv/bin", 2, "hostA:1,hostB:1", ["--ssh-port", "2222"])
        ... # doctest: +NORMALIZE_WHITESPACE
        ['/venv/bin/horovodrun', '-np', '2', '-H', 'hostA:1,hostB:1', '--gloo',
         '--ssh-port', '2222', '/venv/bin/python']
    """
    python = sys.executable if Path(bin_dir) == BIN else f"{bin_dir}/python"
    return [
        f"{bin_dir}/horovodrun",
        *("-np", str(np)),
        *("-H", hosts or f"localhost:{np}"),
        "--gloo",
        *options,
        python,
    ]


def trainer(
    bin_dir: str | Path,
    np: int | str,
    args: Sequence[str],
    hosts: str | None = None,
    options: Sequence[str] = (),
) -> list[str]:
    """``horovodrun ... python -m esmm.train ARGS``."""
    return [*horovodrun(bin_dir, np, hosts, options), "-m", "esmm.train", *args]


def model_server(
    bin_dir: str | Path, model_uri: str, host: str = "127.0.0.1", port: int = 5001, workers: int = 1
) -> list[str]:
    """``mlflow models serve`` of a registered model in the pipeline's own environment
    (``--env-manager local``: no conda or virtualenv is built), answering ``POST
    /invocations`` on ``host:port`` (docs/OPERATIONS.md, "Online serving").

    Example:
        >>> model_server("/venv/bin", "models:/esmm@champion", port=8080)
        ... # doctest: +NORMALIZE_WHITESPACE
        ['/venv/bin/mlflow', 'models', 'serve', '-m', 'models:/esmm@champion',
         '--env-manager', 'local', '--host', '127.0.0.1', '--port', '8080', '--workers', '1']
    """
    return [
        f"{bin_dir}/mlflow",
        *("models", "serve", "-m", model_uri, "--env-manager", "local"),
        *("--host", host, "--port", str(port), "--workers", str(workers)),
    ]


def gate(bin_dir: str | Path, args: Sequence[str]) -> list[str]:
    """``python -m esmm.promotion ARGS`` with that environment's python."""
    python = sys.executable if Path(bin_dir) == BIN else f"{bin_dir}/python"
    return [python, "-m", "esmm.promotion", *args]


def generate_logs_args(
    out: str | Path,
    start_date: str,
    days: int,
    preset: str = "demo",
    seed: int = 0,
    sets: Sequence[str] = (),
) -> list[str]:
    """The options of ``jobs/generate_logs.py`` (the funnel simulator)."""
    options = _options(preset=preset, start_date=start_date, days=days, seed=seed, out=out)
    return [*options, *set_args(sets)]


def build_features_args(
    raw: str | Path,
    out: str | Path,
    start_date: str,
    end_date: str,
    fields: str | Path | None = None,
    config: str | Path | None = None,
    sets: Sequence[str] = (),
) -> list[str]:
    """The options of ``jobs/build_features.py`` for the days ``start_date .. end_date``."""
    options = _options(
        raw=raw, out=out, start_date=start_date, end_date=end_date, config=config, fields=fields
    )
    return [*options, *set_args(sets)]


def score_args(
    features: str | Path, date: str, model: str, out: str | Path, tracking_uri: str | None = None
) -> list[str]:
    """The options of ``jobs/score.py`` (batch scoring of one day with a registered model)."""
    return _options(features=features, date=date, model=model, out=out, tracking_uri=tracking_uri)


def train_args(
    config: str | Path,
    features: str | Path,
    train_dates: str,
    eval_date: str,
    fields: str | Path | None = None,
    valid_date: str | None = None,
    oracle: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    run_name: str | None = None,
    summary_json: str | Path | None = None,
    no_progress: bool = False,
    sets: Sequence[str] = (),
) -> list[str]:
    """The options of ``python -m esmm.train`` (``valid_date``: the day that chooses the
    epoch; ``eval_date`` is then the test day)."""
    options = _options(
        config=config,
        fields=fields,
        features=features,
        train_dates=train_dates,
        valid_date=valid_date,
        eval_date=eval_date,
        oracle=oracle,
        checkpoint_dir=checkpoint_dir,
        run_name=run_name,
        summary_json=summary_json,
        no_progress=no_progress,
    )
    return [*options, *set_args(sets)]


def promotion_args(
    model: str,
    version: str,
    features: str | Path,
    eval_date: str,
    config: str | Path | None = None,
    sets: Sequence[str] = (),
) -> list[str]:
    """The options of ``python -m esmm.promotion`` (the gate)."""
    options = _options(
        model=model, version=version, features=features, eval_date=eval_date, config=config
    )
    return [*options, *set_args(sets)]


class StepFailed(RuntimeError):
    """A launched command exited non-zero."""

    def __init__(self, title: str, returncode: int):
        super().__init__(f"step '{title}' failed with exit code {returncode}")
        self.returncode = returncode


def pipeline_env(
    tracking_uri: str | None = None, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of a launched command: this venv's tools first on the PATH, the
    project importable (driver and Spark executors), one OpenMP thread per process and
    Spark's quieter log4j2 settings (``conf/spark``)."""
    env = dict(os.environ if base is None else base)
    env["PYSPARK_PYTHON"] = sys.executable
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("SPARK_CONF_DIR", str(PROJECT_ROOT / "conf" / "spark"))
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def run_step(
    title: str,
    command: Sequence[str],
    env: Mapping[str, str],
    log: Path | None = None,
    echo: bool = True,
) -> float:
    """Run one step from the project root; return its seconds, raise StepFailed on failure.

    With ``log`` the step's output goes to that file (and its tail is printed on failure);
    otherwise it streams to this process's stdout/stderr.
    """
    if echo:
        print(f"\n=== {title}\n$ {shlex.join(command)}", flush=True)
    started = time.monotonic()
    if log is None:
        result = subprocess.run(command, cwd=PROJECT_ROOT, env=dict(env), check=False)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            result = subprocess.run(
                command, cwd=PROJECT_ROOT, env=dict(env), stdout=out, stderr=subprocess.STDOUT
            )
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        if log is not None:
            tail = log.read_text(errors="replace").splitlines()[-25:]
            print("\n".join(tail), file=sys.stderr)
            print(f"(whole log: {log})", file=sys.stderr)
        raise StepFailed(title, result.returncode)
    if echo:
        print(f"--- {title}: done in {elapsed:.0f}s", flush=True)
    return elapsed
