"""The `d2d` command: the app layer, above the flows (flows/) and the library (pipeline/).
Heavy libraries are imported inside commands so `d2d --help` stays fast.

Errors a user can fix print one line and exit 2; `--debug` (anywhere on the line) shows the traceback.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from pipeline.errors import D2DError
from pipeline.summaries import TrainingRun

app = typer.Typer(help="d2d: raw data → validated, versioned data → trained, registered model.", no_args_is_help=True, add_completion=False)
data_app = typer.Typer(help="Datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
schema_app = typer.Typer(help="Dataset schemas.", no_args_is_help=True)
app.add_typer(schema_app, name="schema")
# Markup off: every printed string may hold a path, a column or a value the user chose, and a
# `[` in it must print as itself, never be parsed as a style (or fail as a bad one). Styles
# are passed as `style=`.
console = Console(soft_wrap=True, markup=False)
err_console = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)
DEBUG = False

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="The params file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override one param: section.key=value (repeatable)."),
]


def _quiet_user_errors() -> None:
    """Prefect logs a failed task's traceback; for an error the user can fix, the one line is enough."""

    class _DropTraceback(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.exc_info and isinstance(record.exc_info[1], D2DError):
                record.exc_info = None
                record.exc_text = None
            return True

    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addFilter(_DropTraceback())


def print_run_summary(result: TrainingRun, seconds: float, tracking_uri: str | None) -> None:
    """The table `d2d run` ends with."""
    from rich.table import Table

    data, split, reg = result.data_version, result.split, result.register
    metrics = result.evaluate.metrics
    table = Table(title=f"d2d run finished in {seconds:.0f} s", show_header=False, title_justify="left")
    table.add_row("data version", f"{data.md5}  ({data.path}; {data.dvc})")
    table.add_row(
        "rows",
        f"raw {result.validate.rows_in}, quarantined {result.validate.rows_quarantined}, "
        f"removed by cleaning {result.clean.removed}",
    )
    table.add_row("splits", ", ".join(f"{k} {v}" for k, v in split.sizes.items()))
    if "test_r2" in metrics:
        shown = f"RMSE {metrics['test_rmse']:.4g}, MAE {metrics['test_mae']:.4g}, R² {metrics['test_r2']:.4f}"
    else:
        shown = (
            f"accuracy {metrics['test_accuracy']:.4f}, macro F1 {metrics['test_f1_macro']:.4f}, "
            f"macro precision {metrics['test_precision_macro']:.4f}, macro recall {metrics['test_recall_macro']:.4f}, "
            f"ROC-AUC {metrics['test_roc_auc_ovr']:.4f}, log loss {metrics['test_log_loss']:.4f}"
        )
    table.add_row("test metrics", shown)
    table.add_row(
        "model",
        f"{reg.model_name} version {reg.version}"
        + (" → champion" if reg.promoted else f" (champion: {reg.champion or 'none'})"),
    )
    table.add_row("why", "; ".join(reg.reasons))
    table.add_row("MLflow run", result.evaluate.mlflow_run_id)
    table.add_row("MLflow UI", f"open {tracking_uri}" if tracking_uri else "mlflow ui --backend-store-uri sqlite:///mlflow.db  →  http://127.0.0.1:5000")
    console.print(table)
    from pipeline.versioning import push_failed

    if push_failed(data.dvc):  # the run is complete; only the remote is behind, and the user must know
        console.print(f"warning: {data.dvc}: the data version is in the local DVC cache only; run `dvc push` "
                      "once the remote is reachable", style="yellow")


# The background services of a long-lived Prefect server. With no PREFECT_API_URL, Prefect
# starts a temporary server for one `d2d run`, `monitor` or `predict`, on the same database as a
# local `prefect server` (so its scheduler would start that server's scheduled runs). On this
# 2-core machine these services took the streamed epochs of a 1M `d2d run` from 53.6k to 41.7k
# samples/s (second epochs, two runs each; bench/RESULTS.md).
TEMPORARY_SERVER_OFF = ("SCHEDULER", "LATE_RUNS", "FOREMAN", "PAUSE_EXPIRATIONS", "REPOSSESSOR",
                        "CANCELLATION_CLEANUP", "DB_VACUUM", "CLEANUP_RECONCILER", "TRIGGERS")


def lean_temporary_server() -> None:
    """Settings for the temporary Prefect server a flow command may start: no analytics, and
    none of TEMPORARY_SERVER_OFF. Each is a default: a value in the environment wins, and a
    server named by PREFECT_API_URL is not affected."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    for service in TEMPORARY_SERVER_OFF:
        os.environ.setdefault(f"PREFECT_SERVER_SERVICES_{service}_ENABLED", "false")


@app.command()
def run(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Run the whole pipeline as a Prefect flow: validate, clean, split, train, evaluate, register."""
    from pipeline.config import load_params

    overrides = set_ or []
    load_params(params, overrides)  # fail in a second on bad params, before any server starts
    lean_temporary_server()
    from flows.training import training_flow
    from pipeline import lock, stages

    with lock.exclusive(stages.path("run_lock", Path.cwd()), "a training run"):
        pass  # another run holds it: say so now, before a Prefect server starts; the flow takes it for real

    _quiet_user_errors()
    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")  # a team server, else SQLite here
    started = time.perf_counter()
    result = training_flow(params_path=str(params.resolve()), overrides=overrides, root=str(Path.cwd()))
    print_run_summary(result, time.perf_counter() - started, tracking_uri)


@app.command()
def monitor(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Check the inbox's new batches for drift; a drifted labelled batch joins the dataset as a
    new DVC version and, when monitor.* allows, retrains (the drift-monitor flow)."""
    from rich.table import Table

    overrides = set_ or []
    lean_temporary_server()
    from flows.monitor import monitor_flow

    _quiet_user_errors()
    result = monitor_flow(params_path=str(params.resolve()), overrides=overrides, root=str(Path.cwd()))
    if not result.batches:
        console.print("no new batches in the inbox")
        return
    table = Table(title=f"drift monitor: {len(result.batches)} batch(es), {result.retrains} retrain(s) "
                        f"({result.mode})", title_justify="left")
    for column in ("batch", "drift share", "domain AUC", "action", "new version"):
        table.add_column(column)
    for b in result.batches:
        share, auc, reg = b.decision.drift_share, b.decision.domain_auc, b.register
        table.add_row(b.batch, f"{share:.2f}" if share is not None else "-",
                      f"{auc:.3f}" if auc is not None else "-", b.decision.action,
                      f"{reg.version} ({'champion' if reg.promoted else 'rejected by the gate'})" if reg else "-")
    console.print(table)
    for b in result.batches:  # the reasons in full, below the table
        console.print(f"{b.batch}: " + "; ".join([*b.decision.reasons, *(b.register.reasons if b.register else ())]))
    for b in result.batches:
        for warning in b.warnings:
            console.print(f"warning: {b.batch}: {warning}", style="yellow")


def _port_free(host: str, port: int) -> None:
    import socket

    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise D2DError(f"cannot serve on {host}:{port}: {e.strerror} (set serve.port)") from None


@app.command()
def serve(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Serve the registry's champion over HTTP with Ray Serve (POST /predict, GET /health,
    GET /metadata, and MLflow's POST /invocations); follows the alias when it moves. Ctrl-C stops."""
    from pipeline import registry, tracking
    from pipeline.config import load_params
    from pipeline.ray_runtime import ray_session
    from pipeline.serve import ServeSettings, build_app

    cfg = load_params(params, set_ or [])
    root = Path.cwd()
    uri = tracking.configure(root)
    tracking.reachable(tracking.ping)
    name, alias = cfg.register_.model_name, cfg.serve.alias
    if tracking.reachable(lambda: registry.resolve_alias(name, alias)) is None:
        raise D2DError(f"models:/{name}@{alias} does not exist" + (": run `d2d run` first" if alias == "champion" else ""))
    _port_free(cfg.serve.host, cfg.serve.port)
    from ray import serve as ray_serve

    replicas = cfg.serve.autoscaling.max_replicas if cfg.serve.autoscaling else cfg.serve.num_replicas
    with ray_session(cfg.train, cpus_needed=int(replicas * cfg.serve.cpus_per_replica) + 1, dashboard=True):
        ray_serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
        # no access log line per request on the console: the inference log keeps every request
        ray_serve.run(build_app(ServeSettings.from_params(cfg, uri, root)), name="d2d", route_prefix="/",
                      logging_config={"enable_access_log": False})
        console.print(f"serving {name}@{alias} on http://{cfg.serve.host}:{cfg.serve.port} "
                      f"(POST /predict, POST /invocations, GET /health, GET /metadata); Ctrl-C stops")
        def stop(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt  # SIGTERM (a service manager, `kill`) stops as cleanly as Ctrl-C

        signal.signal(signal.SIGTERM, stop)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            console.print("stopping: draining replicas and writing the inference log")
            ray_serve.shutdown()


@app.command()
def predict(
    input_: Annotated[Path, typer.Option("--input", "-i", help="A CSV/Parquet file, or a folder of them.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where the predictions go (.csv or .parquet).")],
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --output if it exists.")] = False,
) -> None:
    """Score files with the champion (Ray Data map_batches), as the d2d-batch-predict flow.
    A row that fails the model's checks keeps its place with an `error` naming the column."""
    from pipeline.config import load_params
    from pipeline.predict import check_output

    overrides = set_ or []
    load_params(params, overrides)
    check_output(output, force)  # before Prefect and Ray start
    lean_temporary_server()
    from flows.predict import predict_flow

    _quiet_user_errors()
    result = predict_flow(input=str(input_.resolve()), output=str(output.resolve()), params_path=str(params.resolve()),
                          overrides=overrides, root=str(Path.cwd()), force=force)
    console.print(f"scored {result.rows} rows from {result.files} file(s) with {result.model} → "
                  f"{result.output}" + (f" ({result.errors} rows could not be scored; see the error column)"
                                        if result.errors else ""))


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="validate | clean | split | train | evaluate | register")],
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
    root: Annotated[Path, typer.Option("--root", help="The project folder; a relative --params is read from it. "
                                       "For a Ray job on a cluster, a folder every node sees.")] = Path("."),
) -> None:
    """Run one stage on its own (what `dvc repro` calls, and a Ray job's entrypoint)."""
    from pipeline import stages
    from pipeline.config import load_params

    if not stages.stage(name).dvc:
        raise D2DError(f"'{name}' is a step of the flow, not a DVC stage; choose one of: "
                       + ", ".join(s.name for s in stages.DVC_STAGES))
    if not root.is_dir():
        raise D2DError(f"--root {root}: not a folder")
    cfg = load_params(root / params, set_ or [])
    summary = stages.run(name, cfg, root.resolve()).shown()
    console.print(f"{name} done: " + ", ".join(f"{k}={v}" for k, v in summary.items()))


