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

__all__ = ["InputRowsError", "check_rows", "numpy_batch_to_tensors"]

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


class InputRowsError(ValueError):
    """Feature rows that the model cannot score; the message names the field and the row."""


def check_rows(frame, fields: FieldsConfig) -> dict[str, np.ndarray]:
    """The ``fields`` columns of a pandas ``frame`` as the model's numpy input, or one
    :class:`InputRowsError` naming what is wrong: a missing field, a value that is not an
    integer id, an id outside ``[0, num_buckets)``, or a multi-valued field whose row is not
    a list of exactly ``max_len`` ids (0-padded, as in the feature table).

    Example:
        >>> import pandas as pd
        >>> from contract.fields import FieldSpec
        >>> fields = FieldsConfig(fields=[
        ...     FieldSpec(name="u", kind="single", source="users.u", num_buckets=8),
        ...     FieldSpec(name="b", kind="multi", source="users.b", num_buckets=8, max_len=2)])
        >>> sorted(check_rows(pd.DataFrame({"u": [3], "b": [[1, 2]]}), fields))
        ['b', 'u']
        >>> check_rows(pd.DataFrame({"u": [3], "b": [[1]]}), fields)
        Traceback (most recent call last):
        ...
        esmm.model_input.InputRowsError: field 'b': row 0 has 1 ids, needs exactly 2 (0-padded)
    """
    missing = [spec.name for spec in fields.fields if spec.name not in frame.columns]
    if missing:
        raise InputRowsError(f"missing field(s): {', '.join(missing)}")
    out: dict[str, np.ndarray] = {}
    for spec in fields.fields:
        column = frame[spec.name]
        if spec.kind == "multi":
            rows = column.tolist()
            for i, row in enumerate(rows):
                if isinstance(row, (str, bytes)) or not hasattr(row, "__len__"):
                    raise InputRowsError(
                        f"field '{spec.name}': row {i} is {row!r}, not a list of {spec.max_len} ids"
                    )
                if len(row) != spec.max_len:
                    raise InputRowsError(
                        f"field '{spec.name}': row {i} has {len(row)} ids, needs exactly "
                        f"{spec.max_len} (0-padded)"
                    )
            values = np.asarray([np.asarray(row) for row in rows]).reshape(-1, spec.max_len)
        else:
            values = column.to_numpy()
        if values.dtype.kind not in "iu":
            try:
                as_float = values.astype(np.float64)
            except (TypeError, ValueError):
                raise InputRowsError(
                    f"field '{spec.name}': ids must be integers, got {values.dtype} values"
                ) from None
            bad = ~np.isfinite(as_float) | (as_float != np.round(as_float))
            if bad.any():
                row = int(np.argwhere(bad)[0][0])
                raise InputRowsError(
                    f"field '{spec.name}': row {row} is not an integer id "
                    f"({values.reshape(len(frame), -1)[row].tolist()})"
                )
            values = as_float.astype(np.int64)
        out_of_range = (values < 0) | (values >= spec.num_buckets)
        if out_of_range.any():
            row = int(np.argwhere(out_of_range)[0][0])
            raise InputRowsError(
                f"field '{spec.name}': row {row} has an id outside [0, {spec.num_buckets})"
            )
        out[spec.name] = values.astype(np.int64)
    return out
