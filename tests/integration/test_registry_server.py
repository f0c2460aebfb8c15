"""Evaluation and the registry against a real tracking server: PostgreSQL (Debian's package)
and `mlflow server` on it with a served artifact root, both on loopback, reached only
through MLFLOW_TRACKING_URI, checked through MLflow's REST client. Then the gate's faults:
a retried registration, a worse challenger, a hand promotion and rollback, two concurrent
promotions, and a server that is down."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_params
from pipeline.data import io
from pipeline import stages
from pipeline.runners.data import make_demo
from tests.conftest import REPO
from tests.integration.servers import free_port, mlflow_server, postgres
from tests.integration.test_end_to_end import small_project

pytestmark = pytest.mark.integration
FAST = ["train.epochs=4", "train.num_workers=1", "register.min_test_accuracy=0.5"]
NAME = "d2d-digits"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("servers")
    with postgres(work / "pg") as db_uri, mlflow_server(db_uri, work / "artifacts", work / "mlflow.log") as url:
        saved = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = url
        try:
            yield {"url": url, "db": db_uri}
        finally:
            if saved is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = small_project(tmp_path_factory.mktemp("project"))
    params = load_params(root / "params.yaml", FAST)
    make_demo(params, root)
    for name in ("validate", "clean", "split", "train"):
        stages.run(name, params, root)
    return root


def d2d(args: list[str], root: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    bin_dir = Path(sys.executable).parent
    return subprocess.run([str(bin_dir / "d2d"), *args], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"})


def test_evaluate_and_register_on_a_postgresql_backed_server(server, project):
    import psycopg
    from mlflow import MlflowClient

    params = load_params(project / "params.yaml", FAST)
    metrics = stages.run("evaluate", params, project, {"prefect.flow_run_id": "test-flow-run"})
    decision = stages.run("register", params, project)
    assert decision.version == 1 and decision.promoted, decision

    client = MlflowClient(server["url"])  # the REST client, as the UI and other tools see it
    run = client.get_run(metrics.mlflow_run_id)
    assert {"test_accuracy", "test_f1_macro", "test_roc_auc_ovr", "test_log_loss", "val_log_loss"} <= set(run.data.metrics)
    assert run.data.tags["prefect.flow_run_id"] == "test-flow-run" and "d2d.params_hash" in run.data.tags
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert {"reports/per_class_f1.png", "reports/roc_curves.png", "reports/attributions.png",
            "reports/test_predictions.png",
            "reports/validate.json", "reports/clean.json", "reports/split.json", "reports/per_class.csv"} <= artifacts
    assert "data_docs/index.html" in {a.path for a in client.list_artifacts(run.info.run_id, "data_docs")}
    tags = [{t.key: t.value for t in d.tags} for d in run.inputs.dataset_inputs]
    inputs = {(d.dataset.name.split("@")[0], t["mlflow.data.context"]) for d, t in zip(run.inputs.dataset_inputs, tags)}
    assert inputs == {("train", "training"), ("val", "validation"), ("test", "test")}
    assert all(int(t["rows"]) > 0 and t["target"] == "label" for t in tags)  # counted from each split file's footer
    assert all('"pixel_0"' in d.dataset.schema for d in run.inputs.dataset_inputs)
    assert all(d.dataset.name.endswith("@" + run.data.tags["d2d.data_md5"][:8]) for d in run.inputs.dataset_inputs)

    champion = client.get_model_version_by_alias(NAME, "champion")
    assert champion.version == "1" and champion.run_id == run.info.run_id
    for tag in ("d2d.data_md5", "d2d.params_hash", "prefect.flow_run_id", "d2d.decision", "d2d.promotion"):
        assert tag in champion.tags, tag
    assert champion.tags["d2d.decision"] == "promoted"
    # what the server stored went to PostgreSQL, not to a file next to it
    with psycopg.connect(server["db"]) as conn:
        assert conn.execute("select count(*) from model_versions where name = %s", (NAME,)).fetchone()[0] == 1


NO_D2D = """
import json, sys
sys.modules["pipeline"] = sys.modules["flows"] = None  # any import of d2d's code now fails
import mlflow, pandas as pd
# no cast: pandas reads a column with a null anywhere in the file as float, and the model takes it
rows = pd.read_csv(sys.argv[1])
out = mlflow.pyfunc.load_model("models:/d2d-digits@champion").predict(rows.drop(columns=["label"]))
probs = out[[c for c in out.columns if c.startswith("prob_")]]
print(json.dumps({"accuracy": float((out["label"].astype(str) == rows["label"].astype(str)).mean()),
                  "columns": list(out.columns), "prob_sums": probs.sum(axis=1).round(4).tolist(),
                  "d2d_loaded": any(m.startswith(("pipeline.", "flows.")) for m in sys.modules)}))
