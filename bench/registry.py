"""A throwaway MLflow registry of constant models, for the sections that need versions.

Each registered model gets one version per constant: a scikit-learn DummyRegressor that
predicts it (v1 → the first constant, v2 → the second …), so an answer tells which
version served it. ``break_version`` deletes a version's weights so its runner cannot
start, as ``tests/registry.py`` does.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse


def constant_registry(root: Path, experiment: str, models: Iterable[str],
                      constants: Sequence[float]) -> tuple[str, Any]:
    """A sqlite registry under ``root``: (its URI, an MlflowClient on it)."""
    warnings.filterwarnings("ignore")  # SQLAlchemy deprecations, MLflow's format advice
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient
    from sklearn.dummy import DummyRegressor

    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(experiment,
                                             artifact_location=(root / "artifacts").as_uri())
    mlflow.set_experiment(experiment_id=experiment_id)
    x = pd.DataFrame({"x": [0.0, 1.0]})
    for model in models:
        for constant in constants:
            with mlflow.start_run():
                mlflow.sklearn.log_model(DummyRegressor(strategy="constant", constant=constant)
                                         .fit(x, [0, 0]), name="model", input_example=x,
                                         registered_model_name=model)
    return uri, client


def break_version(client: Any, model: str, version: str) -> None:
    """Delete everything of a version but its MLmodel file: loading it fails."""
    path = Path(urlparse(client.get_model_version_download_uri(model, version)).path)
    for item in path.iterdir():
        if item.name != "MLmodel":
            shutil.rmtree(item) if item.is_dir() else item.unlink()


def log_code_model(root: Path, experiment: str, name: str, code: Path, example: Any) -> None:
    """Register the "models from code" pyfunc at ``code`` as ``name`` (v1) in the sqlite
    registry under ``root`` (created by constant_registry, or made here)."""
    warnings.filterwarnings("ignore")
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(
        experiment, artifact_location=(root / "artifacts").as_uri())
    mlflow.set_experiment(experiment_id=experiment_id)
    with mlflow.start_run():
        mlflow.pyfunc.log_model(name="model", python_model=str(code), input_example=example,
                                registered_model_name=name)