@app.command("stages")
def stages_table() -> None:
    """Every stage: its runner, the params it takes, what it reads and writes, what it returns."""
    from rich.table import Table

    from pipeline.stages import describe

    rows = describe()
    table = Table(title="d2d stages (pipeline/stages.py)", title_justify="left")
    for column in rows[0]:
        table.add_column(column)
    for row in rows:
        table.add_row(*row.values())
    console.print(table)


ReasonOpt = Annotated[str, typer.Option("--reason", "-r", help="Why; recorded on the version's tags with your user name.")]


def _registry_call(params: Path, set_: list[str] | None, call: Any) -> dict[str, Any]:
    from pipeline import tracking
    from pipeline.config import load_params

    cfg = load_params(params, set_ or [])
    tracking.configure(Path.cwd())
    return tracking.reachable(lambda: call(cfg.register_.model_name))


@app.command()
def promote(
    version: Annotated[str, typer.Argument(help="The registered version to make champion.")],
    reason: ReasonOpt,
    params: ParamsOpt = Path("params.yaml"),
    set_: SetOpt = None,
) -> None:
    """Move the `champion` alias to VERSION by hand (the gate is skipped; who and why are recorded)."""
    from pipeline import registry

    out = _registry_call(params, set_, lambda name: registry.promote(name, version, reason))
    console.print(f"{out['model_name']}: champion is version {out['champion']} (was {out['previous'] or 'none'})")


