"""The model zoo. Every model takes a flat float tensor (N, features) and returns class
logits (N, classes), so serving and evaluation never need to know the architecture."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """All a worker, the evaluator or a loader needs to rebuild the network."""

    kind: str
    n_features: int
    n_classes: int  # outputs: the number of classes, or 1 for regression
    image_shape: tuple[int, int, int] | None
    channels: tuple[int, ...]
    hidden: tuple[int, ...]
    dropout: float

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        shape = tuple(d["image_shape"]) if d.get("image_shape") else None
        return cls(d["kind"], d["n_features"], d["n_classes"], shape, tuple(d["channels"]), tuple(d["hidden"]), d["dropout"])


def _head(n_in: int, hidden: tuple[int, ...], n_out: int, dropout: float) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(n_in, width), nn.ReLU(), nn.Dropout(dropout)]
        n_in = width
    return [*layers, nn.Linear(n_in, n_out)]


def mlp(spec: ModelSpec) -> nn.Module:
    return nn.Sequential(*_head(spec.n_features, spec.hidden, spec.n_classes, spec.dropout))


def cnn(spec: ModelSpec) -> nn.Module:
    """Conv-BN-ReLU blocks, halving the image while it is at least 4 pixels on a side."""
    if spec.image_shape is None:
        raise ValueError("cnn needs an image_shape")
    c, h, w = spec.image_shape
    layers: list[nn.Module] = [nn.Unflatten(1, (c, h, w))]
    for out in spec.channels:
        layers += [nn.Conv2d(c, out, kernel_size=3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
        if min(h, w) >= 4:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = out
    layers.append(nn.Flatten())
    return nn.Sequential(*layers, *_head(c * h * w, spec.hidden, spec.n_classes, spec.dropout))


ZOO = {"mlp": mlp, "cnn": cnn}


def build_model(spec: ModelSpec) -> nn.Module:
    return ZOO[spec.kind](spec)


def save_model(model: nn.Module, spec: ModelSpec, path: str) -> None:
    torch.save({"spec": spec.to_dict(), "state_dict": model.state_dict()}, path)


def load_model(path: str) -> tuple[nn.Module, ModelSpec]:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    spec = ModelSpec.from_dict(blob["spec"])
    model = build_model(spec)
    model.load_state_dict(blob["state_dict"])
    return model.eval(), spec
