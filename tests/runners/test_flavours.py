"""Which modules the zygote imports for a model's flavours (fast tier: no MLflow)."""

from __future__ import annotations

from runners.flavours import modules_for


def test_a_lightgbm_model_needs_its_flavour_library_and_model_class() -> None:
    mlmodel = {"flavors": {
        "python_function": {"loader_module": "mlflow.lightgbm", "python_version": "3.11"},
        "lightgbm": {"lgb_version": "4.7.0", "model_class": "lightgbm.sklearn.LGBMClassifier"},
    }}
    assert modules_for(mlmodel) == ["mlflow.lightgbm", "lightgbm", "lightgbm.sklearn"]


def test_flavours_named_unlike_their_library() -> None:
    assert modules_for({"flavors": {"pytorch": {}}}) == ["mlflow.pytorch", "torch"]
    assert modules_for({"flavors": {"onnx": {}}}) == ["mlflow.onnx", "onnxruntime"]


def test_a_custom_pyfunc_needs_its_loader_only() -> None:
    assert modules_for({"flavors": {"python_function": {
        "loader_module": "mlflow.pyfunc.model"}}}) == ["mlflow.pyfunc.model"]


def test_nothing_but_module_names_comes_out_of_an_mlmodel() -> None:
    assert modules_for({}) == []
    assert modules_for({"flavors": "sklearn"}) == []
    assert modules_for({"flavors": {"os; rm -rf /": {}, "python_function": {
        "loader_module": "x y"}, "sklearn": {"model_class": "../../evil.Class"}}}) == \
        ["mlflow.sklearn", "sklearn"]