@app.command()
def rollback(reason: ReasonOpt, params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None) -> None:
    """Move `champion` back to the version the current champion replaced."""
    from pipeline import registry

    out = _registry_call(params, set_, lambda name: registry.rollback(name, reason))
    console.print(f"{out['model_name']}: champion is version {out['champion']} again (rolled back from {out['previous']})")


POOL = "d2d-process"


def _prefect(args: list[str]) -> Any:
    import subprocess

    # the interpreter's own Prefect CLI, as `d2d` may run without the venv on PATH
    return subprocess.run([sys.executable, "-m", "prefect", *args], capture_output=True, text=True, timeout=600)


def check_triggers(spec_path: Path, params_path: Path) -> None:
    """A retrain trigger that names another model than register.model_name would never fire."""
    import yaml

    from pipeline.config import load_params

    if not params_path.is_file():
        return
    expected = f"d2d.model.{load_params(params_path).register_.model_name}"
    for d in (yaml.safe_load(spec_path.read_text()) or {}).get("deployments", []):
        for t in d.get("triggers") or []:
            named = (t.get("match") or {}).get("prefect.resource.id", "")
            if named.startswith("d2d.model.") and named != expected:
                raise D2DError(f"prefect.yaml: deployment {d['name']}'s trigger matches {named}, but the monitor emits "
                               f"its events on {expected} (register.model_name)")


