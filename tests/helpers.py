"""Test helpers that run real components: horovodrun, an MLflow server, MLflow SQLite stores.

Kept out of conftest.py so that scripts and benchmarks can use them too.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from contract import commands

PROJECT_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# The tests' JVMs: C1 only (tests/conftest.py says why).
SHORT_LIVED_JVM_OPTIONS = "-XX:TieredStopAtLevel=1"

# horovodrun prefixes each line of a rank's output with "[<rank>]<stdout>:" / "[<rank>]<stderr>:".
_RANK_PREFIX = re.compile(r"^\[(\d+)\]<(stdout|stderr)>:(.*)$")


@dataclass(frozen=True)
class HorovodResult:
    """What a horovodrun invocation printed.

    Attributes:
        returncode: horovodrun's exit status.
        ranks: rank → that rank's lines (stdout and stderr, prefixes removed), in order.
        output: the raw combined output, for error messages.
    """

    returncode: int
    ranks: dict[int, list[str]]
    output: str

    def rank_text(self, rank: int) -> str:
        """All lines of one rank joined with newlines."""
        return "\n".join(self.ranks.get(rank, []))


def split_by_rank(output: str) -> dict[int, list[str]]:
    """Group horovodrun's prefixed output lines by rank."""
    ranks: dict[int, list[str]] = {}
    for line in output.splitlines():
        match = _RANK_PREFIX.match(line)
        if match:
            ranks.setdefault(int(match.group(1)), []).append(match.group(3))
    return ranks


def project_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a subprocess of the project: venv first on PATH, project importable."""
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYSPARK_PYTHON"] = sys.executable
    if extra:
        env.update(extra)
    return env


def run_horovodrun(
    script: str | Path,
    *args: str,
    np: int = 2,
    env: Mapping[str, str] | None = None,
    timeout: float = 300,
    module: bool = False,
) -> HorovodResult:
    """Run ``horovodrun -np N -H localhost:N --gloo python [-m] SCRIPT ARGS``.

    Args:
        script: path of a Python script, or a module name when ``module`` is true.
        args: arguments for the script.
        np: number of worker processes.
        env: extra environment variables.
        timeout: seconds before the run is killed (a deadlock must fail the test, not hang it).
        module: run ``python -m script``.

    Returns:
        The exit code and each rank's output.
    """
    target = ["-m", str(script)] if module else [str(script)]
    command = [*commands.horovodrun(VENV_BIN, np), *target, *args]
    proc = subprocess.run(
        command,
        cwd=PROJECT_ROOT,
        env=project_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = proc.stdout + proc.stderr
    return HorovodResult(proc.returncode, split_by_rank(output), output)


_LIBC = ctypes.CDLL("libc.so.6", use_errno=True)  # loaded here, not in a forked child
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn`` of a server a test starts: the kernel sends it SIGTERM when the test
    process dies (killed by a CI timeout, say), which skips every ``finally`` that would have
    stopped it (Linux ``prctl(PR_SET_PDEATHSIG)``; it survives the ``exec`` of the server)."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_process_groups(procs: Sequence[subprocess.Popen], timeout: float) -> None:
    """SIGTERM the process group of each of ``procs`` (started with ``start_new_session``),
    last started first, then wait for each; a group still there after ``timeout`` seconds
    gets SIGKILL. Children the daemons started (executors, sshd sessions) go with them."""
    for proc in reversed(procs):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers_200(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def wait_until_answering(
    url: str,
    what: str,
    timeout: float = 120,
    answers: Callable[[str], bool] | None = None,
    alive: Callable[[], None] | None = None,
) -> None:
    """Until ``url`` answers 200 (asked by ``answers(url)`` when given); a RuntimeError naming
    ``what`` after ``timeout`` seconds. ``alive()``, when given, is called before each try and
    raises if the server is gone."""
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None:
            alive()
        if (answers or _answers_200)(url):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer on {url} within {timeout}s")
        time.sleep(0.5)


@contextlib.contextmanager
def serve(
    command: Sequence[str],
    url: str,
    probe: str,
    log_path: Path,
    env: Mapping[str, str],
    what: str,
    timeout: float = 120,
    answers: Callable[[str], bool] | None = None,
) -> Iterator[str]:
    """Run a server ``command`` (output to ``log_path``) until ``url + probe`` answers 200
    (asked by ``answers(url + probe)`` when given: a server in a network namespace is asked
    from inside it); yield ``url``; stop it afterwards, also when the test fails."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("w")
    proc = subprocess.Popen(
        list(command),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(env),
        preexec_fn=die_with_parent,
    )

    def alive() -> None:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log_path.read_text()}")

    try:
        wait_until_answering(f"{url}{probe}", what, timeout, answers, alive)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


