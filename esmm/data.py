"""Petastorm input: feature-table partitions → batches of torch tensors, one shard per rank.

The network knows nothing of files; this module knows nothing of the network. The trainer
asks for ``train_batches(...)`` (shuffled, sharded, as tensors) and ``eval_batches(...)``
(in order, sharded, numpy, with the impression id for the oracle join).

Why ``make_batch_reader`` + ``BatchedDataLoader``: Petastorm's row-by-row ``DataLoader``
collates in Python (4.6 s for 2M rows here) while the batched path hands whole Arrow row
groups to torch (0.11 s). Multi-valued fields are stored padded to a fixed length
(:mod:`esmm.schema`), so the reader stacks them into ``[rows, max_len]`` arrays in one call.

Sharding: ``cur_shard=rank, shard_count=size`` gives each rank whole row groups, so shards
are uneven in general; the trainer ends each epoch on every rank together (an allreduced
"any rank out of data" flag) so the gradient allreduce of the others never waits forever.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from datetime import date, timedelta
from urllib.parse import urlparse

import numpy as np
import torch
from pydantic import Field

from esmm import schema
from esmm.config import FieldsConfig, StrictModel

__all__ = [
    "DataConfig",
    "DataError",
    "count_rows",
    "eval_batches",
    "parse_dates",
    "partition_urls",
    "train_batches",
]


# Petastorm 0.12 uses pyarrow's legacy ParquetDataset attributes and pyarrow 14 warns on every
# row group read; the pins (pyproject.toml) keep the pair working, so the noise says nothing.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm\..*")
# Arrow hands Petastorm read-only buffers; batches are never written in place, so torch's
# warning about wrapping them without a copy does not apply.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


class DataError(RuntimeError):
    """The requested feature-table partitions cannot be read as asked."""


class DataConfig(StrictModel):
    """The ``data:`` section of the training config.

    Attributes:
        batch_size: rows per training step on each rank.
        eval_batch_size: rows per evaluation batch.
        shuffle_queue_rows: rows held by the shuffling buffer (0 = no row shuffle; row groups
            are still read in a seeded random order). Each refill of Petastorm's buffer copies
            what it holds, so a buffer of a few row groups mixes well at a small cost
            (bench/input_pipeline.py).
        reader_workers: Petastorm reader threads per rank. One keeps up with a CPU trainer
            with room to spare; more threads compete with the training step for the GIL
            (measured slower on 2 cores); raise it on GPU hosts with cores to spare.
        prefetch_batches: batches assembled ahead by a background thread (0 = assemble in
            the training loop). Petastorm's loader collates and shuffles in the thread that
            iterates it; doing that while the step runs hides it behind the model's compute.
    """

    batch_size: int = Field(default=1024, ge=1)
    eval_batch_size: int = Field(default=8192, ge=1)
    shuffle_queue_rows: int = Field(default=20_000, ge=0)
    reader_workers: int = Field(default=1, ge=1)
    prefetch_batches: int = Field(default=4, ge=0)


_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def parse_dates(spec: str) -> list[str]:
    """Dates from ``A..B`` (inclusive range), ``A,B,C`` or ``A``; each ``YYYY-MM-DD``.

    Non-date partition names (``train``, ``test`` of an ingested Ali-CCP table) are taken
    as they are when given as a list.
    """
    spec = spec.strip()
    if ".." in spec:
        start_text, _, end_text = spec.partition("..")
        try:
            start, end = date.fromisoformat(start_text), date.fromisoformat(end_text)
        except ValueError:
            raise DataError(f"bad date range '{spec}': expected YYYY-MM-DD..YYYY-MM-DD") from None
        if end < start:
            raise DataError(f"bad date range '{spec}': the end is before the start")
        return [(start + timedelta(days=i)).isoformat() for i in range((end - start).days + 1)]
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise DataError("empty date list")
    for part in parts:
        if _DATE.match(part):
            try:
                date.fromisoformat(part)
            except ValueError:
                raise DataError(f"bad date '{part}'") from None
    return parts


def _as_url(path_or_url: str) -> str:
    """Petastorm wants URLs; a plain path becomes an absolute ``file://`` URL."""
    if urlparse(path_or_url).scheme:
        return path_or_url.rstrip("/")
    return "file://" + os.path.abspath(path_or_url)


def partition_urls(features: str, partitions: Sequence[str]) -> list[str]:
    """URLs of ``features/dt=P`` for each partition; DataError naming any that is missing.

    Works for any filesystem pyarrow knows (local, HDFS, S3, GCS), so the same call serves a
    laptop and a cluster.
    """
    import pyarrow.fs as pafs

    urls = [f"{_as_url(features)}/{schema.PARTITION}={p}" for p in partitions]
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
    import pyarrow.fs as pafs

    files: list[str] = []
    for url in urls:
        filesystem, path = pafs.FileSystem.from_uri(url)
        prefix = url[: len(url) - len(path)] if url.endswith(path) else ""
        infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
        names = sorted(
            info.path
            for info in infos
            if info.type == pafs.FileType.File
            and not info.base_name.startswith(("_", "."))
            and info.base_name.endswith(".parquet")
        )
        if not names:
            raise DataError(f"no Parquet files in {url}")
        files.extend(prefix + name for name in names)
    return files


def count_rows(urls: Sequence[str]) -> int:
    """Rows in the partitions, from the Parquet footers only (no data is read)."""
    import pyarrow.dataset as ds

    total = 0
    for url in urls:
        dataset = ds.dataset(url, format="parquet")
        total += sum(fragment.count_rows() for fragment in dataset.get_fragments())
    return total


