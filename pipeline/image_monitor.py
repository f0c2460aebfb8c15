"""Drift for images (issue 17): what the monitor does differently when the data is image files.

Per-pixel tests do not apply to images of real size, so a batch of images is compared with
the reference in two ways:
- **image properties**: brightness, contrast, sharpness, width, height and aspect (the facts
  validation already records for every file), plus mode and format, each through the same
  univariate tests as a table's features (`drift.column_drift`);
- **embeddings**: the champion's penultimate layer (the input of its last linear layer, cut
  out of the exported network's graph) on the reference and on the batch, compared by a
  domain classifier (ROC-AUC) and by MMD with a permutation test (`drift.mmd_test`).

The reference is the test split, not the train split: the champion has learned the train
images, and its embeddings of them differ from those of any unseen image, drift or not.

An inbox batch is a folder: class folders (`<batch>/<label>/*.png`, labelled, the dataset's
own layout) or images directly in it (unlabelled, as production traffic comes). A labelled
batch that drifted joins an image-folder dataset as new files under each class folder
(`<label>/<batch key>/...`), so DVC caches only the new files; a manifest dataset is not
appended to (the manifest is the user's file), and the report says so.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline import drift
from pipeline.config import DriftParams, Params
from pipeline.data import images, io
from pipeline.data.schema import Schema
from pipeline.errors import DataError
from pipeline.preprocess import IMAGE_COLUMN, transform

if TYPE_CHECKING:
    import torch

    from pipeline.monitor import Screened

PROPERTIES = ["brightness", "contrast", "sharpness", "width", "height", "aspect"]  # tested as numbers
KINDS_OF_FILE = ["mode", "format"]  # tested as categories
EXAMPLES = 8  # example images of each side in the report
EMBED_BATCH = 256  # images through the network at a time
MIN_EMBEDDED = 10  # images a side, at least, for the domain classifier's 3 folds and MMD


def is_batch_folder(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".")


def list_batch(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, bool]:
    """A batch folder's files as rows (path relative to the folder, label), the files that
    cannot be rows with their reasons, and whether the batch is labelled: class folders are
    labelled; images directly in the folder, with no class folders, are not."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    if entries and not any(p.is_dir() for p in entries):
        rows = pd.DataFrame({images.PATH: sorted(p.name for p in entries if p.is_file()), images.LABEL: None})
        return rows, pd.DataFrame(columns=[images.PATH, images.LABEL, images.REASON]), False
    rows, refused = images.list_folder(folder)
    return rows, refused, True


def properties(frame: pd.DataFrame) -> pd.DataFrame:
    """The image properties drift is tested on, from the facts validation recorded."""
    out = frame[[*PROPERTIES[:-1], *KINDS_OF_FILE]].copy()
    out[PROPERTIES[:-1]] = out[PROPERTIES[:-1]].astype("float64")
    out["aspect"] = out["width"] / out["height"]
    return out


def penultimate(net: torch.nn.Module) -> torch.nn.Module:
    """The exported network cut before its last linear layer: what it returns is that layer's
    input, the embedding the classifier head reads. A copy of the graph over the same weights."""
    import torch

    linear = [n for n in net.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.linear.default]
    if not linear:
        raise DataError("the champion's network has no linear layer to take embeddings before")
    graph = torch.fx.Graph()
    copies: dict[Any, Any] = {}
    graph.graph_copy(net.graph, copies)
    graph.output(copies[linear[-1]].args[0])
    return torch.fx.GraphModule(net, graph)


def embeddings(python_model: Any, frame: pd.DataFrame) -> np.ndarray:
    """The champion's penultimate-layer embeddings of the images in `frame` (its IMAGE bytes),
    through the model's own preprocessing."""
    import torch

    cut = penultimate(python_model.net)
    out = []
    with torch.no_grad():
        for start in range(0, len(frame), EMBED_BATCH):
            x = torch.from_numpy(transform(frame.iloc[start:start + EMBED_BATCH], python_model.state))
            out.append(cut(x).flatten(1).numpy())
    return np.concatenate(out) if out else np.empty((0, 0), dtype="float32")


def sample(frame: pd.DataFrame, rows: int, seed: int = 0) -> pd.DataFrame:
    if len(frame) <= rows:
        return frame
    return frame.iloc[np.sort(np.random.default_rng(seed).choice(len(frame), rows, replace=False))]


def image_drift(reference: pd.DataFrame, reference_embeddings: np.ndarray, current: pd.DataFrame,
                current_embeddings: np.ndarray, params: DriftParams) -> drift.DriftReport:
    """Property drift (each property's test, voted by drift.drift_share) and embedding drift
    (domain classifier and MMD); the batch drifted when either says so."""
    report = drift.column_drift(properties(reference), properties(current), PROPERTIES, KINDS_OF_FILE, params,
                                multivariate=False)
    if min(len(reference_embeddings), len(current_embeddings)) < MIN_EMBEDDED:  # a 3-fold classifier needs more
        return drift.DriftReport(report.features, report.share, None, report.drifted, [
            *report.reasons, f"embeddings: not compared, {len(current_embeddings)} images in the batch and "
                             f"{len(reference_embeddings)} in the reference (at least {MIN_EMBEDDED} each)"])
    auc = drift.domain_classifier_auc(reference_embeddings, current_embeddings, params.domain_max_rows)
    mmd2, p = drift.mmd_test(reference_embeddings, current_embeddings, params.mmd_permutations, params.mmd_max_rows)
    by_auc, by_mmd = auc >= params.domain_auc_threshold, p < params.mmd_p
    embedding = {"method": "embeddings: the champion's penultimate layer", "dimensions": int(reference_embeddings.shape[1]),
                 "roc_auc": round(auc, 4), "threshold": params.domain_auc_threshold, "mmd2": round(mmd2, 6),
                 "mmd_p": round(p, 4), "mmd_threshold": params.mmd_p, "drifted": bool(by_auc or by_mmd)}
    reasons = [*report.reasons,
               f"embeddings: domain classifier ROC-AUC {auc:.3f} {'≥' if by_auc else '<'} {params.domain_auc_threshold:g}",
               f"embeddings: MMD² {mmd2:.4g}, permutation p {p:.4f} {'<' if by_mmd else '≥'} {params.mmd_p:g}"]
    return drift.DriftReport(report.features, report.share, embedding, report.drifted or embedding["drifted"], reasons)


