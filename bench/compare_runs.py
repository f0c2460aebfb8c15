"""Compares two project folders in which `d2d data demo && d2d run` has been run, to show that a
refactor left behaviour unchanged: metrics, DVC-tracked files, MLflow records and `dvc status`.

    .venv/bin/python bench/compare_runs.py /tmp/before /tmp/after [--all]

Prints a table per section and ends with `behaviour: same` or `behaviour: DIFFERS (n items)`;
exits 1 when anything that should match differs. What may differ (NONDETERMINISTIC and the
key-only lists below) is what differed between two runs of the same commit, each with why.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import yaml

# reports/metrics.json: ids of this run, new on every run, compared by key only.
METRICS_IDS = {"mlflow_run_id": "MLflow run id", "model_uri": "logged model id"}

# Keys of any reports/*.json that hold wall-clock seconds, compared by key only.
TIMING_KEYS = {
    "train_seconds": "wall time of training",
    "seconds": "wall time",
    "step_s": "wall time of a step",
    "dvc_s": "wall time of dvc status/commit",
}

# reports/history.csv columns (also logged as MLflow metrics) that hold times or speeds.
TIMING_COLUMNS = {
    "samples_per_s": "training speed",
    "epoch_s": "wall time of an epoch",
    "loop_started": "clock time the loop started",
    "wall_end": "clock time the epoch ended",
}

# MLflow tags (run, logged model, model version) whose values are ids, times, commits or paths.
KEY_ONLY_TAGS = {
    "git.commit": "commit hash",
    "mlflow.runName": "random run name",
    "mlflow.source.name": "path of the d2d executable",
    "prefect.flow_run_id": "Prefect flow run id",
    "d2d.decided_at": "time of the promotion decision",
}

# Great Expectations names each validation's folder after its run time.
_RUN_TIME_DIR = re.compile(r"\d{8}T\d{6}\.\d+Z")

NOT_THERE = "(missing)"


@dataclass(frozen=True)
class Row:
    """One compared item: its two values and the verdict."""

    item: str
    a: str
    b: str
    verdict: str
    counts: bool = True  # False for a summary row whose parts have rows of their own


@dataclass(frozen=True)
class FileRef:
    """A file to compare: the md5 recorded for it, where it lies, and its project folder."""

    md5: str
    path: Path
    project: Path


@dataclass(frozen=True)
class Nondeterministic:
    """Files known to differ between two runs of the same code, and what is equal once the
    varying part is taken out: a differing file counts only when that part still differs."""

    pattern: str  # fnmatch on the row's item: a DVC path, or run/… and model/… for artifacts
    reason: str
    normalize: Callable[[bytes, Path], object]


def same(a: object, b: object) -> bool:
    """Equal values; NaN equals NaN, as a metric that is NaN on both sides has not changed."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)


def is_failure(verdict: str) -> bool:
    """Whether a verdict is one of the items counted in `behaviour: DIFFERS (n items)`."""
    return verdict.startswith("DIFFERS") or verdict.startswith("NOT UP TO DATE")


def nondeterministic(why: str) -> str:
    return f"differs (nondeterministic: {why})"


# --- normalizers: what of a nondeterministic file must still be equal ---------------------------


def json_without_timing(data: bytes, project: Path) -> object:
    """The JSON's leaves without the TIMING_KEYS ones."""
    return {k: v for k, v in flatten(json.loads(data)).items() if leaf(k) not in TIMING_KEYS}


def json_without_ids(data: bytes, project: Path) -> object:
    """The JSON without the METRICS_IDS keys."""
    return {k: v for k, v in json.loads(data).items() if k not in METRICS_IDS}


def csv_without_timing(data: bytes, project: Path) -> object:
    """The CSV's rows, as text, without the TIMING_COLUMNS."""
    rows = list(csv.DictReader(io.StringIO(data.decode())))
    return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in rows]


_DATA_DOCS_VARYING = [
    (_RUN_TIME_DIR, "<run time>"),  # run id, and the ?d= cache buster on the logo
    (re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:Z| UTC)"), "<run time>"),
    (re.compile(r"'_run_time_sort': [\d.]+"), "'_run_time_sort': <run time>"),
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "<uuid>"),
]


