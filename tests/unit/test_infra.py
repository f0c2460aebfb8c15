"""infra/ is parsed and checked here, since no Docker engine or Kubernetes cluster runs on
this machine: the Ray cluster config against Ray's own schema, and the compose file and
manifests for what team mode relies on (startup order, health checks, loopback ports, no
committed secrets, a GPU worker group with autoscaling bounds)."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from tests.conftest import REPO

INFRA = REPO / "infra"


def compose() -> dict:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())


def test_compose_services_start_in_order_behind_health_checks():
    services = compose()["services"]
    assert {"postgres", "minio", "mlflow", "prefect-server", "prefect-worker", "ray-head", "ray-worker"} <= set(services)
    for name, service in services.items():
        for needed, rule in (service.get("depends_on") or {}).items():
            assert needed in services, f"{name} depends on unknown service {needed}"
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[needed], f"{name} waits for {needed}, which has no healthcheck"
    assert services["prefect-worker"]["depends_on"].keys() >= {"prefect-server", "mlflow", "ray-head"}
    assert services["mlflow"]["depends_on"]["minio-buckets"]["condition"] == "service_completed_successfully"


def test_compose_publishes_on_loopback_and_commits_no_secret():
    text = (INFRA / "compose.yaml").read_text()
    for service in compose()["services"].values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), port
    example = dict(line.split("=", 1) for line in (INFRA / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    used = set(re.findall(r"\$\{([A-Z_]+)", text))
    assert used <= set(example), f"variables missing from .env.example: {used - set(example)}"
    for key in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_TOKEN",
                "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert example[key] == "", f"{key} has a value in .env.example"
    assert ".env" in (REPO / ".gitignore").read_text()


def test_compose_points_d2d_at_the_servers_through_the_standard_variables_only():
    env = compose()["x-d2d-env"]
    assert env["PREFECT_API_URL"].startswith("http://prefect-server")
    assert env["MLFLOW_TRACKING_URI"].startswith("http://mlflow")
    assert env["RAY_ADDRESS"].startswith("ray-head") and env["RAY_AUTH_MODE"] == "token"
    assert "MLFLOW_TRACKING_USERNAME" in env and "MLFLOW_TRACKING_PASSWORD" in env
    assert "--app-name basic-auth" in (INFRA / "mlflow/start.sh").read_text()  # MLflow refuses anonymous clients
    assert "capabilities: [gpu]" in (INFRA / "compose.yaml").read_text()  # the (commented) GPU reservation


def test_kuberay_cluster_has_a_cpu_head_and_an_autoscaling_gpu_group():
    cluster = yaml.safe_load((INFRA / "k8s/raycluster.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    [gpu] = cluster["spec"]["workerGroupSpecs"]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    [container] = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    job = yaml.safe_load((INFRA / "k8s/rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["entrypoint"].startswith("d2d stage train --root")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]


def test_kubernetes_secrets_come_from_secret_refs():
    for path in (INFRA / "k8s").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            text = yaml.safe_dump(doc)
            for key in ("RAY_AUTH_TOKEN", "MLFLOW_TRACKING_PASSWORD"):
                for match in re.finditer(rf"name: {key}\n(\s+)(\S+):", text):
                    assert match.group(2) == "valueFrom", f"{path.name}: {key} is not from a secret"
    worker = yaml.safe_load((INFRA / "k8s/prefect-worker.yaml").read_text())
    [container] = worker["spec"]["template"]["spec"]["containers"]
    assert "d2d-process" in " ".join(container["command"])


def test_the_ray_cluster_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((INFRA / "ray/cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    assert config["available_node_types"]["gpu_worker"]["resources"]["GPU"] == 1
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["max_workers"] = "four"
    with pytest.raises(Exception, match="four"):
        validate_config(prepare_config(broken))
