"""The only module that reads and writes data files. Writes go to a temporary file
first and are renamed into place, so a crashed step never leaves a half-written output.
Each write has its own temporary file (a unique name beside the target), so two writers at
once each install a whole file, never a mix of both."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.errors import DataError, first_line


RAW_SUFFIXES = (".csv", ".parquet", ".txt", ".tsv")


def data_parts(path: Path) -> list[Path]:
    """The files a dataset is: a CSV or Parquet file, or a folder of CSV or Parquet part files
    (name order, hidden files skipped). Missing, empty, of another type, or a folder that
    mixes CSV and Parquet parts: a DataError naming it."""
    if path.is_dir():
        parts = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in RAW_SUFFIXES
                       and not any(n.startswith(".") for n in p.relative_to(path).parts))
        if not parts:
            raise DataError(f"{path} holds no .csv or .parquet part files")
        if len({p.suffix == ".parquet" for p in parts}) > 1:
            raise DataError(f"{path} mixes CSV and Parquet parts; keep one format per dataset folder")
        return parts
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.suffix not in RAW_SUFFIXES:
        raise DataError(f"{path}: expected a .csv or .parquet file, or a folder of them")
    return [path]


def _unreadable(path: Path, e: Exception) -> DataError:
    kind = "Parquet" if path.suffix == ".parquet" else "CSV"
    return DataError(f"{path} is not a valid {kind} file: {first_line(e)}")


def read_batches(path: Path, rows: int = 500_000, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
    """A dataset (file or folder of parts, see `data_parts`) as frames of at most `rows` rows,
    in order: memory holds one batch. CSV is parsed by pandas in chunks, with the same rules
    as a whole-file read; an empty part file is a DataError."""
    import pyarrow.parquet as pq

    for part in data_parts(path):
        if part.stat().st_size == 0:
            raise DataError(f"{part} is empty")
        try:
            if part.suffix == ".parquet":
                with pq.ParquetFile(part) as f:
                    if f.metadata.num_rows == 0:
                        yield f.schema_arrow.empty_table().to_pandas()
                    for batch in f.iter_batches(batch_size=rows, columns=columns):
                        yield batch.to_pandas()
            else:
                with pd.read_csv(part, sep="\t" if part.suffix == ".tsv" else ",", chunksize=rows, usecols=columns) as reader:
                    yield from reader
        except (ValueError, OSError, pd.errors.ParserError) as e:
            raise _unreadable(part, e) from None


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV or Parquet file, or a folder of parts, whole; a missing or unreadable file is
    a DataError. For data that may not fit in memory, use `read_batches`."""
    parts = data_parts(path)
    if len(parts) == 1 and parts[0] == path:
        if path.stat().st_size == 0:
            raise DataError(f"{path} is empty")
        try:
            if path.suffix == ".parquet":
                return pd.read_parquet(path)
            return pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")
        except (ValueError, OSError, pd.errors.ParserError) as e:
            raise _unreadable(path, e) from None
    return pd.concat(list(read_batches(path, rows=1 << 62)), ignore_index=True)


# Parquet files up to this size become a Ray Dataset from this process (one block in the
# object store): a small split is then not read again by tasks every time it executes.
SMALL_PARQUET = 64 << 20


