"""Ray Train on a real local Ray instance: a fault drill, determinism, 2-worker DDP, every
model in the zoo, and a clear error for GPUs the cluster does not have."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import TrainParams
from pipeline.data.schema import Schema, schema_from_params
from pipeline.errors import D2DError
from pipeline.train.trainer import train
from tests.conftest import REPO

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module, started as d2d starts one (4 logical CPUs: two 1-CPU
    workers and the driver)."""
    from pipeline.ray_runtime import ray_session

    with ray_session(TrainParams(), cpus_needed=4):
        yield


def idle_workers() -> list:
    """Ray's idle worker processes on this machine that this test's Ray started."""
    import psutil

    def program(process: psutil.Process) -> str:
        # A process that exits between children() and this call is a zombie or gone: it holds no
        # memory any more, which is what the test waits for.
        try:
            return process.cmdline()[0]
        except (psutil.ZombieProcess, psutil.NoSuchProcess, IndexError):
            return ""

    raylets = [p for p in psutil.Process().children(recursive=True) if Path(program(p)).name == "raylet"]
    assert raylets, "no raylet under this process: the test would prove nothing"
    return [w for r in raylets for w in r.children() if program(w) == "ray::IDLE"]


def test_idle_workers_give_their_memory_back(ray_local):
    """After Ray Data's tasks finish, their worker processes do not stay behind holding the heap
    the tasks grew (at 6M rows, 1.8 GiB through the whole of training)."""
    import time

    import ray.data

    ray.data.range(20_000, override_num_blocks=4).map_batches(lambda b: {"x": b["id"] * 2}).materialize()
    deadline = time.monotonic() + 30
    while idle_workers() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert idle_workers() == []


@pytest.fixture(scope="module")
def digits() -> tuple[Schema, pd.DataFrame, pd.DataFrame, dict]:
    from sklearn.datasets import load_digits

    from pipeline.config import load_params

    schema = schema_from_params(load_params(REPO / "params.yaml").data)
    bunch = load_digits()
    df = pd.DataFrame(bunch.data[:600], columns=schema.feature_names).assign(id=range(600), label=bunch.target[:600])
    state = {  # the digits' declared range, as preprocess.fit writes it for scale: range
        "numeric": {"names": schema.feature_names, "fill": [None] * 64, "center": [0.0] * 64, "scale": [16.0] * 64},
        "categorical": [], "outputs": schema.feature_names, "target": None,
    }
    return schema, df.iloc[:480], df.iloc[480:], state


def fit(digits, tmp_path, val_parts: int = 1, pretrained: dict | None = None, **overrides):
    """Train on the digits as Ray Datasets (the validation split in `val_parts` blocks)."""
    import ray.data

    schema, train_df, val_df, state = digits
    params = TrainParams(**{"epochs": 4, "batch_size": 32, "num_workers": 1, "patience": 10, **overrides})
    val = ray.data.from_pandas([val_df.iloc[i::val_parts] for i in range(val_parts)])
    return train(ray.data.from_pandas(train_df), val, schema, state, params, tmp_path, pretrained=pretrained)


def test_validation_is_sharded_and_counts_every_row_once(ray_local, digits, tmp_path):
    """Two ranks score their shards of a 3-block validation split and all-reduce the sums: the
    reported accuracy of the best epoch is the best weights' accuracy on the whole split,
    scored here in one process."""
    from pipeline.train.loop import evaluate_split
    from pipeline.train.trainer import features_and_labels

    import torch

    schema, train_df, val_df, state = digits
    val_df = val_df.iloc[:-1]  # 119 rows: an equal cut of two shards would drop one
    result = fit((schema, train_df, val_df, state), tmp_path, val_parts=3, num_workers=2, epochs=3)
    x, y = features_and_labels(val_df, schema, state)
    loss, accuracy = evaluate_split(result.model, torch.tensor(x), torch.tensor(y), regression=False)
    best = result.history.loc[result.history["epoch"] == result.best_epoch].iloc[0]
    assert round(best["val_accuracy"] * len(y)) == round(accuracy * len(y))  # the same rows right, of all 119
    assert best["val_loss"] == pytest.approx(loss, rel=1e-5)


