"""An MLflow pyfunc model that predicts on raw feature rows.

MLflow logs this file as "model code" and preprocess.py beside it (code_paths), so loading
the model needs mlflow, torch, numpy and pandas but not d2d. Keep it free of d2d imports.
"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd

try:  # inside a logged model, code_paths puts preprocess.py on sys.path
    from preprocess import transform, unscale_target
except ImportError:  # while d2d itself logs the model
    from pipeline.preprocess import transform, unscale_target


class RawRowModel(mlflow.pyfunc.PythonModel):
    """Applies the preprocessing fitted on the train split, runs the exported network, and
    returns the label, its probability and every class's probability (or, for a regression
    model, the prediction in the target's units)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        import torch

        # open(), not pipeline.data.io: this runs inside the logged model, where d2d is absent
        with open(context.artifacts["preprocess"]) as f:
            self.state = json.load(f)
        with open(context.artifacts["classes"]) as f:
            self.classes = np.array(json.load(f), dtype=object)
        self.net = torch.export.load(context.artifacts["network"]).module()

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        import torch

        x = torch.from_numpy(transform(model_input, self.state))
        with torch.no_grad():
            out = self.net(x)
        if self.state.get("target"):
            return pd.DataFrame({"prediction": unscale_target(out[:, 0].numpy(), self.state)})
        probs = torch.softmax(out, dim=1).numpy()
        # one frame from one dict: adding the class columns one by one was half of a 1-row prediction
        return pd.DataFrame({"label": self.classes[probs.argmax(1)], "probability": probs.max(1),
                             **{f"prob_{c}": probs[:, i] for i, c in enumerate(self.classes)}})


# The name before the rename, for code that imports it. Logged versions do not need it: MLflow
# logs this file as model code (no pickle), so each version loads with its own copy of it.
RawRowClassifier = RawRowModel

mlflow.models.set_model(RawRowModel())