def read_dataset(path: Path | str, columns: list[str] | None = None, shuffle_seed: int | None = None) -> Any:
    """A Parquet file (or a folder of Parquet parts; or a URI such as s3://, see `shared_copy`)
    as a Ray Dataset of `columns`. A local file of at most SMALL_PARQUET bytes is read here and
    put in the object store; anything larger is read lazily by Ray Data tasks, a row group at a
    time in batches of SCORE_ROWS, when something iterates it, never whole in this process.
    `shuffle_seed`: the row groups are read in a random order, a new one each time the dataset
    executes (each epoch), from this seed. A split keeps its source's order, and an image
    folder's is class by class: a worker's local shuffle buffer (426 images of 224², 256 MiB)
    would then fill with one class. Needs a running Ray (pipeline.ray_runtime)."""
    import pyarrow.parquet as pq
    import ray.data

    if isinstance(path, str) and "://" in path:
        return ray.data.read_parquet(path, columns=columns)
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_file() and path.stat().st_size <= SMALL_PARQUET:
        return ray.data.from_arrow(pq.read_table(path, columns=columns))
    # Ray Data's own Parquet reader (2.60) lists the files and starts FooterReader actors each
    # time the dataset executes, that is every epoch, for every split: on 2 cores, new
    # processes cost more CPU than reading the data. The row groups are known here, so each
    # task is handed its own and reads it with pyarrow, in file order. A map_batches after
    # this one with a batch size is fused with it, and its batch size then counts pieces per
    # task: give it batch_size=None and bound the batches inside (ingest.featurize_block).
    pieces = [{"path": str(f.resolve()), "row_group": g} for f in data_parts(path)
              for g in range(pq.ParquetFile(f).metadata.num_row_groups)]
    if not pieces:  # no rows: nothing to stream
        return ray.data.from_arrow(pq.read_table(path, columns=columns))
    listed = ray.data.from_items(pieces, override_num_blocks=len(pieces))
    if shuffle_seed is not None:  # only the list of pieces moves: nothing is read ahead
        from ray.data import RandomSeedConfig

        listed = listed.randomize_block_order(seed=RandomSeedConfig(seed=shuffle_seed, reseed_after_execution=True))
    return listed.map_batches(read_row_groups, fn_kwargs={"columns": columns}, batch_size=None, batch_format="pyarrow")


