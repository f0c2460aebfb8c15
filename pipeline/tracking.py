"""MLflow tracking from the driver side: one run per pipeline run, with params, per-epoch
history, test metrics, plots and a model that predicts on raw rows."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, TypeVar

import pandas as pd

from pipeline.config import Params
from pipeline.data import io
from pipeline.data.schema import Schema
from pipeline.preprocess import IMAGE_COLUMN

T = TypeVar("T")
MODEL_CODE = Path(__file__).with_name("raw_model.py")
PREPROCESS_CODE = Path(__file__).with_name("preprocess.py")
IMAGE_CODE = Path(__file__).with_name("image_transforms.py")  # the image preprocessing, for image models
# The SQLite URI this process chose. MLflow copies whatever URI is set into
# MLFLOW_TRACKING_URI, so that value must not be mistaken for the user's choice later.
_local_uri: str | None = None


# MLflow retries a failed HTTP call 7 times with a backoff factor of 2 (minutes in all) and
# waits 120 s per call; a pipeline should say the server is down well before that. The
# user's own settings of these variables win.
RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
                  # one progress bar per downloaded file drowns the pipeline's own output
                  "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def configure(root: Path) -> str:
    """MLFLOW_TRACKING_URI when the user set it (a team server); otherwise SQLite in the project."""
    import mlflow

    for key, value in RETRY_DEFAULTS.items():
        os.environ.setdefault(key, value)
    global _local_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and env != _local_uri:
        uri = env
    else:
        uri = _local_uri = f"sqlite:///{(root / 'mlflow.db').resolve()}"
    mlflow.set_tracking_uri(uri)
    return uri


def ping() -> None:
    """One cheap call to the tracking server."""
    from mlflow import MlflowClient

    MlflowClient().search_experiments(max_results=1)


def reachable(call: Callable[[], T]) -> T:
    """Run `call`; a tracking server that stays down through MLflow's retries becomes one line."""
    import mlflow

    from pipeline.errors import ServiceError

    try:
        return call()
    except Exception as e:
        if unreachable(e):
            retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
            raise ServiceError(f"MLflow tracking server {mlflow.get_tracking_uri()} is unreachable "
                               f"(after {retries} retries with backoff)") from e
        raise


