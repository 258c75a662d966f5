"""A pyfunc model (MLflow "models from code") that sleeps before answering.

Input: a DataFrame with a ``seconds`` column; output: the same seconds, after sleeping
for the largest of them. Used to hold requests in flight on purpose.
"""

import time

import mlflow
import pandas as pd


class Sleepy(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input: pd.DataFrame, params=None):
        seconds = model_input["seconds"].astype(float)
        time.sleep(float(seconds.max()))
        return seconds.tolist()


mlflow.models.set_model(Sleepy())
