"""The only module that talks to MLflow's model registry, and the promotion gate.

A candidate becomes a new version with alias `challenger`. It takes the `champion` alias
only if it meets the absolute thresholds in params and is not worse than the current
champion, re-scored (pipeline.scoring) on the same current test split, by more than `register.tolerance`.
Every decision is written to the version's tags with its reasons.
"""

from __future__ import annotations

import getpass
import logging
import math
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline import scoring
from pipeline.config import RegisterParams
from pipeline.data.schema import Schema
from pipeline.errors import D2DError, ServiceError
from pipeline.summaries import Evaluated, Registered

CHAMPION, CHALLENGER = "champion", "challenger"
LOCK_SUFFIX = ".d2d-gate-lock"  # the sentinel model that is the gate's lock (see gate_lock)
LOCK_STALE_S = 900.0  # a lock older than this was left by a crashed gate and may be broken
HOLD_DRILL = "D2D_GATE_HOLD_S"  # a test drill: hold the lock this long after deciding, to force an overlap

logger = logging.getLogger(__name__)


@contextmanager
def gate_lock(client: Any, name: str, wait_s: float = 1800.0) -> Iterator[None]:
    """One gate decision at a time per registered model, across processes and machines.
    MLflow has no compare-and-set on an alias, but creating a registered model is atomic (its
    name is unique in the registry's database), so a sentinel model `<name>.d2d-gate-lock` is
    the lock: whoever creates it decides, the others wait, and it is deleted afterwards. A
    lock left by a crash is broken after LOCK_STALE_S."""
    from mlflow.exceptions import MlflowException

    sentinel, said = f"{name}{LOCK_SUFFIX}", False
    deadline = time.monotonic() + wait_s
    while True:
        stamp = f"{time.time():.6f}"
        try:
            client.create_registered_model(sentinel, tags={"d2d.lock_acquired_at": stamp,
                                                          "d2d.lock_holder": f"{socket.gethostname()}:{os.getpid()}"},
                                           description=f"d2d's promotion-gate lock for {name}; deleted when the gate has decided")
            break
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        held = _lock_tags(client, sentinel)
        if held is not None and time.time() - float(held.get("d2d.lock_acquired_at", "0") or 0) > LOCK_STALE_S:
            logger.warning("breaking %s's gate lock, left by %s more than %.0f s ago", name, held.get("d2d.lock_holder"), LOCK_STALE_S)
            _unlock(client, sentinel)
            continue
        if not said and held is not None:
            logger.warning("waiting for %s's promotion gate, held by %s", name, held.get("d2d.lock_holder"))
            said = True
        if time.monotonic() > deadline:
            raise ServiceError(f"{name}'s promotion gate stayed locked for {wait_s:.0f} s ({sentinel} exists); "
                               "if no gate is running, delete that registered model and run register again")
        time.sleep(0.5)
    try:
        yield
    finally:
        _unlock(client, sentinel)


def _lock_tags(client: Any, sentinel: str) -> dict[str, str] | None:
    from mlflow.exceptions import MlflowException

    try:
        return dict(client.get_registered_model(sentinel).tags)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":  # released meanwhile
            return None
        raise


