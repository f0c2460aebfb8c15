"""infra/ is parsed and checked here, since no Docker engine or Kubernetes cluster runs on
this machine: the Ray cluster config against Ray's own schema, and the compose file and
manifests for what team mode relies on (startup order, health checks, loopback ports, no
committed secrets, a GPU worker group with autoscaling bounds)."""

from __future__ import annotations

import copy
import configparser
import os
import re
import subprocess
import sys
from pathlib import Path

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
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    assert used <= set(example), f"variables missing from .env.example: {used - set(example)}"
    for key in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_TRACKING_PASSWORD", "RAY_AUTH_TOKEN",
                "MLFLOW_FLASK_SERVER_SECRET_KEY", "PREFECT_API_AUTH_STRING", "D2D_SERVE_TOKEN"):
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
            for key in ("RAY_AUTH_TOKEN", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING", "D2D_SERVE_TOKEN"):
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


def k8s_docs() -> list[tuple[str, dict]]:
    return [(p.name, doc) for p in sorted((INFRA / "k8s").glob("*.yaml")) for doc in yaml.safe_load_all(p.read_text())]


def pod_specs(node, found=None) -> list[dict]:
    """Every pod spec in a manifest: a dict with `containers`."""
    found = [] if found is None else found
    if isinstance(node, dict):
        if "containers" in node:
            found.append(node)
        for value in node.values():
            pod_specs(value, found)
    elif isinstance(node, list):
        for value in node:
            pod_specs(value, found)
    return found


def dockerfile_stages() -> list[str]:
    return re.findall(r"^FROM\s+(\S+)", (INFRA / "docker/d2d.Dockerfile").read_text(), flags=re.M)


def pinned(image: str) -> bool:
    """An exact version (or a digest): no `latest`, no bare name, no floating major or minor."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag or tag == "latest":
        return False
    if name.endswith("python"):  # Python's tags float on 3.11; 3.11.7 is one release
        return re.match(r"\d+\.\d+\.\d+", tag) is not None
    return re.match(r"(RELEASE\.\d{4}-\d\d-\d\dT|\d+\.\d+)", tag) is not None


@pytest.mark.parametrize("image, ok", [("postgres:17", False), ("minio/minio:latest", False), ("python:3.11-slim", False),
                                       ("postgres", False), ("ghcr.io/x/d2d", False), ("localhost:5000/d2d", False),
                                       ("postgres:17.6-bookworm", True), ("minio/mc:RELEASE.2025-04-16T18-13-26Z", True),
                                       ("python:3.11.7-slim-bookworm", True), ("d2d@sha256:" + "0" * 64, True)])
def test_the_pin_rule(image, ok):
    assert pinned(image) is ok


def test_every_image_is_pinned():
    images = [s["image"] for s in compose()["services"].values() if "image" in s]
    images += [c["image"] for _, doc in k8s_docs() for spec in pod_specs(doc) for c in spec["containers"]]
    images += dockerfile_stages()
    assert len(images) >= 10 and all(images)
    assert [i for i in images if not pinned(i)] == []
    for name, service in compose()["services"].items():
        assert "image" in service, f"{name}: a built service is tagged, so every container names its version"


def test_no_container_runs_as_root():
    for name, service in compose()["services"].items():
        user = str(service.get("user", ""))
        assert user and not re.match(r"(0|root)(:|$)", user), f"compose service {name} runs as root"
    users = re.findall(r"^USER\s+(\S+)", (INFRA / "docker/d2d.Dockerfile").read_text(), flags=re.M)
    assert users and not re.match(r"(0|root)(:|$)", users[-1]), "the d2d image runs as root"
    specs = [(path, spec) for path, doc in k8s_docs() for spec in pod_specs(doc)]
    assert len(specs) == 4
    for path, spec in specs:
        context = spec.get("securityContext", {})
        assert context.get("runAsNonRoot") is True and context.get("runAsUser", 0) > 0, f"{path}: a pod may run as root"


def test_prefect_server_and_every_client_use_basic_auth():
    services = compose()["services"]
    server = services["prefect-server"]["environment"]
    assert server["PREFECT_SERVER_API_AUTH_STRING"] == "${PREFECT_API_AUTH_STRING:?set in .env}"
    assert compose()["x-d2d-env"]["PREFECT_API_AUTH_STRING"] == "${PREFECT_API_AUTH_STRING:?set in .env}"
    assert services["prefect-worker"]["environment"]["PREFECT_API_AUTH_STRING"]  # through the anchor
    [worker] = pod_specs(yaml.safe_load((INFRA / "k8s/prefect-worker.yaml").read_text()))
    env = {e["name"]: e for e in worker["containers"][0]["env"]}
    assert env["PREFECT_API_AUTH_STRING"]["valueFrom"]["secretKeyRef"]["name"] == "d2d-secrets"


def test_team_mode_sets_the_serving_token_params_name():
    variable = yaml.safe_load((REPO / "params.yaml").read_text())["serve"]["auth_token_env"]
    assert variable and compose()["x-d2d-env"][variable] == f"${{{variable}:?set in .env}}"
    for path, doc in k8s_docs():
        if path in ("prefect-worker.yaml", "raycluster.yaml"):
            [head, *_] = pod_specs(doc)
            env = {e["name"]: e for e in head["containers"][0]["env"]}
            assert "secretKeyRef" in env[variable]["valueFrom"], path


def test_no_password_is_pasted_into_a_url():
    for path in ("compose.yaml", "mlflow/start.sh"):
        text = (INFRA / path).read_text()
        assert not re.search(r"://[^\s\"']*\$\{?[A-Z_]*PASSWORD", text), f"{path} puts a raw password in a URL"


def test_mlflow_start_escapes_the_database_password(tmp_path):
    """infra/mlflow/start.sh, run with a stand-in `mlflow` that records what it was given: the
    URLs and the auth .ini carry the password intact, whatever characters it holds."""
    import sqlalchemy

    fake = tmp_path / "bin/mlflow"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/args\ncp "$MLFLOW_AUTH_CONFIG_PATH" {tmp_path}/ini\n')
    fake.chmod(0o755)
    password, user = "p@ss:w/rd%41#?& x", "d2d@team"
    env = {"PATH": f"{fake.parent}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}/usr/bin:/bin",
           "POSTGRES_USER": user, "POSTGRES_PASSWORD": password, "MLFLOW_AUTH_ADMIN_USERNAME": "admin"}
    done = subprocess.run(["sh", str(INFRA / "mlflow/start.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "args").read_text().splitlines()
    backend = sqlalchemy.make_url(args[args.index("--backend-store-uri") + 1])
    ini = configparser.ConfigParser()  # read as MLflow reads it
    ini.read(tmp_path / "ini")
    auth = sqlalchemy.make_url(ini["mlflow"]["database_uri"])
    for url, database in ((backend, "mlflow"), (auth, "mlflow_auth")):
        assert (url.username, url.password, url.host, url.database) == (user, password, "postgres", database)


def test_every_package_the_image_installs_is_pinned():
    """What constraints.txt does not pin is pinned in the Dockerfile itself: an unpinned
    package makes two builds of the same tag differ."""
    from packaging.requirements import Requirement

    constrained = {Requirement(line).name.lower() for line in (REPO / "constraints.txt").read_text().splitlines()
                   if line.strip() and not line.startswith("#")}
    installs = re.findall(r"pip install ([^\n]+)", (INFRA / "docker/d2d.Dockerfile").read_text())
    assert installs
    for line in installs:
        for token in line.split():
            if token.startswith("-") or token in (".", "constraints.txt"):
                continue
            requirement = Requirement(token.strip("\"'"))
            assert requirement.name.lower() in constrained or str(requirement.specifier).startswith("=="), token
    # and every Ray client in k8s speaks token auth, as Ray 2.60's clusters require
    for name, doc in k8s_docs():
        for spec in pod_specs(doc):
            for container in spec.get("containers", []):
                names = {e["name"]: e for e in container.get("env", [])}
                if "RAY_AUTH_TOKEN" in names:
                    assert names.get("RAY_AUTH_MODE", {}).get("value") == "token", (name, container["name"])


def _install_commands(path: str, *args: str) -> subprocess.CompletedProcess:
    """What `make install` would run (a dry run, every step forced), with `path` as PATH and no
    D2D_TORCH or make variables inherited (a `make test D2D_TORCH=cuda` passes them down)."""
    env = {k: v for k, v in os.environ.items() if k not in ("D2D_TORCH", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", "-n", "-B", "install", *args], cwd=REPO, capture_output=True, text=True,
                          env={**env, "PATH": path}, timeout=60)


def _stand_in_nvidia_smi(folder: Path, answers: bool) -> str:
    """A PATH whose first `nvidia-smi` answers as a driver does, or fails as on a machine without one."""
    folder.mkdir()
    script = "echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'" if answers else "exit 9"
    (folder / "nvidia-smi").write_text(f"#!/bin/sh\n{script}\n")
    (folder / "nvidia-smi").chmod(0o755)
    return f"{folder}:/usr/bin:/bin:{Path(sys.executable).parent}"


def test_make_install_picks_the_cuda_build_of_the_same_torch_where_an_nvidia_driver_answers(tmp_path):
    """No GPU here: a stand-in `nvidia-smi` is the only thing mocked. What is checked is the
    install the Makefile then runs, and its last step, the check that torch is a CUDA build,
    runs for real against this machine's CPU torch and must refuse it."""
    without, with_gpu = _stand_in_nvidia_smi(tmp_path / "none", False), _stand_in_nvidia_smi(tmp_path / "gpu", True)
    cpu = _install_commands(without)
    assert cpu.returncode == 0, cpu.stderr
    assert "-c constraints.txt" in cpu.stdout and "cuda" not in cpu.stdout and ".installed-cpu" in cpu.stdout
    gpu = _install_commands(with_gpu)
    assert gpu.returncode == 0, gpu.stderr
    steps = gpu.stdout.splitlines()
    assert "-c .venv/constraints-cuda.txt" in gpu.stdout and steps[-1] == "touch .venv/.installed-cuda"
    # the same version, PyPI's CUDA build: only the +cpu local tag goes
    sed = next(line for line in steps if line.startswith("sed "))
    out = subprocess.run(["bash", "-c", sed.split(" > ")[0]], cwd=REPO, capture_output=True, text=True, check=True).stdout
    pinned = (REPO / "constraints.txt").read_text().splitlines()
    assert [a for a, b in zip(pinned, out.splitlines()) if a != b] == ["torch==2.13.0+cpu"]
    assert [line for line in out.splitlines() if line.startswith("torch==")] == ["torch==2.13.0"]
    # a CPU build in the venv would satisfy torch==2.13.0: it is removed before the install...
    uninstall = next(i for i, line in enumerate(steps) if "pip uninstall -q -y torch" in line)
    assert uninstall < next(i for i, line in enumerate(steps) if "constraints-cuda.txt -e" in line)
    # ...and the install fails, naming why, if pip still chose a CPU build (as it must here)
    check = subprocess.run(["bash", "-c", steps[-3]], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert check.returncode == 1 and "is a CPU build" in check.stderr and "D2D_TORCH=cpu" in check.stderr
    # the variable decides over the detection, both ways
    assert "constraints-cuda" in _install_commands(without, "D2D_TORCH=cuda").stdout
    assert "-c constraints.txt" in _install_commands(with_gpu, "D2D_TORCH=cpu").stdout
    bad = _install_commands(without, "D2D_TORCH=rocm")
    assert bad.returncode != 0 and "D2D_TORCH=rocm: expected cpu or cuda" in bad.stderr
