"""The logged MLflow model: a pyfunc that turns feature-table rows into pCTR, pCVR, pCTCVR.

Separate from :mod:`esmm.tracking` so that only the process that logs or serves a model
imports MLflow's model machinery.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import mlflow.pyfunc
import numpy as np

# MLflow suggests type hints on predict() for its own validation; the signature logged with
# the model (inferred from a real input example) already does that job.
warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method.*")


class ESMMPyfunc(mlflow.pyfunc.PythonModel):
    """The logged model: feature-table rows in, ``pctr``, ``pcvr``, ``pctcvr`` out.

    Input: a pandas DataFrame with one column per field of the field list, as in the feature
    table (int ids; multi-valued fields as equal-length lists/arrays of ids). Extra columns
    (labels, impression_id) are ignored. Output: a DataFrame with float columns ``pctr``,
    ``pcvr``, ``pctcvr`` (``pctcvr == pctr * pcvr`` except for the ``division`` variant,
    whose pCVR is the clipped ratio).

    The model's weights and configs travel as one artifact (``checkpoint``), and the ``esmm``
    package travels as the model's code, so a Spark executor can load it with
    ``mlflow.pyfunc.spark_udf`` without the project checked out.
    """

    def load_context(self, context) -> None:
        import torch

        from contract.fields import FieldsConfig
        from esmm.model import ModelConfig, build_model

        payload = torch.load(context.artifacts["checkpoint"], map_location="cpu")
        self.fields = FieldsConfig.model_validate(payload["fields"])
        self.model = build_model(self.fields, ModelConfig.model_validate(payload["model_config"]))
        self.model.load_state_dict(payload["state_dict"])
        self.model.eval()

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from esmm.model_input import InputRowsError, check_rows, numpy_batch_to_tensors

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        try:
            batch = check_rows(frame, self.fields)
        except InputRowsError as exc:
            # a 400 from the scoring server, with this message; a clear error in batch jobs
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        with torch.no_grad():
            outputs = self.model(numpy_batch_to_tensors(batch, self.fields))
        return pd.DataFrame(
            {name: outputs[name].double().numpy() for name in ("pctr", "pcvr", "pctcvr")}
        )


def input_example(batch: Mapping[str, np.ndarray], field_names: list[str], rows: int = 3):
    """A few feature rows as a DataFrame (multi-valued fields as lists), for the signature."""
    import pandas as pd

    columns = {}
    for name in field_names:
        values = np.asarray(batch[name])[:rows]
        columns[name] = [list(map(int, v)) for v in values] if values.ndim == 2 else values
    return pd.DataFrame(columns)


class StaticContext:
    """The bit of mlflow's PythonModelContext that ESMMPyfunc.load_context reads."""

    def __init__(self, artifacts: Mapping[str, str]):
        self.artifacts = dict(artifacts)
