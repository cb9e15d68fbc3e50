"""Feature rows (numpy arrays, or a pandas frame's columns) → the model's input tensors.

Shared by the served pyfunc (:mod:`esmm.pyfunc`) and the trainer's evaluation: kept apart
from the pyfunc so that the trainer imports neither MLflow nor the input pipeline for it.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from contract import schema
from contract.fields import FieldsConfig

__all__ = ["numpy_batch_to_tensors"]

# Arrow hands Petastorm (and pandas) read-only buffers; a batch is never written in place, so
# torch's warning about wrapping them without a copy does not apply.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def numpy_batch_to_tensors(
    batch: dict[str, np.ndarray], fields: FieldsConfig, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Convert a numpy batch (from :func:`esmm.data.eval_batches` or a pandas frame) to
    model input: labels (when present) as float32, fields as int64.

    Example:
        >>> from contract.fields import FieldSpec
        >>> fields = FieldsConfig(fields=[
        ...     FieldSpec(name="u", kind="single", source="users.u", num_buckets=8),
        ...     FieldSpec(name="b", kind="multi", source="users.b", num_buckets=8, max_len=2)])
        >>> rows = {"click": [1, 0], "u": [3, 5], "b": [[1, 2], [3, 0]]}
        >>> {name: (t.dtype, tuple(t.shape)) for name, t in
        ...  numpy_batch_to_tensors(rows, fields).items()}
        {'click': (torch.float32, (2,)), 'u': (torch.int64, (2,)), 'b': (torch.int64, (2, 2))}
    """
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
