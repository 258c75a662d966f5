"""A pyfunc model (MLflow "models from code") whose versions differ as releases do.

Input: a DataFrame with an ``x`` column; output: ``x + offset``. Its ``model_config``:
``offset`` (which version answered), ``fail_every`` (rows whose ``int(x)`` is a multiple
of it fail with MLflow's INTERNAL_ERROR, which the scoring server answers with 500: a
fifth of inputs for 5) and ``sleep`` (seconds before answering: a slow version).
"""

import time

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR


class Canary(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.config = context.model_config or {}

    def predict(self, context, model_input: pd.DataFrame, params=None):
        x = model_input["x"].astype(float)
        every = int(self.config.get("fail_every", 0))
        if every and any(int(v) % every == 0 for v in x):
            raise MlflowException("this version fails on such inputs", INTERNAL_ERROR)
        time.sleep(float(self.config.get("sleep", 0)))
        return (x + float(self.config.get("offset", 0))).tolist()


mlflow.models.set_model(Canary())
