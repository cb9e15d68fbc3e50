"""How the drivers (``esmm.demo``, ``esmm.experiments``) launch the pipeline's own commands.

Every step is the command a user would type (``spark-submit jobs/...``, ``horovodrun ...
python -m esmm.train``), run as a subprocess from the project root with this interpreter's
virtual environment first on the PATH, so the drivers exercise exactly what production runs.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


class StepFailed(RuntimeError):
    """A launched command exited non-zero."""

    def __init__(self, title: str, returncode: int):
        super().__init__(f"step '{title}' failed with exit code {returncode}")
        self.returncode = returncode


def pipeline_env(tracking_uri: str | None = None, base: Mapping[str, str] = os.environ) -> dict:
    """The environment of the launched commands: this venv's tools, the project importable
    (driver and Spark executors), one OpenMP thread per process, Spark's quieter log4j2."""
    env = dict(base)
    env["PYSPARK_PYTHON"] = sys.executable
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("SPARK_CONF_DIR", str(PROJECT_ROOT / "conf" / "spark"))
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def spark_submit(master: str = "local[2]", driver_memory: str = "4g") -> list[str]:
    """``spark-submit`` with the embedded defaults (local master, no console progress bar)."""
    return [
        str(BIN / "spark-submit"),
        "--master",
        master,
        "--driver-memory",
        driver_memory,
        "--conf",
        "spark.ui.showConsoleProgress=false",
    ]


def horovodrun(np: int) -> list[str]:
    """``horovodrun -np N`` on this host over Gloo, running this interpreter."""
    return [
        str(BIN / "horovodrun"),
        "-np",
        str(np),
        "-H",
        f"localhost:{np}",
        "--gloo",
        sys.executable,
    ]


def set_args(overrides: Sequence[str]) -> list[str]:
    """``["a=1", "b=2"]`` → ``["--set", "a=1", "--set", "b=2"]`` for a launched command."""
    return [part for kv in overrides for part in ("--set", kv)]


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
