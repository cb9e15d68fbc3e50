"""The trainer's API: shuffled training batches as tensors, evaluation batches as numpy.

:func:`train_batches` assembles a shard's batches (:mod:`esmm.data.reader`, then
:mod:`esmm.data.shuffle`) in an input process (:mod:`esmm.data.process`) or a prefetch
thread (:mod:`esmm.data.prefetch`); :func:`eval_batches` reads a shard in order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from contract import schema
from contract.fields import FieldsConfig
from esmm.data.config import DataConfig
from esmm.data.prefetch import _Prefetcher
from esmm.data.process import _InputProcess, _use_input_process
from esmm.data.reader import _make_reader
from esmm.data.shuffle import _shuffled_batches

__all__ = ["eval_batches", "train_batches"]


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
        urls: feature-table partition URLs (:func:`esmm.data.catalog.partition_urls`).
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
        args = (urls, fields, cfg, rank, size, seed)
        with _InputProcess(_local_batches, args, cfg.prefetch_batches) as batches:
            yield batches
        return
    with _local_batches(urls, fields, cfg, rank, size, seed) as batches:
        if cfg.prefetch_batches:
            with _Prefetcher(batches, cfg.prefetch_batches) as prefetched:
                yield prefetched
        else:
            yield batches


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
