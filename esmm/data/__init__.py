"""Petastorm input: feature-table partitions → batches of torch tensors, one shard per rank.

The network knows nothing of files; this package knows nothing of the network. The trainer
asks for ``train_batches(...)`` (shuffled, sharded, as tensors) and ``eval_batches(...)``
(in order, sharded, numpy, with the impression id for the oracle join).

Why ``make_batch_reader``: Petastorm's row-by-row ``DataLoader`` collates in Python (4.6 s
for 2M rows here) while the batched reader hands whole row groups over as numpy arrays.
Multi-valued fields are stored padded to a fixed length (:mod:`contract.schema`), so each is
viewed as one ``[rows, max_len]`` array, and plain numeric columns are taken zero-copy
rather than through pandas. Batches are assembled as Petastorm 0.12's ``BatchedDataLoader``
assembles them (same shuffling buffer, same random draws) but with a few tensor operations
per several batches instead of one per column and batch, already in the model's dtypes. All
of it runs in a child process that hands the batches over in shared memory: in a thread
beside the training step, every Python-level operation of the input would compete with the
step for the GIL (issue #8).

Sharding: ``cur_shard=rank, shard_count=size`` gives each rank whole row groups, so shards
are uneven in general; the trainer ends each epoch on every rank together (an allreduced
"any rank out of data" flag) so the gradient allreduce of the others never waits forever.

The submodules, in the order the data flows through them:

- :mod:`esmm.data.config`: :class:`DataConfig` (the ``data:`` section) and :class:`DataError`;
- :mod:`esmm.data.catalog`: partitions and their files (:func:`partition_urls`,
  :func:`parquet_file_urls`) and :func:`count_rows`, which reads every footer and so also
  rejects a damaged file before training;
- :mod:`esmm.data.reader`: the Petastorm batch reader of a shard and its faster conversion
  of columns to numpy (a patch of Petastorm 0.12's results reader);
- :mod:`esmm.data.shuffle`: the shuffling buffer, row groups in, batches of tensors out;
- :mod:`esmm.data.prefetch`: the prefetch thread (``data.input_process: false``);
- :mod:`esmm.data.process`: the input process, its forkserver and the shared-memory
  hand-over (:func:`start_input_server`);
- :mod:`esmm.data.batches`: the trainer's API, :func:`train_batches` and
  :func:`eval_batches`.

The conversion of served rows (a pandas frame) to model input lives beside the pyfunc, in
:mod:`esmm.model_input`.
"""

from __future__ import annotations

from esmm.data.batches import eval_batches, train_batches
from esmm.data.catalog import count_rows, parquet_file_urls, partition_urls
from esmm.data.config import DataConfig, DataError
from esmm.data.process import start_input_server

__all__ = [
    "DataConfig",
    "DataError",
    "count_rows",
    "eval_batches",
    "parquet_file_urls",
    "partition_urls",
    "start_input_server",
    "train_batches",
]
