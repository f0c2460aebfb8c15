"""Batch inference: score files with a registered version through Ray Data `map_batches`.

The version is pinned when the job starts, so one job is scored by one model even if the
alias moves meanwhile. Rows are never dropped: each is checked by the check every way in
shares (preprocess.check_rows), and a row that fails it keeps its place with an `error`
naming the column, and no prediction. A `.parquet` output is a Parquet dataset folder that
Ray Data's `write_parquet` writes from the workers, in input order: the driver never holds
the results. A `.csv` output is one file, written as the batches stream through the driver
(one batch in memory at a time), and so is a `.parquet` output (one file in the folder) on a
multi-node cluster, whose workers would write to their own disks. Either is written under a
temporary name and put in place at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import Params
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


def output_types(python_model: Any) -> dict[str, Any]:
    """The columns a d2d model returns and the types they keep in every batch, also one whose
    rows all failed the check (so that every batch writes the same schema)."""
    state, classes = getattr(python_model, "state", None), getattr(python_model, "classes", None)
    if not isinstance(state, dict) or classes is None:
        return {}
    if state.get("target"):
        return {"prediction": "float64"}
    integral = all(isinstance(c, int) and not isinstance(c, bool) for c in classes)
    return {"label": "Int64" if integral else "string", "probability": "float64",
            **{f"prob_{c}": "float64" for c in classes}}


class Scorer:
    """A Ray Data actor: loads the model once, then checks and scores pandas batches."""

    def __init__(self, model_uri: str, tracking_uri: str, version: str, id_column: str | None,
                 image_root: str | None = None) -> None:
        """`image_root`: the batches are image paths relative to it, each file read here."""
        import mlflow

        from pipeline.preprocess import extras_spec
        from pipeline.scoring import model_id, model_inputs, python_model_of

        self.image_root = Path(image_root) if image_root else None

        mlflow.set_tracking_uri(tracking_uri)
        self.model = mlflow.pyfunc.load_model(model_uri)
        self.python_model = python_model_of(self.model)  # None for another flavor: MLflow's own predict
        self.inputs = model_inputs(self.model, self.python_model)
        id_spec = model_id(self.python_model, id_column)
        self.id_column = id_spec["name"] if id_spec else None
        self.outputs = output_types(self.python_model)
        self.extras = extras_spec(getattr(self.python_model, "state", None))  # what an image model takes besides the image
        self.version = version

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        import numpy as np

        from pipeline.preprocess import check_rows

        batch = batch.reset_index(drop=True)
        if self.image_root is not None:
            checked, errors = self.read_images(batch)
        else:
            checked, errors = check_rows(batch, self.inputs)
        out = pd.DataFrame(index=batch.index)
        if self.id_column and self.id_column in batch:
            out[self.id_column] = batch[self.id_column]
        out["model_version"] = self.version
        out["error"] = pd.Series(errors, dtype="string")
        scored = pd.DataFrame(index=checked.index)
        if len(checked):  # the rows check_rows passed, as the model takes them; it checks them once more
            scored = (self.python_model.predict(None, checked) if self.python_model is not None
                      else self.model.predict(checked))
            scored.index = checked.index
        for column in dict.fromkeys([*self.outputs, *scored.columns]):
            values = scored[column] if column in scored else pd.Series(np.nan, index=scored.index)
            out[column] = values.reindex(out.index).astype(self.outputs.get(column, values.dtype))
        return out

    def read_images(self, batch: pd.DataFrame) -> tuple[pd.DataFrame, Any]:
        """Each row's image file read and checked as serving checks a request's (the model's
        byte and pixel limits, decodable): the images that pass, and each row's error ("" when none)."""
        import numpy as np

        from pipeline.data.images import ImageChecks, read_file, request_problem
        from pipeline.preprocess import IMAGE_COLUMN, check_rows, image_limits

        limits = image_limits(self.python_model.state)
        assert limits is not None
        kept, errors = {}, np.full(len(batch), "", dtype=object)
        extras = self.extras
        if extras:  # a manifest's extra columns, checked as a table's rows are, before any file is read
            table, errors = check_rows(batch, extras)
            errors = errors.astype(object)
        assert self.image_root is not None
        top = self.image_root.resolve()
        for i, relative in enumerate(batch[self.id_column or "path"].astype(str)):
            if errors[i]:
                continue
            path = self.image_root / relative
            if not relative.strip() or Path(relative).is_absolute() or not path.resolve().is_relative_to(top):
                errors[i] = "image: no path, or a path outside the input's folder"
                continue
            data, why = read_file(path, ImageChecks(max_bytes=limits[0]))
            problem = (413, why) if why is not None else request_problem(data, *limits)
            if problem is None:
                kept[i] = data
            else:
                errors[i] = f"image: {problem[1]}"
        images = pd.Series(kept, dtype=object)
        if extras:
            return table.loc[images.index].assign(**{IMAGE_COLUMN: images}), errors
        return pd.DataFrame({IMAGE_COLUMN: images}), errors