"""

# The README's snippet, then what other readers make of the same raw file, in a process
# without d2d. The snippet's own tracking URI line is left out: here the registry is a server.
READERS = """
import polars as pl, pyarrow.csv as pacsv
raw = "data/raw/digits.csv"
frames = {"dropna": pd.read_csv(raw).dropna(), "pyarrow": pacsv.read_csv(raw).to_pandas(),
          "polars": pl.read_csv(raw, infer_schema_length=None).to_pandas()}
pd.read_csv(raw).to_parquet("round_trip.parquet")
frames["parquet"] = pd.read_parquet("round_trip.parquet")
sizes = {name: len(model.predict(frame.dropna(subset=[c for c in frame if c.startswith("pixel_")])))
         for name, frame in frames.items()}
# a null where the model has no imputation, and a value that is not an integer: errors naming the column
errors = []
for bad in (pd.read_csv(raw).head(2).assign(pixel_3=[1.0, None]), pd.read_csv(raw).head(1).assign(pixel_4=2.7)):
    try:
        model.predict(bad)
    except Exception as e:
        errors.append(str(e))
print(json.dumps({"snippet_rows": len(snippet), "sizes": sizes, "errors": errors,
                  "d2d_loaded": any(m.startswith(("pipeline.", "flows.")) for m in sys.modules)}))
"""


def readme_snippet() -> str:
    """The Python block of the README's "Loading the model" section, as a user copies it."""
    text = (REPO / "README.md").read_text()
    block = text[text.index("## Loading the model"):].split("```python\n", 1)[1].split("```", 1)[0]
    assert 'model.predict(pd.read_csv("data/raw/digits.csv").head(3))' in block
    lines = [line for line in block.splitlines() if "set_tracking_uri" not in line]
    lines[-1] = "snippet = " + lines[-1]  # keep what the last line returns
    return "\n".join(lines)


