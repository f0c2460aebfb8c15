"""The model zoo. Every model takes a flat float tensor (N, features) and returns class
logits (N, classes), so serving and evaluation never need to know the architecture."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from pipeline.train.resnet import DEPTHS, EXTRAS_WIDTH, ResNet, extras_branch


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
    norm: str = "auto"  # batch | layer | none; auto: batch for cnn, none for the others
    width: int = 64  # lstm hidden size, transformer d_model
    depth: int = 2  # lstm / transformer layers
    heads: int = 4  # transformer attention heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        d = dict(d)
        d["image_shape"] = tuple(d["image_shape"]) if d.get("image_shape") else None
        d["channels"], d["hidden"] = tuple(d["channels"]), tuple(d["hidden"])
        return cls(**d)


def _norm1d(kind: str, width: int) -> list[nn.Module]:
    return {"batch": [nn.BatchNorm1d(width)], "layer": [nn.LayerNorm(width)]}.get(kind, [])


def _head(n_in: int, spec: ModelSpec, norm: str = "none") -> list[nn.Module]:
    layers: list[nn.Module] = []
    for width in spec.hidden:
        layers += [nn.Linear(n_in, width), *_norm1d(norm, width), nn.ReLU(), nn.Dropout(spec.dropout)]
        n_in = width
    return [*layers, nn.Linear(n_in, spec.n_classes)]


ZOO: dict[str, Callable[[ModelSpec], nn.Module]] = {}


def register(name: str) -> Callable:
    """Add an architecture to the zoo: `@register("mine") def mine(spec) -> nn.Module`.
    It takes (N, n_features) floats and returns (N, n_classes)."""

    def add(builder: Callable[[ModelSpec], nn.Module]) -> Callable[[ModelSpec], nn.Module]:
        ZOO[name] = builder
        return builder

    return add


@register("mlp")
def mlp(spec: ModelSpec) -> nn.Module:
    norm = "none" if spec.norm == "auto" else spec.norm
    return nn.Sequential(*_head(spec.n_features, spec, norm))


def extra_inputs(spec: ModelSpec) -> int:
    """Columns a row carries after its C·H·W pixels: a manifest's extra columns, preprocessed."""
    return spec.n_features - math.prod(spec.image_shape) if spec.image_shape else 0


class ImageAndExtras(nn.Module):
    """An image network whose head also takes the row's extra columns: the pixels (the first
    C·H·W values) through `body` to features, the extras through their own layer, both into `head`."""

    def __init__(self, body: nn.Module, head: nn.Module, extras: int) -> None:
        super().__init__()
        self.body, self.head, self.extras = body, head, extras
        self.tabular = extras_branch(extras)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x.shape[1] - self.extras
        return self.head(torch.cat([self.body(x[:, :pixels]), self.tabular(x[:, pixels:])], dim=1))


@register("cnn")
def cnn(spec: ModelSpec) -> nn.Module:
    """Conv-norm-ReLU blocks, halving the image while it is at least 4 pixels on a side. With
    a manifest's extra columns, the last block's maps are averaged (one feature a channel, as a
    ResNet's are) and join the extras' layer before the head: flattened, 1,024 image features
    beside 3 extras left a label the extras decided at chance on 168 training images."""
    if spec.image_shape is None:
        raise ValueError("cnn needs an image_shape")
    c, h, w = spec.image_shape
    norm = "batch" if spec.norm == "auto" else spec.norm
    layers: list[nn.Module] = [nn.Unflatten(1, (c, h, w))]
    for out in spec.channels:
        layers.append(nn.Conv2d(c, out, kernel_size=3, padding=1))
        layers += {"batch": [nn.BatchNorm2d(out)], "layer": [nn.GroupNorm(1, out)]}.get(norm, [])
        layers.append(nn.ReLU())
        if min(h, w) >= 4:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = out
    extras = extra_inputs(spec)
    if extras:
        body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        return ImageAndExtras(body, nn.Sequential(*_head(c + EXTRAS_WIDTH, spec)), extras)
    layers.append(nn.Flatten())
    return nn.Sequential(*layers, *_head(c * h * w, spec))