def test_what_reaches_the_workers_does_not_grow_with_the_rows(ray_local, digits, tmp_path):
    """The loop's config is hyperparameters only, and the streamed datasets travel as plans:
    their pickled sizes are the same for 480 rows and for 48,000."""
    import cloudpickle

    from pipeline.data import io
    from pipeline.train.ingest import IdleBackoff, training_datasets
    from pipeline.train.models import ModelSpec
    from pipeline.train.trainer import loop_config, make_trainer, model_spec, n_inputs

    schema, train_df, val_df, state = digits
    params = TrainParams(num_workers=1, cache_features="stream")
    sizes = []
    for copies in (1, 100):
        folder = tmp_path / str(copies)
        folder.mkdir()
        io.write_parquet(pd.concat([train_df] * copies, ignore_index=True), folder / "train.parquet")
        io.write_parquet(val_df, folder / "val.parquet")
        data = training_datasets(io.read_dataset(folder / "train.parquet"), io.read_dataset(folder / "val.parquet"),
                                 schema, state, params)
        assert all(IdleBackoff in d.context.custom_execution_callback_classes for d in data.values())
        spec: ModelSpec = model_spec(schema, n_inputs(state), params)
        trainer = make_trainer(loop_config(spec, schema, state, params), data, params, str(tmp_path), "sizes")
        sizes.append((len(cloudpickle.dumps(trainer.train_loop_config)), len(cloudpickle.dumps(data))))
    assert sizes[0][0] == sizes[1][0]
    assert abs(sizes[0][1] - sizes[1][1]) < 256 and sizes[1][1] < 100_000  # the 48,000 rows are 12 MB of floats


def test_each_featurising_task_reads_one_row_group(ray_local, digits, tmp_path, monkeypatch):
    """Fused with the reader, a batch size would be the number of (file, row group) pieces
    each task is handed: 111 of them for 224² images, 65,536 for a table (every row group
    in one task). Training's featurising takes whole blocks, so there is one task a row group."""
    import re

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data import io
    from pipeline.train.ingest import TRAIN, training_datasets

    monkeypatch.setattr(io, "SMALL_PARQUET", 0)
    schema, train_df, val_df, state = digits
    for name, frame in (("train", train_df), ("val", val_df)):
        (tmp_path / f"{name}.parquet").mkdir()
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False),
                       tmp_path / f"{name}.parquet/part-00000.parquet", row_group_size=60)
    groups = pq.ParquetFile(tmp_path / "train.parquet/part-00000.parquet").metadata.num_row_groups
    assert groups >= 4
    data = training_datasets(io.read_dataset(tmp_path / "train.parquet"), io.read_dataset(tmp_path / "val.parquet"),
                             schema, state, TrainParams(num_workers=1, cache_features="stream"))
    done = data[TRAIN].materialize()
    assert done.count() == len(train_df)
    [tasks] = re.findall(r"read_row_groups\)->MapBatches\(featurize_block\): (\d+) tasks executed", done.stats())
    assert int(tasks) == groups