def data_docs_without_run_times(data: bytes, project: Path) -> object:
    """The Data Docs HTML with run times and the random element UUIDs replaced."""
    return substitute(data.decode(), _DATA_DOCS_VARYING)


_MLMODEL_VARYING = [
    (re.compile(r"^(model_id|model_uuid|run_id): .*$", re.M), r"\1: <id>"),
    (re.compile(r"^utc_time_created: .*$", re.M), "utc_time_created: <time>"),
    (re.compile(r"m-[0-9a-f]{32}"), "m-<id>"),
    # log_model stages network.pt2 and classes.json in a fresh temporary folder
    (re.compile(re.escape(tempfile.gettempdir()) + r"/tmp\w{8}/"), "<tmpdir>/"),
    # the artifacts' total size, which includes the shipped code (SHIPPED_CODE)
    (re.compile(r"^model_size_bytes: .*$", re.M), "model_size_bytes: <size>"),
]

# The logged model ships copies of these project files (MLflow's code paths), so a change to
# the code changes them: each must equal its own checkout's file, not the other run's copy.
SHIPPED_CODE = {"model/raw_model.py": "pipeline/raw_model.py", "model/code/preprocess.py": "pipeline/preprocess.py"}


def mlmodel_without_ids(data: bytes, project: Path) -> object:
    """The MLmodel file with ids, creation time, staging folder and project path replaced."""
    text = data.decode().replace(str(project.resolve()), "<project>")
    return substitute(text, _MLMODEL_VARYING)