def image_paths(source: Path, path_column: str) -> tuple[pd.DataFrame, Path]:
    """The images to score, as paths relative to a root: every image file under a folder (in
    class folders or not), or a manifest's path column (its other columns kept)."""
    from pipeline.data import images, io

    if source.is_dir():
        found = sorted(p.relative_to(source).as_posix() for p in source.rglob("*")
                       if p.is_file() and p.suffix.lower() in images.SUFFIXES
                       and not any(part.startswith(".") for part in p.relative_to(source).parts))
        if not found:
            raise D2DError(f"--input {source}: no image files ({', '.join(images.SUFFIXES)}) in it")
        return pd.DataFrame({path_column: found}), source
    if not source.is_file():
        raise D2DError(f"--input {source}: no such file or folder")
    table = io.read_table(source)
    if path_column not in table.columns:
        raise D2DError(f"--input {source}: no column {path_column!r} of image paths (data.images.path_column)")
    return table.assign(**{path_column: table[path_column].astype("string").fillna("")}), source.parent


def predict_images(source: Path, path_column: str, model_uri: str, version: str, tracking_uri: str, batch_size: int,
                   concurrency: int, output: Path) -> tuple[int, int]:
    """Image files scored as `predict_files` scores rows: each read and checked by a Ray Data
    actor, an unreadable or refused image kept in place with its error, in input order."""
    import ray

    import mlflow

    from pipeline.preprocess import IMAGE_COLUMN

    ray.data.DataContext.get_current().execution_options.preserve_order = True
    paths, root = image_paths(source, path_column)
    declared = [c.name for c in mlflow.models.get_model_info(model_uri).signature.inputs.inputs]
    missing = [n for n in declared if n != IMAGE_COLUMN and n not in paths.columns]
    if missing:
        where = "a folder holds images only" if source.is_dir() else "the manifest lacks them"
        raise D2DError(f"--input {source}: the model also takes column(s) {', '.join(missing[:5])}, and {where}; "
                       f"give a manifest (CSV or Parquet) with them beside {path_column}")
    step = max(batch_size, -(-len(paths) // 200))  # at most 200 blocks of paths: the actors take them in turn
    dataset = ray.data.from_pandas([paths.iloc[i:i + step].reset_index(drop=True) for i in range(0, len(paths), step)])
    scored = dataset.map_batches(Scorer, fn_constructor_kwargs={"model_uri": model_uri, "tracking_uri": tracking_uri,
                                                               "version": version, "id_column": path_column,
                                                               "image_root": str(root.resolve())},
                                 batch_format="pandas", batch_size=batch_size, concurrency=concurrency)
    return write_scored(scored, output)


def predict_files(files: list[Path], model_uri: str, version: str, tracking_uri: str, id_column: str | None,
                  batch_size: int, concurrency: int, output: Path) -> tuple[int, int]:
    """Every row of `files` scored by the pinned version and written to `output` in input
    order as the batches come; returns the number of rows and of rows with an error."""
    import mlflow
    import ray
    from pyarrow import csv, string

    ray.data.DataContext.get_current().execution_options.preserve_order = True  # output rows in input order
    declared = [c.name for c in mlflow.models.get_model_info(model_uri).signature.inputs.inputs]
    if files[0].suffix == ".parquet":
        dataset = ray.data.read_parquet([str(f) for f in files])
    else:
        # features as text: Arrow infers a column's type from the file's first block, and a later
        # "inf", "2.7" or "abc" in an int column would then fail the whole job; check_rows reads
        # each value and fails only its row
        options = csv.ConvertOptions(column_types={n: string() for n in declared}, strings_can_be_null=True)
        dataset = ray.data.read_csv([str(f) for f in files], convert_options=options)
    names = dataset.schema().names
    missing = [n for n in declared if n not in names]
    if missing:
        raise D2DError(f"the input lacks column(s) the model needs: {', '.join(missing[:5])}"
                       + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    scored = dataset.map_batches(Scorer, fn_constructor_kwargs={"model_uri": model_uri, "tracking_uri": tracking_uri,
                                                               "version": version, "id_column": id_column},
                                 batch_format="pandas", batch_size=batch_size, concurrency=concurrency)
    return write_scored(scored, output)


def write_scored(scored: Any, output: Path) -> tuple[int, int]:
    """A scored Ray Dataset written to `output` in input order (see the module's notes);
    returns the number of rows and of rows with an error."""
    from pipeline.data import io

    errors = 0

    def counted(batches: Any) -> Any:
        nonlocal errors
        for batch in batches:
            errors += int((batch["error"] != "").sum())
            yield batch

    if output.suffix == ".parquet" and workers_write_here():
        with io.staged_dir(output) as folder:
            scored.write_parquet(str(folder))
        # counted from what was written: the row count from the footers, the errors from one column
        rows = io.parquet_rows(output)
        errors = sum(int((batch["error"].fillna("") != "").sum()) for batch in io.read_batches(output, io.SCORE_ROWS, ["error"]))
        return rows, errors
    batches = counted(scored.iter_batches(batch_format="pandas", batch_size=None))
    if output.suffix == ".parquet":  # a dataset folder of one part, written through this process
        with io.staged_dir(output) as folder:
            rows = io.write_batches(batches, folder / "part-00000.parquet")
        return rows, errors
    return io.write_batches(batches, output), errors


def workers_write_here() -> bool:
    """Whether files Ray Data's workers write land where this process reads them: on a
    one-node Ray, not through Ray Client. Elsewhere the results stream through this process
    instead (one batch at a time), so none are written on another node's disk."""
    import ray
    from ray.util.client import ray as client

    return not client.is_connected() and sum(1 for node in ray.nodes() if node["Alive"]) == 1


@dataclass(frozen=True)
class Predicted:
    """What a batch-predict job scored, with which version, and where it wrote."""

    files: int
    rows: int
    errors: int  # rows that failed the model's checks: kept, with an `error`
    output: str
    model: str  # models:/NAME/VERSION, pinned when the job started
    model_version: str


def run_predict(params: Params, root: Path, source: Path, output: Path, force: bool = False) -> Predicted:
    """Score `source` (a file or folder) with models:/<name>@<serve.alias>, write `output`
    (an existing one only with `force`)."""
    from pipeline import registry, tracking
    from pipeline.data import io
    from pipeline.data.schema import schema_from_params
    from pipeline.ray_runtime import ray_session

    check_output(output, force)
    images = params.data.images
    files = [source] if images is not None else input_files(source)
    uri = tracking.configure(root)
    tracking.reachable(tracking.ping)
    name, alias = params.register_.model_name, params.serve.alias
    pinned = tracking.reachable(lambda: registry.resolve_alias(name, alias))
    if pinned is None:
        raise D2DError(f"models:/{name}@{alias} does not exist" + (": run `d2d run` first" if alias == "champion" else ""))
    version = pinned[0]
    with ray_session(params.train, cpus_needed=params.serve.predict_concurrency + 1):
        if images is not None:  # a batch of decoded images bounded in bytes, as training's are
            shape = schema_from_params(params.data).input_shape or (1,)
            batch = min(params.serve.predict_batch_size, io.score_rows(math.prod(shape)))
            rows, errors = predict_images(source, images.path_column, f"models:/{name}/{version}", version, uri,
                                          batch, params.serve.predict_concurrency, output)
        else:
            rows, errors = predict_files(files, f"models:/{name}/{version}", version, uri, params.data.id_column,
                                         params.serve.predict_batch_size, params.serve.predict_concurrency, output)
    # for image files, each image is a file
    return Predicted(len(files) if images is None else rows, rows, errors, str(output), f"models:/{name}/{version}",
                     version)


def check_output(output: Path, force: bool) -> None:
    """A .csv or .parquet name that does not exist yet (or `force`); a .parquet output is a
    folder of parts, a .csv output one file."""
    if output.suffix not in SUFFIXES:
        raise D2DError(f"--output {output}: expected a .csv or .parquet file name")
    if output.suffix == ".csv" and output.is_dir():
        raise D2DError(f"--output {output} is a folder; name a .csv file, or a .parquet dataset")
    if output.exists() and not force:
        raise D2DError(f"--output {output} exists; pass --force to overwrite it")

