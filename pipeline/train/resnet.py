"""Residual networks (He et al., "Deep Residual Learning for Image Recognition", 2016) with
torchvision's parameter names and shapes.

torchvision cannot be imported next to the CPU build of torch that d2d installs (its wheels
link against torch's CUDA libraries: `operator torchvision::nms does not exist`), and timm
depends on it. So the network is written here, block for block as torchvision writes it
(the bottleneck's stride on its 3×3 convolution, "ResNet v1.5"), and a `state_dict` that a
user saved from torchvision's or timm's `resnet18` ... `resnet152` loads into it unchanged:
`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.downsample.0`, ..., `fc`.

Two things that hold no parameters differ from torchvision's, so the same weights fit:
- for images under `SMALL_INPUT` (64) pixels on a side, the stem keeps its 7×7 convolution
  but with stride 1 and no max pool (torchvision's stem divides the image by 4 before the
  first block, which leaves a 32×32 image 1×1 by `layer4`);
- the model also takes its input flat, (N, C·H·W), as every model in d2d's zoo does.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

# blocks per stage, as torchvision's resnet18 ... resnet152 have them
DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
SMALL_INPUT = 64  # pixels on the shorter side below which the stem does not downsample


def _conv3x3(inputs: int, outputs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inputs, outputs, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(inputs: int, outputs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inputs, outputs, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 convolutions and the identity (or a strided 1×1 projection) added back."""

    expansion = 1

    def __init__(self, inputs: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inputs, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """1×1 down to `planes`, 3×3 (strided), 1×1 up to 4·`planes`, and the shortcut added back."""

    expansion = 4

    def __init__(self, inputs: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv1x1(inputs, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


HEAD = ("fc.", "tabular.")  # what a new task trains afresh: the classifier, and the extra columns' layer
EXTRAS_WIDTH = 32  # a manifest's extra columns, through one layer, join the image features at this width


def extras_branch(extras: int) -> nn.Module:
    """The extra columns' own layer before they meet the image features: as raw inputs, three
    columns beside a thousand image features were ignored (a label the extras decided stayed
    at chance), and through this layer, beside pooled features, they were learnt (0.9)."""
    return nn.Sequential(nn.Linear(extras, EXTRAS_WIDTH), nn.ReLU())


class ResNet(nn.Module):
    """A ResNet of `depth` 18, 34, 50, 101 or 152 for `image_shape` (C, H, W) inputs and
    `classes` outputs. Takes (N, C, H, W) or the same values flat, (N, C·H·W), followed by
    `extras` more columns a row (a manifest's extra columns, preprocessed) that join the
    pooled features at the head through their own layer (`tabular`): `fc` then takes
    512·expansion + EXTRAS_WIDTH inputs."""

    def __init__(self, depth: int, image_shape: tuple[int, int, int], classes: int, extras: int = 0) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"a ResNet's depth is one of {', '.join(map(str, DEPTHS))}, not {depth}")
        kind, stages = DEPTHS[depth]
        block: type[BasicBlock] | type[Bottleneck] = BasicBlock if kind == "basic" else Bottleneck
        self.image_shape = tuple(image_shape)
        channels, height, width = self.image_shape
        small = min(height, width) < SMALL_INPUT
        self.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=1 if small else 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = nn.Identity() if small else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.inputs = 64
        self.layer1 = self._stage(block, 64, stages[0], 1)
        self.layer2 = self._stage(block, 128, stages[1], 2)
        self.layer3 = self._stage(block, 256, stages[2], 2)
        self.layer4 = self._stage(block, 512, stages[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.extras = extras
        if extras:
            self.tabular = extras_branch(extras)
        self.fc = nn.Linear(512 * block.expansion + (EXTRAS_WIDTH if extras else 0), classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _stage(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inputs != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inputs, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inputs, planes, stride, downsample)]
        self.inputs = planes * block.expansion
        layers += [block(self.inputs, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features the head sees, (N, 512·expansion)."""
        if x.dim() == 2:
            x = x.view(-1, *self.image_shape)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.extras:
            pixels = x.shape[1] - self.extras
            return self.fc(torch.cat([self.features(x[:, :pixels]), self.tabular(x[:, pixels:])], dim=1))
        return self.fc(self.features(x))


def load_backbone(model: ResNet, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Load a torchvision- or timm-named ResNet `state_dict` into `model`, all but the head
    (`fc`, which the new classes replace). Weights for another number of input channels are
    adapted as timm's `adapt_input_conv` does (RGB filters summed for greyscale, a grey
    filter spread over three channels). A missing or extra backbone tensor, or one of another
    shape, is a ValueError naming it. Returns the names of the tensors loaded."""
    own = model.state_dict()
    backbone = {k: v for k, v in state.items() if not k.startswith(HEAD)}
    if "conv1.weight" in backbone:
        backbone["conv1.weight"] = adapt_input_conv(backbone["conv1.weight"], own["conv1.weight"].shape[1])
    missing = sorted(k for k in own if not k.startswith(HEAD) and k not in backbone)
    extra = sorted(k for k in backbone if k not in own)
    shapes = sorted(f"{k} {tuple(v.shape)} (the model's {tuple(own[k].shape)})"
                    for k, v in backbone.items() if k in own and tuple(v.shape) != tuple(own[k].shape))
    problems = [f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                for label, names in (("missing", missing), ("unexpected", extra), ("other shapes", shapes)) if names]
    if problems:
        raise ValueError("the weights do not fit this ResNet; " + "; ".join(problems))
    model.load_state_dict(backbone, strict=False)
    return sorted(backbone)


def adapt_input_conv(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """The first convolution's weights for `channels` input channels: summed over RGB for one
    channel, a single channel repeated and rescaled for more (so activations keep their scale)."""
    given = weight.shape[1]
    if given == channels:
        return weight
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    if given == 1:
        return weight.repeat(1, channels, 1, 1) / channels
    return weight  # no rule fits: load_backbone names the shapes


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A saved `state_dict` from a file: `.safetensors` (read without pickle) or a PyTorch
    `.pt`/`.pth`/`.bin` (tensors and plain values only: `weights_only`). A checkpoint that
    wraps it (`{"state_dict": ...}` or `{"model": ...}`) and DDP's `module.` prefix are
    unwrapped. Anything else is a ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pretrained weights {path} not found (d2d downloads nothing: copy the file there)")
    from pipeline.errors import first_line

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the file is the user's: the parsers raise whatever its bytes lead them to
        raise ValueError(f"pretrained weights {path} cannot be read: {first_line(e)[:200]}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"pretrained weights {path}: expected a state_dict (parameter names to tensors)")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state)


def blocks(model: ResNet) -> list[str]:
    """The network's blocks from input to head, as parameter-name prefixes: the stem
    (`conv1` + `bn1`) and each residual block (`layer1.0`, ..., `layer4.N`)."""
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    return ["stem", *(f"layer{s}.{b}" for s, stage in enumerate(stages, 1) for b in range(len(stage)))]


def frozen_prefixes(model: ResNet, freeze: str | int) -> tuple[str, ...]:
    """What `train.freeze` holds fixed: nothing (`none`), every block but the head
    (`backbone`), or all but the last N blocks (an integer)."""
    if freeze == "none":
        return ()
    names = blocks(model)
    keep = 0 if freeze == "backbone" else int(freeze)
    held = names[: max(0, len(names) - keep)]
    return tuple(p for name in held for p in (("conv1.", "bn1.") if name == "stem" else (name + ".",)))


def set_frozen(model: nn.Module, prefixes: tuple[str, ...]) -> int:
    """Hold the parameters under `prefixes` fixed (no gradient) and let the rest train;
    returns how many tensors are held."""
    held = 0
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not name.startswith(prefixes))
        held += not parameter.requires_grad
    return held


def hold_frozen_norms(model: nn.Module) -> None:
    """Batch norms whose weights are frozen keep their running statistics too (evaluation
    mode), as fine-tuning a frozen backbone expects; call after each `model.train()`."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d) and module.weight is not None and not module.weight.requires_grad:
            module.eval()


def parameter_groups(model: nn.Module, lr: float, backbone_scale: float) -> list[dict[str, Any]]:
    """The head (`fc`, and the extras' layer) at `lr` and the backbone at `lr × backbone_scale`:
    pretrained features move less than the new head."""
    head = [p for n, p in model.named_parameters() if n.startswith(HEAD)]
    backbone = [p for n, p in model.named_parameters() if not n.startswith(HEAD)]
    return [{"params": backbone, "lr": lr * backbone_scale, "name": "backbone"}, {"params": head, "lr": lr, "name": "head"}]