def test_the_champion_predicts_raw_rows_in_a_process_without_d2d(server, project, tmp_path):
    """`mlflow.pyfunc.load_model("models:/…@champion").predict(raw_df)` in a fresh, isolated
    interpreter where importing d2d's code is impossible, on the raw CSV rows of the test split."""
    import pandas as pd

    test_ids = pd.read_parquet(project / "data/split/test.parquet")["id"]
    raw = pd.read_csv(project / "data/raw/digits.csv").set_index("id").loc[test_ids].reset_index()
    raw.to_csv(tmp_path / "rows.csv", index=False)
    out = subprocess.run([sys.executable, "-I", "-c", NO_D2D, str(tmp_path / "rows.csv")], cwd=tmp_path,
                         env={**os.environ, "MLFLOW_TRACKING_URI": server["url"]}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert not result["d2d_loaded"]
    assert result["columns"][:2] == ["label", "probability"] and len(result["columns"]) == 12
    assert result["prob_sums"] == [1.0] * len(raw)
    assert result["accuracy"] == pytest.approx(io.read_json(project / "reports/metrics.json")["test_accuracy"], abs=1e-6)


def test_the_readme_snippet_runs_on_the_raw_file_as_every_reader_reads_it(server, project):
    """Exactly the README's lines on data/raw/digits.csv (where columns with a null anywhere
    are float64), then its dropna() rows, a Parquet round trip, pyarrow's and polars' frames;
    a refused null and a fractional value name their column."""
    import pandas as pd

    raw = pd.read_csv(project / "data/raw/digits.csv")
    assert (raw.dtypes == "float64").any()  # the case the snippet failed on
    script = "import json, sys\nsys.modules['pipeline'] = sys.modules['flows'] = None\n" + readme_snippet() + READERS
    out = subprocess.run([sys.executable, "-I", "-c", script], cwd=project, capture_output=True, text=True,
                         env={**os.environ, "MLFLOW_TRACKING_URI": server["url"]}, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["snippet_rows"] == 3 and not result["d2d_loaded"]
    complete = len(raw.dropna(subset=[c for c in raw if c.startswith("pixel_")]))
    assert result["sizes"] == {"dropna": len(raw.dropna()), "pyarrow": complete, "polars": complete, "parquet": complete}
    assert "row 1: column pixel_3 is null" in result["errors"][0]
    assert "row 0: column pixel_4: 2.7 is not an integer" in result["errors"][1]


def test_a_retried_registration_does_not_add_a_version(server, project):
    from mlflow import MlflowClient

    params = load_params(project / "params.yaml", FAST)
    again = stages.run("register", params, project)
    assert again.version == 1 and again.champion == 1
    assert len(MlflowClient(server["url"]).search_model_versions(f"name = '{NAME}'")) == 1


def test_a_worse_challenger_stays_registered_but_is_not_champion(server, project):
    from mlflow import MlflowClient

    weak = load_params(project / "params.yaml", [*FAST, "train.epochs=1", "train.lr=0.00001"])
    stages.run("train", weak, project)
    stages.run("evaluate", weak, project)
    decision = stages.run("register", weak, project)
    assert decision.version == 2 and not decision.promoted and decision.champion == 1
    # both gates ran: below the threshold, and compared with the champion on the same split
    assert "is below" in decision.reasons[0] and "worse beyond the tolerance" in decision.reasons[1]
    assert decision.champion_metrics["version"] == "1"
    client = MlflowClient(server["url"])
    v2 = client.get_model_version(NAME, "2")
    assert v2.tags["d2d.decision"] == "rejected" and "challenger" in v2.aliases
    assert client.get_model_version_by_alias(NAME, "champion").version == "1"
    assert io.read_json(project / "reports/register.json")["promoted"] is False


def test_promote_and_rollback_by_hand_record_who_and_why(server, project):
    from mlflow import MlflowClient

    env = {"MLFLOW_TRACKING_URI": server["url"]}
    out = d2d(["promote", "2", "--reason", "audit asked for it", "--set", "register.min_test_accuracy=0.5"], project, env)
    assert out.returncode == 0, out.stderr
    client = MlflowClient(server["url"])
    v2 = client.get_model_version(NAME, "2")
    assert "champion" in v2.aliases and v2.tags["d2d.previous_champion"] == "1"
    assert v2.tags["d2d.promotion"] == "audit asked for it" and v2.tags["d2d.promoted_by"]

    out = d2d(["rollback", "--reason", "worse in production"], project, env)
    assert out.returncode == 0, out.stderr
    assert client.get_model_version_by_alias(NAME, "champion").version == "1"
    assert "worse in production" in client.get_model_version(NAME, "2").tags["d2d.rolled_back"]

    missing = d2d(["promote", "9", "--reason", "x"], project, env)
    assert missing.returncode == 2 and "has no version 9" in missing.stderr


def test_two_concurrent_promotions_leave_exactly_one_champion(server, project):
    from mlflow import MlflowClient

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "MLFLOW_TRACKING_URI": server["url"], "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    procs = [subprocess.Popen([str(bin_dir / "d2d"), "promote", v, "--reason", f"race {v}"], cwd=project, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for v in ("1", "2")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    client = MlflowClient(server["url"])
    versions = [client.get_model_version(NAME, v.version) for v in client.search_model_versions(f"name = '{NAME}'")]
    holders = [v.version for v in versions if "champion" in v.aliases]
    assert len(holders) == 1 and holders[0] in ("1", "2")
    champion = client.get_model_version(NAME, holders[0])
    assert champion.tags.get("d2d.previous_champion") != champion.version  # the chain never points at itself


def test_an_unreachable_server_fails_with_one_line_after_retries(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    io.write_json({"mlflow_run_id": "0" * 32, "model_uri": "models:/m-0", "test_accuracy": 0.9}, tmp_path / "reports/metrics.json")
    down = f"http://127.0.0.1:{free_port()}"
    out = d2d(["stage", "register"], tmp_path, {"MLFLOW_TRACKING_URI": down, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"})
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and f"MLflow tracking server {down} is unreachable (after 2 retries with backoff)" in lines[0]


def test_two_gated_registrations_at_once_leave_one_champion_chosen_by_the_gate(server, project, tmp_path):
    """Two evaluated candidates (two MLflow runs) registered by two `d2d stage register`
    processes started together. The gate is opened wide (any accuracy, any tolerance) so that
    both pass it, and the first to take the gate's lock holds it for a while after deciding
    (the D2D_GATE_HOLD_S drill), so the two really overlap: the second must wait, then be gated
    against the first. Exactly one champion, both decisions recorded, and the last promotion
    names the version it replaced (so `d2d rollback` goes back through both)."""
    from mlflow import MlflowClient

    from pipeline.registry import HOLD_DRILL, LOCK_SUFFIX

    wide = ["register.min_test_accuracy=0", "register.tolerance=1"]
    roots = [project, tmp_path / "second"]
    shutil.copytree(project, roots[1], ignore=shutil.ignore_patterns("ray", "mlruns", "*.db"))
    params = load_params(project / "params.yaml", FAST)
    runs = [stages.run("evaluate", params, root).mlflow_run_id for root in roots]  # two candidates, two runs
    assert runs[0] != runs[1]
    client = MlflowClient(server["url"])
    before = {v.version for v in client.search_model_versions(f"name = '{NAME}'")}
    old_champion = next(v.version for v in client.search_model_versions(f"name = '{NAME}'")
                        if "champion" in client.get_model_version(NAME, v.version).aliases)

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "MLFLOW_TRACKING_URI": server["url"], "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           HOLD_DRILL: "20"}
    procs = [subprocess.Popen([str(bin_dir / "d2d"), "stage", "register", *[a for s in FAST + wide for a in ("--set", s)]],
                              cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for root in roots]
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        errs.append(err)
    assert sum(f"waiting for {NAME}'s promotion gate" in e for e in errs) == 1, errs  # they did overlap

    decisions = [io.read_json(root / "reports/register.json") for root in roots]
    new = {str(d["version"]) for d in decisions}
    assert len(new) == 2 and not new & before  # one new version per candidate
    holders = [v.version for v in client.search_model_versions(f"name = '{NAME}'")
               if "champion" in client.get_model_version(NAME, v.version).aliases]
    assert len(holders) == 1 and holders[0] in new  # exactly one champion, and one the gate passed
    [first] = new - {holders[0]}
    champion, earlier = client.get_model_version(NAME, holders[0]), client.get_model_version(NAME, first)
    # serialised by the lock: the first was gated against the old champion, the second against the first
    assert earlier.tags["d2d.decision"] == champion.tags["d2d.decision"] == "promoted"
    assert earlier.tags["d2d.compared_with"].startswith(f"version {old_champion}:")
    assert champion.tags["d2d.compared_with"].startswith(f"version {first}:")
    assert earlier.tags["d2d.previous_champion"] == old_champion and champion.tags["d2d.previous_champion"] == first
    assert all(client.get_model_version(NAME, v).tags.get("d2d.decided_at") for v in new)  # both decisions recorded
    assert not [m for m in client.search_registered_models() if m.name.endswith(LOCK_SUFFIX)]  # the lock is gone
