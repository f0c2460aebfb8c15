"""The promotion gate's lock: a sentinel registered model in a real MLflow registry (SQLite in a
temporary folder). One holder at a time, the others wait; a lock left by a crash is broken."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline import registry


@pytest.fixture
def client(tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_one_holder_at_a_time_and_the_lock_is_released(client, caplog):
    order: list[str] = []
    with registry.gate_lock(client, "m"):
        def second() -> None:
            with registry.gate_lock(client, "m"):
                order.append("second in")
        waiter = threading.Thread(target=second)
        waiter.start()
        time.sleep(1.5)
        order.append("first out")
    waiter.join(timeout=30)
    assert order == ["first out", "second in"]
    assert "waiting for m's promotion gate" in caplog.text
    assert not [m for m in client.search_registered_models() if m.name.endswith(registry.LOCK_SUFFIX)]


def test_a_stale_lock_left_by_a_crash_is_broken(client, monkeypatch, caplog):
    client.create_registered_model(f"m{registry.LOCK_SUFFIX}", tags={"d2d.lock_acquired_at": f"{time.time() - 10:.6f}",
                                                                     "d2d.lock_holder": "gone:1"})
    monkeypatch.setattr(registry, "LOCK_STALE_S", 5.0)
    with registry.gate_lock(client, "m", wait_s=30):
        pass
    assert "breaking m's gate lock, left by gone:1" in caplog.text


def test_a_lock_that_stays_held_is_a_clear_error(client):
    client.create_registered_model(f"m{registry.LOCK_SUFFIX}", tags={"d2d.lock_acquired_at": f"{time.time():.6f}"})
    with pytest.raises(registry.ServiceError, match="stayed locked"):
        with registry.gate_lock(client, "m", wait_s=1):
            pass
