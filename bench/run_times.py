"""Wall time of `d2d run` on the default dataset: a first run, a second with nothing changed,
and one after changing only a training param (in params.yaml, so DVC sees it), with the
orchestration overhead: wall time minus the time spent inside the steps (reports/timings.json).

Run it in a scratch clone after `make install` (it edits params.yaml and restores it):
    git clone . /tmp/rt && cd /tmp/rt && make install data && .venv/bin/python bench/run_times.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path.cwd()


def d2d_run() -> tuple[float, dict]:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    started = time.perf_counter()
    out = subprocess.run([str(Path(sys.executable).parent / "d2d"), "run"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    wall = time.perf_counter() - started
    if out.returncode:
        sys.exit(f"d2d run failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return wall, json.loads((ROOT / "reports/timings.json").read_text())


def show(label: str, wall: float, timings: dict) -> None:
    steps = sum(t["step_s"] for t in timings.values())
    dvc = sum(t["dvc_s"] for t in timings.values())
    ran = [n for n, t in timings.items() if t["how"] == "ran"]
    print(f"{label:<34} wall {wall:6.1f} s   in steps {steps:6.1f} s   dvc status/commit {dvc:5.1f} s   "
          f"overhead (wall − steps) {wall - steps:5.1f} s   ran: {', '.join(ran) or 'none'}")
    for name, t in timings.items():
        print(f"    {name:<13} {t['how']:<7} step {t['step_s']:6.2f} s   dvc {t['dvc_s']:5.2f} s")


def main() -> None:
    params_path = ROOT / "params.yaml"
    original = params_path.read_text()
    show("first run", *d2d_run())
    show("second run, nothing changed", *d2d_run())
    params = yaml.safe_load(original)
    params["train"]["lr"] = params["train"]["lr"] * 1.5
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        show("after changing train.lr only", *d2d_run())
    finally:
        params_path.write_text(original)


if __name__ == "__main__":
    main()
