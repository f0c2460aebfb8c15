"""Schema inference for bring-your-own data: column kinds, ranges with a margin, value sets,
nullability, the task and the modality, rendered as a complete, commented params.yaml."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pipeline.data import images
from pipeline.data.keys import ROW_KEY
from pipeline.errors import DataError

ID_NAMES = {"id", "row_id", "record_id", "uuid", "key", "index"}
MAX_CATEGORIES = 50  # more distinct text values than this is free text or an identifier
RANGE_MARGIN = 0.10  # inferred ranges are widened by this share of the observed span
NUMERIC_SHARE = 0.95  # text columns that parse as numbers this often are numeric columns


def _shown(name: Any) -> str:
    """A name in a one-line message: quoted, with newlines and control characters escaped."""
    return "'" + json.dumps(str(name), ensure_ascii=False)[1:-1] + "'"


def _listed(columns: Any) -> str:
    shown = ", ".join(json.dumps(str(c), ensure_ascii=False)[1:-1] for c in list(columns)[:8])
    return shown + (f" and {len(columns) - 8} more" if len(columns) > 8 else "")


def _id_like(col: Any) -> bool:
    name = str(col).lower()
    return name in ID_NAMES or name.endswith("_id")


FLOAT_MAX = float(np.finfo("float64").max)


def numeric_range(lo: float, hi: float, integral: bool) -> tuple[Any, Any]:
    """The observed range widened by RANGE_MARGIN, as params write it: finite, and strictly
    wider than the data even where a margin of 1 is below the spacing of floats (beyond
    2**53) or the widened bound overflows (near 1.8e308)."""
    margin = (hi - lo) * RANGE_MARGIN or 1.0
    new_lo = max(min(lo - margin, float(np.nextafter(lo, -np.inf))), -FLOAT_MAX)
    new_hi = min(max(hi + margin, float(np.nextafter(hi, np.inf))), FLOAT_MAX)
    if lo >= 0 > new_lo:
        new_lo = 0.0  # non-negative data stays non-negative
    if integral:
        return math.floor(new_lo), math.ceil(new_hi)
    # rounded for the reader, unless rounding would cut into the data or close the range
    shown_lo, shown_hi = _scalar(new_lo), _scalar(new_hi)
    if shown_lo <= lo and hi <= shown_hi and shown_lo < shown_hi:
        return shown_lo, shown_hi
    return new_lo, new_hi


def _scalar(v: Any) -> Any:
    """numpy scalars → plain Python, integral floats → int (they render cleanly in YAML)."""
    v = v.item() if isinstance(v, np.generic) else v
    if isinstance(v, float):
        v = float(f"{v:.6g}")  # 10.649999999999999 → 10.65; the margin dwarfs the rounding
        return int(v) if v.is_integer() else v
    return v


# The distinct values kept per column while inferring batch by batch: beyond this a text column
# is free text and a target is not a set of classes, whatever the exact count.
DISTINCT_CAP = 100_000


@dataclass
class ColumnTally:
    """What inferring one column needs, summed over the batches of a dataset: the answer is the
    same as for the whole column read at once (`infer_column`), and memory holds at most
    DISTINCT_CAP distinct values."""

    kinds: set[str] = field(default_factory=set)  # numpy dtype kinds of the batches
    nulls: int = 0
    values: int = 0  # non-null values
    numbers: int = 0  # non-null values that read as numbers
    finite: int = 0
    lo: float = math.inf
    hi: float = -math.inf
    whole: bool = True  # every finite number is a whole number
    distinct: set[str] = field(default_factory=set)  # the text batches' values
    # The numeric batches' distinct values by dtype, as text only where a text batch makes the
    # column text (`texts`): turning 100,000 floats per column into strings up front was most
    # of init-params' time on numeric data (9 s of 11 at 1M rows × 64 columns).
    numeric: dict[str, pd.Series] = field(default_factory=dict)
    overflow: bool = False  # more than DISTINCT_CAP distinct values

    def add(self, col: pd.Series) -> ColumnTally:
        kind = col.dtype.kind
        self.kinds.add(kind)
        values = col.dropna()
        self.nulls += len(col) - len(values)
        self.values += len(values)
        if values.empty or kind in "mM":
            return self
        if kind == "b":  # True/False are categories, not 1/0
            values = values.astype("string")
        numbers = pd.to_numeric(values, errors="coerce") if kind not in "iuf" else values
        numbers = numbers.dropna().astype("float64").to_numpy()
        self.numbers += len(numbers)
        numbers = numbers[np.isfinite(numbers)]  # an infinity is a bad value, not the range
        if len(numbers):
            self.finite += len(numbers)
            self.lo, self.hi = min(self.lo, float(numbers.min())), max(self.hi, float(numbers.max()))
            self.whole = self.whole and bool((numbers == np.floor(numbers)).all())
        if self.overflow:
            return self
        unique = pd.Series(values.unique()[: DISTINCT_CAP + 1])
        if kind in "iuf":
            # one dtype's distinct numbers are distinct strings, so this count is a lower bound
            key = str(unique.dtype)
            known = self.numeric.get(key)
            unique = unique if known is None else pd.Series(pd.concat([known, unique]).unique())
            self.numeric[key] = unique
        else:
            self.distinct.update(unique.astype("string"))
        if len(unique) > DISTINCT_CAP or len(self.distinct) > DISTINCT_CAP:
            self.overflow, self.distinct, self.numeric = True, set(), {}
        return self

    def texts(self) -> set[str] | None:
        """Every distinct value as text (how a whole read gives a text column), or None beyond DISTINCT_CAP."""
        if self.overflow:
            return None
        texts = self.distinct.union(*(unique.astype("string") for unique in self.numeric.values()))
        return texts if len(texts) <= DISTINCT_CAP else None

    @property
    def kind(self) -> str:
        """The dtype kind pandas gives the whole column: integer, float, or otherwise object-like."""
        if self.kinds <= set("iu"):
            return "i"
        if self.kinds <= set("iuf"):
            return "f"
        return next(iter(self.kinds)) if len(self.kinds) == 1 else "O"

    def spec(self, name: str) -> tuple[dict[str, Any] | None, str]:
        """A feature spec for the column, or None with the reason it is left out."""
        nullable = self.nulls > 0
        kind = self.kind
        if not self.values:
            return None, "every value is null"
        if kind in "mM":
            return None, "dates are not supported as features yet"
        if kind in "if" or self.numbers >= NUMERIC_SHARE * self.values:
            if not self.finite:
                return None, "no finite numbers"
            # "int" only where pandas reads integers (or would, but for the nulls): the served
            # model's signature must match what a CSV reader produces, and MLflow will not cast
            # float64 "59.0" to int64.
            integral = kind == "i" or (self.whole and nullable and kind == "f")
            lo, hi = numeric_range(self.lo, self.hi, integral)
            spec = {"name": name, "kind": "numeric", "dtype": "int" if integral else "float", "min": lo, "max": hi}
        else:
            texts = self.texts()
            if texts is None or len(texts) > MAX_CATEGORIES:
                count = f"more than {DISTINCT_CAP:,}" if texts is None else len(texts)
                return None, f"{count} distinct text values: free text or an identifier"
            spec = {"name": name, "kind": "categorical", "dtype": "str", "values": sorted(texts)}
        if nullable:
            spec["nullable"] = True
        return spec, ""


def infer_column(name: str, col: pd.Series) -> tuple[dict[str, Any] | None, str]:
    """A feature spec for one column, or None with the reason it is left out."""
    return ColumnTally().add(col).spec(name)


@dataclass
class TargetTally:
    """What inferring the task needs from the target, summed over batches."""

    kinds: set[str] = field(default_factory=set)
    first: Any = None  # the first non-null value, to name a single class
    distinct: set[Any] = field(default_factory=set)
    overflow: bool = False
    infinite: int = 0
    whole: bool = True

    def add(self, y: pd.Series) -> None:
        values = y.dropna()
        if values.empty:
            return
        self.kinds.add(values.dtype.kind)
        if self.first is None:
            self.first = values.iloc[0]
        if values.dtype.kind in "iuf":
            numbers = values.to_numpy(dtype="float64")
            self.infinite += int((~np.isfinite(numbers)).sum())
            self.whole = self.whole and bool((numbers == np.floor(numbers)).all())
        if not self.overflow:
            self.distinct.update(values.unique()[: DISTINCT_CAP + 1])
            if len(self.distinct) > DISTINCT_CAP:
                self.overflow, self.distinct = True, set()

    def task(self, name: Any) -> tuple[str, list[Any] | None]:
        """Classification for text or up to 20 distinct integers; regression for other numbers."""
        if not self.overflow and len(self.distinct) < 2:
            raise DataError(f"target {_shown(name)} has a single class "
                            f"({_shown(self.first) if self.first is not None else 'all null'}): nothing to learn")
        numeric = bool(self.kinds) and self.kinds <= set("iuf")
        if numeric and self.infinite:
            raise DataError(f"target {_shown(name)} holds {self.infinite} infinite value(s): "
                            "neither a class nor a number to learn")
        integral = numeric and self.whole
        if numeric and not (integral and not self.overflow and len(self.distinct) <= 20):
            return "regression", None
        if self.overflow:
            raise DataError(f"target {_shown(name)} has more than {DISTINCT_CAP:,} distinct text values: "
                            "too many to be classes")
        return "classification", sorted({_scalar(v) for v in self.distinct}, key=lambda v: (isinstance(v, str), v))


def infer_task(y: pd.Series) -> tuple[str, list[Any] | None]:
    """Classification for text or up to 20 distinct integers; regression for other numbers."""
    tally = TargetTally()
    tally.add(y)
    return tally.task(y.name)


@dataclass
class IdTally:
    """Whether a column could be the row id: present in every row, and unique (by 64-bit
    hashes of its values across batches)."""

    nulls: int = 0
    hashes: list[np.ndarray] = field(default_factory=list)

    def add(self, col: pd.Series) -> None:
        self.nulls += int(col.isna().sum())
        self.hashes.append(pd.util.hash_pandas_object(col, index=False).to_numpy())

    def unique(self) -> bool:
        hashes = np.concatenate(self.hashes) if self.hashes else np.empty(0, "uint64")
        return self.nulls == 0 and len(np.unique(hashes)) == len(hashes)


def infer_batches(batches: Iterable[pd.DataFrame], target: str, id_column: str | None = None,
                  image_shape: list[int] | None = None, features_needed: bool = True) -> tuple[dict[str, Any], list[str]]:
    """The `data` section of params.yaml for a dataset read as batches (one batch in memory at
    a time), and notes on columns left out: the same answer as for the whole frame at once."""
    columns: list[Any] | None = None
    rows = 0
    tallies: dict[Any, ColumnTally] = {}
    target_tally = TargetTally()
    ids: dict[Any, IdTally] = {}
    for df in batches:
        if columns is None:
            columns = list(df.columns)
            if target not in columns:
                raise DataError(f"target column {_shown(target)} is not in the file (columns: {_listed(columns)})")
            if id_column is not None and id_column not in columns:
                raise DataError(f"id column {_shown(id_column)} is not in the file (columns: {_listed(columns)})")
            tallies = {c: ColumnTally() for c in columns if c not in (target, id_column)}
            ids = {c: IdTally() for c in tallies if id_column is None and _id_like(c)}
        rows += len(df)
        target_tally.add(df[target])
        for name, tally in tallies.items():
            tally.add(df[name])
        for name, tally in ids.items():
            tally.add(df[name])
    if not rows or columns is None:
        raise DataError("the file has no rows")
    id_col = id_column if id_column is not None else next((c for c, t in ids.items() if t.unique()), None)
    task, classes = target_tally.task(target)
    features, notes = [], []
    for name in columns:
        if name in (target, id_col):
            continue
        if str(name) == ROW_KEY:
            notes.append(f"{_shown(name)[1:-1]}: left out (the name is reserved for the row key d2d derives)")
            continue
        if id_col is None and _id_like(name):
            notes.append(f"{_shown(name)[1:-1]}: left out (named like an id, but its values are not unique and present in every row)")
            continue
        spec, why = tallies[name].spec(str(name))
        if spec is None:
            notes.append(f"{_shown(name)[1:-1]}: left out ({why})")
        else:
            features.append(spec)
    if not features and features_needed:
        raise DataError("no usable feature columns")
    data: dict[str, Any] = {"id_column": None if id_col is None else str(id_col), "target": target, "task": task, "classes": classes, "features": features}
    if image_shape:
        if any(f["kind"] != "numeric" for f in features) or int(np.prod(image_shape)) != len(features):
            raise DataError(f"--image-shape {image_shape} needs {int(np.prod(image_shape))} numeric features; found {len(features)}")
        data["image_shape"] = list(image_shape)
    return data, notes


# Files decoded to describe an image dataset's sizes and modes: enough for their spread, and
# init-params stays a few seconds long on any folder.
DESCRIBE_IMAGES = 2_000


def image_path_column(head: pd.DataFrame, named: str | None) -> str | None:
    """The column of a table that names image files (`named` when given): text whose values
    mostly end in an image suffix. None: the table is a table."""
    candidates = [named] if named is not None else list(head.columns)
    for name in candidates:
        if name not in head.columns or head[name].dtype.kind not in "OSU" and str(head[name].dtype) != "string":
            continue
        values = head[name].dropna().astype(str)
        if len(values) and values.map(lambda v: Path(v).suffix.lower() in images.SUFFIXES).mean() >= 0.9:
            return str(name)
    return None


def is_image_folder(path: Path) -> bool:
    """A folder of class folders holding image files (and no CSV or Parquet parts)."""
    if not path.is_dir():
        return False
    files = (p for p in path.glob("*/**/*") if p.is_file() and not p.name.startswith("."))
    return any(p.suffix.lower() in images.SUFFIXES for _, p in zip(range(1000), files))


def infer_images(raw: Path, target: str, path_column: str | None) -> tuple[dict[str, Any], list[str]]:
    """The `data` section for image files: a folder of class folders, or a manifest table with
    a column of image paths (`path_column`) and the target, its other columns inferred as
    features. The classes, and the sizes and modes of (a sample of) the files, decoded once,
    give the training size and mode."""
    from pipeline.data import io as data_io

    notes: list[str] = []
    if raw.is_dir():
        rows, refused = images.list_folder(raw)
        column = path_column or images.PATH
        data: dict[str, Any] = {"id_column": column, "target": target, "task": "classification",
                                "classes": sorted(rows[images.LABEL].astype(str).unique().tolist()), "features": []}
        root = raw
        if len(refused):
            notes.append(f"{len(refused)} file(s) are not in a class folder or lead out of it (validate quarantines them)")
    else:
        column = path_column or images.PATH
        data, notes = infer_batches(data_io.read_batches(raw), target, column, features_needed=False)
        if data["task"] != "classification":
            raise DataError(f"target {_shown(target)}: image files are classified; its values look like a regression target")
        rows, _ = images.read_manifest(raw, column, target)
        root = raw.parent
    if len(rows) < 2:
        raise DataError(f"{raw}: {len(rows)} image file(s); a dataset needs more")
    sample = rows.sample(n=min(DESCRIBE_IMAGES, len(rows)), random_state=0)
    anything = images.ImageChecks(convert=("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "I;16", "F", "YCbCr"),
                                  min_side=1, max_aspect=float("inf"))
    facts = pd.concat(list(images.inspect_files(sample, root, anything)), ignore_index=True)
    usable = facts[facts[images.REASON].isna()]
    if usable.empty:
        raise DataError(f"{raw}: none of {len(sample)} files read is an image Pillow can decode")
    if len(usable) < len(facts):
        notes.append(f"{len(facts) - len(usable)} of {len(facts)} files read are not usable images "
                     "(validate quarantines them with their reasons)")
    modes = usable["mode"].value_counts()
    sizes = (usable["width"].astype(int).astype(str) + "x" + usable["height"].astype(int).astype(str)).value_counts()
    grey = set(modes.index) <= {"1", "L", "LA", "I", "I;16", "F"}
    data["images"] = {
        "path_column": column,
        "size": images.training_size(usable["width"], usable["height"]),
        "mode": "L" if grey else "RGB",
        "found": {"files": int(len(rows)), "read": int(len(facts)),
                  "modes": {str(k): int(v) for k, v in modes.items()},
                  "sizes": {str(k): int(v) for k, v in sizes.head(5).items()}, "distinct_sizes": int(len(sizes))},
    }
    return data, notes


def infer_schema(df: pd.DataFrame, target: str, id_column: str | None = None, image_shape: list[int] | None = None) -> tuple[dict[str, Any], list[str]]:
    """The `data` section of params.yaml for `df`, and notes on columns left out."""
    return infer_batches([df], target, id_column, image_shape)


# Every stage's defaults with their comments. Static text: nothing from the user's file is
# joined into it; the data section and the few values that depend on the data are set on the
# loaded document, and ruamel.yaml writes them (quoting any name, so every name round-trips).
_TEMPLATE = """\
validate:
  max_bad_row_fraction: 0.30         # up to 30% of a raw dataset may be wrong (d2d's premise): those rows are quarantined with their reasons; above this share the dataset is rejected
  min_rows: 50
  max_rows: null
  max_non_numeric_fraction: 0.5      # a numeric column with more text than this fails the dataset
  data_docs: true                    # GX Data Docs at reports/data_docs/index.html