@app.command()
def deploy() -> None:
    """Register prefect.yaml's deployments with the Prefect server in PREFECT_API_URL,
    creating the `d2d-process` work pool if it is missing."""
    if not Path("prefect.yaml").is_file():
        raise D2DError("prefect.yaml not found: run `d2d deploy` in the project folder")
    if not os.environ.get("PREFECT_API_URL"):
        raise D2DError("PREFECT_API_URL is not set: deployments need a Prefect server (`prefect server start`); "
                       "`d2d serve-flows` serves them without one")
    check_triggers(Path("prefect.yaml"), Path("params.yaml"))
    if _prefect(["work-pool", "inspect", POOL]).returncode:
        created = _prefect(["work-pool", "create", POOL, "--type", "process"])
        if created.returncode:
            raise D2DError(f"could not create work pool {POOL}: {(created.stderr or created.stdout).strip()[-300:]}")
        console.print(f"created work pool {POOL} (process)")
    out = _prefect(["--no-prompt", "deploy", "--all"])
    if out.returncode:
        raise D2DError(f"prefect deploy failed: {(out.stderr or out.stdout).strip().splitlines()[-1]}")
    console.print(out.stdout.strip())
    console.print(f"next: prefect worker start --pool {POOL}")


def concurrency_limit(deployment: dict[str, Any]) -> Any:
    """prefect.yaml's `concurrency_limit` (a number, or limit + collision_strategy) as `to_deployment` takes it."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    spec = deployment.get("concurrency_limit")
    return ConcurrencyLimitConfig(**spec) if isinstance(spec, dict) else spec


@app.command("serve-flows")
def serve_flows() -> None:
    """Serve prefect.yaml's deployments with their schedules in this process (no worker needed)."""
    import yaml
    from prefect import serve

    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    from flows.monitor import monitor_flow
    from flows.training import training_flow

    flows = {"flows/training.py:training_flow": training_flow, "flows/monitor.py:monitor_flow": monitor_flow}
    spec = yaml.safe_load(Path("prefect.yaml").read_text()) if Path("prefect.yaml").is_file() else None
    if not spec:
        raise D2DError("prefect.yaml not found: run `d2d serve-flows` in the project folder")
    deployments = []
    for d in spec.get("deployments", []):
        if d["entrypoint"] not in flows:
            continue  # a flow this version of d2d does not have
        crons = [s["cron"] for s in d.get("schedules", []) if s.get("active", True)]
        deployments.append(flows[d["entrypoint"]].to_deployment(
            name=d["name"], parameters=d.get("parameters", {}), cron=crons[0] if crons else None,
            tags=d.get("tags"), description=d.get("description"), concurrency_limit=concurrency_limit(d),
            triggers=[DeploymentEventTrigger(**{k: v for k, v in t.items() if k != "type"}) for t in d.get("triggers", [])]))
    console.print(f"serving {', '.join(d.name for d in deployments)}; Ctrl-C stops")
    serve(*deployments)


