"""Ray Data into Ray Train, the driver's side: the splits as Ray Datasets of the network's
inputs, and how they are sharded across the workers.

The preprocessing fitted on train is applied as a Ray Data transform with the same function
that ships in the MLflow model (`preprocess.transform`, through `features_and_labels`), so
training, evaluation and serving share one implementation. Nothing here holds a split: the
datasets are lazy plans that the workers pull with `get_dataset_shard`, and the loop's config
carries hyperparameters only.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from ray.data._internal.execution.execution_callback import ExecutionCallback
from ray.train import DataConfig

from pipeline.config import TrainParams
from pipeline.data import io
from pipeline.data.schema import Schema

if TYPE_CHECKING:
    from ray.data import Dataset, DataIterator

TRAIN, VAL = "train", "val"
# The features are cached in the object store ("memory") when they take at most this share of
# it: a small split is then featurised once, not every epoch.
CACHE_SHARE = 0.25


class IdleBackoff(ExecutionCallback):
    """Pauses Ray Data's scheduling loop for a moment when a step came straight back.

    Ray Data 2.60's executor blocks in `ray.wait` (up to 0.1 s) only while it has tasks in
    flight. When the consumer is behind, every task done and the queues full, the loop comes
    straight round again: with one Ray Train worker that loop runs in the worker process, and
    at 20M rows it held the GIL in 90% of py-spy's samples while the training thread held it
    in 7%. A step that returns within SPIN_S did not wait on anything; a PAUSE_S sleep then
    costs the data path at most that much latency per step, against blocks that take tens of
    milliseconds to make."""

    SPIN_S, PAUSE_S = 0.005, 0.005

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def on_execution_step(self, executor: Any) -> None:
        now = time.perf_counter()
        if now - self._last < self.SPIN_S:
            time.sleep(self.PAUSE_S)
            now = time.perf_counter()
        self._last = now


def featurize(batch: pd.DataFrame, schema: Schema, state: dict[str, Any]) -> dict[str, np.ndarray]:
    """One batch of raw split rows → {"x": float32 inputs, "y": targets} (fitted preprocessing)."""
    from pipeline.train.trainer import features_and_labels

    x, y = features_and_labels(batch, schema, state)
    return {"x": x, "y": y}


def featurize_block(block: pd.DataFrame, schema: Schema, state: dict[str, Any], rows: int) -> Iterator[dict[str, np.ndarray]]:
    """A block the reader made (a row group's rows, at most io.SCORE_ROWS) featurised `rows`
    at a time. Ray Data is given no batch size, on purpose: fused with the reader, a batch
    size becomes the rows each task must be handed, and the reader's rows are (file, row
    group) pieces. 111 of them (the rows of 224² images that fill a batch) made each task
    read about 20,000 images, and a running task's output blocks stayed counted in the object
    store until it ended: at 100,000 images of 224² the store grew by what training consumed,
    to 6.9 GiB in 15 minutes (bench/RESULTS.md, seventeenth session). Now a task reads one
    row group."""
    for start in range(0, len(block), rows):
        yield featurize(block.iloc[start:start + rows], schema, state)


def feature_bytes(rows: int, state: dict[str, Any]) -> int:
    """Bytes of a split once featurised: float32 inputs plus an 8-byte target per row."""
    from pipeline.train.trainer import n_inputs

    return rows * (4 * n_inputs(state) + 8)


def should_cache(params: TrainParams, rows: int, state: dict[str, Any], store_bytes: float) -> bool:
    """Whether to featurise once into the object store instead of streaming every epoch."""
    if params.cache_features != "auto":
        return params.cache_features == "memory"
    return feature_bytes(rows, state) <= CACHE_SHARE * store_bytes


def training_datasets(train: Dataset, val: Dataset, schema: Schema, state: dict[str, Any],
                      params: TrainParams, rows: int | None = None) -> dict[str, Dataset]:
    """The raw train and val splits as datasets of network inputs, shuffled as params say.

    A full shuffle reshuffles every epoch (reseeded after each execution: reproducible, yet a
    new order per epoch); the local buffer is applied by the workers as they iterate.
    """
    import ray
    from ray.data import RandomSeedConfig

    from pipeline.train.trainer import n_inputs

    block = block_bytes(params, n_inputs(state))
    for ds in (train, val):
        # Each epoch executes the datasets again; their progress bars would bury the one line
        # per epoch that the loop prints. (Derived datasets share their source's context.)
        ds.context.enable_progress_bars = False
        if block is not None:
            ds.context.target_max_block_size = block
        ds.context.print_on_execution_start = False
        if IdleBackoff not in ds.context.custom_execution_callback_classes:
            ds.context.custom_execution_callback_classes = [*ds.context.custom_execution_callback_classes, IdleBackoff]
    if rows is None:  # the caller did not read it from the files' footers: a Ray Data job counts
        rows = train.count() + val.count()
    # Bounded batches: a whole split part (350,000 rows at 6M) featurised at once peaked at
    # 1.8 GiB per read task in float64 temporaries, the training stage's memory peak.
    kwargs = {"schema": schema, "state": state, "rows": io.score_rows(n_inputs(state))}
    out = {name: ds.map_batches(featurize_block, fn_kwargs=kwargs, batch_format="pandas", batch_size=None)
           for name, ds in ((TRAIN, train), (VAL, val))}
    if should_cache(params, rows, state, ray.available_resources().get("object_store_memory", 0.0)):
        out = {name: ds.materialize() for name, ds in out.items()}
    if params.shuffle == "full":
        out[TRAIN] = out[TRAIN].random_shuffle(seed=RandomSeedConfig(seed=params.seed, reseed_after_execution=True))
    return out


class ShardedIngest(DataConfig):
    """Both splits are sharded across the workers (one worker takes them whole). Train is cut into equal shards (DDP's ranks
    must take the same number of steps); validation is cut without dropping a row, since its
    sums are all-reduced and each row must count once."""

    def configure(self, datasets: dict[str, Dataset], world_size: int, worker_handles: Any, worker_node_ids: Any,
                  **kwargs: Any) -> list[dict[str, DataIterator]]:
        if world_size == 1:
            # One worker iterates the datasets itself: streaming_split would add a coordinator
            # actor per split (about 110 MiB each) that serves no one else.
            only = {}
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                only[name] = ds.iterator()
            return [only]
        rest = {k: v for k, v in datasets.items() if k != VAL}
        shards = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
        if VAL in datasets:
            ds = datasets[VAL]
            ds = ds.copy(ds)
            ds.context.execution_options = self._resolve_execution_options(VAL)
            hints = worker_node_ids if self._enable_shard_locality else None
            for shard, it in zip(shards, ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                shard[VAL] = it
        return shards


WIDE_INPUTS = 4096  # float32 inputs a row (16 KiB) from which decoded rows are bounded by default
WIDE_INGEST_MB = 128


def ingest_limit(params: TrainParams, inputs: int) -> int | None:
    """The object-store bytes Ray Data may hold in flight while it streams the splits, or None (unbounded)."""
    limit = params.ingest_memory_mb or (WIDE_INGEST_MB if inputs >= WIDE_INPUTS else None)
    return None if limit is None else limit << 20


BLOCKS_IN_BUDGET = 16


def block_bytes(params: TrainParams, inputs: int) -> int | None:
    """Ray Data's largest block for wide inputs: a 16th of the in-flight budget, or None
    (Ray Data's 128 MiB). Ray Data 2.60 lets every operator hold a few blocks whatever the
    budget (its log showed 256 MiB of task inputs and 384 MiB of outputs held against a 256
    MiB budget), so at 128 MiB a block the budget did not bound anything: the object store
    filled to 1.75 GiB at the start of an epoch of 100,000 images of 64². At 16 MiB, two
    streaming consumers peaked at 0.28 GiB where they had reached 1.13 (bench/RESULTS.md,
    sixteenth session)."""
    limit = ingest_limit(params, inputs)
    return None if limit is None or inputs < WIDE_INPUTS else max(1 << 20, limit // BLOCKS_IN_BUDGET)


def ingest_config(params: TrainParams, inputs: int) -> ShardedIngest:
    """Shards in a fixed order: with one worker and a seed, every run sees the same batches.
    `train.ingest_memory_mb` bounds the object-store bytes Ray Data holds in flight while it
    streams the splits: unbounded, it filled its share of the store at 20M rows (9.5 GiB of
    system memory on a 24 GB machine); 1 GiB kept it at 7.7 GiB, and epochs ran 25% slower.
    For wide rows (decoded images) it defaults to WIDE_INGEST_MB: there decoding, not the
    buffer, sets the pace, and unbounded, 100,000 images of 64² peaked at twice the memory
    of 10,000."""
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    limit = ingest_limit(params, inputs)
    if limit is not None:
        options.resource_limits = options.resource_limits.copy(object_store_memory=limit)
    return ShardedIngest(execution_options=options)


# A local shuffle buffer's float32 inputs, at most: 1,365 images of 64², 111 of 224². The
# splits' rows are in random order (image_data.listing), so a small buffer still mixes classes.
SHUFFLE_BYTES = 64 * 2**20


def ingest_options(params: TrainParams, inputs: int) -> dict[str, Any]:
    """What the worker loop needs to iterate its shards (plain values, in the loop's config).
    For wide inputs (images, `inputs` float32 values a row) the local shuffle buffer and each
    fetch are bounded in bytes, so a worker's memory does not follow the row count's
    settings: 20,000 rows of 224² images would be 11 GiB of buffer."""
    row = 4 * inputs + 8
    return {"shuffle": params.shuffle, "prefetch_batches": params.prefetch_batches,
            "shuffle_buffer": min(params.shuffle_buffer, max(params.batch_size, SHUFFLE_BYTES // row)),
            "fetch_most": io.score_rows(inputs)}
