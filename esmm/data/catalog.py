"""Partitions and their files: the URLs to read, and how many rows they hold.

Everything here goes through pyarrow's filesystems (local, HDFS, S3, GCS), so the same calls
serve a laptop and a cluster. :func:`count_rows` opens every file's footer, so it is also
the check that every file of the partitions is readable Parquet before training starts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from contract.layout import as_url, partition_dir
from esmm.data.config import DataError

__all__ = ["count_rows", "parquet_file_urls", "partition_urls"]


def partition_urls(features: str, partitions: Sequence[str]) -> list[str]:
    """URLs of ``features/dt=P`` for each partition; DataError naming any that is missing.

    Works for any filesystem pyarrow knows (local, HDFS, S3, GCS), so the same call serves a
    laptop and a cluster.
    """
    import pyarrow.fs as pafs

    urls = [partition_dir(as_url(features), p) for p in partitions]
    missing = []
    for url in urls:
        filesystem, path = pafs.FileSystem.from_uri(url)
        if filesystem.get_file_info(path).type != pafs.FileType.Directory:
            missing.append(url)
    if missing:
        raise DataError(
            "feature partitions not found (run jobs/build_features.py for them first): "
            + ", ".join(missing)
        )
    return urls


def parquet_file_urls(urls: Sequence[str]) -> list[str]:
    """The Parquet files under each partition URL (Petastorm takes a list of files, not of
    folders); files starting with ``_`` or ``.`` (``_SUCCESS``, temp files) are skipped."""
    files: list[str] = []
    for url in urls:
        _, prefix, paths = _parquet_files(url)
        files.extend(prefix + path for path in paths)
    return files


def count_rows(urls: Sequence[str]) -> int:
    """Rows in the partitions' Parquet files (those of :func:`parquet_file_urls`, which the
    reader reads), from their footers only (no data is read).

    Raises:
        DataError: ``<file url>: not a readable Parquet file (<reason>)`` for the first file
            whose footer cannot be read (not Parquet, empty, truncated), so that a damaged
            file stops the trainer before training rather than in the reader mid-epoch.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    total = 0
    for url in urls:
        filesystem, prefix, paths = _parquet_files(url)
        for path in paths:
            try:
                with filesystem.open_input_file(path) as file:
                    total += pq.read_metadata(file).num_rows
            except (pa.ArrowException, OSError) as exc:
                raise DataError(
                    f"{prefix + path}: not a readable Parquet file ({_short_reason(exc)})"
                ) from None
    return total


def _parquet_files(url: str):
    """``(filesystem, prefix, paths)``: the filesystem of ``url``, the prefix that turns its
    paths back into URLs, and the sorted paths of the Parquet files under it; DataError when
    it holds none."""
    import pyarrow.fs as pafs

    filesystem, path = pafs.FileSystem.from_uri(url)
    prefix = url[: len(url) - len(path)] if url.endswith(path) else ""
    infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
    paths = sorted(
        info.path
        for info in infos
        if info.type == pafs.FileType.File
        and not info.base_name.startswith(("_", "."))
        and info.base_name.endswith(".parquet")
    )
    if not paths:
        raise DataError(f"no Parquet files in {url}")
    return filesystem, prefix, paths


def _short_reason(exc: BaseException) -> str:
    """The gist of pyarrow's error: its first sentence, without the source it names.

    Example:
        >>> _short_reason(ValueError("Could not open Parquet input source '<Buffer>': "
        ...     "Parquet magic bytes not found in footer. Either the file is corrupted or ..."))
        'Parquet magic bytes not found in footer'
    """
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^Could not open Parquet input source '[^']*': ", "", text)
    text = text.split(". ")[0].rstrip(".")
    return text if len(text) <= 120 else text[:117] + "..."