clean:
  drop_duplicates: true              # also drops identical features under another label
  missing:                           # nulls in nullable columns: drop | median | most_frequent | constant
    numeric: median
    categorical: most_frequent
    fill_value: 0
    columns: {}                      # per column, e.g. {age: drop}
  outliers:
    method: none                     # none | range (schema min/max) | iqr
    action: clip                     # clip | drop
    iqr_k: 1.5

split:
  strategy: stratified               # stratified | random | hash (by id or row key: stable when data is appended)
  train: 0.70
  val: 0.15
  test: 0.15
  seed: 42

preprocess:                          # fitted on the train split only, saved with the model
  scale: standard                    # standard | minmax | range (schema min/max) | none
  max_categories: 50

train:
  model: mlp                         # cnn | mlp | lstm | transformer | resnet18 ... resnet152 (images)
  channels: [32, 64]                 # cnn only
  hidden: [128, 64]                  # the dense head
  dropout: 0.2
  norm: auto                         # auto | batch | layer | none
  width: 64                          # lstm hidden size / transformer d_model
  depth: 2                           # lstm / transformer layers
  heads: 4                           # transformer attention heads
  epochs: 40
  batch_size: 64                     # per worker; effective batch = batch_size × num_workers
  optimizer: adam                    # adam | adamw | sgd
  lr: 0.001
  weight_decay: 0.0
  schedule: none                     # none | cosine | plateau
  grad_clip: null                    # max gradient norm
  precision: fp32                    # fp32 | bf16 | fp16 (mixed precision; pays on GPUs)
  patience: 6                        # early stopping on validation loss
  seed: 42
  num_workers: 2
  cpus_per_worker: 1
  use_gpu: false
  max_failures: 1                    # a lost worker restarts the group from the latest checkpoint
  num_to_keep: 2
  fail_at_epoch: null                # fault drill: rank 0 exits hard once at this epoch

