"""Where a feature table keeps its partitions, stats and quarantine, for every filesystem.

A table root (a local path or any URL that Hadoop and pyarrow know: ``hdfs://``, ``s3a://``,
``gs://``) holds::

    <root>/dt=<P>/part-*.parquet        the rows of partition P (the table's schema)
    <root>/_stats/dt=<P>.json           the accounting of P: input = output + quarantined + ...
    <root>/_quarantine/dt=<P>/log=<L>/  P's rejected records with their reason
    <root>/_tmp/<run>/                  a build being staged (readers skip ``_`` folders)

The predictions of the batch scorer follow the same ``<root>/dt=<P>/`` rule. The paths here
are strings, never :class:`pathlib.Path`, so an ``hdfs://`` root keeps its scheme.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from contract.schema import PARTITION

__all__ = [
    "PartitionPaths",
    "as_url",
    "partition_dir",
    "partition_paths",
    "read_stats",
    "staging_dir",
]


def partition_dir(root: str, partition: str) -> str:
    """``<root>/dt=<partition>`` (a table or a predictions partition).

    Example:
        >>> partition_dir("hdfs://nn/features/", "2026-01-02")
        'hdfs://nn/features/dt=2026-01-02'
    """
    return f"{str(root).rstrip('/')}/{PARTITION}={partition}"


@dataclass(frozen=True)
class PartitionPaths:
    """Where one partition ``dt=P`` of a feature table lives."""

    table: str
    quarantine: str
    stats: str


def partition_paths(root: str, partition: str) -> PartitionPaths:
    """The table, quarantine and stats paths of ``partition`` under ``root``.

    Example:
        >>> partition_paths("var/features", "2026-01-02").stats
        'var/features/_stats/dt=2026-01-02.json'
    """
    root = str(root).rstrip("/")
    return PartitionPaths(
        table=partition_dir(root, partition),
        quarantine=f"{root}/_quarantine/{PARTITION}={partition}",
        stats=f"{root}/_stats/{PARTITION}={partition}.json",
    )


def staging_dir(root: str, run: str) -> str:
    """The folder a build stages ``run`` in before it publishes (skipped by every reader)."""
    return f"{str(root).rstrip('/')}/_tmp/{run}"


def as_url(path_or_url: str) -> str:
    """A URL pyarrow and Petastorm accept: a plain path becomes an absolute ``file://`` URL.

    Example:
        >>> as_url("s3://bucket/features/")
        's3://bucket/features'
        >>> as_url("/data/features")
        'file:///data/features'
    """
    text = str(path_or_url)
    if urlparse(text).scheme:
        return text.rstrip("/")
    return "file://" + os.path.abspath(text)


def read_stats(root: str, partition: str) -> dict[str, Any] | None:
    """The stats of ``partition`` (parsed JSON), or None when the table has no stats file.

    Reads through pyarrow's filesystems, so an ``hdfs://`` or ``s3://`` root works like a
    local one.
    """
    import pyarrow.fs as pafs

    filesystem, path = pafs.FileSystem.from_uri(as_url(partition_paths(root, partition).stats))
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as stream:
        return json.loads(stream.read().decode("utf-8"))