def _unlock(client: Any, sentinel: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(sentinel)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def gate_metric(task: str, params: RegisterParams) -> tuple[str, str, float]:
    """The metric the absolute gate reads: (metrics key, params key, threshold)."""
    if task == "regression":
        return "test_r2", "min_test_r2", params.min_test_r2
    return "test_accuracy", "min_test_accuracy", params.min_test_accuracy


def compare_metric(task: str, params: RegisterParams) -> str:
    """The metric challenger and champion are compared on (higher is better)."""
    return f"test_{params.compare_metric or ('r2' if task == 'regression' else 'f1_macro')}"


def promotion_decision(
    metrics: dict[str, Any], params: RegisterParams, champion: dict[str, Any] | None = None, task: str = "classification"
) -> tuple[bool, list[str]]:
    """(a) the absolute threshold; (b) no worse than the champion's score on the same test
    split, within the tolerance. `champion` is {"version", "metrics"} or None (no champion yet)."""
    key, param, threshold = gate_metric(task, params)
    value = float(metrics[key])
    meets = value >= threshold
    reasons = [f"{key} {value:.4f} {'meets' if meets else 'is below'} register.{param}={threshold:g}"]
    if champion is None:
        reasons.append("no champion yet")
        return meets, reasons
    if "error" in champion:  # it cannot score today's data at all: only the absolute gate applies
        reasons.append(f"champion version {champion['version']} cannot score the current test split "
                       f"({champion['error']}); compared on the absolute gate only")
        return meets, reasons
    metric = compare_metric(task, params)
    mine, theirs = float(metrics[metric]), float(champion["metrics"][metric])
    holds = mine >= theirs - params.tolerance
    reasons.append(
        f"{metric} {mine:.4f} vs champion version {champion['version']} {theirs:.4f} on the same test split "
        f"({mine - theirs:+.4f}; register.tolerance={params.tolerance:g}): "
        + ("not worse beyond the tolerance" if holds else "worse beyond the tolerance")
    )
    return meets and holds, reasons


def champion_card(name: str, metric: str) -> dict[str, Any] | None:
    """The champion now, pinned to its version: URI, the data it was trained on and its test
    `metric` as recorded at registration; None when there is no champion."""
    from mlflow import MlflowClient

    champ = current_champion(MlflowClient(), name)
    if champ is None:
        return None
    recorded = champ.tags.get(f"d2d.{metric}")
    return {"version": champ.version, "uri": f"models:/{name}/{champ.version}", "data_md5": champ.tags.get("d2d.data_md5"),
            "metric": metric, "test_metric": float(recorded) if recorded is not None else None}


def _rescore(model_uri: str, version: str, test: Path, schema: Schema, sample_rows: int) -> dict[str, Any]:
    """The champion's metrics on the current test split (read in batches), or why it could not be scored."""
    from mlflow.exceptions import MlflowException

    from pipeline.data import io
    from pipeline.tracking import unreachable

    try:
        # images: fewer rows at a time (a table's rows are few bytes whatever their shape)
        rows = io.score_rows(math.prod(schema.input_shape) if schema.images is not None and schema.input_shape else 1)
        return {"version": version, "metrics": scoring.score_model(model_uri, io.read_batches(test, rows), schema,
                                                                   sample_rows)}
    except (MlflowException, KeyError, ValueError, TypeError) as e:
        if unreachable(e):  # an outage is not a champion that cannot score: fail, retry later
            raise
        return {"version": version, "error": str(e).strip().splitlines()[-1][:300]}


def current_champion(client: Any, name: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def resolve_alias(name: str, alias: str) -> tuple[str, dict[str, str]] | None:
    """(version, tags) the alias points at now; None when the model or alias does not exist."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        current = MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    return str(current.version), dict(current.tags)


def version_for_run(client: Any, name: str, run_id: str) -> str | None:
    """The version already registered from this run, so a retried registration reuses it."""
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return min((v.version for v in versions), key=int) if versions else None


def _set_champion(client: Any, name: str, version: str, previous: str | None, tags: dict[str, str]) -> None:
    """Move the alias first (the shortest window after the last check), then record where it
    came from, so `d2d rollback` can move it back."""
    client.set_registered_model_alias(name, CHAMPION, version)
    if previous is not None and previous != version:
        client.set_model_version_tag(name, version, "d2d.previous_champion", previous)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def register_and_gate(
    evaluated: Evaluated, params: RegisterParams, task: str, test: Path, schema: Schema, sample_rows: int
) -> Registered:
    """Register the evaluated model (once per run), gate it against the champion re-scored on
    the test split file `test` as evaluate scored the challenger (`sample_rows`: evaluate's),
    move the alias if it passes."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    metrics = evaluated.metrics
    name, run_id = params.model_name, evaluated.mlflow_run_id
    version = version_for_run(client, name, run_id) or mlflow.register_model(evaluated.model_uri, name).version
    client.set_registered_model_alias(name, CHALLENGER, version)
    run = client.get_run(run_id)
    for key in ("d2d.data_md5", "d2d.data_path", "d2d.params_hash", "git.commit", "prefect.flow_run_id", "d2d.init_from"):
        if key in run.data.tags:
            client.set_model_version_tag(name, version, key, run.data.tags[key])
    for key in ("test_accuracy", "test_f1_macro", "test_roc_auc_ovr", "test_r2", "test_rmse"):
        if key in metrics:
            client.set_model_version_tag(name, version, f"d2d.{key}", f"{float(metrics[key]):.6f}")

    # The decision and the alias move happen under the gate's lock, so a challenger is always
    # compared with the champion it would replace, even when two registrations race.
    with gate_lock(client, name):
        champ = current_champion(client, name)
        if champ is not None and champ.version == version:  # a retry after this version was promoted
            return _decision(name, version, True, version, ["already champion (a retried registration)"], None)
        compared = None if champ is None else _rescore(f"models:/{name}/{champ.version}", champ.version, test, schema,
                                                   sample_rows)
        promote, reasons = promotion_decision(metrics, params, compared, task)
        previous = champ.version if champ is not None else None
        tags = {"d2d.decision": "promoted" if promote else "rejected", "d2d.promotion": "; ".join(reasons),
                "d2d.decided_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if compared is not None and "metrics" in compared:
            tags["d2d.compared_with"] = f"version {compared['version']}: " + ", ".join(
                f"{k} {v:.4f}" for k, v in compared["metrics"].items())
        if promote:
            _set_champion(client, name, version, previous, tags)
        else:
            for key, value in tags.items():
                client.set_model_version_tag(name, version, key, value)
        if os.environ.get(HOLD_DRILL):
            time.sleep(float(os.environ[HOLD_DRILL]))
    return _decision(name, version, promote, version if promote else previous, reasons, compared)


def _decision(name: str, version: str, promoted: bool, champion: str | None, reasons: list[str],
              compared: dict | None) -> Registered:
    return Registered(name, int(version), promoted, int(champion) if champion is not None else None, tuple(reasons),
                      compared)


def promote(name: str, version: str, reason: str) -> dict[str, Any]:
    """A person moves `champion` to a version; who and why are recorded on it."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        client.get_model_version(name, version)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise D2DError(f"{name} has no version {version}") from None
    with gate_lock(client, name):  # not in the middle of a gate's decision
        champ = current_champion(client, name)
        previous = champ.version if champ is not None else None
        _set_champion(client, name, version, previous, {
            "d2d.decision": "promoted by hand", "d2d.promoted_by": getpass.getuser(), "d2d.promotion": reason,
            "d2d.decided_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return {"model_name": name, "champion": version, "previous": previous}


def rollback(name: str, reason: str) -> dict[str, Any]:
    """Move `champion` back to the version it replaced (recorded when it was promoted)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    champ = current_champion(client, name)
    if champ is None:
        raise D2DError(f"{name} has no champion to roll back")
    previous = champ.tags.get("d2d.previous_champion")
    if previous is None:
        raise D2DError(f"{name} version {champ.version} replaced no earlier champion; nothing to roll back to")
    client.set_model_version_tag(name, champ.version, "d2d.rolled_back", f"by {getpass.getuser()}: {reason}")
    target = client.get_model_version(name, previous)
    for key, value in {"d2d.decision": "restored by rollback", "d2d.promoted_by": getpass.getuser(),
                       "d2d.promotion": reason, "d2d.decided_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}.items():
        client.set_model_version_tag(name, previous, key, value)
    client.set_registered_model_alias(name, CHAMPION, target.version)
    return {"model_name": name, "champion": previous, "previous": champ.version}
