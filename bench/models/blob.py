"""A pyfunc model (MLflow "models from code") whose answers are large and cheap.

Input: a DataFrame with a ``size`` column; output: one string of that many characters
per row. bench/hostile.py's non-reading clients ask it for big answers, so that their
answers overflow the kernel's buffers without keeping a runner busy.
"""

import mlflow
import pandas as pd


class Blob(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: pd.DataFrame, params=None):
        return ["x" * int(size) for size in model_input["size"]]


mlflow.models.set_model(Blob())
