"""The team-mode sample run in embedded mode, for comparison with `make team-test`: the same
small project (tests' SMALL params, 400 digits), the same steps — a training run, then a
thickened batch through the drift monitor, which retrains — with no servers: Prefect's
temporary server, a local Ray, MLflow on SQLite.

    .venv/bin/python bench/team_vs_embedded.py          # then: time make team-test
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.integration.test_prefect_server import dvc_project  # noqa: E402  the team test's own sample project


def main() -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")}  # embedded: nothing points elsewhere
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    with tempfile.TemporaryDirectory() as tmp:
        root = dvc_project(Path(tmp) / "project")
        started = time.perf_counter()
        steps = [["d2d", "run"], ["d2d", "simulate-drift", "--kind", "thicken", "--strength", "0.8"], ["d2d", "monitor"]]
        for cmd in steps:
            t0 = time.perf_counter()
            out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
            assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
            print(f"{' '.join(cmd):<55} {time.perf_counter() - t0:6.1f} s")
        print(f"{'embedded total (train, then drift → retrain)':<55} {time.perf_counter() - started:6.1f} s")
        assert "1 retrain(s)" in out.stdout, out.stdout[-2000:]


if __name__ == "__main__":
    main()