def substitute(text: str, rules: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, replacement in rules:
        text = pattern.sub(replacement, text)
    return text


# Observed on two runs of commit edbbe57 (/tmp/before vs /tmp/before2); everything else,
# models/model.pt, the parquet files, every PNG and network.pt2 included, was byte-identical.
_DATA_DOCS = "Data Docs HTML: run time, run-time-named folder and random element UUIDs"
_TRAIN_JSON = "train_seconds is wall time"
_HISTORY = "timing columns " + ", ".join(TIMING_COLUMNS)
NONDETERMINISTIC = [
    Nondeterministic("reports/metrics.json", "mlflow_run_id, model_uri: ids of the run", json_without_ids),
    Nondeterministic("reports/data_docs/*.html", _DATA_DOCS, data_docs_without_run_times),
    Nondeterministic("run/data_docs/*.html", _DATA_DOCS, data_docs_without_run_times),
    Nondeterministic("reports/train.json", _TRAIN_JSON, json_without_timing),
    Nondeterministic("run/reports/train.json", _TRAIN_JSON, json_without_timing),
    Nondeterministic("reports/history.csv", _HISTORY, csv_without_timing),
    Nondeterministic("model/MLmodel", "model/run ids, creation time, temporary staging folder",
                     mlmodel_without_ids),
]


# --- reading ----------------------------------------------------------------------------------


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists as {"a.b[0]": leaf}, so every leaf is a row."""
    if isinstance(value, dict):
        parts = [flatten(sub, f"{prefix}.{key}" if prefix else str(key)) for key, sub in value.items()]
    elif isinstance(value, list) and value:
        parts = [flatten(sub, f"{prefix}[{i}]") for i, sub in enumerate(value)]
    else:
        return {prefix: value}
    return {k: v for part in parts for k, v in part.items()}


def leaf(key: str) -> str:
    """The last dict key of a flattened key: "a.b[0].c" -> "c"."""
    return re.sub(r"\[\d+\]$", "", key).rsplit(".", 1)[-1]


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def stable_path(rel: str) -> str:
    """A relative path with Great Expectations' run-time folder names replaced, so the same
    file of two runs has the same name."""
    return _RUN_TIME_DIR.sub("<run time>", rel)


def files_under(root: Path, project: Path) -> dict[str, FileRef]:
    """Every file under root by stable relative path, with its md5."""
    return {stable_path(p.relative_to(root).as_posix()): FileRef(md5_of(p), p, project)
            for p in sorted(root.rglob("*")) if p.is_file()}


def dvc_outs(project: Path) -> dict[str, str]:
    """path -> md5 of every out in dvc.lock and in the data .dvc files, as DVC records them."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    outs = {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])}
    for dvc_file in sorted(project.glob("data/**/*.dvc")):
        for o in yaml.safe_load(dvc_file.read_text())["outs"]:
            outs[(dvc_file.parent / o["path"]).relative_to(project).as_posix()] = o["md5"]
    return outs


def dir_manifest(project: Path, out: str, md5: str) -> dict[str, FileRef]:
    """The files of a directory out, from the .dir listing in the DVC cache."""
    listing = project / ".dvc/cache/files/md5" / md5[:2] / md5[2:]
    return {stable_path(e["relpath"]): FileRef(e["md5"], project / out / e["relpath"], project)
            for e in json.loads(listing.read_text())}


def artifact_root(uri: str) -> Path:
    """The local folder of a file:// artifact URI (the only kind a demo folder has)."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        sys.exit(f"artifacts at {uri} are not local files; this script reads local stores only")
    return Path(unquote(parsed.path))


# --- comparing --------------------------------------------------------------------------------


def show(value: object) -> str:
    return NOT_THERE if value is NOT_THERE else str(value)


def compare_value(item: str, a: object, b: object, why_varies: str | None = None) -> Row:
    """A row for one value; why_varies names values compared by key only (ids, times)."""
    if same(a, b):
        verdict = "same"
    elif why_varies and NOT_THERE not in (a, b):
        verdict = nondeterministic(why_varies)
    else:
        verdict = "DIFFERS"
    return Row(item, show(a), show(b), verdict)


def compare_mappings(prefix: str, a: Mapping[str, object], b: Mapping[str, object],
                     varies: Callable[[str], str | None] = lambda key: None) -> list[Row]:
    """A row per key of either mapping."""
    return [compare_value(f"{prefix}{key}", a.get(key, NOT_THERE), b.get(key, NOT_THERE), varies(key))
            for key in sorted(set(a) | set(b))]


def allowed_variation(item: str) -> Nondeterministic | None:
    return next((n for n in NONDETERMINISTIC if fnmatch.fnmatch(item, n.pattern)), None)


def compare_file(item: str, a: FileRef | None, b: FileRef | None) -> Row:
    """A row for one file: equal md5s, or a known variation that leaves the rest equal."""
    if a is None or b is None:
        return Row(item, a.md5 if a else NOT_THERE, b.md5 if b else NOT_THERE, "DIFFERS")
    if a.md5 == b.md5:
        return Row(item, a.md5, b.md5, "same")
    if item in SHIPPED_CODE:
        source = SHIPPED_CODE[item]
        if all(f.path.read_bytes() == (f.project / source).read_bytes() for f in (a, b)):
            return Row(item, a.md5, b.md5, f"differs (the code: each is its own checkout's {source})")
        return Row(item, a.md5, b.md5, f"DIFFERS (not the checkout's {source})")
    known = allowed_variation(item)
    if known is None:
        return Row(item, a.md5, b.md5, "DIFFERS")
    if known.normalize(a.path.read_bytes(), a.project) != known.normalize(b.path.read_bytes(), b.project):
        return Row(item, a.md5, b.md5, f"DIFFERS (beyond the known variation: {known.reason})")
    return Row(item, a.md5, b.md5, nondeterministic(known.reason))


def compare_files(prefix: str, a: Mapping[str, FileRef], b: Mapping[str, FileRef]) -> list[Row]:
    return [compare_file(f"{prefix}{rel}", a.get(rel), b.get(rel)) for rel in sorted(set(a) | set(b))]


def compare_dir_out(path: str, md5_a: str, md5_b: str, a: Path, b: Path) -> list[Row]:
    """A directory out: its .dir md5, and when that differs, a row per file inside it."""
    if md5_a == md5_b:
        return [Row(path, md5_a, md5_b, "same")]
    files = compare_files(f"{path}/", dir_manifest(a, path, md5_a), dir_manifest(b, path, md5_b))
    failures = sum(is_failure(r.verdict) for r in files)
    reasons = sorted({r.verdict for r in files if r.verdict.startswith("differs")})
    summary = f"files: {failures} differ" if failures else "; ".join(reasons) or "same files"
    changed = [r for r in files if r.verdict != "same"]
    return [Row(path, md5_a, md5_b, summary, counts=False), *changed]


# --- sections ---------------------------------------------------------------------------------


def read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else {}


def presence_rows(rel: str, a: Path, b: Path) -> list[Row]:
    """A DIFFERS row when the file is in only one folder, else none."""
    there_a, there_b = (a / rel).exists(), (b / rel).exists()
    return [] if there_a == there_b else [compare_value(rel, there_a or NOT_THERE, there_b or NOT_THERE)]


def metrics_rows(a: Path, b: Path) -> list[Row]:
    """reports/metrics.json, key by key; the run's ids by key only."""
    rel = "reports/metrics.json"
    keys = compare_mappings("", read_json(a / rel), read_json(b / rel), METRICS_IDS.get)
    return presence_rows(rel, a, b) + keys


def reports_rows(a: Path, b: Path) -> list[Row]:
    """Every other reports/*.json, leaf by leaf; wall times by key only."""
    names = {p.name for folder in (a, b) for p in folder.glob("reports/*.json")} - {"metrics.json"}
    rows: list[Row] = []
    for name in sorted(names):
        rel = f"reports/{name}"
        rows += presence_rows(rel, a, b)
        rows += compare_mappings(f"{name}: ", flatten(read_json(a / rel)), flatten(read_json(b / rel)),
                                 lambda key: TIMING_KEYS.get(leaf(key)))
    return rows


def dvc_rows(a: Path, b: Path) -> list[Row]:
    """Every DVC-tracked out by md5 (directories by .dir md5, then file by file)."""
    outs_a, outs_b = dvc_outs(a), dvc_outs(b)
    rows: list[Row] = []
    for path in sorted(set(outs_a) | set(outs_b)):
        md5_a, md5_b = outs_a.get(path), outs_b.get(path)
        if md5_a and md5_b and md5_a.endswith(".dir") and md5_b.endswith(".dir"):
            rows += compare_dir_out(path, md5_a, md5_b, a, b)
        else:
            ref_a = FileRef(md5_a, a / path, a) if md5_a else None
            ref_b = FileRef(md5_b, b / path, b) if md5_b else None
            rows.append(compare_file(path, ref_a, ref_b))
    return rows


def dvc_status_rows(a: Path, b: Path, venv_bin: Path) -> list[Row]:
    """`dvc status` in each folder: after `d2d run`, `dvc repro` must have nothing to do."""
    status_a, status_b = dvc_status(a, venv_bin), dvc_status(b, venv_bin)
    stale = [label for label, status in (("A", status_a), ("B", status_b)) if status != "up to date"]
    verdict = f"NOT UP TO DATE in {' and '.join(stale)}" if stale else "same"
    return [Row("dvc status (nothing to reproduce)", status_a, status_b, verdict)]


def dvc_status(folder: Path, venv_bin: Path) -> str:
    """"up to date" when `dvc status` finds nothing to do in folder, else what it reports."""
    # dvc.yaml's commands are `d2d stage …`: the venv's bin must be on PATH, as `make repro` does
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    out = subprocess.run([str(venv_bin / "dvc"), "status", "--json"], cwd=folder, env=env,
                         capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.strip() == "{}":
        return "up to date"
    return " ".join((out.stdout.strip() or out.stderr.strip()).split())[:300]


@dataclass(frozen=True)
class MlflowRecord:
    """What one folder's tracking store holds about its `d2d run`."""

    run: Any  # mlflow.entities.Run
    run_files: dict[str, FileRef]
    model_tags: dict[str, str]
    model_files: dict[str, FileRef]
    version: Any  # mlflow.entities.model_registry.ModelVersion
    aliases: dict[str, int]


def mlflow_record(project: Path) -> MlflowRecord:
    """The training run, its logged model and its registered version, found through the ids
    that reports/metrics.json and reports/register.json name."""
    from mlflow import MlflowClient

    store = f"sqlite:///{project.resolve()}/mlflow.db"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    metrics = read_json(project / "reports/metrics.json")
    register = read_json(project / "reports/register.json")
    run = client.get_run(metrics["mlflow_run_id"])
    model = client.get_logged_model(metrics["model_uri"].removeprefix("models:/"))
    version = client.get_model_version(register["model_name"], str(register["version"]))
    registered = client.get_registered_model(register["model_name"])
    return MlflowRecord(
        run=run,
        run_files=files_under(artifact_root(run.info.artifact_uri), project),
        model_tags=dict(model.tags),
        model_files=files_under(artifact_root(model.artifact_location), project),
        version=version,
        aliases=dict(registered.aliases),
    )


def mlflow_run_rows(a: MlflowRecord, b: MlflowRecord) -> list[Row]:
    """The training run's status, tags, params and final metrics."""
    rows = [compare_value("status", a.run.info.status, b.run.info.status)]
    rows += compare_mappings("tag ", a.run.data.tags, b.run.data.tags, KEY_ONLY_TAGS.get)
    rows += compare_mappings("param ", a.run.data.params, b.run.data.params)
    return rows + compare_mappings("metric ", a.run.data.metrics, b.run.data.metrics, TIMING_COLUMNS.get)


def mlflow_artifact_rows(a: MlflowRecord, b: MlflowRecord) -> list[Row]:
    """The run's artifacts and the logged model's, file by file (relative paths, md5)."""
    run_files = compare_files("run/", a.run_files, b.run_files)
    return run_files + compare_files("model/", a.model_files, b.model_files)


def mlflow_registry_rows(a: MlflowRecord, b: MlflowRecord) -> list[Row]:
    """The logged model's tags, the registered version's number, status, tags, and the aliases."""
    rows = compare_mappings("logged model tag ", a.model_tags, b.model_tags, KEY_ONLY_TAGS.get)
    rows.append(compare_value("version", a.version.version, b.version.version))
    rows.append(compare_value("version status", a.version.status, b.version.status))
    rows.append(compare_value("version source", a.version.source, b.version.source, "logged model id"))
    rows += compare_mappings("version tag ", a.version.tags, b.version.tags, KEY_ONLY_TAGS.get)
    return rows + compare_mappings("alias ", a.aliases, b.aliases)


# --- output -----------------------------------------------------------------------------------


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def table_lines(title: str, rows: list[Row], show_all: bool) -> Iterator[str]:
    """A section's table; in a long section the rows that are the same are only counted."""
    yield f"\n== {title}"
    listed = rows if show_all or len(rows) <= 30 else [r for r in rows if r.verdict != "same"]
    width = max([len(r.item) for r in listed] + [4])
    width = min(width, 70)
    yield f"{'item':<{width}}  {'A':<22}  {'B':<22}  verdict"
    for r in listed:
        yield f"{clip(r.item, width):<{width}}  {clip(r.a, 22):<22}  {clip(r.b, 22):<22}  {r.verdict}"
    if len(listed) < len(rows):
        yield f"{f'({len(rows) - len(listed)} more rows, all same; --all lists them)':<{width}}"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("a", type=Path, help="project folder of the first run (before)")
    ap.add_argument("b", type=Path, help="project folder of the second run (after)")
    ap.add_argument("--all", action="store_true", help="list the rows that are the same in long sections too")
    ap.add_argument("--venv-bin", type=Path, default=Path(sys.executable).parent,
                    help="bin folder with dvc and d2d (default: this interpreter's)")
    return ap.parse_args()


def quiet_mlflow() -> None:
    """MLflow's store migrations and deprecations are noise in a comparison."""
    warnings.filterwarnings("ignore")
    for name in ("alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main() -> int:
    args = parse_args()
    for folder in (args.a, args.b):
        if not (folder / "dvc.lock").exists() or not (folder / "mlflow.db").exists():
            sys.exit(f"{folder}: no dvc.lock or mlflow.db; run `d2d data demo && d2d run` there first")
    quiet_mlflow()
    record_a, record_b = mlflow_record(args.a), mlflow_record(args.b)
    sections = [
        ("metrics: reports/metrics.json", metrics_rows(args.a, args.b)),
        ("reports/*.json (the others)", reports_rows(args.a, args.b)),
        ("DVC-tracked files (dvc.lock outs, data .dvc files)", dvc_rows(args.a, args.b)),
        ("MLflow training run", mlflow_run_rows(record_a, record_b)),
        ("MLflow artifacts (run/ and logged model/)", mlflow_artifact_rows(record_a, record_b)),
        ("MLflow registry", mlflow_registry_rows(record_a, record_b)),
        ("dvc status", dvc_status_rows(args.a, args.b, args.venv_bin)),
    ]
    print(f"A = {args.a}\nB = {args.b}")
    for title, rows in sections:
        print("\n".join(table_lines(title, rows, args.all)))
    failures = sum(is_failure(r.verdict) for _, rows in sections for r in rows if r.counts)
    print("\nbehaviour: same" if failures == 0 else f"\nbehaviour: DIFFERS ({failures} items)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