def _field_patterns(columns: Sequence[str]) -> list[str]:
    # Petastorm matches schema_fields as regular expressions by prefix: anchor them so that
    # "user_id" never also selects a column such as "user_id_hash".
    return [f"^{re.escape(c)}$" for c in columns]


def _make_reader(
    urls: Sequence[str],
    columns: Sequence[str],
    rank: int,
    size: int,
    shuffle_row_groups: bool,
    seed: int | None,
    workers: int,
):
    from petastorm import make_batch_reader
    from petastorm.errors import NoDataAvailableError

    try:
        return make_batch_reader(
            parquet_file_urls(urls),
            schema_fields=_field_patterns(columns),
            reader_pool_type="thread",
            workers_count=workers,
            shuffle_row_groups=shuffle_row_groups,
            seed=seed,
            num_epochs=1,
            cur_shard=rank if size > 1 else None,
            shard_count=size if size > 1 else None,
        )
    except NoDataAvailableError as exc:
        raise DataError(
            f"cannot give each of {size} workers at least one row group of {list(urls)}: {exc}. "
            "Write the feature table with more row groups (features.yaml: rows_per_row_group) "
            "or use fewer workers."
        ) from None


def _to_tensors(batch: dict[str, torch.Tensor], fields: FieldsConfig) -> dict[str, torch.Tensor]:
    """Labels as float32 (BCE targets), ids as int64 (embedding indices)."""
    out = {label: batch[label].to(torch.float32) for label in schema.LABELS}
    for spec in fields.fields:
        out[spec.name] = batch[spec.name].to(torch.int64)
    return out


@contextlib.contextmanager
def train_batches(
    urls: Sequence[str],
    fields: FieldsConfig,
    cfg: DataConfig,
    rank: int = 0,
    size: int = 1,
    seed: int = 0,
) -> Iterator[Iterator[dict[str, torch.Tensor]]]:
    """One epoch of shuffled training batches of this rank's shard.

    Args:
        urls: feature-table partition URLs (:func:`partition_urls`).
        fields: the field list; only its columns and the labels are read.
        cfg: batch size, shuffling buffer, reader threads.
        rank, size: this worker's shard of ``size`` shards.
        seed: seeds the row-group order and the shuffling buffer; pass a different one per
            epoch (and per rank) so epochs differ but reruns repeat.

    Yields:
        An iterator of dicts: label → float32 ``[B]``; single field → int64 ``[B]``; multi
        field → int64 ``[B, max_len]``. The last batch may be smaller.
    """
    from petastorm.pytorch import BatchedDataLoader

    torch.manual_seed(seed)  # BatchedRandomShufflingBuffer draws from torch's global RNG
    reader = _make_reader(
        urls, schema.model_columns(fields), rank, size, True, seed, cfg.reader_workers
    )
    loader = BatchedDataLoader(
        reader, batch_size=cfg.batch_size, shuffling_queue_capacity=cfg.shuffle_queue_rows
    )
    with loader:
        batches = (_to_tensors(batch, fields) for batch in loader)
        if cfg.prefetch_batches:
            with _Prefetcher(batches, cfg.prefetch_batches) as prefetched:
                yield prefetched
        else:
            yield batches


class _Prefetcher:
    """Iterate ``source`` in a background thread, ``depth`` items ahead of the consumer.

    Exceptions of the source are re-raised in the consumer; leaving the ``with`` block early
    (an error in the training step, a rank that stops first) stops the thread and drains the
    queue so it never blocks forever on a full queue.
    """

    _DONE = object()

    def __init__(self, source: Iterator, depth: int):
        self._source = source
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="esmm-prefetch", daemon=True)

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        try:
            for item in self._source:
                if not self._put(item):
                    return
            self._put(self._DONE)
        except BaseException as exc:  # handed to the consumer and re-raised there
            self._put(exc)

    def __enter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self._thread.start()
        return self

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        item = self._queue.get()
        if item is self._DONE:
            self._queue.put(self._DONE)  # later next() calls keep answering "done"
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get_nowait()
            self._thread.join(timeout=0.1)


def eval_batches(
    urls: Sequence[str],
    fields: FieldsConfig,
    rank: int = 0,
    size: int = 1,
    workers: int = 2,
) -> Iterator[dict[str, np.ndarray]]:
    """This rank's shard of the evaluation partitions, in Parquet row-group batches.

    Yields dicts of numpy arrays: ``impression_id`` (object/str), the labels and the fields
    (see :func:`train_batches` for shapes). Every row of the partitions is yielded by exactly
    one rank, so gathering all ranks' outputs gives the whole evaluation set.
    """
    columns = [schema.IMPRESSION_ID, *schema.model_columns(fields)]
    with _make_reader(urls, columns, rank, size, False, None, workers) as reader:
        for batch in reader:
            yield batch._asdict()


def numpy_batch_to_tensors(
    batch: dict[str, np.ndarray], fields: FieldsConfig, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Convert a numpy batch (from :func:`eval_batches` or a pandas frame) to model input."""
    out: dict[str, torch.Tensor] = {}
    for label in schema.LABELS:
        if label in batch:
            out[label] = torch.as_tensor(np.asarray(batch[label]), dtype=torch.float32)
    for spec in fields.fields:
        values = batch[spec.name]
        values = np.asarray(values)
        if spec.kind == "multi" and values.dtype == np.object_:
            values = np.stack(values)  # lists of equal length (the table's contract)
        out[spec.name] = torch.as_tensor(np.asarray(values), dtype=torch.int64)
    return {name: tensor.to(device) for name, tensor in out.items()}
