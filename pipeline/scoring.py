"""Scoring a registered model on raw rows: loading a version, the inputs and id it checks
rows against, its predictions and the test metrics computed from them.

Serving, batch predict, the promotion gate and the monitor all score through here. It
imports neither FastAPI nor Ray Serve, so a Ray Data actor that scores batches stays light;
resolving an alias is the registry's job (pipeline.registry), loading the version it names is this one's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline.data.schema import Schema
from pipeline.preprocess import IMAGE_COLUMN, extras_spec, image_limits, input_spec


def python_model_of(model: Any) -> Any | None:
    """The python model inside a loaded pyfunc, or None for a model of another flavor (MLflow's own predict path)."""
    try:
        return model.unwrap_python_model()
    except Exception:  # not a python model
        return None


def model_inputs(model: Any, python_model: Any) -> list[dict[str, Any]]:
    """The inputs a loaded model checks rows against: a d2d model's own (the state its
    preprocessing was fitted with); another pyfunc's from its signature."""
    state = getattr(python_model, "state", None)
    if isinstance(state, dict) and "numeric" in state:
        return input_spec(state)
    declared = model.metadata.get_input_schema()
    if declared is None:
        raise ValueError("the model has no input signature; log it with one to serve it")
    return [{"name": c.name, "type": str(getattr(c.type, "name", c.type)), "nullable": not c.required}
            for c in declared.inputs]


def model_id(python_model: Any, id_column: str | None) -> dict[str, Any] | None:
    """The id a request may carry: the one the model was trained with, and its type in the
    data (a model fitted before ids were recorded: params' id column, of either type)."""
    state = getattr(python_model, "state", None)
    if isinstance(state, dict) and "id" in state:
        return state["id"]
    return {"name": id_column, "type": None} if id_column else None


@dataclass(frozen=True)
class LoadedVersion:
    """One registered version, loaded, with what a request is checked against before it is scored."""

    version: str
    model: Any
    inputs: list[dict[str, Any]]  # what serve.parse_rows checks a request against (preprocess.input_spec)
    id: dict[str, Any] | None  # the id a request may carry, and its type
    data_md5: str | None
    python_model: Any  # the python model inside the pyfunc, or None

    @property
    def names(self) -> list[str]:
        return [c["name"] for c in self.inputs]

    @property
    def extras(self) -> list[dict[str, Any]]:
        """The columns an image model takes besides the image (a manifest's extras), as input_spec gives them."""
        return extras_spec(getattr(self.python_model, "state", None))

    @property
    def image_limits(self) -> tuple[int, int] | None:
        """An image model's byte and pixel limits (what its validation allowed); None for a table's."""
        return image_limits(getattr(self.python_model, "state", None))

    def predict(self, raw: pd.DataFrame) -> pd.DataFrame:
        """Rows parse_rows already checked: the python model is called directly, as MLflow's
        schema enforcement would only repeat checks (half the time of a 1-row prediction). A
        request checked against the version before a swap is checked again by this one's
        preprocessing (check_rows), so a difference between their inputs is still caught."""
        if self.python_model is None:
            return self.model.predict(raw)
        return self.python_model.predict(None, raw)


def load_version(name: str, version: str, data_md5: str | None, id_column: str | None = None) -> LoadedVersion:
    """Version `version` of the registered model `name`, loaded with the inputs and id it checks requests against."""
    import mlflow

    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    python_model = python_model_of(model)
    return LoadedVersion(version, model, model_inputs(model, python_model), model_id(python_model, id_column),
                         data_md5, python_model)


def score_model(model_uri: str, batches: Iterable[pd.DataFrame], schema: Schema, sample_rows: int) -> dict[str, float]:
    """A registered model's test metrics, computed the same way as the challenger's (summed
    batch by batch, ROC-AUC exact while the split fits `sample_rows`), from its own raw-row
    predictions (its own preprocessing) on the current test split, read in `batches`."""
    import mlflow

    from pipeline.evaluate import Scored
    from pipeline.metric_totals import ClassTotals, RegressionTotals, RowSample

    model = mlflow.pyfunc.load_model(model_uri)
    totals = RegressionTotals() if schema.regression else ClassTotals(schema.n_outputs)
    sample = RowSample(sample_rows)
    for test in batches:
        y, out = prediction_arrays(predict_raw(model, test, schema), test, schema)
        totals.add(y, out)
        sample.add(y=y, out=out)
    return {f"test_{k}": v for k, v in Scored(totals, sample, schema.regression).metrics().items()}


def prediction_arrays(out: pd.DataFrame, test: pd.DataFrame, schema: Schema) -> tuple[np.ndarray, np.ndarray]:
    """The truth and a pyfunc's raw-row predictions `out` as arrays: class indices and
    probabilities, or actual and predicted values."""
    if schema.regression:
        return test[schema.target].to_numpy("float64"), out["prediction"].to_numpy("float64")
    classes = [str(c) for c in schema.classes]
    index = {c: i for i, c in enumerate(classes)}
    return (test[schema.target].astype(str).map(index).to_numpy("int64"),
            out[[f"prob_{c}" for c in classes]].to_numpy("float64"))


def prediction_metrics(out: pd.DataFrame, test: pd.DataFrame, schema: Schema) -> dict[str, float]:
    """test_* metrics of a pyfunc's raw-row predictions `out` against the labels in `test`."""
    from pipeline.evaluate import classification_metrics, regression_metrics

    y, predicted = prediction_arrays(out, test, schema)
    metrics = regression_metrics(y, predicted) if schema.regression else classification_metrics(y, predicted)
    return {f"test_{k}": v for k, v in metrics.items()}


def predict_raw(model: Any, frame: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """A loaded pyfunc's predictions for raw rows. A d2d model is called directly: it checks
    the rows itself (preprocess.check_rows), and MLflow's enforcement of its `any` columns
    costs 50 µs a row. Another model is fed the types its own signature declares (an older
    champion may have been logged with other column types than the current schema gives)."""
    python_model = python_model_of(model)
    if isinstance(getattr(python_model, "state", None), dict):
        return python_model.predict(None, frame[[IMAGE_COLUMN, *schema.feature_names] if schema.images is not None else schema.feature_names])
    declared = model.metadata.get_input_schema()
    types = ({c.name: c.type.to_numpy() for c in declared.inputs if c.name in frame and hasattr(c.type, "to_numpy")}
             if declared is not None else {f.name: f.numpy_dtype for f in schema.features})
    return model.predict(frame[schema.feature_names].astype(types))