evaluate:
  experiment: d2d-data

register:
  model_name: d2d-data
  min_test_accuracy: 0.80            # classification: the first version at or above this becomes champion
  min_test_r2: 0.50                  # regression: likewise, on the test R²
"""
COMMENT_COLUMN = 37
NO_ID = ("no id column: d2d derives a stable row key from each row's content (features and target) "
         "and its occurrence number among identical rows")


def _yaml() -> Any:
    """A ruamel.yaml emitter whose output PyYAML (YAML 1.1, what load_params reads) reads back
    exactly: null spelled out, floats always with a dot or as .inf/.nan, no line wrapping."""
    from ruamel.yaml import YAML

    y = YAML()
    y.width = 1 << 20
    y.indent(mapping=2, sequence=4, offset=2)
    y.allow_unicode = True

    def null(rep: Any, _: None) -> Any:
        return rep.represent_scalar("tag:yaml.org,2002:null", "null")

    def number(rep: Any, v: float) -> Any:
        if math.isnan(v):
            text = ".nan"
        elif math.isinf(v):
            text = ".inf" if v > 0 else "-.inf"
        else:
            text = repr(v)
            if "." not in text and "e" in text:
                text = text.replace("e", ".0e", 1)  # 1e-07 is text to YAML 1.1; 1.0e-07 a float
        return rep.represent_scalar("tag:yaml.org,2002:float", text)

    y.representer.add_representer(type(None), null)
    y.representer.add_representer(float, number)
    return y


def _text(v: Any) -> Any:
    """User text (names, labels, paths) always double-quoted: no name can read as a bool, a
    null, a number, a comment or a new key, in YAML 1.1 or 1.2."""
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    return DoubleQuotedScalarString(v) if isinstance(v, str) else v


def _flow_seq(items: list[Any]) -> Any:
    from ruamel.yaml.comments import CommentedSeq

    seq = CommentedSeq(_text(v) for v in items)
    seq.fa.set_flow_style()
    return seq


def _flow_map(d: dict[str, Any]) -> Any:
    from ruamel.yaml.comments import CommentedMap

    out = CommentedMap()
    for k, v in d.items():
        out[k] = _flow_seq(v) if isinstance(v, list) else _text(v) if k in ("name", "prefix") else v
    out.fa.set_flow_style()
    return out


def comment_safe(text: str) -> str:
    """User text inside a YAML comment: one line, printable ASCII (a newline would end the comment)."""
    return json.dumps(text, ensure_ascii=True)[1:-1]


def data_section(data: dict[str, Any], raw: Path | None = None) -> Any:
    """The `data` section as a commented ruamel mapping."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    section = CommentedMap()
    if raw is not None:
        section["raw"] = _text(raw.as_posix())
        section.yaml_add_eol_comment("relative to the project folder; version it with `dvc add`", "raw", COMMENT_COLUMN)
    section["id_column"] = _text(data["id_column"])
    if data["id_column"] is None:
        section.yaml_add_eol_comment(NO_ID, "id_column", COMMENT_COLUMN)
    section["target"] = _text(data["target"])
    section["task"] = data["task"]
    if data["classes"]:
        section["classes"] = _flow_seq(data["classes"])
    section["features"] = CommentedSeq(_flow_map(f) for f in data["features"])
    section.yaml_add_eol_comment("inferred; ranges carry a 10% margin" if data["features"] or "images" not in data
                                 else "a manifest's extra columns; a folder of class folders has none",
                                 "features", COMMENT_COLUMN)
    if "images" in data:
        section["images"] = images_section(data["images"])
    if "image_shape" in data:
        section["image_shape"] = _flow_seq(data["image_shape"])
        section.yaml_add_eol_comment("C, H, W", "image_shape", COMMENT_COLUMN)
    if raw is not None:  # the params file's data section: where its stages run
        section["engine"] = "auto"
        section.yaml_add_eol_comment("where validate, clean and split run: local | ray (actors take the part files "
                                     "side by side) | auto: ray on a configured cluster", "engine", COMMENT_COLUMN)
    return section


