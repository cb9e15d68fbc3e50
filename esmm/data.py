"""Petastorm input: feature-table partitions → batches of torch tensors, one shard per rank.

The network knows nothing of files; this module knows nothing of the network. The trainer
asks for ``train_batches(...)`` (shuffled, sharded, as tensors) and ``eval_batches(...)``
(in order, sharded, numpy, with the impression id for the oracle join).

Why ``make_batch_reader``: Petastorm's row-by-row ``DataLoader`` collates in Python (4.6 s
for 2M rows here) while the batched reader hands whole row groups over as numpy arrays.
Multi-valued fields are stored padded to a fixed length (:mod:`contract.schema`), so each is
viewed as one ``[rows, max_len]`` array, and plain numeric columns are taken zero-copy
rather than through pandas (:func:`_use_fast_list_conversion`). Batches are assembled as
Petastorm 0.12's ``BatchedDataLoader`` assembles them (same shuffling buffer, same random
draws) but with a few tensor operations per several batches instead of one per column and
batch, already in the model's dtypes (:func:`_shuffled_batches`). All of it runs in a child
process (:class:`_InputProcess`) that hands the batches over in shared memory: in a thread
beside the training step, every Python-level operation of the input would compete with the
step for the GIL (issue #8).

Sharding: ``cur_shard=rank, shard_count=size`` gives each rank whole row groups, so shards
are uneven in general; the trainer ends each epoch on every rank together (an allreduced
"any rank out of data" flag) so the gradient allreduce of the others never waits forever.
"""

from __future__ import annotations

import contextlib
import functools
import math
import multiprocessing as mp
import pickle
import queue
import re
import sys
import threading
import types
import warnings
from collections import deque
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from pydantic import Field

from contract import schema
from contract.config import StrictModel
from contract.fields import FieldsConfig
from contract.layout import as_url, partition_dir

