"""The Ray runtime that training, tuning, serving and batch predict run on: connect to the
cluster params name, or start a local instance sized for the work, and stop only what was
started here."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.config import Params, TrainParams
from pipeline.errors import D2DError, ServiceError


# A local instance keeps no idle worker process (Ray kills a worker idle for a second). By
# default Ray keeps one per CPU for reuse, each holding the heap its last task grew: after Ray
# Data featurised the splits at 6M rows, two idle workers held 1.8 GiB through the whole of
# training. A cluster's own config is left alone.
LOCAL_WORKER_POOL = {"num_workers_soft_limit": 0}


@contextmanager
def ray_session(params: TrainParams, cpus_needed: int | None = None, dashboard: bool = False) -> Iterator[None]:
    """Use the Ray that is already up, the cluster in train.ray_address or RAY_ADDRESS, or
    start a local one with room for `cpus_needed` (default: the workers plus the driver).

    A local instance for one stage runs without Ray's dashboard unless `dashboard` (serving,
    tuning: Ray Train frees a stopped trial's resources through the State API, which the
    dashboard serves): its processes held about 0.25 GiB through training. A cluster keeps its own.

    Only a Ray instance started or connected here is shut down on exit.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    address = params.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ServiceError(f"cannot connect to the Ray cluster at {address}: {str(e).splitlines()[0]}") from e
    else:
        # Logical CPUs: a 2-core laptop can still host the driver and two 1-CPU workers.
        needed = cpus_needed or params.num_workers * params.cpus_per_worker + 1
        # address="local": a new instance even when `ray start` left a cluster address behind;
        # a cluster is used only when asked for.
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, needed), log_to_driver=True,
                 include_dashboard=dashboard, _system_config=LOCAL_WORKER_POOL)
    try:
        yield
    finally:
        ray.shutdown()


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds when nothing listens at a cluster address; ray.init retries for minutes."""
    import socket
    from urllib.parse import urlsplit

    if address in ("auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise D2DError(f"Ray address {address!r}: expected host:port, ray://host:port or auto")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise ServiceError(f"cannot connect to the Ray cluster at {address}: {e.strerror or e}") from None


def cpus_for_training(params: Params) -> int:
    """Logical CPUs a local Ray needs: the training run's workers, or the concurrent trials'
    (each trial's driver takes one CPU on top of its workers), plus this driver, plus one for
    Ray Data's read and featurise tasks (Ray Train reserves the workers' CPUs away from them:
    without a spare one the data never arrives)."""
    run = params.train.num_workers * params.train.cpus_per_worker
    trials = params.tune.max_concurrent * (params.tune.workers_per_trial * params.train.cpus_per_worker + 1)
    return max(run, trials if params.tune.enabled else 0) + 2