def test_a_large_split_streams_every_row_group_in_order(ray_local, tmp_path, monkeypatch):
    """Past SMALL_PARQUET, a folder of parts is read by Ray Data tasks a row group at a time:
    every row once, in file and row group order, with only the columns asked for."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data import io

    monkeypatch.setattr(io, "SMALL_PARQUET", 0)
    folder = tmp_path / "train.parquet"
    folder.mkdir()
    ids = np.arange(1_000)
    for part, rows in enumerate(np.array_split(ids, 3)):  # 3 parts of 2 or 3 row groups each
        pq.write_table(pa.table({"id": rows, "x": rows * 0.5, "skip": rows.astype(str)}),
                       folder / f"part-{part:05d}.parquet", row_group_size=150)
    pq.write_table(pa.table({"id": ids[:0], "x": ids[:0] * 0.5, "skip": ids[:0].astype(str)}),
                   folder / "part-00003.parquet")  # an empty part: no row group
    ds = io.read_dataset(folder, ["id", "x"])
    ds.context.execution_options.preserve_order = True  # as training's ingest sets it
    data = ds.to_pandas()
    assert data.columns.tolist() == ["id", "x"] and data["id"].tolist() == ids.tolist()
    assert (data["x"] == data["id"] * 0.5).all()

    # train's row groups come in a new order each execution (epoch), the same for the same
    # seed, every row once, the rows of a group still together
    shuffled = io.read_dataset(folder, ["id"], shuffle_seed=7)
    shuffled.context.execution_options.preserve_order = True
    first, second = (shuffled.to_pandas()["id"].tolist() for _ in range(2))
    assert sorted(first) == sorted(second) == ids.tolist() and first != second and first != ids.tolist()
    again = io.read_dataset(folder, ["id"], shuffle_seed=7)
    again.context.execution_options.preserve_order = True
    assert again.to_pandas()["id"].tolist() == first
    starts = [run[0] for run in np.split(np.array(first), np.flatnonzero(np.diff(first) != 1) + 1)]
    groups = {int(part[0]) + k for part in np.array_split(ids, 3) for k in range(0, len(part), 150)}
    assert set(starts) <= groups  # whole row groups move


def test_a_lost_worker_resumes_from_its_checkpoint(ray_local, digits, tmp_path):
    """Rank 0 exits hard at the start of epoch 3 of 5; Ray restarts the 2-worker group, which
    resumes from the latest checkpoint the controller had recorded (epoch 2's, or epoch 1's if
    the crash beat its bookkeeping) and finishes the same 5 epochs, each once."""
    result = fit(digits, tmp_path, epochs=5, num_workers=2, max_failures=1, fail_at_epoch=3)
    history = result.history
    assert history["epoch"].tolist() == [1, 2, 3, 4, 5]
    assert history["restarts"].iloc[0] == 0 and (history.loc[history["epoch"] >= 3, "restarts"] == 1).all()


def test_without_failure_budget_the_run_fails(ray_local, digits, tmp_path):
    with pytest.raises(Exception, match="(?i)fail|died|exit"):
        fit(digits, tmp_path, epochs=3, max_failures=0, fail_at_epoch=2)


def test_same_seed_one_worker_is_reproducible(ray_local, digits, tmp_path):
    a = fit(digits, tmp_path / "a", epochs=3)
    b = fit(digits, tmp_path / "b", epochs=3)
    assert a.history["val_loss"].tolist() == b.history["val_loss"].tolist()
    c = fit(digits, tmp_path / "c", epochs=3, seed=7)
    assert c.history["val_loss"].tolist() != a.history["val_loss"].tolist()


def test_one_worker_iterates_its_datasets_itself(ray_local):
    """With one worker there is nothing to split: it gets plain iterators over every row, in
    order, and no streaming_split coordinator actor per dataset (about 110 MiB each)."""
    import ray.data

    from pipeline.train.ingest import ingest_config

    ds = ray.data.range(300, override_num_blocks=3)
    [only] = ingest_config(TrainParams(), 1).configure({"train": ds, "val": ds}, 1, None, None)
    assert {type(it).__name__ for it in only.values()} == {"DataIteratorImpl"}
    assert [r["id"] for r in only["train"].iter_rows()] == list(range(300))


@pytest.mark.parametrize(
    "overrides",
    [
        {"model": "cnn", "num_workers": 2, "optimizer": "sgd", "lr": 0.05, "schedule": "cosine", "grad_clip": 1.0},
        {"model": "mlp", "optimizer": "adamw", "schedule": "plateau", "hidden": [64]},
        # mixed precision runs for real on the CPU too (autocast supports bf16 there)
        {"model": "cnn", "precision": "bf16", "grad_clip": 1.0},
        {"model": "lstm", "width": 32, "lr": 0.005},
        {"model": "transformer", "width": 32, "heads": 4, "depth": 1, "lr": 0.002},
        # the streaming options: a full shuffle every epoch, featurised on every pass
        {"model": "mlp", "hidden": [64], "shuffle": "full", "cache_features": "stream"},
        # the GPU-minded options run on the CPU too: NHWC weights, accumulation under DDP, scaled lr
        {"model": "cnn", "num_workers": 2, "channels_last": True, "grad_accum_steps": 2, "lr_scaling": "sqrt",
         "shuffle": "none"},
    ],
)
def test_every_model_learns(ray_local, digits, tmp_path, overrides):
    result = fit(digits, tmp_path, **overrides)
    assert result.history["val_loss"].iloc[-1] < result.history["val_loss"].iloc[0]
    if overrides.get("schedule") == "cosine":
        assert result.history["lr"].is_monotonic_decreasing
    assert result.history["val_accuracy"].max() > 0.3  # ten classes: chance is 0.1


def test_gpus_the_cluster_lacks_are_a_clear_error(ray_local, digits, tmp_path):
    # No GPU exists on this machine; the check must answer at once instead of waiting for one.
    with pytest.raises(D2DError, match="use_gpu is true but the Ray cluster has 0 GPU"):
        fit(digits, tmp_path, use_gpu=True)


def test_workers_that_leave_no_cpu_for_the_data_are_a_clear_error(ray_local, digits, tmp_path):
    # 4 CPUs: two 2-CPU workers would take them all and wait for Ray Data's reads forever
    with pytest.raises(D2DError, match="has 4 CPU.*need 5, one for Ray Data's reads"):
        fit(digits, tmp_path, num_workers=2, cpus_per_worker=2)


def test_a_pretrained_backbone_held_fixed_trains_only_the_new_head(ray_local, digits, tmp_path):
    """Issue 17, point 5: torchvision-named RGB weights from a .safetensors file fine-tune on
    the grey digits; with freeze: backbone every backbone tensor, batch-norm statistics
    included, is the pretrained one at the end, and the new head learned."""
    import torch
    from safetensors.torch import save_file

    from pipeline.train.resnet import ResNet, adapt_input_conv, read_weights

    torch.manual_seed(1)
    source = ResNet(18, (3, 224, 224), 1000).state_dict()  # stands in for torchvision's, same names and shapes
    save_file({k: v.contiguous() for k, v in source.items()}, str(tmp_path / "resnet18.safetensors"))
    weights = read_weights(tmp_path / "resnet18.safetensors")
    result = _fit_pretrained(digits, tmp_path, weights, epochs=2, freeze="backbone")
    state = result.model.state_dict()
    backbone = [k for k in source if not k.startswith("fc.")]
    assert result.transfer["transferred"] == len(backbone) and result.transfer["fresh"] == ["fc.bias", "fc.weight"]
    assert torch.equal(state["conv1.weight"], adapt_input_conv(source["conv1.weight"], 1))
    assert all(torch.equal(state[k], source[k]) for k in backbone if k != "conv1.weight")
    assert state["fc.weight"].shape == (10, 512)
    assert result.history["val_loss"].iloc[-1] < result.history["val_loss"].iloc[0]


def test_blocks_thaw_at_the_unfreeze_epoch_on_two_workers(ray_local, digits, tmp_path):
    """freeze: 2 with unfreeze_epoch: 2 under DDP (the model is wrapped again when it thaws):
    the best epoch's stem is the pretrained one if that epoch was the first, trained if not."""
    import torch

    from pipeline.train.resnet import ResNet, adapt_input_conv

    torch.manual_seed(2)
    source = ResNet(18, (1, 8, 8), 10).state_dict()
    result = _fit_pretrained(digits, tmp_path, source, epochs=2, freeze=2, unfreeze_epoch=2, num_workers=2,
                             backbone_lr_scale=0.5)
    state = result.model.state_dict()
    stem_kept = torch.equal(state["conv1.weight"], adapt_input_conv(source["conv1.weight"], 1))
    assert stem_kept == (result.best_epoch == 1), (result.best_epoch, result.history.to_dict("records"))
    assert not torch.equal(state["layer4.1.conv2.weight"], source["layer4.1.conv2.weight"])  # never frozen
    assert len(result.history) == 2


def _fit_pretrained(digits, tmp_path, weights, **overrides):
    return fit(digits, tmp_path, pretrained=weights, **{"model": "resnet18", **overrides})
