"""The Petastorm batch reader of a shard, with a faster conversion of its columns to numpy.

:func:`_make_reader` opens ``make_batch_reader`` over the partitions' files (one shard of
whole row groups per rank); :func:`_use_fast_list_conversion` replaces Petastorm 0.12's
column conversion (``to_pandas`` + ``np.vstack`` per list column) with zero-copy views of
the Arrow buffers where the column allows it (:func:`_numeric_column_to_numpy`).
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Sequence

import numpy as np

from esmm.data.catalog import parquet_file_urls
from esmm.data.config import DataError

# Petastorm 0.12 uses pyarrow's legacy ParquetDataset attributes and pyarrow 14 warns on every
# row group read; the pins (pyproject.toml) keep the pair working, so the noise says nothing.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"petastorm\..*")


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