@app.command("simulate-drift")
def simulate_drift(
    kind: Annotated[str, typer.Option(help="rows: none | brightness | contrast | noise | shift | thicken; "
                                            "images: none | brightness | blur | noise | rotation | new_class")] = "none",
    strength: Annotated[float, typer.Option(min=0.0, max=1.0, help="How strong the change is, 0..1.")] = 0.5,
    rows: Annotated[int, typer.Option(min=1, help="Rows in the batch.")] = 300,
    seed: Annotated[int, typer.Option(help="Seeds the resampling and the noise.")] = 0,
    out: Annotated[Path, typer.Option(help="The inbox folder the batch is written to.")] = Path("data/inbox"),
    params: ParamsOpt = Path("params.yaml"),
    labelled: Annotated[bool, typer.Option(help="Images: class folders (labelled) or the images alone.")] = True,
) -> None:
    """Write a batch of new digits, unchanged or drifted, for the drift monitor: labelled rows,
    or, for an image dataset, a folder of images."""
    from pipeline.config import load_params
    from pipeline.data import io
    from pipeline.data.demo import digits_frame
    from pipeline.data.schema import schema_from_params
    from pipeline.data.simulate import simulate_batch, write_image_batch

    data = load_params(params).data
    schema = schema_from_params(data)
    if data.images is not None:
        folder = out / f"batch-{kind}-{strength:g}-seed{seed}"
        try:
            write_image_batch(folder, kind, strength, rows, seed, data.demo.rows, labelled)
        except (ValueError, OSError) as e:
            raise D2DError(str(e)) from None
        layout = "class folders" if labelled and kind != "new_class" else "unlabelled"
        console.print(f"wrote {rows} images ({kind}, strength {strength:g}, {layout}) to {folder}")
        return
    # the digits the demo dataset holds (data.demo.rows), so `none` is the reference's own distribution
    source = digits_frame(schema).head(data.demo.rows)
    try:
        batch = simulate_batch(source, schema, kind, strength, rows, seed, first_id=1_000_000 + seed * rows)
    except ValueError as e:
        raise D2DError(str(e)) from None
    path = io.write_csv(batch, out / f"batch-{kind}-{strength:g}-seed{seed}.csv")
    console.print(f"wrote {len(batch)} labelled rows ({kind}, strength {strength:g}) to {path}")


DemoKindOpt = Annotated[str, typer.Option(
    "--kind", help="table: the digits as a CSV at data.raw; images: the digits as an image folder (DIR/<label>/*.png).")]
DemoOutOpt = Annotated[Path, typer.Option("--out", help="Where --kind images writes its folder (it must not exist yet).")]


