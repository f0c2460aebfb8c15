"""Checkpoints load with torch's weights_only: what the training loop saves (state dicts,
tensors, plain values) loads; a checkpoint that pickles an arbitrary object is refused
instead of running the object's code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pipeline.errors import D2DError
from pipeline.train.loop import STATE_FILE, make_optimizer, make_scheduler
from pipeline.train.trainer import read_checkpoint

RAN: list[str] = []


class Payload:
    """What a tampered checkpoint could hold: unpickling it calls a function of the attacker's choice."""

    def __reduce__(self):
        return (RAN.append, ("code from the checkpoint ran",))


def checkpoint(folder: Path, state: dict):
    from ray.train import Checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / STATE_FILE)
    return Checkpoint.from_directory(str(folder))


def loop_state(schedule: str) -> dict:
    """The dict train_loop_per_worker saves each epoch, with real optimizer and scheduler state."""
    model = torch.nn.Linear(4, 3)
    config = {"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.0, "momentum": 0.9, "schedule": schedule,
              "epochs": 5, "patience": 2}
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step(*([0.5] if schedule == "plateau" else []))
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None, "epoch": 1, "best_loss": 0.5,
            "bad_epochs": 0, "best_model": {k: v.clone() for k, v in model.state_dict().items()},
            "history": [{"epoch": 1, "train_loss": 0.7, "val_accuracy": 0.5, "lr": 0.01, "restarts": 0}], "restarts": 0}


@pytest.mark.parametrize("schedule", ["cosine", "plateau", "none"])
def test_what_the_loop_saves_loads_under_weights_only(tmp_path, schedule):
    state = loop_state(schedule)
    back = read_checkpoint(checkpoint(tmp_path, state))
    assert back["history"] == state["history"] and back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert all(torch.equal(back["model"][k], v) for k, v in state["model"].items())


def test_a_checkpoint_holding_an_arbitrary_object_is_refused_unrun(tmp_path):
    state = {**loop_state("cosine"), "history": [Payload()]}
    with pytest.raises(D2DError, match="refused to load the checkpoint"):
        read_checkpoint(checkpoint(tmp_path, state))
    assert RAN == []


def test_numpy_values_are_refused_too(tmp_path):
    """weights_only admits no numpy objects: the loop must keep saving plain floats."""
    import numpy as np

    with pytest.raises(D2DError, match="refused"):
        read_checkpoint(checkpoint(tmp_path, {"best_loss": np.float64(0.5)}))
    assert os.path.isfile(tmp_path / STATE_FILE)
