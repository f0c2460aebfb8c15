"""The dataset's schema, expanded from params: which columns exist and what values they may hold."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config import DataParams, ImageParams
from pipeline.data.keys import ROW_KEY


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # "numeric" | "categorical"
    dtype: str  # "int" | "float" | "str"
    min: float | None = None
    max: float | None = None
    values: tuple[int | str, ...] | None = None
    nullable: bool = False

    @property
    def numpy_dtype(self) -> str:
        """The type a raw value has in the served model's signature. An int column that may
        hold nulls is float64, as MLflow advises: integers cannot represent a missing value."""
        if self.dtype == "int" and not self.nullable:
            return "int64"
        return "float64" if self.kind == "numeric" else "object"


@dataclass(frozen=True)
class Schema:
    # The id column, or ROW_KEY when the data has none and d2d derives each row's key
    # (pipeline.data.keys): every step identifies rows by this column either way.
    id_column: str
    target: str
    classes: tuple[int | str, ...]  # empty for regression
    features: tuple[Column, ...]
    image_shape: tuple[int, int, int] | None
    task: str = "classification"
    derived_key: bool = False
    images: ImageParams | None = None  # image files: the id column holds each file's path

    @property
    def input_shape(self) -> tuple[int, int, int] | None:
        """C×H×W of the model's input: image files at their training size and mode, or image-shaped columns."""
        if self.images is not None:
            return (3 if self.images.mode == "RGB" else 1, self.images.size, self.images.size)
        return self.image_shape

    @property
    def regression(self) -> bool:
        return self.task == "regression"

    @property
    def n_outputs(self) -> int:
        return 1 if self.regression else len(self.classes)

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def numeric(self) -> list[Column]:
        return [f for f in self.features if f.kind == "numeric"]

    @property
    def categorical(self) -> list[Column]:
        return [f for f in self.features if f.kind == "categorical"]

    @property
    def columns(self) -> list[str]:
        """Every column a raw file must have (a derived key is added by d2d, not read)."""
        return [*([] if self.derived_key else [self.id_column]), *self.feature_names, self.target]

    def arrow_types(self, stage: str) -> dict[str, Any]:
        """The Parquet column types every part of a data stage's output shares (batches of a
        CSV may type a column differently). `raw`: the quarantine's raw values, as text;
        `valid`: numbers as float64 (text was coerced); `clean`: the declared types."""
        import pyarrow as pa

        types: dict[str, Any] = {ROW_KEY: pa.string()} if self.derived_key else {}
        if stage == "raw":
            return types | {c: pa.string() for c in [*self.feature_names, self.target]}
        for f in self.features:
            if f.kind == "numeric":
                types[f.name] = pa.int64() if stage == "clean" and f.numpy_dtype == "int64" else pa.float64()
            elif f.dtype == "str":
                types[f.name] = pa.string()
        if self.regression:
            types[self.target] = pa.float64()
        elif all(isinstance(c, int) for c in self.classes):
            types[self.target] = pa.int64()
        elif all(isinstance(c, str) for c in self.classes):
            types[self.target] = pa.string()
        return types

    @property
    def id_label(self) -> str:
        """How a row's identity is named in reasons: its id, or its derived row key."""
        return "row key" if self.derived_key else "id"


def schema_from_params(data: DataParams) -> Schema:
    features = tuple(
        Column(
            name,
            f.kind,
            f.dtype,
            f.min,
            f.max,
            tuple(f.values) if f.values is not None else None,
            f.nullable,
        )
        for f in data.features
        for name in f.names()
    )
    shape = tuple(data.image_shape) if data.image_shape else None
    derived = data.id_column is None
    return Schema(ROW_KEY if derived else data.id_column, data.target, tuple(data.classes or ()), features, shape,  # type: ignore[arg-type]
                  data.task, derived, data.images)
