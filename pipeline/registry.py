"""The only module that talks to MLflow's model registry, and the promotion gate."""

from __future__ import annotations

from typing import Any

from pipeline.config import RegisterParams

CHAMPION, CHALLENGER = "champion", "challenger"


def gate_metric(task: str, params: RegisterParams) -> tuple[str, str, float]:
    """The metric the absolute gate reads: (metrics key, params key, threshold)."""
    if task == "regression":
        return "test_r2", "min_test_r2", params.min_test_r2
    return "test_accuracy", "min_test_accuracy", params.min_test_accuracy


def promotion_decision(
    metrics: dict[str, Any], params: RegisterParams, champion_version: str | None, task: str = "classification"
) -> tuple[bool, list[str]]:
    """The absolute gate: promote the first version that reaches the threshold.

    Comparing a challenger against an existing champion on the same test split is not
    done here yet; until it is, an existing champion is never replaced automatically.
    """
    key, param, threshold = gate_metric(task, params)
    value = float(metrics[key])
    meets = value >= threshold
    reasons = [f"{key} {value:.4f} {'meets' if meets else 'is below'} register.{param}={threshold:g}"]
    if champion_version is not None:
        reasons.append(f"version {champion_version} is already champion; it is kept")
        return False, reasons
    return meets, reasons


def current_champion(client: Any, name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION).version
    except MlflowException:
        return None


def register_and_gate(metrics: dict[str, Any], params: RegisterParams, task: str = "classification") -> dict[str, Any]:
    """Register the evaluated model as a new version (alias challenger); promote it if the gate says so.

    `metrics` is what the evaluate stage wrote: test metrics, the MLflow run id and model URI.
    """
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    champion = current_champion(client, params.model_name)
    run_id = metrics["mlflow_run_id"]
    version = mlflow.register_model(metrics["model_uri"], params.model_name).version
    client.set_registered_model_alias(params.model_name, CHALLENGER, version)
    run = client.get_run(run_id)
    for key in ("d2d.data_md5", "d2d.params_hash", "git.commit"):
        if key in run.data.tags:
            client.set_model_version_tag(params.model_name, version, key, run.data.tags[key])
    promote, reasons = promotion_decision(metrics, params, champion, task)
    if promote:
        client.set_registered_model_alias(params.model_name, CHAMPION, version)
    client.set_model_version_tag(params.model_name, version, "d2d.promotion", "; ".join(reasons))
    return {
        "model_name": params.model_name,
        "version": version,
        "promoted": promote,
        "champion": version if promote else champion,
        "reasons": reasons,
    }
