"""The worker loop's pieces on plain tensors, without Ray: sharded validation sums, gradient
accumulation, the learning-rate rule, when the features are cached, and the ingest params'
errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config import TrainParams
from pipeline.errors import ConfigError
from pipeline.train.ingest import feature_bytes, should_cache
from pipeline.train.loop import (
    Worker, unwrap, common_batches, evaluate_split, scaled_lr, score_batches, split_metrics, train_epoch,
)

CPU = torch.device("cpu")


def data(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 6, generator=g), torch.randint(0, 3, (rows,), generator=g)


def chunks(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


@pytest.mark.parametrize("ranks", [2, 3, 5])
@pytest.mark.parametrize("regression", [False, True])
def test_validation_sums_over_shards_equal_the_whole_split(ranks, regression):
    """What the all-reduce adds up: each rank's totals over its shard give the whole split's
    loss and metric, whatever the shards' sizes (an uneven cut drops no row)."""
    torch.manual_seed(0)
    model = nn.Linear(6, 1 if regression else 3)
    x, y = data(101)
    if regression:
        y = y.float()
    whole = evaluate_split(model, x, y, regression, target_scale=2.0)
    cuts = torch.tensor_split(torch.arange(101), ranks)
    totals = sum(score_batches(model, chunks(x[c], y[c], 7), regression, CPU) for c in cuts)
    assert totals[2].item() == 101
    assert split_metrics(*totals.tolist(), regression, 2.0) == pytest.approx(whole, rel=1e-6)


def test_an_empty_shard_counts_nothing():
    totals = score_batches(nn.Linear(6, 3), [], regression=False, device=CPU)
    assert totals.tolist() == [0.0, 0.0, 0.0]


def worker(model: nn.Module, lr: float = 0.1) -> Worker:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return Worker(0, 1, CPU, model, opt, None, torch.amp.GradScaler("cpu", enabled=False), None)


CONFIG = {"regression": False, "grad_clip": None}


def test_gradient_accumulation_matches_the_larger_batch():
    """Two accumulated batches of 16 step exactly like one batch of 32 (mean loss, plain SGD)."""
    x, y = data(64)
    torch.manual_seed(1)
    a = nn.Linear(6, 3)
    b = nn.Linear(6, 3)
    b.load_state_dict(a.state_dict())
    loss_a, seen_a, _ = train_epoch(worker(a), chunks(x, y, 32), {**CONFIG, "grad_accum_steps": 1})
    loss_b, seen_b, _ = train_epoch(worker(b), chunks(x, y, 16), {**CONFIG, "grad_accum_steps": 2})
    assert seen_a == seen_b == 64
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    # the reported loss is each batch's loss before its step, so only the first steps agree in kind
    assert loss_a > 0 and loss_b > 0


def test_a_leftover_micro_batch_steps_with_its_own_mean():
    """5 batches of 10 with accumulation 2 step like batches of 20, 20 and 10: the last, lone
    micro-batch is not scaled down by the full accumulation count."""
    x, y = data(50)
    torch.manual_seed(2)
    a, b = nn.Linear(6, 3), nn.Linear(6, 3)
    b.load_state_dict(a.state_dict())
    train_epoch(worker(a), [(x[:20], y[:20]), (x[20:40], y[20:40]), (x[40:], y[40:])], {**CONFIG, "grad_accum_steps": 1})
    train_epoch(worker(b), chunks(x, y, 10), {**CONFIG, "grad_accum_steps": 2})
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