def images_section(found: dict[str, Any]) -> Any:
    """`data.images`: the path column, the training size and mode inferred, the file checks at
    their defaults; what the files were, in the comments."""
    from ruamel.yaml.comments import CommentedMap

    from pipeline.config import ImageParams

    seen = found["found"]
    defaults = ImageParams()
    out = CommentedMap()
    out["path_column"] = _text(found["path_column"])
    out.yaml_add_eol_comment("each file's path, relative to the folder (or the manifest's folder): the row id",
                             "path_column", COMMENT_COLUMN)
    out["size"] = found["size"]
    sizes = ", ".join(f"{k} ({v})" for k, v in seen["sizes"].items())
    out.yaml_add_eol_comment(comment_safe(
        f"the square side images are trained at: their median short side; {seen['read']} of {seen['files']} files "
        f"read: {seen['distinct_sizes']} sizes, most often {sizes}"), "size", COMMENT_COLUMN)
    out["mode"] = found["mode"]
    modes = ", ".join(f"{k} ({v})" for k, v in seen["modes"].items())
    out.yaml_add_eol_comment(comment_safe(f"RGB or L; modes found: {modes}"), "mode", COMMENT_COLUMN)
    out["convert"] = _flow_seq(list(defaults.convert))
    out.yaml_add_eol_comment("modes turned into `mode`; files in any other are quarantined", "convert", COMMENT_COLUMN)
    for key, why in (("min_side", "smaller images are quarantined"), ("max_aspect", "long side over short side"),
                     ("max_pixels", "decompression bombs are refused before decoding"), ("max_bytes", "per file"),
                     ("near_duplicate_distance", "perceptual-hash bits: closer val/test images are leakage")):
        out[key] = getattr(defaults, key)
        out.yaml_add_eol_comment(why, key, COMMENT_COLUMN)
    return out


