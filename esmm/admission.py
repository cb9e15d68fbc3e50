"""Id admission: ids seen fewer than ``model.min_id_count`` times in training share one row.

An id that occurs a handful of times in the training partitions gets a handful of updates;
after the first epoch its embedding mostly memorises those few impressions. With admission
such ids are looked up as their field's out-of-vocabulary (OOV) row instead, one extra row
per table at index ``num_buckets``, learned like any other row. The pieces, in the order the
trainer uses them:

- :func:`count_ids`: each id's occurrences in this rank's share of the training row groups
  (pyarrow, vectorised ``np.bincount``; multi-valued bags flattened; id 0 not counted);
- :func:`allreduce_counts`: the sum over the ranks (a no-op for one process);
- :func:`admission_tables`: per field a remap table ``id → id`` (admitted) or ``→ OOV``;
- :meth:`esmm.model.ESMMModel.set_admission`: installs them into the model's
  :class:`IdAdmission`, whose buffers travel in ``state_dict`` (checkpoint, served pyfunc);
- :func:`admission_summary`: ids admitted and ids seen per field, for the run's log.

Id 0 (missing / padding) always maps to 0 and keeps its meaning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor, nn

from contract.fields import FieldsConfig
from contract.schema import PADDING_ID

__all__ = [
    "IdAdmission",
    "admission_summary",
    "admission_tables",
    "allreduce_counts",
    "count_ids",
]


class IdAdmission(nn.Module):
    """Id admission: one remap table per field, applied to the ids before any lookup.

    ``remap[id]`` is ``id`` for an admitted id and ``num_buckets`` (the field's
    out-of-vocabulary row, see ``FieldEmbedding(oov_row=True)``) for a rare one; id 0 always
    maps to 0. The tables are registered buffers named ``remap_<field>``, so they travel in
    ``state_dict`` (checkpoints, the logged pyfunc) and serving applies the same mapping.
    They start as identity maps: :meth:`set_tables` installs the trained ones
    (:func:`esmm.admission.admission_tables`).

    Args:
        fields: the field list; one table of ``num_buckets`` entries per field.

    Call args:
        batch: mapping field name → ids; other keys (labels) pass through unchanged.

    Returns:
        a new dict with every field's ids remapped.

    Example:
        >>> from contract.fields import FieldSpec, FieldsConfig
        >>> fields = FieldsConfig(fields=[
        ...     FieldSpec(name="user", kind="single", source="users.id", num_buckets=4)])
        >>> admission = IdAdmission(fields)
        >>> admission.set_tables({"user": torch.tensor([0, 1, 4, 4])})
        >>> admission({"user": torch.tensor([0, 1, 2, 3])})["user"]
        tensor([0, 1, 4, 4])
    """

    def __init__(self, fields: FieldsConfig) -> None:
        super().__init__()
        self.num_buckets = {spec.name: spec.num_buckets for spec in fields.fields}
        for name, buckets in self.num_buckets.items():
            self.register_buffer(self._buffer(name), torch.arange(buckets, dtype=torch.int64))

    @staticmethod
    def _buffer(name: str) -> str:
        return f"remap_{name}"

    def table(self, name: str) -> Tensor:
        """The remap table of field ``name``: LongTensor ``[num_buckets]``."""
        return getattr(self, self._buffer(name))

    def set_tables(self, tables: Mapping[str, Tensor]) -> None:
        """Install one remap table per field (in place, on the buffers' device).

        Raises:
            ValueError: a field is missing or extra, a table has the wrong length, maps id 0
                elsewhere than 0, or holds a value outside ``0 .. num_buckets``.
        """
        if set(tables) != set(self.num_buckets):
            raise ValueError(
                f"admission tables for {sorted(tables)}, expected {sorted(self.num_buckets)}"
            )
        for name, buckets in self.num_buckets.items():
            remap = torch.as_tensor(tables[name], dtype=torch.int64)
            if remap.shape != (buckets,):
                raise ValueError(
                    f"{name}: remap of shape {tuple(remap.shape)}, expected ({buckets},)"
                )
            if int(remap[PADDING_ID]) != PADDING_ID:
                raise ValueError(f"{name}: id {PADDING_ID} (missing / padding) must map to itself")
            if int(remap.min()) < 0 or int(remap.max()) > buckets:
                raise ValueError(f"{name}: remap values must lie in 0..{buckets}")
            self.table(name).copy_(remap)

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {
            key: self.table(key)[ids] if key in self.num_buckets else ids
            for key, ids in batch.items()
        }


def _row_groups(urls: Sequence[str]) -> list[tuple[str, int]]:
    """Every ``(file url, row group index)`` of the partitions, in a fixed order."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from esmm.data.catalog import parquet_file_urls

    units = []
    for url in parquet_file_urls(urls):
        filesystem, path = pafs.FileSystem.from_uri(url)
        with filesystem.open_input_file(path) as file:
            groups = pq.read_metadata(file).num_row_groups
        units.extend((url, index) for index in range(groups))
    return units


def _ids(column) -> np.ndarray:
    """A pyarrow (chunked) column of ids or of bags of ids → a flat int64 array (nulls = 0)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        column = pc.list_flatten(column)
    return np.asarray(pc.fill_null(column, 0).to_numpy(), dtype=np.int64)


def _count_units(
    units: Sequence[tuple[str, int]], buckets: Mapping[str, int]
) -> dict[str, np.ndarray]:
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    counts = {name: np.zeros(size, dtype=np.int64) for name, size in buckets.items()}
    for url, index in units:
        filesystem, path = pafs.FileSystem.from_uri(url)
        with filesystem.open_input_file(path) as file:
            table = pq.ParquetFile(file).read_row_group(index, columns=list(buckets))
        for name, size in buckets.items():
            ids = _ids(table.column(name))
            if ids.size and (ids.min() < 0 or ids.max() >= size):
                bad = ids.min() if ids.min() < 0 else ids.max()
                raise ValueError(f"{url}: field {name} has id {bad}, outside 0..{size - 1}")
            counts[name] += np.bincount(ids, minlength=size)
    return counts


def count_ids(
    urls: Sequence[str],
    fields: FieldsConfig,
    rank: int = 0,
    size: int = 1,
    reader_workers: int = 1,
) -> dict[str, np.ndarray]:
    """How often each id of each field occurs in this rank's share of the partitions.

    The row groups of all the partitions' files, in file order, are dealt out to the ranks
    (``rank::size``); the shares do not need to match the training reader's, only to cover
    every row group exactly once, so that :func:`allreduce_counts` gives the whole counts.
    Only the field columns are read. A multi-valued field counts every element of its bags;
    id 0 (missing / padding) is never counted (its count is 0).

    Args:
        urls: the training partitions (``esmm.data.partition_urls``).
        fields: the field list.
        rank, size: this process's share of ``size``.
        reader_workers: threads reading row groups in parallel.

    Returns:
        ``{field name: int64 array [num_buckets]}``, ``counts[id]`` = occurrences of ``id``.

    Raises:
        ValueError: an id outside ``0 .. num_buckets - 1`` (the table does not match the
            field list).

    Example:
        >>> import tempfile, pathlib, pyarrow as pa, pyarrow.parquet as pq
        >>> from contract.fields import FieldSpec
        >>> fields = FieldsConfig(fields=[
        ...     FieldSpec(name="u", kind="single", source="users.u", num_buckets=4),
        ...     FieldSpec(name="b", kind="multi", source="users.b", num_buckets=4, max_len=2)])
        >>> day = pathlib.Path(tempfile.mkdtemp()) / "dt=2026-01-01"
        >>> day.mkdir()
        >>> pq.write_table(pa.table({"u": [1, 1, 3], "b": [[2, 0], [2, 3], [0, 0]]}),
        ...                day / "part-0.parquet")
        >>> {k: v.tolist() for k, v in count_ids([day.as_uri()], fields).items()}
        {'u': [0, 2, 0, 1], 'b': [0, 0, 2, 1]}
    """
    buckets = {spec.name: spec.num_buckets for spec in fields.fields}
    units = _row_groups(urls)[rank::size]
    workers = max(1, min(reader_workers, len(units)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        parts = list(pool.map(lambda w: _count_units(units[w::workers], buckets), range(workers)))
    counts = {name: sum(part[name] for part in parts) for name in buckets}
    for count in counts.values():
        count[PADDING_ID] = 0
    return counts


def allreduce_counts(counts: Mapping[str, np.ndarray], hvd) -> dict[str, np.ndarray]:
    """The sum of every rank's :func:`count_ids` (one ``hvd.allreduce`` per field, in the
    field-list order every rank shares); the counts unchanged for a single process.

    Example:
        >>> class OneProcess:
        ...     def size(self): return 1
        >>> allreduce_counts({"u": np.array([0, 2])}, OneProcess())
        {'u': array([0, 2])}
    """
    if hvd.size() == 1:
        return dict(counts)
    return {
        name: hvd.allreduce(
            torch.from_numpy(np.ascontiguousarray(count, dtype=np.int64)),
            op=hvd.Sum,
            name=f"id_counts.{name}",
        ).numpy()
        for name, count in counts.items()
    }


def admission_tables(counts: Mapping[str, np.ndarray], min_count: int) -> dict[str, Tensor]:
    """Per field the remap table of id admission: ``remap[id] = id`` when
    ``count[id] >= min_count``, else the OOV row ``num_buckets`` (= ``len(count)``);
    ``remap[0] = 0`` always.

    Args:
        counts: all ranks' counts (:func:`allreduce_counts`).
        min_count: ``model.min_id_count``.

    Returns:
        ``{field name: LongTensor [num_buckets]}`` for :meth:`ESMMModel.set_admission`.

    Example:
        >>> admission_tables({"u": np.array([0, 5, 1, 2])}, min_count=2)
        {'u': tensor([0, 1, 4, 3])}
    """
    tables = {}
    for name, count in counts.items():
        count = np.asarray(count)
        remap = np.arange(len(count), dtype=np.int64)
        remap[count < min_count] = len(count)
        remap[PADDING_ID] = PADDING_ID
        tables[name] = torch.from_numpy(remap)
    return tables


def admission_summary(
    counts: Mapping[str, np.ndarray], min_count: int
) -> dict[str, tuple[int, int]]:
    """Per field ``(admitted, seen)``: the ids (id 0 aside) with ``count >= min_count``, and
    those with ``count >= 1``; ``seen - admitted`` ids of the training data go to OOV.

    Example:
        >>> admission_summary({"u": np.array([0, 5, 1, 2, 0])}, min_count=2)
        {'u': (2, 3)}
    """
    summary = {}
    for name, count in counts.items():
        real = np.asarray(count)[PADDING_ID + 1 :]
        summary[name] = (int((real >= max(min_count, 1)).sum()), int((real >= 1).sum()))
    return summary
