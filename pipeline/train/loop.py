"""The training loop that runs on every Ray Train worker.

Every rank calls `ray.train.report` once per epoch (it is a barrier); only rank 0 attaches
a checkpoint. The checkpoint holds everything needed to resume: model, optimizer, epoch,
early-stopping state and the history so far.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pipeline.train.models import ModelSpec, build_model

STATE_FILE = "state.pt"


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum per-rank values across the worker group (a no-op with one worker)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _stop_everywhere(stop: bool, device: torch.device) -> bool:
    """Rank 0's early-stopping decision, shared so that every rank leaves the loop together."""
    flag = torch.tensor([int(stop)], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(flag, src=0)
    return bool(flag.item())


def loss_fn(out: torch.Tensor, y: torch.Tensor, regression: bool, reduction: str = "mean") -> torch.Tensor:
    if regression:
        return nn.functional.mse_loss(out.squeeze(1), y, reduction=reduction)
    return nn.functional.cross_entropy(out, y, reduction=reduction)


@torch.no_grad()
def evaluate_split(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, regression: bool, target_scale: float = 1.0, batch: int = 1024
) -> tuple[float, float]:
    """Mean loss on a whole split, and its metric: accuracy, or RMSE in the target's units."""
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x), batch):
        out = model(x[i : i + batch])
        loss += loss_fn(out, y[i : i + batch], regression, reduction="sum").item()
        if not regression:
            correct += (out.argmax(1) == y[i : i + batch]).sum().item()
    mean = loss / len(x)
    return mean, (mean**0.5 * target_scale if regression else correct / len(x))


def _quiet_report_log() -> None:
    """Ray Train logs every report at INFO under a logger named by its file path, which its
    LoggingConfig does not reach; the epoch line printed below is the progress people read."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _first_drill(marker: str) -> bool:
    """True once per run: the marker file (beside the run's checkpoints) records the drill."""
    if os.path.exists(marker):
        return False
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    open(marker, "w").close()
    return True


def make_optimizer(model: nn.Module, config: dict[str, Any]) -> torch.optim.Optimizer:
    lr, wd = config["lr"], config["weight_decay"]
    if config["optimizer"] == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    if config["optimizer"] == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)


def load_state(path: str, map_location: Any) -> dict[str, Any]:
    """A checkpoint this loop wrote: tensors, state dicts and plain Python values only.
    `weights_only` refuses anything else, since unpickling an arbitrary object runs code that
    a tampered checkpoint (shared storage, a copied run folder) could carry."""
    import pickle

    from pipeline.errors import D2DError

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise D2DError(f"refused to load the checkpoint {path}: it holds more than tensors and plain values "
                       f"({str(e).strip().splitlines()[0][:200]})") from None


def make_scheduler(optimizer: torch.optim.Optimizer, config: dict[str, Any]) -> Any:
    """Cosine decay over the epoch budget, or halve the rate when validation loss stalls."""
    if config["schedule"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config["epochs"])
    if config["schedule"] == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=max(1, config["patience"] // 2))
    return None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    _quiet_report_log()
    loop_started = time.time()  # with wall_end below: start-up cost and per-epoch wall time
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(config["seed"])
    np.random.seed(config["seed"])
    torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device()

    spec = ModelSpec.from_dict(config["spec"])
    model = build_model(spec)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("init_state"):  # a warm start; a resume overrides it below
        model.load_state_dict(config["init_state"], strict=False)
    model = ray.train.torch.prepare_model(model)
    optimizer = make_optimizer(model, config)
    # Mixed precision: autocast to bf16/fp16 for the forward pass; fp16 also needs a loss
    # scaler so small gradients do not underflow. Weights and the optimizer stay fp32.
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config["precision"])
    scaler = torch.amp.GradScaler(device.type, enabled=config["precision"] == "fp16")
    scheduler = make_scheduler(optimizer, config)

    start_epoch, best_loss, bad_epochs, best_state, history, restarts = 0, float("inf"), 0, None, [], 0
    if checkpoint:  # resuming after a worker failure
        with checkpoint.as_directory() as d:
            state = load_state(os.path.join(d, STATE_FILE), device)
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        start_epoch, best_loss, bad_epochs = state["epoch"] + 1, state["best_loss"], state["bad_epochs"]
        best_state, history, restarts = state["best_model"], state["history"], state["restarts"] + 1
        if rank == 0:
            print(f"resumed from the checkpoint of epoch {start_epoch} (restart {restarts})", flush=True)

    x_train = torch.tensor(config["x_train"])
    y_train = torch.tensor(config["y_train"])
    x_val = torch.tensor(config["x_val"], device=device)
    y_val = torch.tensor(config["y_val"], device=device)
    loader = ray.train.torch.prepare_data_loader(
        DataLoader(TensorDataset(x_train, y_train), batch_size=config["batch_size"], shuffle=True)
    )

    for epoch in range(start_epoch, config["epochs"]):
        if rank == 0 and config.get("fail_at_epoch") == epoch + 1 and _first_drill(config["drill_marker"]):
            print(f"fault drill: rank 0 exits hard at epoch {epoch + 1}", flush=True)
            # As a crash mid-epoch would, this leaves the controller a poll to record the last
            # checkpoint; then the process dies without cleanup, like a lost node.
            time.sleep(1.0)
            os._exit(1)
        if ctx.get_world_size() > 1:
            loader.sampler.set_epoch(epoch)
        started = time.perf_counter()
        model.train()
        loss_sum, seen = 0.0, 0
        for xb, yb in loader:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model(xb)
            loss = loss_fn(out.float(), yb, config["regression"])
            scaler.scale(loss).backward()
            if config["grad_clip"]:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.item() * len(yb)
            seen += len(yb)
        loss_sum, seen = _all_sum([loss_sum, seen], device)
        elapsed = time.perf_counter() - started
        # Every rank scores the whole validation split with identical weights, so all agree.
        val_loss, val_metric = evaluate_split(_unwrap(model), x_val, y_val, config["regression"], config["target_scale"])
        metric_name = "val_rmse" if config["regression"] else "val_accuracy"
        improved = val_loss < best_loss
        if improved:
            best_loss, bad_epochs = val_loss, 0
            best_state = {k: v.detach().cpu().clone() for k, v in _unwrap(model).state_dict().items()}
        else:
            bad_epochs += 1
        lr = optimizer.param_groups[0]["lr"]  # the rate this epoch trained with
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val_loss)
        elif scheduler is not None:
            scheduler.step()
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "val_loss": val_loss,
            metric_name: val_metric,
            "lr": lr,
            "samples_per_s": seen / elapsed,
            "epoch_s": elapsed,
            "restarts": restarts,
            "loop_started": loop_started,
            "wall_end": time.time(),
        }
        history.append(row)
        stop = _stop_everywhere(bad_epochs >= config["patience"], device)

        if rank == 0:
            print(
                f"epoch {epoch + 1}/{config['epochs']}  train_loss {row['train_loss']:.4f}  "
                f"val_loss {val_loss:.4f}  {metric_name} {val_metric:.4f}" + ("  *" if improved else ""),
                flush=True,
            )
            with tempfile.TemporaryDirectory() as d:
                torch.save(
                    {
                        "model": _unwrap(model).state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict() if scheduler is not None else None,
                        "epoch": epoch,
                        "best_loss": best_loss,
                        "bad_epochs": bad_epochs,
                        "best_model": best_state,
                        "history": history,
                        "restarts": restarts,
                    },
                    os.path.join(d, STATE_FILE),
                )
                ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(row)
        if stop:
            break
