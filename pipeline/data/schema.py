"""The dataset's schema, expanded from params: which columns exist and what values they may hold."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import DataParams


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    min: float
    max: float
    dtype: str = "float"  # "int" or "float"

    @property
    def numpy_dtype(self) -> str:
        return "int64" if self.dtype == "int" else "float64"


@dataclass(frozen=True)
class Schema:
    id_column: str
    target: str
    classes: tuple[int | str, ...]
    features: tuple[FeatureSpec, ...]
    image_shape: tuple[int, int, int] | None

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def columns(self) -> list[str]:
        """Every column a raw file must have, in file order."""
        return [self.id_column, *self.feature_names, self.target]


def schema_from_params(data: DataParams) -> Schema:
    features = tuple(
        FeatureSpec(f"{g.prefix}{i}", g.min, g.max, g.dtype) for g in data.features for i in range(g.count)
    )
    shape = tuple(data.image_shape) if data.image_shape else None
    return Schema(data.id_column, data.target, tuple(data.classes), features, shape)  # type: ignore[arg-type]
