"""Evaluation of the trainer: predictions over a whole partition, gathered from every rank.

:func:`evaluate` predicts each rank's shard of the evaluation partitions and allgathers the
scores, so the AUCs of :func:`esmm.metrics.evaluate_predictions` are exact;
:func:`load_oracle` reads the simulator's ground truth for the entire-space metrics.
"""

from __future__ import annotations

import numpy as np
import torch

from esmm.data import DataError, eval_batches, partition_urls
from esmm.model_input import numpy_batch_to_tensors

__all__ = ["evaluate", "load_oracle"]


def load_oracle(oracle_root: str, partitions: list[str]):
    """The oracle rows of the evaluation partitions as a pandas frame indexed by impression."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    tables = [
        ds.dataset(url, format="parquet").to_table(
            columns=["impression_id", "pctr", "pcvr", "conversion_if_clicked"]
        )
        for url in partition_urls(oracle_root, partitions)
    ]
    return pa.concat_tables(tables).to_pandas().set_index("impression_id")


@torch.no_grad()
def evaluate(model, urls, fields, data_cfg, hvd, device, oracle) -> dict[str, np.ndarray]:
    """Predict this rank's shard of the eval set and allgather every rank's predictions.

    Returns numpy arrays over the WHOLE eval set (on every rank): ``click``, ``conversion``,
    ``pctr``, ``pcvr``, ``pctcvr`` and, with an oracle, ``oracle_pctr``, ``oracle_pcvr``,
    ``conversion_if_clicked``. Gathering the scores (not histograms) keeps AUCs exact.
    """
    model.eval()
    columns = ["click", "conversion", "pctr", "pcvr", "pctcvr"]
    if oracle is not None:
        columns += ["oracle_pctr", "oracle_pcvr", "conversion_if_clicked"]
    pieces = []
    for batch in eval_batches(urls, fields, hvd.rank(), hvd.size(), data_cfg.reader_workers):
        ids = batch["impression_id"]
        for start in range(0, len(ids), data_cfg.eval_batch_size):
            part = {k: v[start : start + data_cfg.eval_batch_size] for k, v in batch.items()}
            outputs = model(numpy_batch_to_tensors(part, fields, device))
            block = [
                np.asarray(part["click"], dtype=np.float64),
                np.asarray(part["conversion"], dtype=np.float64),
                *(outputs[k].double().cpu().numpy() for k in ("pctr", "pcvr", "pctcvr")),
            ]
            if oracle is not None:
                truth = oracle.reindex(part["impression_id"])
                missing = int(truth["pctr"].isna().sum())
                if missing:
                    raise DataError(f"{missing} eval impressions have no oracle row")
                block += [
                    truth["pctr"].to_numpy(np.float64),
                    truth["pcvr"].to_numpy(np.float64),
                    truth["conversion_if_clicked"].to_numpy(np.float64),
                ]
            pieces.append(np.stack(block, axis=1))
    local = np.concatenate(pieces) if pieces else np.zeros((0, len(columns)))
    gathered = hvd.allgather(torch.from_numpy(local), name="eval_predictions").numpy()
    return {name: gathered[:, i] for i, name in enumerate(columns)}