def unreachable(error: BaseException) -> bool:
    """A connection that failed or timed out (MLflow wraps the HTTP client's errors in its own)."""
    import requests

    if isinstance(error, (ConnectionError, TimeoutError, requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return True
    text = str(error)
    return any(s in text for s in ("Max retries exceeded", "Connection refused", "Read timed out", "timed out"))


def _experiment(name: str, root: Path) -> str:
    """The experiment's id; a new local one keeps its artifacts in <root>/mlruns."""
    import mlflow

    experiment = mlflow.get_experiment_by_name(name)
    if experiment:
        return experiment.experiment_id
    local = mlflow.get_tracking_uri().startswith("sqlite:")
    location = (root / "mlruns").resolve().as_uri() if local else None
    return mlflow.create_experiment(name, artifact_location=location)


def git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, f"{key}.")
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else v
    return out


def input_colspec(column: Any) -> Any:
    """A feature's entry in the logged signature. Declared from the schema, not inferred from
    five example rows: a nullable column is optional even when the example has no nulls.

    A number is declared `any`: MLflow's types cannot say "an integer that a reader may hand
    over as an integral float". MLflow 3.17 refuses float64 for `long` (pandas reads an int
    column with one null anywhere in the file as float64) and int64 for `double` (a Parquet
    file or a file without nulls), so either declaration rejects one of the raw file's
    ordinary readings before the model sees it. The model checks every value itself
    (preprocess.check_rows: integral, finite, in range, null only where imputed) and names
    the column; the types it checks are in the model's metadata (d2d_inputs). Text stays
    `string`, which MLflow checks as it is.
    """
    from mlflow.types import ColSpec
    from mlflow.types.schema import AnyType

    required = not column.nullable
    if column.numpy_dtype == "object" and column.dtype == "str":
        return ColSpec("string", column.name, required=required)
    return ColSpec(AnyType(), column.name, required=required)


def log_raw_model(net: Any, n_inputs: int, preprocess_path: Path, example: pd.DataFrame, schema: Schema) -> Any:
    """Export the network with torch.export and log it with its fitted preprocessing as a pyfunc."""
    import mlflow
    import torch

    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec
    from mlflow.types import Schema as MlflowSchema

    images = schema.images is not None
    if images:  # the files' bytes (MLflow's binary type), then a manifest's extra columns
        raw = example[[IMAGE_COLUMN, *schema.feature_names]].head(2).astype({f.name: f.numpy_dtype for f in schema.features})
        signature = ModelSignature(inputs=MlflowSchema([ColSpec("binary", IMAGE_COLUMN),
                                                        *(input_colspec(f) for f in schema.features)]))
    else:
        raw = example[schema.feature_names].astype({f.name: f.numpy_dtype for f in schema.features})
        signature = ModelSignature(inputs=MlflowSchema([input_colspec(f) for f in schema.features]))
    inputs = io.read_json(preprocess_path).get("inputs")
    batch = torch.export.Dim("batch")
    sample = torch.zeros((2, n_inputs), dtype=torch.float32)
    exported = torch.export.export(net, (sample,), dynamic_shapes=({0: batch},))
    with tempfile.TemporaryDirectory() as d:
        network = Path(d) / "network.pt2"
        torch.export.save(exported, network)
        classes = Path(d) / "classes.json"
        io.write_text(json.dumps(list(schema.classes)), classes)
        # The output's integer label column makes MLflow warn about missing integers; labels are never missing.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
            return mlflow.pyfunc.log_model(
                name="model",
                python_model=str(MODEL_CODE),
                code_paths=[str(PREPROCESS_CODE), *([str(IMAGE_CODE)] if images else [])],
                artifacts={"network": str(network), "preprocess": str(preprocess_path), "classes": str(classes)},
                input_example=raw,
                signature=signature,
                # the types the model checks each number against (see input_colspec), for people and tools
                metadata={"d2d_inputs": inputs} if inputs else None,
                pip_requirements=[f"mlflow=={version('mlflow')}", "torch==2.13.0",
                                  f"pandas=={version('pandas')}", f"numpy=={version('numpy')}",
                                  *([f"pillow=={version('pillow')}"] if images else [])],
            )


def log_pipeline_run(
    params: Params,
    metrics: dict[str, float],
    history: pd.DataFrame,
    artifacts: list[Path],
    root: Path,
    model: Any,
    n_inputs: int,
    preprocess_path: Path,
    example: pd.DataFrame,
    schema: Schema,
    tags: dict[str, str],
    trials: pd.DataFrame | None = None,
    datasets: dict[str, Path] | None = None,
    data_docs: Path | None = None,
) -> tuple[str, str]:
    """Log one pipeline run; returns its run id and the logged model's URI. With `trials`
    (the tuning history), each trial becomes a child run."""
    import mlflow

    experiment_id = _experiment(params.evaluate.experiment, root)
    commit = git_commit(root)
    all_tags = {**tags, "d2d.params_hash": params.digest(), **({"git.commit": commit} if commit else {})}
    with mlflow.start_run(experiment_id=experiment_id, tags=all_tags) as run:
        mlflow.log_params(flatten({k: v for k, v in params.as_dict().items() if k != "data"} | {"data.raw": str(params.data.raw)}))
        if "d2d.tuned_config" in tags:  # what the model trained with, where tuning replaced train.*
            mlflow.log_params(flatten(json.loads(tags["d2d.tuned_config"]), "tuned."))
        for row in history.to_dict("records"):
            step = int(row["epoch"])
            mlflow.log_metrics({k: float(v) for k, v in row.items() if k != "epoch"}, step=step)
        mlflow.log_metrics(metrics)
        for path in artifacts:
            mlflow.log_artifact(str(path), artifact_path="reports")
        if data_docs is not None:
            mlflow.log_artifacts(str(data_docs), artifact_path="data_docs")
        for name, path in (datasets or {}).items():
            log_dataset(path, name, schema.target, tags.get("d2d.data_path"), tags.get("d2d.data_md5"))
        info = log_raw_model(model, n_inputs, preprocess_path, example, schema)
        if trials is not None:
            log_trials(trials, experiment_id)
        return run.info.run_id, info.model_uri


def log_drift_run(experiment: str, root: Path, run_name: str, metrics: dict[str, float], run_params: dict[str, Any],
                  tags: dict[str, str], artifacts: list[Path], current: pd.DataFrame | None = None) -> str:
    """One run per inspected batch in the monitoring experiment: the drift figures as metrics,
    the verdict as tags, the HTML and JSON reports as artifacts, the batch as a dataset input."""
    import mlflow

    with mlflow.start_run(experiment_id=_experiment(experiment, root), run_name=run_name, tags=tags) as run:
        mlflow.log_params(run_params)
        mlflow.log_metrics(metrics)
        for path in artifacts:
            mlflow.log_artifact(str(path), artifact_path="drift")
        if current is not None:
            dataset = mlflow.data.from_pandas(current, source=run_params.get("batch", "batch"), name=run_name)
            mlflow.log_input(dataset, context="current")
        return run.info.run_id


CONTEXTS = {"train": "training", "val": "validation", "test": "test"}


def log_dataset(path: Path, split: str, target: str, raw_path: str | None, raw_md5: str | None) -> None:
    """The split file as an MLflow dataset input, so the UI shows what data the run used (with
    the raw file's DVC md5 in its name: the data version it came from). Recorded as metadata
    (MLflow's MetaDataset): the schema from the first rows, the split file's md5 as digest and
    its row count as a tag. MLflow's pandas dataset would infer its schema over every row,
    which took most of the evaluate stage at 200,000 rows."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.models import infer_signature

    from pipeline.data import io

    version = f"@{raw_md5[:8]}" if raw_md5 else ""
    with warnings.catch_warnings():  # MLflow's hints about a local path source and integer columns
        warnings.simplefilter("ignore", UserWarning)
        columns = infer_signature(io.parquet_head(path, 100)).inputs
        source = resolve_dataset_source(raw_path or "unknown")
    dataset = MetaDataset(source, name=f"{split}{version}", digest=io.dvc_md5(path)[:8], schema=columns)
    mlflow.log_input(dataset, context=CONTEXTS.get(split, split),
                     tags={"rows": str(io.parquet_rows(path)), "target": target})


def log_trials(trials: pd.DataFrame, experiment_id: str) -> None:
    """One nested MLflow run per tuning trial: its sampled config as params, its epochs as step metrics."""
    import mlflow

    for trial, rows in trials.groupby("trial", sort=False):
        config = {c.removeprefix("config."): rows[c].iloc[0] for c in rows if c.startswith("config.")}
        with mlflow.start_run(experiment_id=experiment_id, run_name=f"trial {trial}", nested=True,
                              tags={"d2d.tune_trial": str(trial)}):
            mlflow.log_params(config)
            for row in rows.to_dict("records"):
                mlflow.log_metrics({k: float(v) for k, v in row.items()
                                    if k not in ("trial", "epoch") and not k.startswith("config.") and pd.notna(v)},
                                   step=int(row["epoch"]))
            mlflow.log_metric("best_val_loss", float(rows["val_loss"].min()))


def network_weights(model_uri: str) -> dict[str, Any]:
    """The network's tensors from a logged d2d model (for a warm start), read from its
    torch.export archive: no pickled objects are loaded."""
    import mlflow
    import torch
    from mlflow.exceptions import MlflowException

    from pipeline.errors import D2DError

    try:
        local = Path(reachable(lambda: mlflow.artifacts.download_artifacts(artifact_uri=model_uri)))
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise
        raise D2DError(f"train.init_from {model_uri}: {e.message.splitlines()[0]}") from None
    network = local / "artifacts" / "network.pt2"
    if not network.is_file():
        raise D2DError(f"train.init_from {model_uri}: not a d2d model (no artifacts/network.pt2)")
    return {k: v.detach().clone() for k, v in torch.export.load(str(network)).state_dict.items()}


def pin_version(model_uri: str) -> str:
    """models:/NAME@ALIAS → models:/NAME/VERSION (what the alias points at now), so a warm
    start records the exact weights it began from; other URIs are returned as they are."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipeline.errors import D2DError

    if not model_uri.startswith("models:/") or "@" not in model_uri:
        return model_uri
    name, alias = model_uri.removeprefix("models:/").split("@", 1)
    try:
        version = reachable(lambda: MlflowClient().get_model_version_by_alias(name, alias)).version
    except MlflowException as e:
        raise D2DError(f"train.init_from {model_uri}: {e.message.splitlines()[0]}") from None
    return f"models:/{name}/{version}"
