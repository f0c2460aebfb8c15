"""Batch inference: score files with a registered version through Ray Data `map_batches`.

The version is pinned when the job starts, so one job is scored by one model even if the
alias moves meanwhile. Rows are never dropped: a row whose features cannot be read as the
model's types comes back with an `error` and no prediction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.errors import D2DError

SUFFIXES = (".csv", ".parquet")


def input_files(path: Path) -> list[Path]:
    """A file, or every CSV/Parquet file in a folder (one format per job)."""
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUFFIXES)
    else:
        raise D2DError(f"--input {path}: no such file or folder")
    if not files:
        raise D2DError(f"--input {path}: no .csv or .parquet files in it")
    if any(f.suffix not in SUFFIXES for f in files):
        raise D2DError(f"--input {path}: expected .csv or .parquet files")
    if len({f.suffix for f in files}) > 1:
        raise D2DError(f"--input {path}: mixes CSV and Parquet files; score them in two jobs")
    return files


class Scorer:
    """A Ray Data actor: loads the model once, then scores pandas batches."""

    def __init__(self, model_uri: str, tracking_uri: str, version: str, id_column: str | None) -> None:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        self.model = mlflow.pyfunc.load_model(model_uri)
        self.types = {c.name: c.type.to_numpy() for c in self.model.metadata.get_input_schema().inputs}
        self.version, self.id_column = version, id_column

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        # through object and float64: on Arrow-backed text, to_numeric's NaN is not a null that isna() sees
        numbers = {n: pd.to_numeric(batch[n].astype(object), errors="coerce").astype("float64")
                   for n, t in self.types.items() if t.kind in "iuf"}
        unreadable = pd.DataFrame({n: v.isna() for n, v in numbers.items()})  # text or missing
        bad = unreadable.any(axis=1) if len(unreadable.columns) else pd.Series(False, index=batch.index)
        out = pd.DataFrame(index=batch.index)
        if self.id_column and self.id_column in batch:
            out[self.id_column] = batch[self.id_column]
        out["model_version"] = self.version
        out["error"] = ""
        if bad.any():
            out.loc[bad, "error"] = unreadable[bad].apply(
                lambda r: "missing or not a number: " + ", ".join(r.index[r]), axis=1)
        good = ~bad
        if good.any():
            features = batch.loc[good, list(self.types)].assign(**{n: v[good] for n, v in numbers.items()})
            scored = self.model.predict(features.astype(self.types))
            scored.index = features.index
            for column in scored.columns:  # labels stay labels (object), not floats beside the unscored rows' gaps
                out[column] = scored[column].astype(object) if column == "label" else scored[column]
        return out.reset_index(drop=True)


def predict_files(files: list[Path], model_uri: str, version: str, tracking_uri: str, id_column: str | None,
                  batch_size: int, concurrency: int) -> pd.DataFrame:
    """Every row of `files` scored by the pinned version, in input order."""
    import mlflow
    import ray

    ray.data.DataContext.get_current().execution_options.preserve_order = True  # output rows in input order
    read = ray.data.read_parquet if files[0].suffix == ".parquet" else ray.data.read_csv
    dataset = read([str(f) for f in files])
    names = dataset.schema().names
    declared = [c.name for c in mlflow.models.get_model_info(model_uri).signature.inputs.inputs]
    missing = [n for n in declared if n not in names]
    if missing:
        raise D2DError(f"the input lacks column(s) the model needs: {', '.join(missing[:5])}"
                       + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    scored = dataset.map_batches(Scorer, fn_constructor_kwargs={"model_uri": model_uri, "tracking_uri": tracking_uri,
                                                               "version": version, "id_column": id_column},
                                 batch_format="pandas", batch_size=batch_size, concurrency=concurrency)
    return scored.to_pandas()


def run_predict(params: Any, root: Path, source: Path, output: Path) -> dict[str, Any]:
    """Score `source` (a file or folder) with models:/<name>@<serve.alias>, write `output`."""
    from pipeline import registry, tracking
    from pipeline.data import io
    from pipeline.train.trainer import ray_session

    if output.suffix not in SUFFIXES:
        raise D2DError(f"--output {output}: expected a .csv or .parquet file name")
    files = input_files(source)
    uri = tracking.configure(root)
    tracking.reachable(tracking.ping)
    name, alias = params.register_.model_name, params.serve.alias
    found = tracking.reachable(lambda: registry.resolve_alias(name, alias))
    if found is None:
        raise D2DError(f"models:/{name}@{alias} does not exist" + (": run `d2d run` first" if alias == "champion" else ""))
    version = found[0]
    with ray_session(params.train, cpus_needed=params.serve.predict_concurrency + 1):
        out = predict_files(files, f"models:/{name}/{version}", version, uri, params.data.id_column,
                            params.serve.predict_batch_size, params.serve.predict_concurrency)
    (io.write_parquet if output.suffix == ".parquet" else io.write_csv)(out, output)
    return {"files": len(files), "rows": len(out), "errors": int((out["error"] != "").sum()), "output": str(output),
            "model": f"models:/{name}/{version}", "model_version": version}