__all__ = [
    "DataConfig",
    "DataError",
    "count_rows",
    "eval_batches",
    "partition_urls",
    "start_input_server",
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
            are still read in a seeded random order). Each refill of the buffer copies what it
            holds, so a buffer of a few row groups mixes well at a small cost
            (bench/input_pipeline.py).
        reader_workers: Petastorm reader threads per rank. One keeps up with a CPU trainer
            with room to spare (bench/input_pipeline.py); raise it on GPU hosts with cores
            to spare.
        prefetch_batches: batches assembled ahead of the training step (0 = read, convert
            and shuffle in the training loop itself, between steps); an input process
            rounds it up to whole hand-overs of 8 batches.
        input_process: assemble the batches in a child process (the reader, the conversion
            and the shuffling buffer), handed over in shared memory; the training process
            only receives them. False: in a thread of the training process, where every
            Python-level operation of the input waits for, or delays, the training step's
            hold of the GIL (bench/training.py times both).
    """

    batch_size: int = Field(default=1024, ge=1)
    eval_batch_size: int = Field(default=8192, ge=1)
    shuffle_queue_rows: int = Field(default=20_000, ge=0)
    reader_workers: int = Field(default=1, ge=1)
    prefetch_batches: int = Field(default=4, ge=0)
    input_process: bool = True


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
        reader = make_batch_reader(
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
    _use_fast_list_conversion(reader)
    return reader


def _use_fast_list_conversion(reader) -> None:
    """Convert each row group's list columns to ``[rows, max_len]`` arrays in one call.

    Petastorm 0.12 turns a list column into numpy with ``to_pandas()`` (an object array of
    one small array per row) and ``np.vstack`` of those: 60% of the input's time here, spent
    holding the GIL in the thread that iterates the reader, i.e. beside the training step.
    The padded multi-valued fields (:mod:`contract.schema`) are one flat Arrow buffer; viewing it
    as ``[rows, max_len]`` gives the same array for a small fraction of the cost. Plain
    numeric columns without nulls are likewise viewed zero-copy instead of going through a
    pandas Series. Petastorm is pinned (pyproject.toml); a reader of another kind than
    0.12's Arrow reader is left alone.
    """
    from petastorm.arrow_reader_worker import ArrowReaderWorkerResultsQueueReader

    if type(reader._results_queue_reader) is ArrowReaderWorkerResultsQueueReader:
        reader._results_queue_reader = _fast_list_results_reader_class()()


def _numeric_column_to_numpy(array) -> np.ndarray | None:
    """The ``[rows, length]`` numpy view of a list array whose rows all hold ``length``
    non-null numbers, or the ``[rows]`` view of an array of non-null numbers; None for any
    other array (left to Petastorm's conversion, which goes through pandas)."""
    import pyarrow as pa

    if pa.types.is_integer(array.type) or pa.types.is_floating(array.type):
        return array.to_numpy() if len(array) and not array.null_count else None
    if not (pa.types.is_list(array.type) or pa.types.is_large_list(array.type)):
        return None
    value_type = array.type.value_type
    if not (pa.types.is_integer(value_type) or pa.types.is_floating(value_type)):
        return None
    rows = len(array)
    if rows == 0 or array.null_count:
        return None
    offsets = np.asarray(array.offsets)
    total = int(offsets[-1] - offsets[0])
    if total % rows or np.any(np.diff(offsets) != total // rows):
        return None
    values = array.flatten()
    if values.null_count:
        return None
    return values.to_numpy().reshape(rows, total // rows)


@functools.cache
def _fast_list_results_reader_class() -> type:
    from petastorm.arrow_reader_worker import ArrowReaderWorkerResultsQueueReader
    from petastorm.workers_pool import EmptyResultError

    class FastListResultsReader(ArrowReaderWorkerResultsQueueReader):
        """Petastorm's results reader, with numeric columns and fixed-length numeric list
        columns converted by :func:`_numeric_column_to_numpy`; other columns are converted as
        Petastorm's ``read_next`` converts them."""

        def read_next(self, workers_pool, schema, ngram):
            assert not ngram, "ArrowReader does not support ngrams for now"
            try:
                table = workers_pool.get_results()
            except EmptyResultError:
                raise StopIteration from None
            columns = {}
            for name in table.column_names:
                column = table.column(name)
                if column.num_chunks == 1:
                    values = _numeric_column_to_numpy(column.chunks[0])
                else:
                    values = _numeric_column_to_numpy(column.combine_chunks())
                if values is None:
                    columns[name] = _petastorm_column_to_numpy(column, table.column(0))
                    continue
                shape = schema.fields[name].shape
                if len(shape) > 1:
                    values = values.reshape((len(values), *shape))
                columns[name] = values
            return schema.make_namedtuple(**columns)

    return FastListResultsReader


def _petastorm_column_to_numpy(column, first_column) -> np.ndarray:
    """A column other than a fixed-length numeric list, as Petastorm 0.12's reader converts it."""
    import pandas as pd
    import pyarrow as pa

    # Petastorm converts the single chunk of a one-row-group table directly (faster).
    one_chunk = first_column.num_chunks == 1
    values = column.chunks[0].to_pandas() if one_chunk else column.to_pandas()
    if isinstance(values, pd.Series):
        values = values.values
    if pa.types.is_string(column.type):
        return values.astype(np.str_)
    if pa.types.is_list(column.type):
        try:
            return np.vstack(values.tolist())
        except ValueError:
            raise RuntimeError(
                f"Length of all values in column '{column._name}' are expected to be the same"
            ) from None
    return values


def _batch_dtypes(fields: FieldsConfig) -> dict[str, torch.dtype]:
    """Labels as float32 (BCE targets), ids as int64 (embedding indices)."""
    return {
        **{label: torch.float32 for label in schema.LABELS},
        **{spec.name: torch.int64 for spec in fields.fields},
    }


def _to_tensors(batch: dict[str, torch.Tensor], fields: FieldsConfig) -> dict[str, torch.Tensor]:
    """A batch of Petastorm's loader with the dtypes of :func:`_batch_dtypes`."""
    return {name: batch[name].to(dtype) for name, dtype in _batch_dtypes(fields).items()}


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
    if _use_input_process(cfg):
        with _InputProcess((urls, fields, cfg, rank, size, seed), cfg.prefetch_batches) as batches:
            yield batches
        return
    with _local_batches(urls, fields, cfg, rank, size, seed) as batches:
        if cfg.prefetch_batches:
            with _Prefetcher(batches, cfg.prefetch_batches) as prefetched:
                yield prefetched
        else:
            yield batches


def _use_input_process(cfg: DataConfig) -> bool:
    # (a daemonic process, such as a multiprocessing pool's worker, may not start one)
    return bool(cfg.prefetch_batches and cfg.input_process and not mp.current_process().daemon)


@contextlib.contextmanager
def _local_batches(
    urls: Sequence[str], fields: FieldsConfig, cfg: DataConfig, rank: int, size: int, seed: int
) -> Iterator[Iterator[dict[str, torch.Tensor]]]:
    """train_batches' batches, assembled in the calling thread."""
    torch.manual_seed(seed)  # the shuffling buffer draws from torch's global RNG
    reader = _make_reader(
        urls, schema.model_columns(fields), rank, size, True, seed, cfg.reader_workers
    )
    with reader:
        rows = (row._asdict() for row in reader)
        yield _shuffled_batches(rows, cfg.batch_size, cfg.shuffle_queue_rows, _batch_dtypes(fields))


def _shuffled_batches(
    row_groups: Iterator[dict[str, np.ndarray]],
    batch_size: int,
    queue_rows: int,
    dtypes: dict[str, torch.dtype] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of ``batch_size`` rows (the last may be smaller) from row-group dicts.

    The batches of Petastorm 0.12's ``BatchedDataLoader`` (same random draws from torch's
    global RNG, so the same rows in the same order), assembled with a few tensor operations
    per several batches instead of one per column and batch: columns of one dtype and row
    shape are held as one ``[rows, columns, ...]`` tensor, and the batches drawn from one
    permutation are gathered :data:`_GATHER_BATCHES` at a time. Petastorm's buffer indexes
    each of the 17 columns on its own for every batch; every such call is a hand-over of the
    GIL with the training step beside it (issue #8).

    With ``queue_rows`` > 0 (Petastorm's ``BatchedRandomShufflingBuffer``): once the buffer
    holds ``queue_rows + batch_size - 1`` rows, one ``randperm`` of its rows is sliced into
    batches until it holds fewer; the rest is compacted and the next row group appended. With
    0 (``BatchedNoopShufflingBuffer``): the rows in the order read, in ``batch_size`` slices.
    ``dtypes`` (column → dtype) converts columns as their rows enter the buffer, once per row
    group rather than once per batch.
    """
    if queue_rows <= 0:
        yield from _sequential_batches(row_groups, batch_size, dtypes)
        return
    buffer = _GroupedColumns(dtypes)
    capacity = queue_rows - 1 + batch_size  # Petastorm's shuffling_queue_capacity
    retrieve_at = capacity - 1  # its can_retrieve: size >= min_after_dequeue + batch_size - 1
    size = 0
    order: torch.Tensor | None = None  # the permutation being sliced, drawn at first retrieve
    head = 0
    done = False
    row_groups = iter(row_groups)
    while True:
        group = next(row_groups, None)
        if group is None:
            done = True
        else:
            columns = {k: _as_torch_column(v) for k, v in group.items()}
            rows = len(next(iter(columns.values())))
            new_capacity = capacity
            while new_capacity < size + rows:
                new_capacity *= 2
            if head > 0:  # drop the rows already handed out, keeping the rest in draw order
                buffer.keep(order[head:])
            order, head = None, 0
            buffer.append(columns, size, new_capacity)
            size += rows
        # The batches Petastorm retrieves before the next row group is added: consecutive
        # slices of one permutation, all full but (at the end) the last.
        if done:
            full, last = divmod(size, batch_size)
        else:
            full, last = max(0, (size - retrieve_at) // batch_size + 1), 0
        if full or last:
            if order is None:
                order, head = torch.randperm(size), 0
            for start in range(0, full, _GATHER_BATCHES):
                count = min(_GATHER_BATCHES, full - start)
                yield from buffer.take(order[head : head + count * batch_size], count)
                head += count * batch_size
            if last:
                yield from buffer.take(order[head : head + last], 1)
                head += last
            size -= full * batch_size + last
        if done:
            return


# Batches gathered by one call of _GroupedColumns.take: fewer tensor operations (GIL
# hand-overs) per batch, while the gathered block (~1 MiB per dtype group) stays in cache.
_GATHER_BATCHES = 8


class _GroupedColumns:
    """The buffer's columns in ``[capacity, columns, ...]`` tensors, one per (dtype, row shape).

    Row-major, so that taking or keeping rows is one ``index_select`` of dimension 0 per group
    (along dimension 1 of a column-major block it is ~10x slower in torch 2.13); each gathered
    block is turned column-major once, so that every column handed out is contiguous.
    """

    def __init__(self, dtypes: dict[str, torch.dtype] | None = None) -> None:
        self._dtypes = dtypes or {}
        self._groups: dict[tuple, torch.Tensor] = {}
        self._members: dict[tuple, list[str]] = {}  # group key -> its columns, in order
        self._where: list[tuple[str, tuple, int]] = []  # (column, group key, index in it)

    def append(self, columns: dict[str, torch.Tensor], at: int, capacity: int) -> None:
        """Write ``columns`` at row ``at``, first growing the buffer to ``capacity`` rows."""
        if not self._members:
            for name, column in columns.items():
                key = (self._dtypes.get(name, column.dtype), tuple(column.shape[1:]))
                members = self._members.setdefault(key, [])
                self._where.append((name, key, len(members)))
                members.append(name)
            self._groups = {
                key: torch.empty((capacity, len(names), *key[1]), dtype=key[0])
                for key, names in self._members.items()
            }
        for key, group in self._groups.items():
            if len(group) < capacity:
                grown = torch.empty((capacity, *group.shape[1:]), dtype=group.dtype)
                grown[:at] = group[:at]
                self._groups[key] = group = grown
            # one copy per group (converting the dtype if need be) into contiguous rows
            members = [columns[name] for name in self._members[key]]
            torch.stack(members, dim=1, out=group[at : at + len(members[0])])

    def keep(self, rows: torch.Tensor) -> None:
        """Move ``rows`` (indices) to the front, in that order."""
        for group in self._groups.values():
            group[: len(rows)] = group.index_select(0, rows)

    def take(self, rows: torch.Tensor, batches: int) -> list[dict[str, torch.Tensor]]:
        """``rows`` (indices) as ``batches`` consecutive batches of equal size, each column a
        contiguous tensor: per group one gather, one transpose and one split."""
        size = len(rows) // batches
        columns = {}  # group key -> its columns of every batch, batch-major
        for key, group in self._groups.items():
            block = group.index_select(0, rows).view(batches, size, *group.shape[1:])
            columns[key] = block.movedim(2, 1).contiguous().flatten(0, 1).unbind(0)
        return [
            {
                name: columns[key][batch * len(self._members[key]) + index]
                for name, key, index in self._where
            }
            for batch in range(batches)
        ]


def _sequential_batches(
    row_groups: Iterator[dict[str, np.ndarray]],
    batch_size: int,
    dtypes: dict[str, torch.dtype] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Petastorm's ``BatchedNoopShufflingBuffer``: rows in order, leftovers carried over."""
    dtypes = dtypes or {}
    pending: dict[str, torch.Tensor] = {}
    for group in row_groups:
        columns = {}
        for name, values in group.items():
            column = _as_torch_column(values)
            columns[name] = column.to(dtypes.get(name, column.dtype))
        if pending:
            columns = {k: torch.cat([pending[k], v]) for k, v in columns.items()}
        rows = len(next(iter(columns.values())))
        end = rows - rows % batch_size
        for start in range(0, end, batch_size):
            yield {k: v[start : start + batch_size] for k, v in columns.items()}
        pending = {k: v[end:] for k, v in columns.items()}
    if pending and len(next(iter(pending.values()))):
        yield pending


def _as_torch_column(values: np.ndarray) -> torch.Tensor:
    """A reader column as a tensor, with the dtype promotions of Petastorm's loader."""
    promote = {np.dtype(np.uint16): np.int32, np.dtype(np.uint32): np.int64}
    if values.dtype == np.bool_:
        values = values.astype(np.uint8)
    elif values.dtype in promote:
        values = values.astype(promote[values.dtype])
    return torch.as_tensor(values)


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


# Batches packed into one shared-memory block per dtype and handed over together: the cost of
# a hand-over (a file descriptor per block, received through a socket) is paid per chunk.
_CHUNK_BATCHES = 8


def _pack(batches: list[dict[str, torch.Tensor]]) -> tuple[dict, list]:
    """Batches as one flat shared-memory tensor per dtype and where each column lies in them:
    ``({dtype: flat}, [[(name, dtype, offset, shape), ...] per batch])``."""
    ends: dict[torch.dtype, int] = {}
    layout = []
    for batch in batches:
        places = []
        for name, tensor in batch.items():
            offset = ends.get(tensor.dtype, 0)
            places.append((name, tensor.dtype, offset, tuple(tensor.shape)))
            ends[tensor.dtype] = offset + tensor.numel()
        layout.append(places)
    flats = {dtype: torch.empty(end, dtype=dtype).share_memory_() for dtype, end in ends.items()}
    for batch, places in zip(batches, layout, strict=True):
        for name, dtype, offset, shape in places:
            flats[dtype][offset : offset + math.prod(shape)].view(shape).copy_(batch[name])
    return flats, layout


def _unpack(flats: dict, layout: list) -> list[dict[str, torch.Tensor]]:
    """The batches of :func:`_pack`, as views of its blocks (no copy)."""
    return [
        {
            name: flats[dtype][offset : offset + math.prod(shape)].view(shape)
            for name, dtype, offset, shape in places
        }
        for places in layout
    ]


def _produce(channel, stop, args: tuple) -> None:
    """The input process: train_batches' batches, in chunks, onto ``channel`` until the end
    of the epoch, ``stop`` or an error (which is sent instead, and re-raised by the trainer).

    The trainer fetches each chunk's shared memory from this process when it receives the
    chunk, so the process stays alive until the trainer says ``stop`` (or dies itself).
    """
    torch.set_num_threads(1)  # the trainer's cores are for its step
    parent = mp.parent_process()

    def running() -> bool:
        return not stop.is_set() and (parent is None or parent.is_alive())

    def send(item) -> bool:
        while running():
            try:
                channel.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        with _local_batches(*args) as batches:
            chunk = []
            for batch in batches:
                chunk.append(batch)
                if len(chunk) == _CHUNK_BATCHES:
                    if not send(("batches", *_pack(chunk))):
                        return
                    chunk = []
            if chunk and not send(("batches", *_pack(chunk))):
                return
        send(("done",))
    except BaseException as exc:
        try:
            pickle.dumps(exc)
        except Exception:  # the trainer gets its text then
            exc = DataError(f"input process: {type(exc).__name__}: {exc}")
        send(("error", exc))
    while running():
        stop.wait(0.5)


def _input_context():
    """The multiprocessing context of the input processes: a forkserver that has imported
    this module, Petastorm and pyarrow, so each epoch's process starts in milliseconds."""
    import torch.multiprocessing as torch_mp

    context = torch_mp.get_context("forkserver")
    context.set_forkserver_preload([__name__, "petastorm", "pyarrow.parquet"])
    return context


@contextlib.contextmanager
def _without_main() -> Iterator[None]:
    """A forkserver child re-imports the caller's main module (by path or name), and a script
    without an ``if __name__ == "__main__":`` guard would run again in it. The input process
    needs nothing of it: processes are started with a bare stand-in for that module."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def start_input_server(cfg: DataConfig) -> None:
    """Start the server of the input processes now (it imports torch and Petastorm, about two
    seconds), so that it does so while the caller sets up rather than before the first batch.
    Optional: train_batches starts it when it is not running yet."""
    if _use_input_process(cfg):
        from multiprocessing import forkserver

        _input_context()
        with _without_main():
            forkserver.ensure_running()


class _InputProcess:
    """train_batches' batches assembled in a child process and received in shared memory.

    The child (forked from a ``forkserver`` that has imported this module, so it starts in
    milliseconds and inherits none of the trainer's threads or Horovod state) runs the
    Petastorm reader, the conversion and the shuffling buffer (:func:`_local_batches`) with
    one torch thread, and sends :data:`_CHUNK_BATCHES` batches at a time as one block per
    dtype (:func:`_pack`). The trainer's side only unpickles a few handles per chunk and
    slices views, so the input takes next to nothing from the training step's core or GIL.

    Leaving the ``with`` block early stops the child and drains what it had sent; an error in
    the child is re-raised here; a child that dies (killed, out of memory) is a DataError,
    not a hang.
    """

    def __init__(self, args: tuple, depth: int) -> None:
        context = _input_context()
        self._channel = context.Queue(maxsize=max(1, math.ceil(depth / _CHUNK_BATCHES)))
        self._stop = context.Event()
        self._process = context.Process(
            target=_produce, args=(self._channel, self._stop, args), name="esmm-input", daemon=True
        )
        self._pending: deque = deque()
        self._done = False

    def __enter__(self) -> Iterator[dict[str, torch.Tensor]]:
        with _without_main():
            self._process.start()
        return self

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        while not self._pending:
            if self._done:
                raise StopIteration
            item = self._receive()
            if item[0] == "batches":
                self._pending.extend(_unpack(item[1], item[2]))
                continue
            self._done = True  # "done" or "error": the child may exit now
            self._stop.set()
            if item[0] == "error":
                raise item[1]
        return self._pending.popleft()

    def _receive(self) -> tuple:
        while True:
            try:
                return self._channel.get(timeout=1.0)
            except queue.Empty:
                if not self._process.is_alive():
                    try:  # it may have sent its last item just before exiting
                        return self._channel.get(timeout=1.0)
                    except queue.Empty:
                        raise self._exited() from None
            except (OSError, EOFError) as exc:  # a chunk whose sender died as it was sent
                self._process.join(timeout=5.0)
                raise self._exited() from exc

    def _exited(self) -> DataError:
        return DataError(
            f"the input process exited (code {self._process.exitcode}) before the end of the "
            "epoch; a negative code is the signal that ended it (-9: killed, often for memory)"
        )

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._pending.clear()
        while self._process.is_alive():
            # (a chunk whose sender has just exited cannot be received: nothing is lost, the
            # rest of the epoch is being dropped anyway)
            with contextlib.suppress(queue.Empty, OSError, EOFError):
                self._channel.get(timeout=0.1)
            self._process.join(timeout=0.1)
        self._channel.close()


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