@data_app.command("demo")
def data_demo(params: ParamsOpt = Path("params.yaml"), set_: SetOpt = None, kind: DemoKindOpt = "table",
              out_dir: DemoOutOpt = Path("data/raw/digit-images")) -> None:
    """Write the demo dataset (scikit-learn digits with ~3% seeded corruptions) to data.raw,
    or, with --kind images, the digits as an image folder with flawed files among them."""
    from pipeline.config import load_params
    from pipeline.runners.data import make_demo

    if kind not in ("table", "images"):
        raise D2DError(f"unknown demo kind '{kind}': expected table or images")
    if kind == "images":
        import shutil
        import tempfile

        from pipeline.config import DemoParams
        from pipeline.data.demo import write_image_folder

        # an image folder is where a new project starts: params come after it, from init-params
        demo = load_params(params, set_ or []).data.demo if params.exists() else DemoParams()

        if out_dir.exists():
            raise D2DError(f"{out_dir} already exists: choose a new folder with --out (a user's folder is never changed)")
        try:  # written beside, then renamed into place: a failed write leaves nothing behind
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            building = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        except OSError as e:
            raise D2DError(f"cannot write the image folder {out_dir}: {e.strerror or e}") from None
        try:
            flawed = write_image_folder(building, demo.rows, demo.seed)
            building.rename(out_dir)
        except OSError as e:
            raise D2DError(f"cannot write the image folder {out_dir}: {e.strerror or e}") from None
        finally:
            shutil.rmtree(building, ignore_errors=True)  # gone already once renamed
        files = [p for p in out_dir.rglob("*") if p.is_file()]
        console.print(f"wrote {len(files)} files in {len({p.parent for p in files})} class folders to {out_dir}")
        for flaw, paths in flawed.items():
            console.print(f"  flawed {len(paths):3d} files: {flaw}")
        return
    config = load_params(params, set_ or [])
    out = make_demo(config, Path.cwd())
    console.print(f"wrote {out['rows']} rows to {out['path']} (md5 {out['md5']})")
    for kind, ids in out["corrupted"].items():
        console.print(f"  corrupted {len(ids):3d} rows: {kind}")


TargetOpt = Annotated[str, typer.Option("--target", "-t", help="The column to predict.")]
IdOpt = Annotated[str | None, typer.Option("--id", help="The unique row id column (found by name when omitted).")]
ShapeOpt = Annotated[str | None, typer.Option("--image-shape", help="C,H,W when the features are an image, e.g. 1,8,8.")]


def _infer(data: Path, target: str, id_column: str | None, image_shape: str | None) -> tuple[dict[str, Any], list[str]]:
    from pipeline.data import io
    from pipeline.data.infer import infer_batches

    shape = None
    if image_shape:
        try:
            shape = [int(v) for v in image_shape.split(",")]
        except ValueError:
            raise D2DError(f"--image-shape {image_shape!r}: expected C,H,W such as 1,8,8") from None
    from pipeline.data.infer import image_path_column, infer_images, is_image_folder

    if is_image_folder(data):
        return infer_images(data, target, id_column)
    if data.is_file() and (column := image_path_column(next(io.read_batches(data, 1000)), id_column)) is not None:
        return infer_images(data, target, column)
    return infer_batches(io.read_batches(data), target, id_column, shape)


def _raw_in_project(data: Path, root: Path) -> tuple[Path, str | None]:
    """data.raw as init-params writes it: relative to the project folder. A file outside the
    project is never written into params (pipeline.stages.raw_path refuses it); its place in
    the project is written instead, with what to do."""
    from pipeline.project import inside_project

    lexical = Path(os.path.normpath(os.path.abspath(data)))
    if inside_project(data, root):
        return lexical.relative_to(os.path.abspath(root)), None
    inside = Path("data/raw") / data.name
    return inside, (f"{data} is outside the project folder, so the params name data.raw: {inside}. Copy it there "
                    f"(cp '{lexical}' {inside}, then dvc add {inside}), or run with --set data.raw={lexical}")


