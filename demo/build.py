"""Build the demo registry: an sqlite MLflow store with two real scikit-learn models.

    python demo/build.py [--root demo]

Registers ``iris`` (alias ``champion``) and ``diabetes`` (alias ``prod``, stage
Production), trained on datasets bundled with scikit-learn. Safe to run again: it adds
a version only when a model has none yet.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path


def build(root: Path) -> str:
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    warnings.filterwarnings("ignore")
    import mlflow
    from mlflow import MlflowClient
    from sklearn.datasets import load_diabetes, load_iris
    from sklearn.linear_model import LinearRegression, LogisticRegression

    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    experiment = "model-gateway-demo"
    if client.get_experiment_by_name(experiment) is None:
        client.create_experiment(experiment, artifact_location=(root / "mlartifacts").as_uri())
    mlflow.set_experiment(experiment)

    def register(name: str, model: object, X: object, alias: str, stage: str | None) -> None:
        if client.search_model_versions(f"name='{name}'"):
            return
        with mlflow.start_run(run_name=name):
            info = mlflow.sklearn.log_model(model, name="model", input_example=X[:2],
                                            registered_model_name=name)
        version = str(info.registered_model_version)
        client.set_registered_model_alias(name, alias, version)
        if stage:
            client.transition_model_version_stage(name, version, stage)

    iris = load_iris()
    register("iris", LogisticRegression(max_iter=500).fit(iris.data, iris.target),
             iris.data, "champion", None)
    diabetes = load_diabetes()
    register("diabetes", LinearRegression().fit(diabetes.data, diabetes.target),
             diabetes.data, "prod", "Production")
    return uri


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default=str(Path(__file__).parent))
    print(build(Path(parser.parse_args().root)))