def read_row_groups(pieces: Any, columns: list[str] | None) -> Iterator[Any]:
    """A block of (path, row_group) pieces → their rows, in batches of SCORE_ROWS."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for path, group in zip(pieces["path"].to_pylist(), pieces["row_group"].to_pylist()):
        with pq.ParquetFile(path) as f:
            for batch in f.iter_batches(batch_size=SCORE_ROWS, row_groups=[group], columns=columns):
                yield pa.Table.from_batches([batch])


def shared_copy(path: Path, storage: str) -> str:
    """A copy of a dataset (file or folder) under `storage`, a folder every node of a cluster
    sees or a URI pyarrow opens (s3://bucket/prefix, gs://...), where Ray Data's read tasks on
    any node can read it: `<storage>/datasets/<md5>/<name>`. Named by the content's md5, it is
    copied once per version; a marker written last tells a whole copy from an interrupted one."""
    import pyarrow.fs as pafs

    uri = "://" in storage
    try:
        fs, base = pafs.FileSystem.from_uri(storage if uri else str(Path(storage).resolve()))
    except (ValueError, OSError, NotImplementedError) as e:  # pyarrow's errors subclass these
        raise DataError(f"train.storage_path {storage!r} cannot be opened: {str(e).splitlines()[0]}") from None
    folder = f"{base.rstrip('/')}/datasets/{dvc_md5(path).removesuffix('.dir')}"
    target, marker = f"{folder}/{path.name}", f"{folder}/COMPLETE"
    if fs.get_file_info(marker).type == pafs.FileType.NotFound:
        fs.create_dir(target if path.is_dir() else folder)  # copy_files writes into an existing folder
        pafs.copy_files(str(path.resolve()), target, destination_filesystem=fs)
        with fs.open_output_stream(marker) as out:
            out.write(b"")
    return f"{storage.split('://')[0]}://{target}" if uri else target


# Rows per batch where each batch is scored or sampled: small enough that a model's outputs
# and a batch's copies stay small beside the data.
SCORE_ROWS = 65_536
BATCH_INPUT_BYTES = 64 * 2**20  # a batch's float32 network inputs, at most (a 224² RGB image is 588 KiB of them)


def score_rows(inputs: int) -> int:
    """Rows to featurise or score at a time for a network of `inputs` float32 inputs:
    SCORE_ROWS for a table, fewer for images, so that a batch stays near BATCH_INPUT_BYTES
    whatever the dataset's size (65,536 images of 64² would be 3 GiB at once)."""
    return max(1, min(SCORE_ROWS, BATCH_INPUT_BYTES // (4 * max(inputs, 1))))


def parquet_head(path: Path, rows: int) -> pd.DataFrame:
    """The first `rows` rows of a Parquet file, reading no more than the batch they are in."""
    return next(read_batches(path, rows), pd.DataFrame())


def column_types(path: Path) -> pd.DataFrame | None:
    """A frame with no rows and the dataset's columns and types, as `read_batches` gives them:
    a Parquet dataset's from its first part's footer, without decoding a row group (a 1M-row
    group took 0.9 s); a CSV's from its first row. None for a CSV with no rows."""
    import pyarrow.parquet as pq

    part = data_parts(path)[0]
    if part.suffix != ".parquet":
        head = next(read_batches(part, 1), None)
        return None if head is None else head.iloc[:0]
    if part.stat().st_size == 0:
        raise DataError(f"{part} is empty")
    try:
        return pq.read_schema(part).empty_table().to_pandas()
    except (ValueError, OSError) as e:
        raise _unreadable(part, e) from None


def parquet_rows(path: Path) -> int:
    """Rows in a Parquet file or folder of parts, from their footers."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(part).metadata.num_rows for part in data_parts(path))


def parquet_sample(path: Path, rows: int, seed: int = 0, positions: bool = False,
                   columns: list[str] | None = None) -> pd.DataFrame:
    """A uniform sample of at most `rows` rows of a Parquet file or folder of parts (of
    `columns`, or all), in file order, read one batch at a time; the whole table when it has
    no more rows than that. `positions`: indexed by each row's position in the dataset."""
    import numpy as np

    total = parquet_rows(path)
    if total <= rows:
        return (pd.concat(list(read_batches(path, SCORE_ROWS, columns)), ignore_index=True) if total
                else next(read_batches(path, 1, columns), pd.DataFrame()))
    keep = np.sort(np.random.default_rng(seed).choice(total, size=rows, replace=False))
    frames, start = [], 0
    for batch in read_batches(path, SCORE_ROWS, columns):
        lo, hi = np.searchsorted(keep, [start, start + len(batch)])
        if hi > lo:
            frames.append(batch.iloc[keep[lo:hi] - start].set_axis(keep[lo:hi]))
        start += len(batch)
    sample = pd.concat(frames)
    return sample if positions else sample.reset_index(drop=True)


@contextmanager
def staged_dir(path: Path) -> Iterator[Path]:
    """A fresh hidden folder beside `path` to write into; once written it replaces `path`
    (whatever was there is removed just before), and a failed write leaves only `path` as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's folder is private; an output is not
    if path.exists() or path.is_symlink():
        remove(path)
    os.replace(tmp, path)


def read_csv(path: Path, **options: Any) -> pd.DataFrame:
    """A CSV file d2d wrote itself (a report), read with pandas' `options` (e.g. dtype)."""
    return pd.read_csv(path, **options)


def fresh_dir(path: Path) -> Path:
    """An empty folder at `path`: whatever was there is removed first."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def remove(path: Path) -> None:
    """Delete a file or a whole folder; nothing when it is already gone. A symbolic link is
    removed itself, never what it points to."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def move(source: Path, target: Path) -> Path:
    """Rename `source` over `target` in one step (same file system): readers see the old file
    or the new one, never a mix."""
    os.replace(source, target)
    return target


PRIVATE_FILE, PRIVATE_DIR = 0o600, 0o700  # owner only: files that hold rows of someone's data


@cache
def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def private_dir(path: Path) -> Path:
    """A folder only its owner can enter (created if missing, tightened if it exists)."""
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    os.chmod(path, PRIVATE_DIR)
    return path


def _beside(path: Path, suffix: str) -> Path:
    """A new, empty, hidden file with a unique name in `path`'s folder (so a rename onto
    `path` is atomic): `.<name>.<random><suffix>`."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(name)


@contextmanager
def atomic(path: Path, private: bool = False) -> Iterator[Path]:
    """A fresh temporary file beside `path`, renamed over it once written and flushed to
    disk; removed if the write fails. `private`: readable by the owner only."""
    if private:
        private_dir(path.parent)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _beside(path, ".tmp")
    try:
        yield tmp
        # mkstemp makes the file 0600; an ordinary output gets what the umask gives any new file
        os.chmod(tmp, PRIVATE_FILE if private else 0o666 & ~_umask())
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_named(path: Path) -> Iterator[Path]:
    """`atomic` for a writer that records the file's own name inside it (torch.save names its
    archive's folder after the file): the temporary file has `path`'s name, in a hidden folder
    beside it, so the bytes are what a direct write would give."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp = folder / path.name
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_parquet(df: pd.DataFrame, path: Path, private: bool = False) -> Path:
    with atomic(path, private) as tmp:
        df.to_parquet(tmp, index=False)
    return path


def write_csv(df: pd.DataFrame, path: Path) -> Path:
    with atomic(path) as tmp:
        df.to_csv(tmp, index=False, lineterminator="\n")
    return path


def write_text(text: str, path: Path, private: bool = False) -> Path:
    with atomic(path, private) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def touch(path: Path) -> Path:
    """An empty file (and its folders): a marker whose existence is what it records."""
    return write_text("", path)


def write_json(obj: Any, path: Path, private: bool = False) -> Path:
    with atomic(path, private) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    return path


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path} not found: run the stage that writes it first")
    return json.loads(path.read_bytes())  # bytes: JSON's own encoding detection (UTF-8, with or without a BOM)


def file_md5(path: Path) -> str:
    """md5 of the file's bytes: the same digest DVC 3 records in a .dvc file."""
    h = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dvc_recorded_md5(path: Path) -> str | None:
    """The md5 that `path`.dvc records, or None when the file is not tracked by DVC."""
    import yaml

    dvc_file = path.with_name(path.name + ".dvc")
    if not dvc_file.is_file():
        return None
    outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")


def write_batches(batches: Any, path: Path) -> int:
    """Frames, as they come, into one CSV or Parquet file in their order; returns the rows
    written. The file is written under a unique temporary name beside `path` and renamed into
    place at the end, so a crash leaves no partial output and memory holds one batch at a time.
    Every batch is cast to the first one's column types (an all-null column in a later batch
    does not change the file's schema)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, writer = 0, None
    with atomic(path) as tmp:
        with tmp.open("wb") as f:
            for batch in batches:
                if path.suffix == ".parquet":
                    table = pa.Table.from_pandas(batch, preserve_index=False,
                                                 schema=writer.schema if writer is not None else None)
                    writer = writer or pq.ParquetWriter(f, table.schema)
                    writer.write_table(table)
                else:
                    f.write(batch.to_csv(index=False, header=rows == 0, lineterminator="\n").encode())
                rows += len(batch)
            if writer is not None:
                writer.close()
        if path.suffix == ".parquet" and writer is None:  # no batches: an empty file still has a schema
            pq.write_table(pa.table({}), tmp)
    return rows


def _dvc_listing(folder: Path) -> list[dict[str, str]]:
    return [{"md5": file_md5(p), "relpath": p.relative_to(folder).as_posix()} for p in folder.rglob("*") if p.is_file()]


def _dir_md5(listing: list[dict[str, str]]) -> str:
    entries = sorted(listing, key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def dir_md5_of(folders: list[Path]) -> str:
    """The DVC md5 of one folder holding the files of every folder in `folders`, each at its
    path relative to its own folder (a folder with files about to be moved into it)."""
    return _dir_md5([entry for folder in folders for entry in _dvc_listing(folder)])


def dvc_md5(path: Path) -> str:
    """The md5 DVC 3 records for a file or a folder: a folder's is the md5 of its sorted
    listing of (md5, relpath) as JSON, with the `.dir` suffix (dvc_data's Tree.digest)."""
    return _dir_md5(_dvc_listing(path)) if path.is_dir() else file_md5(path)


def dvc_md5_with(dataset: Path, extra: Path, name: str) -> str:
    """The dataset's DVC md5 once `extra` is installed in it as part `name` (`install_part`):
    a single file has become a folder whose first part it is."""
    listing = (_dvc_listing(dataset) if dataset.is_dir()
               else [{"md5": file_md5(dataset), "relpath": first_part_name(dataset)}])
    return _dir_md5([*listing, {"md5": file_md5(extra), "relpath": name}])


def first_part_name(path: Path) -> str:
    """The name a single-file dataset keeps as the first part of the folder it becomes on its
    first append: its own name, after a prefix that sorts before every appended part's."""
    return f"0-{path.name}"


def stage_part(rows: pd.DataFrame, dataset: Path) -> tuple[Path, str]:
    """A new part file of a dataset (a folder of parts, or a single file), written beside it
    (hidden, `.next`) for `install_part` to move in, and the name it gets there: after every
    existing part in name order, so readers see the new rows last. CSV parts take the first
    part's columns; Parquet parts its column types where the rows fit them. The existing parts
    are never rewritten."""
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = data_parts(dataset)
    first = parts[0]
    last = parts[-1].relative_to(dataset).parts[0] if dataset.is_dir() else first_part_name(dataset)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    name = f"append-{stamp}{first.suffix}"
    if name <= last:
        name = "~" + name  # sorts after letters and digits
    tmp = _beside(dataset, ".next")
    try:
        if first.suffix == ".parquet":
            table = pa.Table.from_pandas(rows, preserve_index=False)
            try:
                table = table.select(pq.read_schema(first).names).cast(pq.read_schema(first).remove_metadata())
            except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
                pass  # rows typed otherwise: kept as they are (readers take each part as it is)
            pq.write_table(table, tmp)
        else:
            header = pd.read_csv(first, nrows=0, sep="\t" if first.suffix == ".tsv" else ",").columns.tolist()
            missing = [c for c in header if c not in rows.columns]
            if missing:
                raise DataError(f"cannot append to {dataset}: the new rows lack column(s) {', '.join(missing[:5])}")
            rows[header].to_csv(tmp, index=False, lineterminator="\n", sep="\t" if first.suffix == ".tsv" else ",")
        os.chmod(tmp, 0o666 & ~_umask())
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, name


def building_folder(staged: Path) -> Path:
    """Where `install_part` assembles the folder a single-file dataset becomes (beside it, hidden)."""
    return staged.with_suffix(".dir")


def install_part(staged: Path, dataset: Path, name: str) -> Path:
    """Move a part that `stage_part` wrote into its dataset. A single file first becomes a
    folder of the same name (as Spark and Dask name their dataset folders), holding the file
    byte for byte as its first part (`first_part_name`; a hard link, so nothing is copied) and
    the new part: no existing bytes are rewritten, and DVC caches only the new part. Safe to
    call again after a crash at any step: it finishes what is left."""
    building = building_folder(staged)
    if dataset.is_file():
        building.mkdir(exist_ok=True)
        first = building / first_part_name(dataset)
        if not first.exists():
            try:
                os.link(dataset, first)
            except OSError:  # a file system without hard links: a copy, installed whole
                with atomic(first) as tmp:
                    shutil.copyfile(dataset, tmp)
        if staged.exists():
            move(staged, building / name)
        dataset.unlink()  # the bytes live on in the folder's first part
    if building.is_dir() and not dataset.exists():
        os.rename(building, dataset)
        return dataset / name
    if not dataset.is_dir():
        raise DataError(f"{dataset} is missing: restore it with `dvc checkout`")
    return move(staged, dataset / name)


class PartsWriter:
    """Frames, as they come, into a Parquet dataset folder at `path`: one part file per frame
    (`part-00000.parquet`, ...), written into a hidden folder beside `path` and installed in
    one rename by `commit`, so readers never see half a dataset; a writer closed without a
    commit leaves `path` as it was.

    Every part has the same Arrow schema: `types` fixes a column's type (the schema's
    declared types), the others take their type in the first batch (text when it is all null); a later batch
    is cast to it, and a value that does not fit is a DataError naming the column. A dataset
    with no rows still gets one empty part, so readers see its columns."""

    def __init__(self, path: Path, types: dict[str, Any] | None = None, into: Path | None = None,
                 prefix: str = "part-", keep_empty: bool = True) -> None:
        """`into`: write into this folder, which another owner installs (several writers, in
        several processes, each with its own `prefix`); `commit` then only finishes the writes,
        and writes an empty part for a writer with no rows only when `keep_empty`."""
        self.path, self.types, self.prefix, self.keep_empty = path, dict(types or {}), prefix, keep_empty
        self.schema: Any = None
        self.parts = self.rows = 0
        self._stage = staged_dir(path) if into is None else None
        self.folder = self._stage.__enter__() if self._stage is not None else into
        self._empty: pd.DataFrame | None = None
        # Parquet encoding releases the GIL: parts are written on a thread while the caller
        # works on the next batch (at most one part waits, so memory holds one more batch)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="d2d-parts")
        self._pending: Future[None] | None = None

    def _table(self, frame: pd.DataFrame) -> Any:
        import pyarrow as pa

        # a column fixed as text may hold numbers and text side by side (raw values): as text
        text = {c: frame[c].where(frame[c].isna(), frame[c].astype(str)) for c, t in self.types.items()
                if c in frame.columns and t == pa.string() and frame[c].dtype != "string"}
        frame = frame.assign(**text) if text else frame
        if self.schema is None:
            table = pa.Table.from_pandas(frame, preserve_index=False)
            # an all-null column has no type yet: text takes any later value
            fields = [pa.field(f.name, self.types.get(f.name, pa.string() if pa.types.is_null(f.type) else f.type))
                      for f in table.schema]
            self.schema = pa.schema(fields)
        else:
            table = pa.Table.from_pandas(frame, preserve_index=False)
            missing = [n for n in self.schema.names if n not in table.column_names]
            if missing or len(table.column_names) != len(self.schema.names):
                raise DataError(f"{self.path.name}: a batch has other columns than the first ({', '.join(missing[:3])})")
            table = table.select(self.schema.names)
        try:
            return table.cast(self.schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise DataError(f"{self.path.name}: a batch's values do not fit the dataset's column types: "
                            f"{str(e).splitlines()[0]}") from None

    def write(self, frame: pd.DataFrame) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if frame.empty:  # kept only for its columns, should no batch have rows
            self._empty = frame if self._empty is None else self._empty
            return
        table = self._table(frame)
        # No dictionary for floats: measured continuous values rarely repeat, and trying one
        # before falling back made the write 4x slower (1.5 s against 0.4 s for 500,000 x 64)
        keep = [f.name for f in table.schema if not pa.types.is_floating(f.type)]
        self._wait()
        self._pending = self._pool.submit(pq.write_table, table, self.folder / f"{self.prefix}{self.parts:05d}.parquet",
                                          use_dictionary=keep)
        self.parts += 1
        self.rows += len(frame)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # a failed write raises here

    def commit(self) -> Path:
        """Install the folder at `path` (replacing what was there)."""
        import pyarrow.parquet as pq

        self._wait()
        self._pool.shutdown()
        if self.parts == 0 and self.keep_empty:
            empty = self._empty if self._empty is not None else pd.DataFrame()
            pq.write_table(self._table(empty), self.folder / f"{self.prefix}00000.parquet")
        if self._stage is not None:
            self._stage.__exit__(None, None, None)
        return self.path

    def discard(self) -> None:
        """Drop what was written; `path` stays as it was."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._stage is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def prefetched(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """`batches`, with the next one read on a thread while the caller works on this one (file
    reads and Parquet decoding release the GIL); an error in the reader is raised here."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="d2d-read") as pool:
        ahead = pool.submit(next, batches, None)
        while (batch := ahead.result()) is not None:
            ahead = pool.submit(next, batches, None)
            yield batch


def coalesced(batches: Iterator[pd.DataFrame], rows: int) -> Iterator[pd.DataFrame]:
    """Consecutive batches joined while they fit in `rows` rows and have the same columns and
    types: small part files (250,000-row parts, 500,000-row batches) become fewer, fuller
    batches, for a consumer with a cost per batch (a GX run, about 1.5 s). Batches are never
    split, and batches that differ in a type stay apart, so values are never converted."""
    pending: list[pd.DataFrame] = []
    count = 0
    for batch in batches:
        if pending and (count + len(batch) > rows or not batch.dtypes.equals(pending[0].dtypes)):
            yield pending[0] if len(pending) == 1 else pd.concat(pending, ignore_index=True)
            pending, count = [], 0
        pending.append(batch)
        count += len(batch)
    if pending:
        yield pending[0] if len(pending) == 1 else pd.concat(pending, ignore_index=True)