class Replica(nn.Module):
    """DDP's interface as far as accumulation uses it: `no_sync()` skips the gradient
    all-reduce of the backward passes inside it. Records which micro-batches skipped it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(6, 3)
        self.synced: list[bool] = []
        self._skip = False

    def no_sync(self):
        from contextlib import contextmanager

        @contextmanager
        def skipping():
            self._skip = True
            try:
                yield
            finally:
                self._skip = False

        return skipping()

    def forward(self, x):
        self.synced.append(not self._skip)
        return self.net(x)


@pytest.mark.parametrize("batches,accum,expected", [
    (5, 2, [False, True, False, True, True]),  # the leftover fifth batch steps, so it syncs
    (6, 3, [False, False, True, False, False, True]),
    (3, 1, [True, True, True]),
])
def test_only_the_micro_batch_before_a_step_all_reduces(batches, accum, expected):
    x, y = data(10 * batches)
    replica = Replica()
    train_epoch(worker(replica), chunks(x, y, 10), {**CONFIG, "grad_accum_steps": accum})
    assert replica.synced == expected


def test_the_epoch_loss_is_the_mean_over_rows():
    """The loss summed on the device, weighted by batch size (a short last batch counts less)."""
    x, y = data(40)
    model = nn.Linear(6, 3)
    expected = evaluate_split(model, x, y, regression=False)[0]
    # lr 0: nothing changes, so the training pass's mean loss is the split's loss
    loss, seen, _ = train_epoch(worker(model, lr=0.0), chunks(x, y, 15), {**CONFIG, "grad_accum_steps": 1})
    assert seen == 40 and loss == pytest.approx(expected, rel=1e-6)


def test_rank_0_says_where_a_long_epoch_stands(monkeypatch, capsys):
    """A line every EPOCH_PROGRESS_S on rank 0 (here after each batch), none on other ranks."""
    from pipeline.train import loop

    monkeypatch.setattr(loop, "EPOCH_PROGRESS_S", 0.0)
    x, y = data(40)
    train_epoch(worker(nn.Linear(6, 3)), chunks(x, y, 15), {**CONFIG, "grad_accum_steps": 1, "epochs": 3}, epoch=1)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" samples")[0] for line in lines] == ["epoch 2/3: 15", "epoch 2/3: 30", "epoch 2/3: 40"]
    assert all("/s on each of 1 workers)" in line for line in lines)
    model = nn.Linear(6, 3)
    other = Worker(1, 2, CPU, model, torch.optim.SGD(model.parameters(), lr=0.1), None,
                   torch.amp.GradScaler("cpu", enabled=False), None)
    train_epoch(other, chunks(x, y, 15), {**CONFIG, "grad_accum_steps": 1, "epochs": 3})
    assert capsys.readouterr().out == ""


def test_common_batches_flags_only_the_final_item():
    assert list(common_batches([])) == []
    assert list(common_batches("a")) == [("a", True)]
    assert list(common_batches("abc")) == [("a", False), ("b", False), ("c", True)]


@pytest.mark.parametrize("rule,workers,expected", [("none", 4, 0.01), ("linear", 4, 0.04), ("sqrt", 4, 0.02),
                                                    ("linear", 1, 0.01)])
def test_learning_rate_scales_with_workers(rule, workers, expected):
    assert scaled_lr(0.01, workers, rule) == pytest.approx(expected)


def test_unwrap_reaches_the_network_inside_compile_and_ddp_wrappers():
    net = nn.Linear(2, 2)

    class Wrapper(nn.Module):  # DDP keeps the network as .module, torch.compile as ._orig_mod
        def __init__(self, attr: str, inner: nn.Module):
            super().__init__()
            setattr(self, attr, inner)

    assert unwrap(Wrapper("module", Wrapper("_orig_mod", net))) is net
    assert unwrap(net) is net


STATE = {"outputs": [f"f{i}" for i in range(64)]}


@pytest.mark.parametrize("mode,rows,store,expected", [
    ("auto", 1_000, 1e9, True),  # 264 KB in a 1 GB store
    ("auto", 10_000_000, 1e9, False),  # 2.6 GB does not fit a quarter of it
    ("memory", 10_000_000, 1e9, True),
    ("stream", 1_000, 1e9, False),
])
def test_features_are_cached_only_when_they_fit(mode, rows, store, expected):
    assert feature_bytes(rows, STATE) == rows * (64 * 4 + 8)
    assert should_cache(TrainParams(cache_features=mode), rows, STATE, store) is expected


@pytest.mark.parametrize("overrides,message", [
    ({"model": "mlp", "channels_last": True}, "channels_last is for the cnn"),
    ({"shuffle_buffer": 10, "batch_size": 64}, "shuffle_buffer .10. must hold at least one batch"),
    ({"shuffle": "sometimes"}, "shuffle"),
    ({"grad_accum_steps": 0}, "grad_accum_steps"),
    ({"lr_scaling": "cubic"}, "lr_scaling"),
    ({"prefetch_batches": -1}, "prefetch_batches"),
])
def test_bad_ingest_params_name_the_key(tmp_path, overrides, message):
    from pipeline.config import load_params
    from tests.conftest import REPO

    sets = [f"train.{k}={v if not isinstance(v, bool) else str(v).lower()}" for k, v in overrides.items()]
    with pytest.raises(ConfigError, match=message):
        load_params(REPO / "params.yaml", sets)



@pytest.mark.parametrize("batch,buffer,expected", [(64, None, 4096), (100, None, 4000), (5000, None, 5000),
                                                   (64, 1000, 960), (64, 20_000, 4096), (64, 64, 64)])
def test_a_fetch_is_whole_batches_within_the_shuffle_buffer(batch, buffer, expected):
    from pipeline.train.loop import fetch_rows

    assert fetch_rows(batch, buffer) == expected


def test_ingest_memory_bounds_ray_datas_object_store_share():
    """train.ingest_memory_mb reaches Ray Data's execution options; null leaves its own limit."""
    from pipeline.train.ingest import WIDE_INGEST_MB, ingest_config

    capped = ingest_config(TrainParams(ingest_memory_mb=256), 64)._user_execution_options
    assert capped.resource_limits.object_store_memory == 256 << 20 and capped.preserve_order
    free = ingest_config(TrainParams(), 64)._user_execution_options
    assert free.resource_limits.object_store_memory != 256 << 20
    # decoded images: bounded by default, and still by the params when they say so
    images = ingest_config(TrainParams(), 3 * 64 * 64)._user_execution_options
    assert images.resource_limits.object_store_memory == WIDE_INGEST_MB << 20
    assert ingest_config(TrainParams(ingest_memory_mb=512), 3 * 64 * 64)._user_execution_options.resource_limits \
        .object_store_memory == 512 << 20
    with pytest.raises(ValueError, match="ingest_memory_mb"):
        TrainParams(ingest_memory_mb=1)


