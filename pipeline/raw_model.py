"""An MLflow pyfunc model that predicts on raw feature rows.

MLflow logs this file as "model code": it is copied into the model, so loading the model
needs mlflow, torch, numpy and pandas but not d2d. Keep it self-contained: no d2d imports.
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd


class RawRowClassifier(mlflow.pyfunc.PythonModel):
    """Scales raw features by the schema's ranges, runs the exported network, returns labels."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        import torch

        with open(context.artifacts["preprocess"]) as f:
            meta = json.load(f)
        self.features: list[str] = meta["features"]
        self.classes = np.array(meta["classes"], dtype=object)
        self.lo = np.array(meta["min"], dtype="float64")
        self.span = np.array(meta["max"], dtype="float64") - self.lo
        self.net = torch.export.load(context.artifacts["network"]).module()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        import torch

        missing = [c for c in self.features if c not in model_input.columns]
        if missing:
            raise ValueError(f"input lacks feature column(s): {', '.join(missing[:5])}")
        x = model_input[self.features].to_numpy(dtype="float64", na_value=np.nan)
        if np.isnan(x).any():
            cols = [c for c, bad in zip(self.features, np.isnan(x).any(axis=0)) if bad]
            raise ValueError(f"null value(s) in column(s): {', '.join(cols[:5])}")
        scaled = torch.from_numpy(((x - self.lo) / self.span).astype("float32"))
        with torch.no_grad():
            probs = torch.softmax(self.net(scaled), dim=1).numpy()
        out = pd.DataFrame({"label": self.classes[probs.argmax(1)], "probability": probs.max(1)})
        for i, c in enumerate(self.classes):
            out[f"prob_{c}"] = probs[:, i]
        return out


mlflow.models.set_model(RawRowClassifier())