def _dump(doc: Any) -> str:
    out = io.StringIO()
    _yaml().dump(doc, out)
    return out.getvalue()


def render_data_section(data: dict[str, Any], raw: Path | None = None) -> str:
    """`data:` and its inferred contents, as YAML (what `d2d schema infer` prints)."""
    from ruamel.yaml.comments import CommentedMap

    return _dump(CommentedMap(data=data_section(data, raw)))


def render_params(data: dict[str, Any], raw: Path, notes: list[str]) -> str:
    """A complete params.yaml: the inferred data section and every stage's defaults, commented."""
    from ruamel.yaml.comments import CommentedMap

    image = "image_shape" in data
    has_range = all("min" in f for f in data["features"] if f["kind"] == "numeric")
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", raw.stem).strip("-") or "data"
    doc = CommentedMap(data=data_section(data, raw))
    defaults = _yaml().load(_TEMPLATE)
    for key in defaults:
        doc[key] = defaults[key]
    doc["preprocess"]["scale"] = "range" if image and has_range else "standard"
    doc["train"]["model"] = "resnet18" if "images" in data else "cnn" if image else "mlp"
    doc["evaluate"]["experiment"] = f"d2d-{stem}"
    doc["register"]["model_name"] = f"d2d-{stem}"
    header = [
        f"d2d params for {comment_safe(raw.name)}, written by `d2d init-params`. Edit freely: unknown keys",
        "and bad values are errors that name the key. Override a value on the command line with",
        "`d2d run --params THIS_FILE --set train.epochs=10`.",
        *([("Notes on the files:" if "images" in data else "Columns left out:"), *(f"  {comment_safe(n)}" for n in notes)]
          if notes else []),
    ]
    doc.yaml_set_start_comment("\n".join(header) + "\n\n")  # a blank line before data:
    doc.yaml_set_comment_before_after_key("validate", before="\n")  # the template spaces the rest
    return _dump(doc)