def test_ray_data_s_scheduling_loop_pauses_only_when_a_step_came_straight_back(monkeypatch):
    """IdleBackoff sleeps after a step that returned within SPIN_S (it waited on nothing),
    and not after one that blocked in ray.wait; Ray Data instantiates it from the datasets'
    context, so it must build without arguments."""
    from pipeline.train import ingest

    clock = [100.0]
    slept = []
    monkeypatch.setattr(ingest.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(ingest.time, "sleep", slept.append)
    backoff = ingest.IdleBackoff()
    clock[0] += 0.001  # a step that came straight back
    backoff.on_execution_step(None)
    assert slept == [ingest.IdleBackoff.PAUSE_S]
    clock[0] += 0.1  # a step that waited on a task
    backoff.on_execution_step(None)
    assert slept == [ingest.IdleBackoff.PAUSE_S]


def test_wide_inputs_bound_the_shuffle_buffer_and_each_fetch_in_bytes():
    from pipeline.train.ingest import SHUFFLE_BYTES, ingest_options
    from pipeline.train.loop import fetch_rows

    params = TrainParams()
    table = ingest_options(params, 64)  # a table's settings are the params'
    assert table["shuffle_buffer"] == params.shuffle_buffer
    assert fetch_rows(params.batch_size, table["shuffle_buffer"], table["fetch_most"]) == fetch_rows(
        params.batch_size, params.shuffle_buffer)
    for side in (64, 224):  # images: bytes, not rows, set the bounds
        width = 3 * side * side
        wide = ingest_options(params, width)
        assert params.batch_size <= wide["shuffle_buffer"] < params.shuffle_buffer
        assert wide["shuffle_buffer"] == params.batch_size or wide["shuffle_buffer"] * 4 * width <= SHUFFLE_BYTES
        fetched = fetch_rows(params.batch_size, wide["shuffle_buffer"], wide["fetch_most"])
        assert fetched % params.batch_size == 0 and fetched * 4 * width <= max(64 * 2**20, params.batch_size * 4 * width)


def test_validation_takes_the_training_batch_for_images_and_more_for_tables():
    from pipeline.train.ingest import ingest_options
    from pipeline.train.loop import EVAL_BATCH, eval_batch_size

    params = TrainParams()
    table = {"batch_size": params.batch_size, **ingest_options(params, 64)}
    assert eval_batch_size(table) == EVAL_BATCH
    for side in (64, 224):
        images = {"batch_size": params.batch_size, **ingest_options(params, 3 * side * side)}
        assert eval_batch_size(images) == params.batch_size
    assert eval_batch_size({"batch_size": 32}) == EVAL_BATCH  # a config from before the bounds: as it was


def test_wide_inputs_stream_in_blocks_small_enough_for_the_budget_to_bound():
    """Ray Data lets each operator hold a few blocks whatever its budget, so for decoded images
    a block is a 16th of the budget; a table keeps Ray Data's own block size."""
    from pipeline.train.ingest import BLOCKS_IN_BUDGET, WIDE_INGEST_MB, block_bytes

    assert block_bytes(TrainParams(), 64) is None
    assert block_bytes(TrainParams(ingest_memory_mb=1024), 64) is None
    assert block_bytes(TrainParams(), 3 * 64 * 64) == (WIDE_INGEST_MB << 20) // BLOCKS_IN_BUDGET
    assert block_bytes(TrainParams(ingest_memory_mb=512), 3 * 224 * 224) == (512 << 20) // BLOCKS_IN_BUDGET


def _two_ranks(rank: int, port: int, counts: list[int], out: Any) -> None:
    import torch.distributed as dist

    from pipeline.train.loop import common_batches

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        steps = list(common_batches(range(counts[rank])))
        dist.barrier()  # reached by both only if neither waits in a collective the other skipped
        out.put((rank, steps))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("counts", [[5, 5], [5, 3], [0, 4]])
def test_ranks_with_unequal_shards_take_the_same_steps_and_do_not_hang(counts):
    """Two gloo processes whose shards differ: both take the common steps, the last flagged
    on both, and neither is left in a collective (which hung a two-worker epoch)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_two_ranks, args=(r, port, counts, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    got = dict(out.get(timeout=5) for _ in range(2))
    common = min(counts)
    expected = [(i, i == common - 1) for i in range(common)]
    assert got[0] == got[1] == expected
