"""Small helpers the ``jobs/`` entry points share: argument checks that end in one line.

A user's mistake (bad date, missing folder, bad config) must end in one clear message on
stderr and exit code 2, before Spark starts where possible, never in a JVM stack trace.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

__all__ = ["UsageError", "die", "is_local_path", "local_dir_exists", "local_path"]

EXIT_USAGE = 2


class UsageError(Exception):
    """A problem with the command line or its inputs that the user can fix."""


def die(prog: str, message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print ``<prog>: error: <message>`` as one line on stderr and exit with ``code``."""
    line = f"{prog}: error: {' '.join(str(message).split())}"
    if not _print_to_spark_submit_stderr(line):
        print(line, file=sys.stderr, flush=True)
    sys.exit(code)


def _print_to_spark_submit_stderr(line: str) -> bool:
    """Under spark-submit, write ``line`` to the launcher's real stderr; False elsewhere.

    spark-submit's PythonRunner merges the Python driver's stderr into its stdout, so a
    plain ``print(file=sys.stderr)`` would not reach the caller's stderr. The launcher's py4j
    gateway is already up before any SparkContext exists, so this costs no Spark start.
    """
    if "PYSPARK_GATEWAY_PORT" not in os.environ:
        return False
    try:
        from pyspark.java_gateway import launch_gateway

        gateway = launch_gateway()
        gateway.jvm.System.err.println(line)
        gateway.jvm.System.err.flush()
        return True
    except Exception:
        return False


def is_local_path(path: str) -> bool:
    """True for a plain or ``file:`` path, which can be checked before Spark starts."""
    return "://" not in path or path.startswith("file:")


def local_path(path: str) -> str:
    """The filesystem path of a plain or ``file:`` path."""
    return path.removeprefix("file://").removeprefix("file:") if path.startswith("file:") else path


def local_dir_exists(path: str) -> bool:
    """Whether a local directory exists (remote paths are checked later, by Spark)."""
    return os.path.isdir(local_path(path))
