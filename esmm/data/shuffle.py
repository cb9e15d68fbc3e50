"""The shuffling buffer: row groups of numpy columns in, batches of torch tensors out.

The same batches as Petastorm 0.12's ``BatchedDataLoader`` (same buffer, same random draws
from torch's global RNG), assembled with a few tensor operations per several batches instead
of one per column and batch (:func:`_shuffled_batches`, :class:`_GroupedColumns`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch

# Arrow hands Petastorm read-only buffers; batches are never written in place, so torch's
# warning about wrapping them without a copy does not apply.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


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