def examples(reference: pd.DataFrame, current: pd.DataFrame) -> tuple[list[bytes], list[bytes]]:
    return (sample(reference, EXAMPLES)[IMAGE_COLUMN].tolist(), sample(current, EXAMPLES, 1)[IMAGE_COLUMN].tolist())


def screen_folder(folder: Path, schema: Schema, params: Params, known: frozenset[str]) -> Screened:
    """A batch folder checked as the dataset's files are (pipeline.data.images): each file
    read and decoded once, its facts kept; into quarantine with its reason a file that fails,
    a label that is not a class, a duplicate within the batch, and (labelled batches, which
    may join the dataset) an image already in the dataset, by content hash."""
    from pipeline.monitor import REASON, Screened
    from pipeline.runners.image_data import as_labels, checks_of

    rows, refused, labelled = list_batch(folder)
    checked = pd.concat(list(images.inspect_files(rows, folder, checks_of(schema), keep_bytes=True)), ignore_index=True)
    reasons = checked[images.REASON].astype("string")
    if labelled:
        checked[images.LABEL] = as_labels(checked[images.LABEL], schema)
        known_classes = {str(c) for c in schema.classes}
        reasons = reasons.fillna(checked[images.LABEL].astype(str).map(
            lambda v: None if v in known_classes else f"label {v!r} is not one of the classes").astype("string"))
        reasons = reasons.fillna(checked["sha256"].map(
            lambda h: "the same image is already in the dataset" if h in known else None).astype("string"))
    reasons = reasons.fillna(images.duplicate_reasons(checked.assign(**{images.REASON: reasons})))
    bad = reasons.notna().to_numpy()
    names = {images.PATH: schema.id_column, images.LABEL: schema.target, images.REASON: REASON}
    quarantine = pd.concat([refused, checked[bad].drop(columns=[images.IMAGE]).assign(**{images.REASON: reasons[bad]})],
                           ignore_index=True).rename(columns=names)
    valid = checked[~bad].drop(columns=[images.REASON]).rename(columns=names).reset_index(drop=True)
    if not labelled:
        valid, quarantine = valid.drop(columns=[schema.target]), quarantine.drop(columns=[schema.target])
    rejected = []
    if schema.features:  # the columns a manifest gave each image have no place in a folder
        rejected.append(f"the model also takes column(s) {', '.join(schema.feature_names[:5])}, which a batch folder "
                        "of images does not carry; batches of a manifest dataset cannot be monitored yet")
    elif len(valid) < params.validate_.min_rows:
        rejected.append(f"{len(valid)} images left after quarantine, under validate.min_rows={params.validate_.min_rows}")
    if rejected:
        quarantine = pd.concat([quarantine, valid.drop(columns=[images.IMAGE]).assign(
            **{REASON: "batch rejected: " + rejected[0]})], ignore_index=True)
        valid = valid.iloc[:0]
    raw_valid = valid[[schema.id_column, *([schema.target] if labelled else [])]]
    return Screened(len(rows) + len(refused), valid, raw_valid, quarantine, labelled, rejected)


def known_images(params: Params, root: Path) -> frozenset[str]:
    """The content hashes of the dataset's validated images (what a batch must not repeat)."""
    from pipeline import stages

    valid = stages.path("valid", root)
    if not valid.exists():
        return frozenset()
    return frozenset(h for batch in io.read_batches(valid, 100_000, ["sha256"]) for h in batch["sha256"])


def appendable(raw: Path) -> bool:
    """Only an image folder takes new files; a manifest (a table file) is the user's to extend."""
    return raw.suffix.lower() not in (".csv", ".tsv", ".parquet")


def stage_files(rows: pd.DataFrame, batch_folder: Path, dataset: Path, key: str, id_column: str) -> Path:
    """The batch's usable files copied beside the dataset (hidden, `.next`) in the layout they
    take in it: `<label>/<batch key>/<the rest of the path>`, for `install_files`."""
    import datetime as dt

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    staged = dataset.with_name(f".{dataset.name}.{stamp}.next")
    try:
        for relative in rows[id_column]:
            label, *rest = Path(relative).parts
            target = staged / label / key / Path(*rest)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(batch_folder / relative, target)
    except BaseException:
        io.remove(staged)
        raise
    return staged


def md5_with_files(dataset: Path, staged: Path) -> str:
    """The image folder's DVC md5 once the staged files are in it."""
    return io.dir_md5_of([dataset, staged])


def install_files(staged: Path, dataset: Path) -> None:
    """Move the staged files into the image folder, each by a rename; safe to call again after
    a crash: the files already moved are in place, the rest follow."""
    for path in sorted(p for p in staged.rglob("*") if p.is_file()):
        target = dataset / path.relative_to(staged)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    io.remove(staged)