_EMPTY_STORE: Path | None = None


def sqlite_store(path: Path) -> str:
    """The URI of a new, empty MLflow SQLite store at ``path`` (the file must not exist).

    A real store, as MLflow itself makes one: the first call of a test process creates it
    with MLflow (whose ~100 schema migrations take 2–3 s in whichever process opens a new
    file first, the trainer's subprocess included) and each call copies that empty store.
    The Default experiment's artifact folder is then ``<path's folder>/mlruns/0``, as if
    MLflow had created the file from there.
    """
    global _EMPTY_STORE
    if path.exists():
        raise FileExistsError(f"{path} exists: sqlite_store() makes a new store")
    if _EMPTY_STORE is None:
        import mlflow

        empty = Path(tempfile.mkdtemp(prefix="empty-mlflow-store-")) / "mlflow.db"
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{empty}").search_experiments()
        _EMPTY_STORE = empty
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_EMPTY_STORE, path)
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        default = (path.parent / "mlruns" / "0").as_posix()
        db.execute(
            "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0", (default,)
        )
    return f"sqlite:///{path}"


@contextlib.contextmanager
def start_mlflow_server(
    root: Path,
    timeout: float = 120,
    host: str = "127.0.0.1",
    port: int | None = None,
    prefix: Sequence[str] = (),
    answers: Callable[[str], bool] | None = None,
) -> Iterator[str]:
    """Start ``mlflow server`` on ``host`` over SQLite under ``root``; yield its URI.

    The server gets its own artifact store (``--artifacts-destination``) and is served with
    ``--serve-artifacts``, as a remote team server would be, so clients upload artifacts
    through HTTP rather than writing to a shared folder. ``prefix`` runs it through another
    command (``ip netns exec NS``), ``answers`` then asks it from there (see :func:`serve`).
    """
    port = port or free_port()
    command = [
        *prefix,
        str(VENV_BIN / "mlflow"),
        *("server", "--host", host, "--port", str(port)),
        *("--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"),
        *("--artifacts-destination", str(root / "artifacts"), "--serve-artifacts"),
        *("--workers", "1"),
    ]
    url = f"http://{host}:{port}"
    with serve(
        command,
        url,
        "/health",
        root / "server.log",
        project_env(),
        "mlflow server",
        timeout,
        answers,
    ) as uri:
        yield uri


@contextlib.contextmanager
def start_model_server(
    model_uri: str, tracking_uri: str, root: Path, timeout: float = 120
) -> Iterator[str]:
    """Serve ``model_uri`` with ``mlflow models serve`` on 127.0.0.1 (the command of
    docs/OPERATIONS.md); yield its base URL. Stopped, and its log kept, even on failure."""
    from contract import commands

    port = free_port()
    env = project_env({"MLFLOW_TRACKING_URI": tracking_uri})
    command = commands.model_server(VENV_BIN, model_uri, port=port)
    url = f"http://127.0.0.1:{port}"
    with serve(
        command, url, "/ping", root / "model-server.log", env, "mlflow models serve", timeout
    ) as served:
        yield served


def post_json(url: str, body: object, timeout: float = 30) -> tuple[int, dict]:
    """POST ``body`` as JSON; the status and the decoded answer (also for 4xx/5xx)."""
    import json

    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def run_command(
    command: Sequence[str], env: Mapping[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run a project command (spark-submit, python -m ...) with the project environment."""
    return subprocess.run(
        list(command),
        cwd=PROJECT_ROOT,
        env=project_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def built_partition(out: Path, day: str):
    """A built day as comparable values: its rows sorted by id, its stats (less where the
    look-back ids came from) and its quarantine records sorted."""
    import json

    import pyarrow.dataset as ds

    table = ds.dataset(str(out / f"dt={day}"), format="parquet").to_table().to_pandas()
    rows = table.sort_values("impression_id").reset_index(drop=True)
    day_stats = json.loads((out / "_stats" / f"dt={day}.json").read_text())
    sources = day_stats.pop("lookback_from")
    quarantine = ds.dataset(
        str(out / "_quarantine" / f"dt={day}"), format="parquet", partitioning="hive"
    ).to_table()
    records = sorted(map(tuple, quarantine.to_pandas().astype(str).values.tolist()))
    return rows, day_stats, records, sources
