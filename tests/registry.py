"""A real MLflow registry (sqlite file) with the models the tests serve.

- ``iris``   v1: LogisticRegression on iris (named columns: JSON, CSV and parquet work);
             alias ``champion``.
- ``const``  v1 predicts 1.0, v2 predicts 2.0 (DummyRegressor), v3 has broken
             artifacts; alias ``live`` → v1, stage Production → v1.
- ``sleepy`` v1: sleeps for the ``seconds`` it is sent; alias ``main``.
- ``rowcount`` v1: answers one prediction per call, its number of rows; alias ``main``.
- ``lgbm``   v1: a LightGBM classifier on iris (another flavour); alias ``champion``.
- ``canary`` answers ``x + version``: v1 and v4 are good, v2 answers 500 for a fifth of
             inputs (``int(x) % 5 == 0``), v3 takes 150 ms more per call; no alias (each
             rollout test sets its own).
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

IRIS_COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]


@dataclass(frozen=True)
class Registry:
    root: Path
    tracking_uri: str
    iris_path: str  # a local copy of the iris model, for path URIs


def build_registry(root: Path) -> Registry:
    warnings.filterwarnings("ignore")
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient
    from sklearn.datasets import load_iris
    from sklearn.dummy import DummyRegressor
    from sklearn.linear_model import LogisticRegression

    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.create_experiment("tests", artifact_location=(root / "artifacts").as_uri())
    mlflow.set_experiment(experiment_id=exp)

    iris = load_iris(as_frame=True)
    X = iris.data.set_axis(IRIS_COLUMNS, axis=1)
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(LogisticRegression(max_iter=500).fit(X, iris.target),
                                        name="model", input_example=X.head(2),
                                        registered_model_name="iris")
    client.set_registered_model_alias("iris", "champion", info.registered_model_version)
    iris_path = str(root / "iris-local")
    mlflow.artifacts.download_artifacts(info.model_uri, dst_path=iris_path)

    x = pd.DataFrame({"x": [0.0, 1.0]})
    for constant in (1.0, 2.0, 3.0):
        with mlflow.start_run():
            info = mlflow.sklearn.log_model(
                DummyRegressor(strategy="constant", constant=constant).fit(x, [0, 0]),
                name="model", input_example=x, registered_model_name="const")
    # Version 3 is broken: its weights are gone, so a runner for it cannot load.
    _break(client.get_model_version_download_uri("const", "3"))
    client.set_registered_model_alias("const", "live", "1")
    client.transition_model_version_stage("const", "1", "Production")

    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model",
                                       python_model=str(Path(__file__).parent / "models/sleepy.py"),
                                       input_example=pd.DataFrame({"seconds": [0.0]}),
                                       registered_model_name="sleepy")
    client.set_registered_model_alias("sleepy", "main", info.registered_model_version)

    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(Path(__file__).parent / "models/rowcount.py"),
            input_example=pd.DataFrame({"x": [0.0]}), registered_model_name="rowcount")
    client.set_registered_model_alias("rowcount", "main", info.registered_model_version)

    import lightgbm
    with mlflow.start_run():
        info = mlflow.lightgbm.log_model(
            lightgbm.LGBMClassifier(n_estimators=10, verbose=-1).fit(X, iris.target),
            name="model", input_example=X.head(2), registered_model_name="lgbm")
    client.set_registered_model_alias("lgbm", "champion", info.registered_model_version)

    canary = str(Path(__file__).parent / "models/canary.py")
    for config in ({"offset": 1}, {"offset": 2, "fail_every": 5}, {"offset": 3, "sleep": 0.15},
                   {"offset": 4}):
        with mlflow.start_run():
            mlflow.pyfunc.log_model(name="model", python_model=canary, model_config=config,
                                    input_example=pd.DataFrame({"x": [1.0]}),
                                    registered_model_name="canary")
    return Registry(root=root, tracking_uri=uri, iris_path=iris_path)


def _break(artifact_uri: str) -> None:
    """Delete a model's weights (and its environment files) so loading it fails."""
    from urllib.parse import urlparse

    path = Path(urlparse(artifact_uri).path)
    for item in path.iterdir():
        if item.name != "MLmodel":
            shutil.rmtree(item) if item.is_dir() else item.unlink()
