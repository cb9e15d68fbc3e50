"""The ``data:`` section of the training config, and the error of the input."""

from __future__ import annotations

from pydantic import Field

from contract.config import StrictModel

__all__ = ["DataConfig", "DataError"]


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