@app.command("init-params")
def init_params(
    data: Annotated[Path, typer.Option("--data", "-d", help="A CSV or Parquet file, a folder of CSV or Parquet parts, "
                                       "a folder of class folders of images, or a manifest of image paths.")],
    target: TargetOpt,
    id_column: IdOpt = None,
    image_shape: ShapeOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the params.")] = Path("params.yaml"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Infer a schema from your data and write a complete, commented params.yaml for it."""
    import yaml

    from pipeline.config import params_from_dict
    from pipeline.data.infer import render_params

    if out.exists() and not force:
        raise D2DError(f"{out} exists; pass --force to overwrite it or --out to write elsewhere")
    if out.is_dir():
        raise D2DError(f"--out {out} is a folder; give a file name such as {out / 'params.yaml'}")
    schema, notes = _infer(data, target, id_column, image_shape)
    raw, outside = _raw_in_project(data, Path.cwd())
    text = render_params(schema, raw, notes)
    written = yaml.safe_load(text)  # what is written must load, as it is, to exactly what was inferred
    params_from_dict(written)
    if {k: written["data"].get(k) for k in ("raw", "id_column", "target")} != {
            "raw": raw.as_posix(), "id_column": schema["id_column"], "target": schema["target"]}:
        raise D2DError("the generated params do not read back as written (please report this file's column names)")
    try:
        from pipeline.data import io

        io.write_text(text, out)  # renamed into place: a crash never leaves half a params file
    except (OSError, UnicodeEncodeError) as e:
        raise D2DError(f"cannot write {out}: {e}") from None
    kinds = [f["kind"] for f in schema["features"]]
    files = (f"{schema['images']['found']['files']:,} image files at {schema['images']['size']}×"
             f"{schema['images']['size']} {schema['images']['mode']}, " if "images" in schema else "")
    console.print(
        f"wrote {out}: {files}{kinds.count('numeric')} numeric and {kinds.count('categorical')} categorical features, "
        + (f"{len(schema['classes'])} classes" if schema["task"] == "classification" else "a regression target")
        + (f", id column '{schema['id_column']}'" if schema["id_column"] is not None
           else ", no id column (d2d derives a stable key per row)")
    )
    for note in notes:
        console.print(f"  {note}", style="yellow")
    if outside:
        console.print(outside, style="yellow")
    console.print(f"next: d2d run --params {out}")


@schema_app.command("infer")
def schema_infer(
    data: Annotated[Path, typer.Argument(help="A CSV or Parquet file, or a folder of CSV or Parquet parts.")],
    target: TargetOpt,
    id_column: IdOpt = None,
    image_shape: ShapeOpt = None,
) -> None:
    """Print the inferred schema (the data section of params.yaml)."""
    from pipeline.data.infer import comment_safe, render_data_section

    schema, notes = _infer(data, target, id_column, image_shape)
    raw, outside = _raw_in_project(data, Path.cwd())
    print(render_data_section(schema, raw), end="")
    for note in [*notes, *([outside] if outside else [])]:
        print(f"# {comment_safe(note)}")


def _error(message: str) -> None:
    """The one line an error prints: its text as it is (markup off), on one line."""
    from rich.text import Text

    line = " ".join(message.splitlines())  # a message holding a line break (a path, a value) stays one line
    err_console.print(Text.assemble(("error:", "bold red"), " ", line))


def main() -> None:
    global DEBUG
    DEBUG = "--debug" in sys.argv[1:]
    args = [a for a in sys.argv[1:] if a != "--debug"]
    try:
        app(args=args, prog_name="d2d")
    except D2DError as e:
        if DEBUG:
            raise
        _error(str(e))
        sys.exit(e.exit_code)
    except Exception as e:  # a failed step that is not the input's fault: one line, exit 1
        if DEBUG:
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        _error(f"{type(e).__name__}: {first} (--debug shows the traceback)")
        sys.exit(1)


if __name__ == "__main__":
    main()
