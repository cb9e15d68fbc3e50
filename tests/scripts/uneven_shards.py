"""Run under horovodrun: iterate one epoch of a deliberately uneven dataset on every rank.

Prints, per rank, how many batches it stepped through; the trainer's lock-step iterator must
make every rank stop at the same step and return (no rank left waiting in an allreduce).
"""

import sys

import horovod.torch as hvd
import torch

from contract.config import load_config
from contract.fields import FieldsConfig
from esmm.data import DataConfig, partition_urls, train_batches
from esmm.steps import LockStep

hvd.init()
features, fields_path = sys.argv[1], sys.argv[2]
fields = load_config(fields_path, FieldsConfig)
urls = partition_urls(features, ["2026-02-01"])
cfg = DataConfig(batch_size=100, shuffle_queue_rows=0, reader_workers=1)
steps = 0
with train_batches(urls, fields, cfg, hvd.rank(), hvd.size(), seed=1) as batches:
    for _batch in LockStep(hvd, torch.device("cpu")).batches(batches, None):
        hvd.allreduce(torch.ones(1), name="fake_gradient")  # what each training step does
        steps += 1
print(f"rank={hvd.rank()} steps={steps}")
