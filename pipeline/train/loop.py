"""The training loop that runs on every Ray Train worker.

Each worker reads its shards of the train and validation Ray Datasets
(`ray.train.get_dataset_shard`) as device tensors, pinned and copied without blocking on a
GPU. Losses and counts stay on the device until the epoch's all-reduce, so no step waits
for the host. Every rank calls `ray.train.report` once per epoch (it is a barrier); only
rank 0 attaches a checkpoint. The checkpoint holds everything needed to resume: model,
optimizer, epoch, early-stopping state and the history so far.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.train.models import ModelSpec, build_model
from pipeline.train.resnet import ResNet, frozen_prefixes, hold_frozen_norms, parameter_groups, set_frozen

if TYPE_CHECKING:
    from ray.data import DataIterator
    from ray.train import Checkpoint

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]

STATE_FILE = "state.pt"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain network inside DDP's wrapper and torch.compile's (their state dicts add prefixes)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _all_sum(t: torch.Tensor) -> list[float]:
    """Sum a tensor of per-rank totals across the worker group (a no-op with one worker); the
    epoch's one wait for the device."""
    t = t.to(torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _share_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (batch norm's running statistics) on every rank. DDP broadcasts them
    at the start of each forward, so after an epoch the other ranks hold their own last
    update; scoring a validation shard with those would not be the model rank 0 checkpoints."""
    if dist.is_available() and dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


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
def score_batches(model: nn.Module, batches: Batches, regression: bool, device: torch.device) -> torch.Tensor:
    """Summed loss, correct predictions (0 for regression) and rows over `batches`, kept on the
    device: one sync at the end, not one per batch."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in batches:
        out = model(x).float()
        totals[0] += loss_fn(out, y, regression, reduction="sum")
        if not regression:
            totals[1] += (out.argmax(1) == y).sum()
        totals[2] += len(y)
    return totals


EVAL_BATCH = 1024  # validation rows a forward pass: no gradients, so more than training's batch


def eval_batch_size(config: dict[str, Any]) -> int:
    """Validation's batch: EVAL_BATCH rows of a table, but the training batch for wide inputs
    (images), whose activations grow with the batch: 1,024 images of 64² through the CNN's
    first block alone are 1.6 GiB, and 224² would be 12 times that. The training batch is
    known to fit, gradients and all."""
    return EVAL_BATCH if config.get("fetch_most", FETCH_ROWS) >= FETCH_ROWS else config["batch_size"]


def split_metrics(loss_sum: float, correct: float, rows: float, regression: bool,
                  target_scale: float = 1.0) -> tuple[float, float]:
    """Mean loss from a split's (all-reduced) totals, and its metric: accuracy, or RMSE in the target's units."""
    mean = loss_sum / max(rows, 1.0)
    return mean, (mean**0.5 * target_scale if regression else correct / max(rows, 1.0))


def evaluate_split(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, regression: bool, target_scale: float = 1.0, batch: int = 1024
) -> tuple[float, float]:
    """Mean loss on a whole split held in tensors, and its metric (the bare-loop benchmark's scoring)."""
    batches = ((x[i : i + batch], y[i : i + batch]) for i in range(0, len(x), batch))
    return split_metrics(*score_batches(model, batches, regression, x.device).tolist(), regression, target_scale)


def _quiet_report_log() -> None:
    """Ray Train logs every report at INFO under a logger named by its file path, which its
    LoggingConfig does not reach; the epoch line printed below is the progress people read."""
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _first_drill(marker: str) -> bool:
    """True once per run: the marker file (beside the run's checkpoints) records the drill."""
    from pipeline.data import io  # here, not at the top: only a drill needs it (and pandas)

    if os.path.exists(marker):
        return False
    io.touch(Path(marker))
    return True


def make_optimizer(model: nn.Module, config: dict[str, Any]) -> torch.optim.Optimizer:
    """The optimizer over every parameter (frozen ones have no gradient and are skipped); a
    ResNet's backbone and head in two groups, the backbone at `backbone_lr_scale` × lr."""
    lr, wd = config["lr"], config["weight_decay"]
    net = unwrap(model)
    params: Any = (parameter_groups(net, lr, config.get("backbone_lr_scale", 1.0)) if isinstance(net, ResNet)
                   else net.parameters())
    if config["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    if config["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    return torch.optim.Adam(params, lr=lr, weight_decay=wd)


def frozen_at(config: dict[str, Any], epoch: int) -> bool:
    """Whether `train.freeze` holds blocks fixed in this (0-based) epoch."""
    thaw = config.get("unfreeze_epoch")
    return config.get("freeze", "none") != "none" and (thaw is None or epoch + 1 < thaw)


def thaw_if_due(worker: Worker, config: dict[str, Any], epoch: int) -> None:
    """From `unfreeze_epoch` on (also after a resume past it), every block trains. DDP fixes
    which parameters it reduces when it wraps the model, so with several workers the model
    is wrapped again (and compiled again when asked)."""
    net = unwrap(worker.model)
    if frozen_at(config, epoch) or all(p.requires_grad for p in net.parameters()):
        return
    import ray.train.torch

    set_frozen(net, ())
    if worker.world_size > 1:
        worker.model = ray.train.torch.prepare_model(torch.compile(net) if config.get("compile") else net)


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


@dataclass
class Worker:
    """What one worker trains with, set up once before its first epoch."""

    rank: int
    world_size: int
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None


@dataclass
class WorkerData:
    """The worker's shards of the train and validation datasets (Ray Data iterators)."""

    train: DataIterator
    val: DataIterator


@dataclass
class Progress:
    """Where training stands: what a checkpoint carries across a restart of the worker group."""

    start_epoch: int = 0
    best_loss: float = float("inf")
    bad_epochs: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    restarts: int = 0


def scaled_lr(lr: float, world_size: int, rule: str) -> float:
    """The learning rate for `world_size` workers: the effective batch grows with them."""
    return lr * {"linear": world_size, "sqrt": world_size**0.5}.get(rule, 1)


def set_up_worker(config: dict[str, Any], warm_start: bool) -> Worker:
    """Seed, device, model (warm-started when `warm_start`, channels-last and compiled when
    asked), optimizer, loss scaler and scheduler. The seeds come first: they fix the model's
    initial weights on every rank."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    torch.manual_seed(config["seed"])
    np.random.seed(config["seed"])
    torch.set_num_threads(config["threads"])
    device = ray.train.torch.get_device()
    model = build_model(ModelSpec.from_dict(config["spec"]))
    if warm_start and config.get("init_state"):
        model.load_state_dict(config["init_state"], strict=False)
    if isinstance(model, ResNet) and frozen_at(config, 0):  # before DDP wraps it: it reduces what trains
        set_frozen(model, frozen_prefixes(model, config["freeze"]))
    if config.get("channels_last"):
        # the convolutions' weights in NHWC; their outputs follow the weights' layout
        model = model.to(memory_format=torch.channels_last)
    if config.get("compile"):
        model = torch.compile(model)  # before DDP's wrapper, which keeps no_sync for accumulation
    model = ray.train.torch.prepare_model(model)
    config = {**config, "lr": scaled_lr(config["lr"], ctx.get_world_size(), config.get("lr_scaling", "none"))}
    optimizer = make_optimizer(model, config)
    # Mixed precision: autocast to bf16/fp16 for the forward pass; fp16 also needs a loss
    # scaler so small gradients do not underflow. Weights and the optimizer stay fp32.
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config["precision"])
    scaler = torch.amp.GradScaler(device.type, enabled=config["precision"] == "fp16")
    scheduler = make_scheduler(optimizer, config)
    return Worker(ctx.get_world_rank(), ctx.get_world_size(), device, model, optimizer, scheduler, scaler, amp_dtype)


def resume(checkpoint: Checkpoint, worker: Worker) -> Progress:
    """Load a checkpoint this loop wrote into the worker's model, optimizer and scheduler,
    after a worker failure; returns the progress it recorded, one restart more."""
    with checkpoint.as_directory() as d:
        state = load_state(os.path.join(d, STATE_FILE), worker.device)
    unwrap(worker.model).load_state_dict(state["model"])
    worker.optimizer.load_state_dict(state["optimizer"])
    if worker.scheduler is not None:
        worker.scheduler.load_state_dict(state["scheduler"])
    progress = Progress(state["epoch"] + 1, state["best_loss"], state["bad_epochs"], state["best_model"],
                        state["history"], state["restarts"] + 1)
    if worker.rank == 0:
        print(f"resumed from the checkpoint of epoch {progress.start_epoch} (restart {progress.restarts})", flush=True)
    return progress


def worker_data() -> WorkerData:
    """This worker's shards of the datasets the trainer was given."""
    import ray.train

    return WorkerData(ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val"))


# Rows fetched from Ray Data at a time, then cut into batches with tensor views: Ray Data's
# per-batch cost (about 0.5 ms here) is then paid once per fetch, not once per small batch.
FETCH_ROWS = 4096


def fetch_rows(batch_size: int, buffer: int | None, most: int = FETCH_ROWS) -> int:
    """Rows per fetch: whole batches, about FETCH_ROWS (fewer for wide inputs: `most`), and
    no more than a local shuffle buffer holds (Ray Data needs the buffer to hold what it yields)."""
    rows = max(1, min(FETCH_ROWS, most) // batch_size) * batch_size
    return min(rows, max(1, buffer // batch_size) * batch_size) if buffer else rows


def batches(shard: DataIterator, config: dict[str, Any], device: torch.device, epoch: int | None = None,
            batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A shard as (inputs, targets) batches on the worker's device; host memory is pinned on a
    GPU so the copies do not block. With `epoch` (training), the local buffer shuffles rows,
    seeded per epoch: reproducible, and a new order each epoch."""
    size = batch_size or config["batch_size"]
    buffer = config["shuffle_buffer"] if epoch is not None and config["shuffle"] == "local" else None
    for fetched in shard.iter_torch_batches(
        batch_size=fetch_rows(size, buffer, config.get("fetch_most", FETCH_ROWS)), prefetch_batches=config["prefetch_batches"], device=device,
        pin_memory=device.type == "cuda", local_shuffle_buffer_size=buffer,
        local_shuffle_seed=config["seed"] + epoch if buffer else None,
    ):
        yield from zip(fetched["x"].split(size), fetched["y"].split(size))


_FLAGS: Any = None  # the process group the per-step flags are reduced in (common_batches)


def _flags_group() -> Any:
    """A gloo group for common_batches' flags: CPU tensors, so that a GPU run does not wait
    for its device at every step (the default group there is NCCL's)."""
    global _FLAGS
    if _FLAGS is None:
        _FLAGS = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _FLAGS


def common_batches(items: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """Each batch with whether it is the last step, for as long as every rank has one (one
    item of lookahead). DDP's ranks must take the same number of steps, or one waits in a
    collective that the others never reach. Ray Data's equal split is meant to give each rank
    the same rows, yet a two-worker epoch of 224² images hung with one rank in the epoch's
    all-reduce and the other still in a forward pass. So at each step the ranks agree (an
    all-reduce of two flags, in gloo) whether all have this batch and the next; a rank with
    batches left stops with the others, and says so."""
    together = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    it = iter(items)
    current = next(it, None)
    while current is not None or together:
        following = next(it, None) if current is not None else None
        flags = torch.tensor([current is not None, following is not None], dtype=torch.int32)
        if together:
            dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=_flags_group())
        if not flags[0]:
            if current is not None:
                print(f"rank {dist.get_rank()}: the other ranks' shards ran out first; this epoch's last "
                      "batches on this rank are skipped, as DDP needs the same steps on every rank", flush=True)
            return
        yield current, not flags[1]
        current = following


def fault_drill(config: dict[str, Any], rank: int, epoch: int) -> None:
    """The configured fault drill: rank 0 exits hard at the start of epoch `fail_at_epoch`, once per run."""
    if rank == 0 and config.get("fail_at_epoch") == epoch + 1 and _first_drill(config["drill_marker"]):
        print(f"fault drill: rank 0 exits hard at epoch {epoch + 1}", flush=True)
        # As a crash mid-epoch would, this leaves the controller a poll to record the last
        # checkpoint; then the process dies without cleanup, like a lost node.
        time.sleep(1.0)
        os._exit(1)


def optimizer_step(worker: Worker, config: dict[str, Any], accumulated: int = 1) -> None:
    """Apply the gradients of `accumulated` micro-batches: rescaled to their mean when fewer
    than grad_accum_steps were left at the end of the shard (each was divided by the full
    count), unscaled and clipped when asked, then step and reset."""
    accum = config.get("grad_accum_steps", 1)
    if accumulated < accum:
        for p in worker.model.parameters():
            if p.grad is not None:
                p.grad.mul_(accum / accumulated)
    if config["grad_clip"]:
        worker.scaler.unscale_(worker.optimizer)
        nn.utils.clip_grad_norm_(worker.model.parameters(), config["grad_clip"])
    worker.scaler.step(worker.optimizer)
    worker.scaler.update()
    worker.optimizer.zero_grad(set_to_none=True)


# Rank 0 prints where a long epoch stands this often: an epoch of 100k images of 224² on
# CPUs takes hours, and the epoch line comes only at its end.
EPOCH_PROGRESS_S = 60.0


def train_epoch(worker: Worker, data: Batches, config: dict[str, Any], epoch: int = 0) -> tuple[float, float, float]:
    """One pass over this rank's shard, an optimizer step every `grad_accum_steps` batches (and
    after the last); returns the mean train loss and the samples seen, both summed over every
    rank, and the epoch's seconds. Rank 0 prints its progress every EPOCH_PROGRESS_S."""
    model, accum = worker.model, config.get("grad_accum_steps", 1)
    started = time.perf_counter()
    next_note, rows = started + EPOCH_PROGRESS_S, 0
    model.train()
    hold_frozen_norms(model)
    worker.optimizer.zero_grad(set_to_none=True)
    totals = torch.zeros(2, dtype=torch.float64, device=worker.device)  # loss sum, rows: on the device
    pending = 0  # micro-batches since the last step
    augmented = image_augmentation(config)
    for i, ((xb, yb), last) in enumerate(common_batches(data)):
        if augmented is not None:
            xb = augmented(xb)
        step = last or (i + 1) % accum == 0
        pending += 1
        # DDP all-reduces gradients on every backward; a micro-batch that is not followed by
        # a step skips that, and the step's backward reduces what accumulated.
        sync = nullcontext() if step or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            with torch.autocast(worker.device.type, dtype=worker.amp_dtype, enabled=worker.amp_dtype is not None):
                out = model(xb)
            loss = loss_fn(out.float(), yb, config["regression"])
            worker.scaler.scale(loss / accum).backward()
        if step:
            optimizer_step(worker, config, pending)
            pending = 0
        totals[0] += loss.detach() * len(yb)
        totals[1] += len(yb)
        rows += len(yb)
        if worker.rank == 0 and time.perf_counter() >= next_note:
            next_note, seconds = time.perf_counter() + EPOCH_PROGRESS_S, time.perf_counter() - started
            print(f"epoch {epoch + 1}/{config['epochs']}: {rows:,} samples on rank 0 in {seconds:.0f} s "
                  f"({rows / max(seconds, 1e-9):,.1f}/s on each of {worker.world_size} workers)", flush=True)
    loss_sum, seen = _all_sum(totals)
    return loss_sum / max(seen, 1.0), seen, time.perf_counter() - started


def image_augmentation(config: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Training batches' augmentation (data.images.augment) on the batch's device, or None:
    the cached inputs are normalised, so it is undone, the image augmented, and redone. A
    manifest's extra columns, after the pixels, pass through as they are."""
    if not config.get("augment"):
        return None
    from pipeline.image_transforms import Augmentation, augment_inputs

    how, shape = Augmentation(**config["augment"]), tuple(config["image_shape"])
    pixels = math.prod(shape)

    def augmented(x: torch.Tensor) -> torch.Tensor:
        images = augment_inputs(x[:, :pixels], shape, how, config["image_mean"], config["image_std"])
        return images if x.shape[1] == pixels else torch.cat([images, x[:, pixels:]], dim=1)

    return augmented


def track_best(worker: Worker, progress: Progress, val_loss: float) -> bool:
    """Record an epoch's validation loss for early stopping; True when it is the best so far,
    whose weights are then kept."""
    if val_loss < progress.best_loss:
        progress.best_loss, progress.bad_epochs = val_loss, 0
        progress.best_state = {k: v.detach().cpu().clone() for k, v in unwrap(worker.model).state_dict().items()}
        return True
    progress.bad_epochs += 1
    return False


def step_scheduler(scheduler: Any, val_loss: float) -> None:
    """Advance the learning-rate schedule once per epoch; the plateau schedule watches validation loss."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_loss)
    elif scheduler is not None:
        scheduler.step()


def checkpoint_state(worker: Worker, progress: Progress, epoch: int) -> dict[str, Any]:
    """What `resume` needs: tensors, state dicts and plain values only (see load_state)."""
    return {
        "model": unwrap(worker.model).state_dict(),
        "optimizer": worker.optimizer.state_dict(),
        "scheduler": worker.scheduler.state_dict() if worker.scheduler is not None else None,
        "epoch": epoch,
        "best_loss": progress.best_loss,
        "bad_epochs": progress.bad_epochs,
        "best_model": progress.best_state,
        "history": progress.history,
        "restarts": progress.restarts,
    }


def report_epoch(row: dict[str, Any], worker: Worker, progress: Progress, epoch: int, improved: bool,
                 config: dict[str, Any]) -> None:
    """Every rank reports the epoch (a barrier); rank 0 also prints it and attaches the checkpoint."""
    import ray.train

    if worker.rank != 0:
        ray.train.report(row)
        return
    metric_name = "val_rmse" if config["regression"] else "val_accuracy"
    print(
        f"epoch {epoch + 1}/{config['epochs']}  train_loss {row['train_loss']:.4f}  "
        f"val_loss {row['val_loss']:.4f}  {metric_name} {row[metric_name]:.4f}" + ("  *" if improved else ""),
        flush=True,
    )
    with tempfile.TemporaryDirectory() as d:
        torch.save(checkpoint_state(worker, progress, epoch), os.path.join(d, STATE_FILE))
        ray.train.report(row, checkpoint=ray.train.Checkpoint.from_directory(d))


def run_epoch(worker: Worker, data: WorkerData, progress: Progress, epoch: int, config: dict[str, Any],
              loop_started: float) -> bool:
    """Train one epoch, score it on validation, step the schedule, report; True when every
    rank is to stop early."""
    train_loss, seen, elapsed = train_epoch(worker, batches(data.train, config, worker.device, epoch), config, epoch)
    # Each rank scores its shard of validation; the all-reduced sums give every rank the
    # whole split's figures, so all agree on early stopping.
    _share_buffers(unwrap(worker.model))
    val = score_batches(unwrap(worker.model), batches(data.val, config, worker.device, batch_size=eval_batch_size(config)),
                        config["regression"], worker.device)
    val_loss, val_metric = split_metrics(*_all_sum(val), config["regression"], config["target_scale"])
    improved = track_best(worker, progress, val_loss)
    lr = worker.optimizer.param_groups[-1]["lr"]  # the rate this epoch trained with (a ResNet's head's)
    step_scheduler(worker.scheduler, val_loss)
    row = {
        "epoch": epoch + 1,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_rmse" if config["regression"] else "val_accuracy": val_metric,
        "lr": lr,
        "samples_per_s": seen / elapsed,
        "epoch_s": elapsed,
        "restarts": progress.restarts,
        "loop_started": loop_started,
        "wall_end": time.time(),
    }
    progress.history.append(row)
    stop = _stop_everywhere(progress.bad_epochs >= config["patience"], worker.device)
    report_epoch(row, worker, progress, epoch, improved, config)
    return stop


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: set up, resume from the latest checkpoint if the worker
    group restarted, then train epoch by epoch until the budget ends or early stopping does."""
    import ray.train

    _quiet_report_log()
    loop_started = time.time()  # with wall_end in each row: start-up cost and per-epoch wall time
    checkpoint = ray.train.get_checkpoint()
    worker = set_up_worker(config, warm_start=checkpoint is None)  # a resume overrides a warm start
    progress = resume(checkpoint, worker) if checkpoint else Progress()
    data = worker_data()
    for epoch in range(progress.start_epoch, config["epochs"]):
        thaw_if_due(worker, config, epoch)
        fault_drill(config, worker.rank, epoch)
        if run_epoch(worker, data, progress, epoch, config, loop_started):
            break