def _resnet(depth: int) -> Callable[[ModelSpec], nn.Module]:
    def build(spec: ModelSpec) -> nn.Module:
        """A ResNet whose `fc` is the head (`hidden` and `dropout` do not apply)."""
        if spec.image_shape is None:
            raise ValueError(f"resnet{depth} needs an image_shape")
        return ResNet(depth, spec.image_shape, spec.n_classes, extra_inputs(spec))

    return build


for _depth in DEPTHS:
    register(f"resnet{_depth}")(_resnet(_depth))


def _steps(spec: ModelSpec) -> tuple[int, int]:
    """A row as a sequence: an image's rows (H steps of C·W values), else one feature per step."""
    if spec.image_shape:
        c, h, w = spec.image_shape
        return h, c * w
    return spec.n_features, 1


class _Sequence(nn.Module):
    """Shared by the lstm and transformer: (N, features) → (N, steps, step_size) → encoder → head."""

    def __init__(self, spec: ModelSpec, encoder: nn.Module, embed: nn.Module | None, pool: str) -> None:
        super().__init__()
        self.steps, self.step_size = _steps(spec)
        self.embed, self.encoder, self.pool = embed, encoder, pool
        norm = "layer" if spec.norm == "auto" else spec.norm
        self.head = nn.Sequential(*_head(spec.width, spec, "none" if norm == "batch" else norm))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x.reshape(x.shape[0], self.steps, self.step_size)
        if self.embed is not None:
            seq = self.embed(seq)
        out = self.encoder(seq)
        out = out[0] if isinstance(out, tuple) else out
        return self.head(out[:, -1] if self.pool == "last" else out.mean(dim=1))


class _TokenEmbedding(nn.Module):
    def __init__(self, steps: int, step_size: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(step_size, width)
        self.position = nn.Parameter(torch.zeros(1, steps, width))

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        return self.proj(seq) + self.position


@register("lstm")
def lstm(spec: ModelSpec) -> nn.Module:
    """An LSTM over ordered features (or an image's rows); the last step feeds the head."""
    _, step_size = _steps(spec)
    encoder = nn.LSTM(step_size, spec.width, num_layers=spec.depth, batch_first=True,
                      dropout=spec.dropout if spec.depth > 1 else 0.0)
    return _Sequence(spec, encoder, None, "last")


@register("transformer")
def transformer(spec: ModelSpec) -> nn.Module:
    """A small Transformer encoder over feature tokens (or sequence steps), mean-pooled."""
    steps, step_size = _steps(spec)
    layer = nn.TransformerEncoderLayer(spec.width, spec.heads, dim_feedforward=2 * spec.width,
                                       dropout=spec.dropout, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=spec.depth, enable_nested_tensor=False)
    return _Sequence(spec, encoder, _TokenEmbedding(steps, step_size, spec.width), "mean")


def build_model(spec: ModelSpec) -> nn.Module:
    if spec.kind not in ZOO:
        raise ValueError(f"unknown model '{spec.kind}'; the zoo has: {', '.join(sorted(ZOO))}")
    return ZOO[spec.kind](spec)


def save_model(model: nn.Module, spec: ModelSpec, path: str) -> None:
    from pathlib import Path

    from pipeline.data import io

    with io.atomic_named(Path(path)) as tmp:  # a crash never leaves half a model.pt
        torch.save({"spec": spec.to_dict(), "state_dict": model.state_dict()}, tmp)


def load_model(path: str) -> tuple[nn.Module, ModelSpec]:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    spec = ModelSpec.from_dict(blob["spec"])
    model = build_model(spec)
    model.load_state_dict(blob["state_dict"])
    return model.eval(), spec
