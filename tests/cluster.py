"""A Spark standalone cluster on 127.0.0.1 and a deployment of the project onto it, as a user
outside the checkout would make one.

- :func:`standalone_cluster`: a master and N workers (one core each, their own work folders),
  started with the pipeline environment's own pyspark (``spark-class ...Master`` /
  ``...Worker``); stopped, executors included, when the block ends, also after a failure.
- :func:`node_python`: an interpreter that sees the pipeline's dependencies (pyspark, torch,
  mlflow, ...) but not the project, as on a cluster node: a venv whose only link to the
  pipeline environment is a ``.pth`` line naming its site-packages, so the project's editable
  install (a ``.pth`` *inside* that folder) is not loaded.
- :func:`application`: the jobs' entry scripts and the shipped configs copied to a folder outside
  the checkout, and the code built by ``make dist`` (the zip that ``--py-files`` ships).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import PROJECT_ROOT, VENV_BIN, die_with_parent, free_port, stop_process_groups


@dataclass(frozen=True)
class Cluster:
    """A running standalone cluster.

    Attributes:
        master_url: ``spark://127.0.0.1:<port>``, for ``spark-submit --master``.
        ui_url: the master's web UI (``/json/`` lists the workers and applications).
        work_dirs: each worker's work folder (``<app-id>/<executor-id>/stderr`` inside).
    """

    master_url: str
    ui_url: str
    work_dirs: list[Path]

    def state(self) -> dict:
        """The master's view of the cluster (its ``/json/`` page)."""
        with urllib.request.urlopen(f"{self.ui_url}/json/", timeout=5) as response:
            return json.loads(response.read())


def _spark_class(*args: str) -> list[str]:
    return [str(VENV_BIN / "spark-class"), *args]


def cluster_env(root: Path) -> dict[str, str]:
    """The daemons' environment: nothing of the checkout on PYTHONPATH, logs under ``root``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYSPARK", "SPARK"))}
    env.pop("PYTHONPATH", None)
    env["SPARK_LOG_DIR"] = str(root / "logs")
    env["SPARK_PID_DIR"] = str(root)
    env["SPARK_LOCAL_IP"] = "127.0.0.1"
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


@contextlib.contextmanager
def standalone_cluster(root: Path, workers: int = 2, timeout: float = 90) -> Iterator[Cluster]:
    """Start a master and ``workers`` workers on 127.0.0.1; yield the cluster once every worker
    is ALIVE; stop them (and the executors they started) at the end."""
    root.mkdir(parents=True, exist_ok=True)
    env = cluster_env(root)
    port, ui_port = free_port(), free_port()
    master_url, ui_url = f"spark://127.0.0.1:{port}", f"http://127.0.0.1:{ui_port}"
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []

    def start(name: str, command: list[str]) -> None:
        log = root / f"{name}.log"
        logs.append(log)
        with log.open("w") as out:
            procs.append(
                subprocess.Popen(
                    command,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                    preexec_fn=die_with_parent,
                )
            )

    work_dirs = [root / f"worker-{i}" for i in range(workers)]
    try:
        start(
            "master",
            _spark_class(
                "org.apache.spark.deploy.master.Master",
                *("--host", "127.0.0.1", "--port", str(port), "--webui-port", str(ui_port)),
            ),
        )
        for i, work_dir in enumerate(work_dirs):
            work_dir.mkdir()
            start(
                f"worker-{i}",
                _spark_class(
                    "org.apache.spark.deploy.worker.Worker",
                    master_url,
                    *("--host", "127.0.0.1", "--cores", "1", "--memory", "2g"),
                    *("--webui-port", str(free_port()), "--work-dir", str(work_dir)),
                ),
            )
        cluster = Cluster(master_url, ui_url, work_dirs)
        deadline = time.monotonic() + timeout
        while True:
            dead = [log for proc, log in zip(procs, logs, strict=True) if proc.poll() is not None]
            if dead:
                raise RuntimeError(f"a Spark daemon exited:\n{dead[0].read_text()[-3000:]}")
            with contextlib.suppress(OSError, ValueError):
                alive = [w for w in cluster.state()["workers"] if w["state"] == "ALIVE"]
                if len(alive) == workers:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the cluster did not come up in {timeout}s:\n"
                    + "\n".join(log.read_text()[-1500:] for log in logs)
                )
            time.sleep(0.5)
        yield cluster
    finally:
        # Workers first (they stop their executors), then the master.
        stop_process_groups(procs, timeout=20)


def node_python(root: Path) -> Path:
    """A python with the pipeline's dependencies and without the project (module docstring)."""
    venv = root / "node-venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "pipeline_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@dataclass(frozen=True)
class Application:
    """What a user submits: ``folder/jobs/<name>.py`` with ``folder/conf/``, and the code."""

    folder: Path
    py_files: Path

    def job(self, name: str) -> str:
        return str(self.folder / "jobs" / f"{name}.py")


def application(root: Path) -> Application:
    """``make dist`` into ``root/dist`` and the entry scripts + configs into ``root/app``."""
    dist = root / "dist"
    subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-C",
            str(PROJECT_ROOT),
            "dist",
            f"DIST={dist}",
            f"VENV={VENV_BIN.parent}",
        ],
        check=True,
        capture_output=True,
    )
    (py_files,) = dist.glob("*.zip")
    folder = root / "app"
    shutil.copytree(
        PROJECT_ROOT / "jobs", folder / "jobs", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(PROJECT_ROOT / "conf", folder / "conf")
    return Application(folder, py_files)
