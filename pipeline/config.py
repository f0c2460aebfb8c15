"""Typed, validated params. `load_params` is called once, at the entry point; each step
receives only the section it needs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError


class _Section(BaseModel):
    # An unknown key is an error, never silently ignored: a typo must not change a run.
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureSpec(_Section):
    """One feature column (`name`) or a run of them sharing a spec (`prefix` + `count`:
    pixel_0..pixel_63)."""

    name: str | None = None
    prefix: str | None = None
    count: int | None = Field(default=None, ge=1)
    kind: Literal["numeric", "categorical"] = "numeric"
    # The raw type: it becomes the served model's signature (MLflow will not cast int64 to float64).
    dtype: Literal["int", "float", "str"] = "float"
    min: float | None = None
    max: float | None = None
    values: list[int | str] | None = None  # the allowed categories
    nullable: bool = False

    @model_validator(mode="after")
    def _shape(self) -> FeatureSpec:
        if (self.name is None) == (self.prefix is None) or (self.prefix is not None) != (self.count is not None):
            raise ValueError("give either name, or prefix and count")
        if self.kind == "numeric":
            if self.dtype == "str":
                raise ValueError("a numeric feature has dtype int or float")
            if self.values is not None:
                raise ValueError("values is for categorical features; numeric ones take min and max")
            if self.min is not None and self.max is not None and self.max <= self.min:
                raise ValueError(f"max ({self.max:g}) must be greater than min ({self.min:g})")
        elif self.min is not None or self.max is not None:
            raise ValueError("min and max are for numeric features; categorical ones take values")
        return self

    def names(self) -> list[str]:
        return [self.name] if self.name is not None else [f"{self.prefix}{i}" for i in range(self.count or 0)]


class DemoParams(_Section):
    seed: int = 0
    rows: int | None = Field(default=None, ge=20)  # the first N digits only (tests, quick demos)
    corrupt_fraction: float = Field(default=0.03, ge=0.0, le=0.5)


class AugmentParams(_Section):
    """Training-time augmentation of image files, each part off at its neutral value; never
    applied at evaluation (pipeline.image_transforms.augment)."""

    crop_scale: float = Field(default=1.0, gt=0.0, le=1.0)  # a random crop keeps this share of the area, or more
    flip: bool = False  # horizontal flips, half the images (not for digits or text)
    rotate: float = Field(default=0.0, ge=0.0, le=180.0)  # degrees, either way
    brightness: float = Field(default=0.0, ge=0.0, lt=1.0)  # a factor within 1 ± this
    contrast: float = Field(default=0.0, ge=0.0, lt=1.0)  # a factor within 1 ± this


class ImageParams(_Section):
    """Image files as the data (issue 17). data.raw is a folder of class subfolders
    (`DIR/<label>/*.png`) or a manifest (CSV or Parquet) with a column of file paths, relative
    to the manifest's folder; the path is each row's id. What a usable image is, and the size
    and mode the model takes it at."""

    path_column: str = "path"
    size: int = Field(default=64, ge=8, le=1024)  # the square side images are trained at
    mode: Literal["RGB", "L"] = "RGB"
    # modes turned into `mode` (RGBA drops its alpha, L repeats the grey level); any other is quarantined
    convert: list[Literal["RGB", "RGBA", "L", "LA", "P", "CMYK", "I;16", "I", "F"]] = ["RGB", "RGBA", "L", "LA", "P"]
    min_side: int = Field(default=8, ge=1)  # smaller images are quarantined
    max_aspect: float = Field(default=10.0, ge=1.0)  # longer side over shorter side
    max_pixels: int = Field(default=40_000_000, ge=1)  # decompression bombs are refused before decoding
    max_bytes: int = Field(default=50 * 2**20, ge=1)
    # Hamming distance between perceptual hashes (of 64 bits) at or under which two images
    # are near duplicates: one in val or test that nearly repeats a train image is leakage
    near_duplicate_distance: int = Field(default=4, ge=0, le=64)
    augment: AugmentParams = AugmentParams()


class DataParams(_Section):
    raw: Path = Path("data/raw/digits.csv")
    # null: the data has no id column, and d2d derives a stable key per row from its content
    # and its occurrence number among identical rows (pipeline.data.keys).
    id_column: str | None = "id"
    target: str = "label"
    task: Literal["classification", "regression"] = "classification"
    classes: list[int | str] | None = None  # classification only: the known labels
    # A table's feature columns; with `images`, the manifest's extra columns (none for a
    # folder of class subfolders).
    features: list[FeatureSpec] = []
    # C×H×W for image-shaped features (the CNN needs it); null for tabular data.
    image_shape: list[int] | None = None
    images: ImageParams | None = None
    demo: DemoParams = DemoParams()
    # Rows the data stages (validate, clean, split) hold at a time: memory stays flat as the
    # file grows. Larger batches pay GX's per-batch cost (about 2 s) fewer times.
    batch_rows: int = Field(default=500_000, ge=1)
    # Where validate, clean and split run: in this process (local), or on Ray actors, one part
    # file each at a time (ray); auto: ray when a Ray cluster is configured (train.ray_address
    # or RAY_ADDRESS), else local.
    engine: Literal["auto", "local", "ray"] = "auto"

    @model_validator(mode="after")
    def _consistent(self) -> DataParams:
        names = [n for f in self.features for n in f.names()]
        if not names and self.images is None:
            raise ValueError("features: a table needs at least one feature")
        if self.images is not None:
            if self.image_shape is not None:
                raise ValueError("image files take their shape from images.size and images.mode, not image_shape")
            if self.id_column != self.images.path_column:
                raise ValueError(f"with images, id_column is the path column ({self.images.path_column!r}): "
                                 "each file is one row")
            if self.images.path_column in names:
                raise ValueError("the path column cannot also be a feature")
        if len(set(names)) != len(names):
            raise ValueError("feature names must be unique")
        if {self.id_column, self.target} & set(names):
            raise ValueError("the id column and the target cannot also be features")
        from pipeline.data.keys import ROW_KEY  # here: config must not import pandas

        if ROW_KEY in {*names, self.target, self.id_column}:
            raise ValueError(f"'{ROW_KEY}' is reserved for the row key d2d derives; rename that column")
        if self.image_shape is not None:
            size = 1
            for d in self.image_shape:
                size *= d
            if len(self.image_shape) != 3 or size != len(names):
                raise ValueError(f"image_shape {self.image_shape} must be C,H,W with C*H*W == {len(names)} features")
            if any(f.kind != "numeric" for f in self.features):
                raise ValueError("image-shaped data has numeric features only")
        if self.task == "classification":
            if not self.classes or len(self.classes) < 2:
                raise ValueError("classification needs at least two classes")
            if len(set(map(str, self.classes))) != len(self.classes):
                raise ValueError("classes must be unique")
        elif self.classes is not None:
            raise ValueError("a regression target has no classes")
        return self


class ValidateParams(_Section):
    # d2d's premise: up to 30% of a raw dataset may be wrong. Those rows are quarantined with
    # their reasons and the rest trains; above this share the dataset as a whole is rejected.
    max_bad_row_fraction: float = Field(default=0.30, ge=0.0, le=1.0)
    min_rows: int = Field(default=50, ge=1)
    max_rows: int | None = Field(default=None, ge=1)
    # A numeric column with more text than this is the wrong column, not a few bad rows.
    max_non_numeric_fraction: float = Field(default=0.5, ge=0.0, le=1.0)
    # GX Data Docs (HTML) for every run; it takes a few seconds on large data.
    data_docs: bool = True


Imputation = Literal["drop", "median", "most_frequent", "constant"]


class MissingParams(_Section):
    """What to do with nulls in nullable feature columns. `drop` removes the row in the
    clean stage; the imputations are fitted on the train split and saved for serving."""

    numeric: Imputation = "median"
    categorical: Imputation = "most_frequent"
    fill_value: float | str = 0
    columns: dict[str, Imputation] = {}

    @model_validator(mode="after")
    def _median_is_numeric(self) -> MissingParams:
        if self.categorical == "median":
            raise ValueError("median cannot fill a categorical column; use most_frequent or constant")
        return self

    def imputation(self, name: str, kind: str) -> Imputation:
        """A nullable column's policy: its own entry in `columns`, else its kind's default. The
        clean stage drops by it and the preprocessing fits by it, so both read it here."""
        return self.columns.get(name) or (self.numeric if kind == "numeric" else self.categorical)


class OutlierParams(_Section):
    method: Literal["none", "range", "iqr"] = "none"  # range: the schema's min/max
    action: Literal["clip", "drop"] = "clip"
    iqr_k: float = Field(default=1.5, gt=0.0)


class CleanParams(_Section):
    drop_duplicates: bool = True
    missing: MissingParams = MissingParams()
    outliers: OutlierParams = OutlierParams()


class SplitParams(_Section):
    # stratified: seeded, per-class ratios; random: seeded; hash: by id column, so a row keeps
    # its split when data is appended (what retraining on drifted data needs).
    strategy: Literal["stratified", "random", "hash"] = "stratified"
    train: float = Field(default=0.70, gt=0.0, lt=1.0)
    val: float = Field(default=0.15, gt=0.0, lt=1.0)
    test: float = Field(default=0.15, gt=0.0, lt=1.0)
    seed: int = 42

    @model_validator(mode="after")
    def _sum(self) -> SplitParams:
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1.0, got {self.train + self.val + self.test:g}")
        return self


class PreprocessParams(_Section):
    """Feature scaling and encoding, fitted on the train split only and saved with the model."""

    # standard: mean/std; minmax: train min/max; range: the schema's declared min/max.
    scale: Literal["standard", "minmax", "range", "none"] = "standard"
    # One-hot slots per categorical column: the most frequent in train; rarer or unseen → all zeros.
    max_categories: int = Field(default=50, ge=1)
    # Train rows the scaling and imputation are fitted on: a uniform sample of this many (the
    # whole split when it is smaller), so the fit's memory does not grow with the data.
    fit_rows: int = Field(default=1_000_000, ge=1)


class TrainParams(_Section):
    # resnetNN: He et al.'s residual network with torchvision's parameter names (pipeline/train/resnet.py)
    model: Literal["cnn", "mlp", "lstm", "transformer", "resnet18", "resnet34", "resnet50", "resnet101",
                   "resnet152"] = "cnn"
    channels: list[int] = Field(default=[32, 64], min_length=1)  # cnn
    hidden: list[int] = Field(default=[128], min_length=0)  # the dense head after any encoder
    dropout: float = Field(default=0.2, ge=0.0, lt=1.0)
    norm: Literal["auto", "batch", "layer", "none"] = "auto"  # auto: batch for cnn, layer for sequences, none for mlp
    width: int = Field(default=64, ge=1)  # lstm hidden size / transformer d_model
    depth: int = Field(default=2, ge=1)  # lstm / transformer layers
    heads: int = Field(default=4, ge=1)  # transformer attention heads
    epochs: int = Field(default=40, ge=1)
    batch_size: int = Field(default=64, ge=1)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    schedule: Literal["none", "cosine", "plateau"] = "none"
    grad_clip: float | None = Field(default=None, gt=0.0)  # max gradient norm
    # Mixed precision for the forward pass: bf16 or fp16 pays on GPUs; fp32 is exact.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    patience: int = Field(default=6, ge=1)
    seed: int = 42
    num_workers: int = Field(default=2, ge=1)
    cpus_per_worker: int = Field(default=1, ge=1)
    use_gpu: bool = False
    max_failures: int = Field(default=1, ge=0)
    num_to_keep: int = Field(default=2, ge=1)
    # A fault drill: rank 0 exits hard once at this epoch, and the run must resume from
    # its latest checkpoint. Off (null) in normal runs.
    fail_at_epoch: int | None = Field(default=None, ge=1)
    # Warm start: initialise from a registered model's weights (models:/NAME@champion,
    # models:/NAME/3, runs:/ID/model); tensors whose shapes differ (a new head) start fresh.
    init_from: str | None = None
    # A Ray cluster to train on (RAY_ADDRESS does the same); null: a local Ray instance.
    ray_address: str | None = None
    # Where Ray Train keeps checkpoints: a path on every node (NFS) or s3://bucket/prefix
    # for multi-node clusters; null: artifacts/ray in the project.
    storage_path: str | None = None
    # How the splits stream from Ray Data into the workers (get_dataset_shard). local: each
    # worker shuffles through a buffer of `shuffle_buffer` rows; full: Ray Data's random
    # shuffle of the whole split, a new order every epoch; none: file order.
    shuffle: Literal["local", "full", "none"] = "local"
    shuffle_buffer: int = Field(default=20_000, ge=1)
    prefetch_batches: int = Field(default=2, ge=0)  # batches each worker fetches ahead
    # Object-store MiB Ray Data may hold in flight while streaming the splits to the workers;
    # null: Ray Data's own limit (256 for images). Lower saves memory on large data and costs speed.
    ingest_memory_mb: int | None = Field(default=None, ge=64)
    # memory: featurise the splits once into Ray's object store; stream: read and featurise
    # every epoch (flat memory, any size); auto: memory when they fit in a quarter of it.
    cache_features: Literal["auto", "memory", "stream"] = "auto"
    grad_accum_steps: int = Field(default=1, ge=1)  # optimizer step every N batches
    # The learning rate scaled with the number of workers (the effective batch grows with it).
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    compile: bool = False  # torch.compile the model (pays on long GPU runs; compiling takes a while)
    channels_last: bool = False  # cnn: NHWC memory layout, faster convolutions on tensor-core GPUs
    # Transfer learning (the resnet models). pretrained: a ResNet state_dict saved elsewhere in
    # torchvision's or timm's naming, a .safetensors or .pt file (a path relative to the
    # project, or absolute); d2d downloads nothing. The head is new. (A registered model's
    # weights: init_from.)
    pretrained: Path | None = None
    # none; backbone (only the new head trains); or N: all but the last N blocks held fixed.
    freeze: str | int = "none"
    unfreeze_epoch: int | None = Field(default=None, ge=2)  # from this epoch (1-based) everything trains
    backbone_lr_scale: float = Field(default=1.0, gt=0.0, le=1.0)  # the backbone's rate: train.lr times this

    @field_validator("freeze", mode="before")
    @classmethod
    def _freeze(cls, value: Any) -> str | int:
        if value in ("none", "backbone") or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return value
        raise ValueError(f"expected none, backbone or a number of blocks to keep training (0 or more), not {value!r}")

    @model_validator(mode="after")
    def _heads(self) -> TrainParams:
        if self.model == "transformer" and self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if self.channels_last and self.model != "cnn":
            raise ValueError(f"channels_last is for the cnn, not {self.model}")
        if self.shuffle == "local" and self.shuffle_buffer < self.batch_size:
            raise ValueError(f"shuffle_buffer ({self.shuffle_buffer}) must hold at least one batch ({self.batch_size})")
        if self.init_from is not None and not self.init_from.startswith(("models:/", "runs:/")):
            raise ValueError(f"init_from {self.init_from!r}: expected an MLflow model URI (models:/NAME@champion or runs:/ID/model)")
        transfer = [name for name, on in (("pretrained", self.pretrained is not None), ("freeze", self.freeze != "none"),
                                          ("backbone_lr_scale", self.backbone_lr_scale != 1.0)) if on]
        if transfer and not self.model.startswith("resnet"):
            raise ValueError(f"{transfer[0]} is for the resnet models, not {self.model}")
        if self.pretrained is not None and self.init_from is not None:
            raise ValueError("give pretrained (a weights file) or init_from (a registered model), not both")
        if self.unfreeze_epoch is not None and self.freeze == "none":
            raise ValueError("unfreeze_epoch needs freeze: backbone or a number of blocks")
        return self


class SearchDim(_Section):
    """One searched hyperparameter: exactly one of loguniform/uniform [low, high] or choice [values]."""

    loguniform: list[float] | None = Field(default=None, min_length=2, max_length=2)
    uniform: list[float] | None = Field(default=None, min_length=2, max_length=2)
    choice: list[Any] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one(self) -> SearchDim:
        given = [k for k in ("loguniform", "uniform", "choice") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of loguniform, uniform or choice")
        bounds = self.loguniform or self.uniform
        if bounds and not bounds[0] < bounds[1]:
            raise ValueError(f"{given[0]} needs [low, high] with low < high, got {bounds}")
        if self.loguniform and self.loguniform[0] <= 0:
            raise ValueError("loguniform bounds must be positive")
        return self


# Hyperparameters a trial may change; the rest (workers, failure policy, the drill) is fixed.
TUNABLE = {"lr", "batch_size", "dropout", "hidden", "channels", "width", "depth", "heads",
           "weight_decay", "optimizer", "schedule", "grad_clip", "norm", "model"}


class TuneParams(_Section):
    """Ray Tune with ASHA over Ray Train runs; the best config then trains the model."""

    enabled: bool = False
    num_samples: int = Field(default=8, ge=1)
    max_concurrent: int = Field(default=1, ge=1)  # trials at once; each takes workers_per_trial + 1 CPUs
    workers_per_trial: int = Field(default=1, ge=1)
    epochs: int | None = Field(default=None, ge=1)  # per trial; null: train.epochs
    grace_period: int = Field(default=2, ge=1)  # ASHA: epochs before a trial can be stopped
    reduction_factor: int = Field(default=3, ge=2)  # ASHA: keep the top 1/N at each rung
    seed: int = 0
    space: dict[str, SearchDim] = {
        "lr": SearchDim(loguniform=[1e-4, 1e-2]),
        "batch_size": SearchDim(choice=[32, 64, 128]),
        "hidden": SearchDim(choice=[[64], [128], [256]]),
        "dropout": SearchDim(uniform=[0.0, 0.5]),
    }

    @model_validator(mode="after")
    def _space(self) -> TuneParams:
        unknown = sorted(set(self.space) - TUNABLE)
        if unknown:
            raise ValueError(f"space: '{unknown[0]}' cannot be tuned; choose from {', '.join(sorted(TUNABLE))}")
        if self.enabled and not self.space:
            raise ValueError("space is empty; give at least one hyperparameter to search")
        return self


class EvaluateParams(_Section):
    experiment: str = "d2d"
    # Metrics per group of this column (a categorical's values, or a numeric's quantile bins):
    # the check for a model that is worse for one group than for the others.
    slice_column: str | None = None
    slice_bins: int = Field(default=4, ge=2)
    attribution_examples: int = Field(default=2, ge=1, le=10)  # test examples per class in attributions.png
    # Metrics are exact over every row (summed batch by batch); the plots, slices and
    # attributions use a uniform sample of at most this many rows of each split (all of a
    # smaller split).
    sample_rows: int = Field(default=200_000, ge=100)


class RegisterParams(_Section):
    model_name: str = "d2d-digits"
    # The absolute gate: a version below this test accuracy is registered but not promoted.
    min_test_accuracy: float = Field(default=0.95, ge=0.0, le=1.0)  # classification
    min_test_r2: float = Field(default=0.5, le=1.0)  # regression
    # Challenger vs champion, both scored on the current test split: this metric (higher is
    # better; null: f1_macro, or r2 for regression) may be at most `tolerance` below the champion's.
    compare_metric: Literal["accuracy", "f1_macro", "roc_auc_ovr", "r2"] | None = None
    tolerance: float = Field(default=0.005, ge=0.0)


class DriftParams(_Section):
    """Drift tests and thresholds (defaults as drift tools set them)."""

    drift_share: float = Field(default=0.5, gt=0.0, le=1.0)  # the dataset drifts at this share of drifted features
    small_reference_rows: int = Field(default=1000, ge=1)  # up to here: KS / chi-squared; above: distances
    ks_p: float = Field(default=0.05, gt=0.0, lt=1.0)
    wasserstein_threshold: float = Field(default=0.1, gt=0.0)  # normalised by the reference's std
    chi2_p: float = Field(default=0.05, gt=0.0, lt=1.0)
    js_threshold: float = Field(default=0.1, gt=0.0, le=1.0)
    psi_bins: int = Field(default=10, ge=2)
    # A domain classifier (reference vs current); auto: for inputs with at least wide_features columns.
    multivariate: Literal["auto", "on", "off"] = "auto"
    wide_features: int = Field(default=20, ge=1)
    domain_auc_threshold: float = Field(default=0.6, gt=0.5, le=1.0)
    domain_max_rows: int = Field(default=2000, ge=50)  # rows sampled from each side
    # Images: MMD between the champion's embeddings of the reference and the batch, with a
    # permutation test (p < mmd_p drifts), on at most mmd_max_rows images a side.
    mmd_p: float = Field(default=0.05, gt=0.0, lt=1.0)
    mmd_permutations: int = Field(default=500, ge=20, le=100_000)
    mmd_max_rows: int = Field(default=500, ge=20, le=20_000)


class MonitorParams(_Section):
    """The drift monitor: where new batches arrive, and when a drifted batch retrains."""

    inbox: str = "data/inbox"  # new labelled batches (CSV or Parquet), each processed once
    read_inference_log: bool = True  # also inspect what `d2d serve` logged (serve.log_dir; unlabelled)
    state: str = "data/monitor"  # the ledger of processed batches and retrains
    # The champion's metric (register.compare_metric) on a labelled batch may fall this far
    # below its test metric before it counts as performance decay.
    performance_tolerance: float = Field(default=0.05, ge=0.0)
    retrain_on_prediction_drift: bool = False  # the champion's outputs moved, with inputs that did not
    cooldown_hours: float = Field(default=24.0, ge=0.0)  # no retrain within this long of the last one
    max_retrains: int = Field(default=3, ge=0)  # at most this many retrains ...
    window_hours: float = Field(default=168.0, gt=0.0)  # ... in this window (a week)
    # flow: run the training flow in this process; event: emit d2d.drift.detected and let the
    # training deployment's automation (prefect.yaml) run it on a worker; auto: event when
    # PREFECT_API_URL names a server, else flow; off: decide and report only.
    retrain: Literal["auto", "flow", "event", "off"] = "auto"
    experiment: str = "monitoring"  # the MLflow experiment of drift reports
    # The drift reference: a uniform sample of at most this many train rows (all of a smaller
    # split), so the monitor's memory does not grow with the dataset.
    reference_rows: int = Field(default=50_000, ge=100)

    @field_validator("retrain", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        return "off" if value is False else value  # YAML reads a bare `off` as false


class AutoscalingParams(_Section):
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    target_ongoing_requests: float = Field(default=2.0, gt=0.0)


class ServeParams(_Section):
    """`d2d serve`: the champion behind Ray Serve on host:port, and `d2d predict`."""

    host: str = "127.0.0.1"  # loopback unless you mean to expose it
    port: int = Field(default=8000, ge=1, le=65535)
    alias: str = "champion"  # serves models:/<register.model_name>@<alias>
    poll_s: float = Field(default=10.0, gt=0.0)  # how often a replica checks where the alias points
    num_replicas: int = Field(default=1, ge=1)  # ignored when autoscaling is set
    autoscaling: AutoscalingParams | None = None
    cpus_per_replica: float = Field(default=1.0, gt=0.0)
    use_gpu: bool = False  # one GPU per replica
    max_batch_size: int = Field(default=64, ge=1)  # @serve.batch: requests scored together
    batch_wait_timeout_s: float = Field(default=0.002, ge=0.0)
    max_body_bytes: int = Field(default=5_000_000, ge=1)  # larger bodies get 413
    max_rows: int = Field(default=2048, ge=1)  # more rows in one request get 413
    log_dir: str = "data/inference_log"  # Parquet, partitioned by date=YYYY-MM-DD; empty: no log
    log_flush_s: float = Field(default=5.0, gt=0.0)
    log_max_queued_rows: int = Field(default=100_000, ge=1)  # rows waiting for the writer; more are dropped and counted
    log_retention_days: int | None = Field(default=None, ge=1)  # date= partitions older than this are removed; None: kept
    # the environment variable holding a bearer token every route but /health requires;
    # None, or the variable unset: open (the log says so at start)
    auth_token_env: str | None = Field(default="D2D_SERVE_TOKEN", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    predict_batch_size: int = Field(default=1024, ge=1)  # `d2d predict`: rows per Ray Data batch
    predict_concurrency: int = Field(default=1, ge=1)  # `d2d predict`: model actors scoring in parallel


class FlowParams(_Section):
    """Prefect orchestration: retries for the tasks that talk to a service (the DVC remote,
    the Ray cluster, MLflow), with exponential backoff."""

    retries: int = Field(default=2, ge=0)
    retry_delay_s: float = Field(default=5.0, ge=0.0)  # the first wait; each later one doubles


class Params(_Section):
    data: DataParams
    validate_: ValidateParams = Field(default=ValidateParams(), alias="validate")
    clean: CleanParams = CleanParams()
    split: SplitParams = SplitParams()
    preprocess: PreprocessParams = PreprocessParams()
    train: TrainParams = TrainParams()
    tune: TuneParams = TuneParams()
    evaluate: EvaluateParams = EvaluateParams()
    register_: RegisterParams = Field(default=RegisterParams(), alias="register")
    flow: FlowParams = FlowParams()
    drift: DriftParams = DriftParams()
    monitor: MonitorParams = MonitorParams()
    serve: ServeParams = ServeParams()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    # True when data.raw was named on the command line (--set data.raw=...): only then may it
    # point outside the project (pipeline.stages.raw_path). Never read from a file.
    _raw_named: bool = PrivateAttr(default=False)

    @property
    def raw_named_explicitly(self) -> bool:
        return self._raw_named

    @model_validator(mode="after")
    def _model_fits_data(self) -> Params:
        compare = self.register_.compare_metric
        if compare is not None and (compare == "r2") != (self.data.task == "regression"):
            raise ValueError(f"register.compare_metric '{compare}' does not apply to a {self.data.task} task")
        if self.evaluate.slice_column is not None and self.evaluate.slice_column not in {
            n for f in self.data.features for n in f.names()
        } | {self.data.target}:
            raise ValueError(f"evaluate.slice_column '{self.evaluate.slice_column}' is not a column of the dataset")
        convolutional = self.train.model == "cnn" or self.train.model.startswith("resnet")
        if self.data.images is not None:
            if not convolutional:
                raise ValueError(f"train.model '{self.train.model}' does not take images; use cnn or a resnet")
        elif convolutional and self.data.image_shape is None:
            raise ValueError(f"train.model '{self.train.model}' needs data.image_shape; use 'mlp' for tabular data")
        if self.preprocess.scale == "range":
            open_ended = [n for f in self.data.features if f.kind == "numeric" and (f.min is None or f.max is None) for n in f.names()]
            if open_ended:
                raise ValueError(f"preprocess.scale 'range' needs min and max for every numeric feature; {open_ended[0]} has none")
        return self

    def as_dict(self) -> dict[str, Any]:
        """The params as params.yaml spells them (for logging and hashing)."""
        return self.model_dump(mode="json", by_alias=True)

    def digest(self) -> str:
        """A stable hash of the effective params, for lineage tags."""
        blob = json.dumps(self.as_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` → (["section", "key"], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({e.__class__.__name__})") from e
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides to the raw mapping; unknown keys fail later, in validation."""
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return raw


# Keys an earlier d2d wrote into params files, and where they are now.
MOVED = {"validate.engine": "data.engine (where validate, clean and split run)"}


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "params"
    extra = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        moved = f": it is now {MOVED[key]}" if key in MOVED else ""
        return f"params: unknown key '{key}'{moved}{extra}"
    return f"params: {key}: {first['msg']}{extra}"


def params_from_dict(raw: dict[str, Any]) -> Params:
    """Validate a raw mapping; the error names the first bad key."""
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None


def load_params(path: Path | str = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read params.yaml, apply overrides, validate. Raises ConfigError naming the bad key."""
    path = Path(path)
    try:
        if not path.is_file():
            raise ConfigError(f"params file not found: {path}")
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file ({e.reason} at byte {e.start})") from None
    except OSError as e:  # a name too long, a folder without permission: the path is the user's to fix
        raise ConfigError(f"params file {path}: {e.strerror}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    params = params_from_dict(apply_overrides(raw, overrides or []))
    params._raw_named = any(parse_override(o)[0] == ["data", "raw"] for o in overrides or [])
    return params
