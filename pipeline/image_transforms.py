"""Image preprocessing with torch tensor ops, one implementation for training, evaluation,
the MLflow model, serving and batch predict (issue 17, point 3).

torchvision's transforms cannot be imported next to the CPU build of torch installed here
(see pipeline/train/resnet.py), so the few that training needs are written with
`torch.nn.functional`:
- `to_tensor`: a decoded Pillow image in the model's mode, as uint8 (C, H, W);
- `fit_size`: the shorter side resized to the training size (bilinear, antialiased: the
  same filter as Pillow's and torchvision's `Resize`), then the centre cropped square;
- `ChannelStats`: each channel's mean and standard deviation, summed over the train split's
  batches, and `normalize` with them;
- `augment`: a batch's training-time augmentation on whatever device it is on, one affine
  warp per image (a random resized crop, a horizontal flip, a small rotation, in one
  `grid_sample`) and colour jitter (brightness, contrast). Evaluation never calls it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


def to_tensor(image: Any, mode: str = "RGB") -> torch.Tensor:
    """A Pillow image in `mode` (RGB or L; RGBA loses its alpha, grey repeats for RGB) as a
    uint8 tensor (C, H, W)."""
    import numpy as np

    if image.mode != mode:
        image = image.convert(mode)
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def fit_size(image: torch.Tensor, size: int) -> torch.Tensor:
    """(C, H, W) uint8 → (C, size, size) uint8: the shorter side resized to `size`, then the
    centre cropped square (the evaluation transform, and what training augments from)."""
    channels, height, width = image.shape
    scale = size / min(height, width)
    target = (max(size, round(height * scale)), max(size, round(width * scale)))
    if target != (height, width):
        resized = F.interpolate(image[None].float(), size=target, mode="bilinear", antialias=True, align_corners=False)
        image = resized[0].round().clamp(0, 255).to(torch.uint8)
    top, left = (image.shape[1] - size) // 2, (image.shape[2] - size) // 2
    return image[:, top:top + size, left:left + size].contiguous()


@dataclass
class ChannelStats:
    """Running per-channel sums over uint8 batches (N, C, H, W): the train split's mean and
    standard deviation, in 0–1 units, fitted in one streaming pass."""

    count: int = 0
    total: torch.Tensor | None = None
    squares: torch.Tensor | None = None

    def update(self, batch: torch.Tensor) -> None:
        x = batch.double() / 255.0
        dims = (0, 2, 3)
        total, squares = x.sum(dim=dims), (x * x).sum(dim=dims)
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.count += x.shape[0] * x.shape[2] * x.shape[3]

    def result(self) -> tuple[list[float], list[float]]:
        if not self.count or self.total is None or self.squares is None:
            raise ValueError("no images to fit the normalisation on")
        mean = self.total / self.count
        std = (self.squares / self.count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-3)
        return mean.tolist(), std.tolist()


def normalize(batch: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 or 0–1 float (N, C, H, W) → float32 standardised per channel."""
    x = batch.float() / 255.0 if batch.dtype == torch.uint8 else batch.float()
    shape = (1, -1, 1, 1)
    return (x - torch.tensor(mean, device=x.device).view(shape)) / torch.tensor(std, device=x.device).view(shape)


@dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation, each part off at its neutral value."""

    crop_scale: float = 1.0  # a random crop keeps between this share of the area and all of it
    flip: bool = False  # horizontal flips, half the images
    rotate: float = 0.0  # degrees, either way
    brightness: float = 0.0  # a factor within 1 ± this
    contrast: float = 0.0  # a factor within 1 ± this

    @property
    def active(self) -> bool:
        return self != Augmentation()


def augment(batch: torch.Tensor, how: Augmentation, generator: torch.Generator | None = None) -> torch.Tensor:
    """A float (N, C, H, W) batch in 0–1, augmented image by image on its own device: one
    affine warp each (crop, flip, rotation; borders reflect) and colour jitter. Output in 0–1."""
    if not how.active:
        return batch
    n, device = batch.shape[0], batch.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator).to(device)

    scale = uniform(how.crop_scale, 1.0).sqrt()  # the side's share: the area's square root
    room = 1.0 - scale  # how far the crop's centre can move, in grid units (-1..1 spans the image)
    shift_x, shift_y = uniform(-1, 1) * room, uniform(-1, 1) * room
    angle = uniform(-how.rotate, how.rotate) * (math.pi / 180)
    flip = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0) if how.flip else torch.ones(n, device=device)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift_x], dim=1),
                         torch.stack([sin * flip, cos, shift_y], dim=1)], dim=1)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    out = F.grid_sample(batch, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if how.brightness:
        out = out * uniform(1 - how.brightness, 1 + how.brightness).view(n, 1, 1, 1)
    if how.contrast:
        grey = out.mean(dim=(1, 2, 3), keepdim=True)
        out = grey + (out - grey) * uniform(1 - how.contrast, 1 + how.contrast).view(n, 1, 1, 1)
    return out.clamp(0, 1)


def decode(data: bytes, size: int, mode: str) -> torch.Tensor:
    """An image file's bytes → uint8 (C, size, size): decoded with Pillow in `mode`, then
    `fit_size`. Raises ValueError for bytes that are not a decodable image."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return fit_size(to_tensor(image, mode), size)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"not a decodable image: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def network_inputs(images: Any, state: dict[str, Any]) -> Any:
    """Image files' bytes (a sequence) → float32 (N, C·H·W) numpy rows, normalised with the
    statistics fitted on train: what the network takes, for training, evaluation, the MLflow
    model and serving alike."""
    batch = torch.stack([decode(data, state["size"], state["mode"]) for data in images]) if len(images) else (
        torch.zeros((0, 3 if state["mode"] == "RGB" else 1, state["size"], state["size"]), dtype=torch.uint8))
    return normalize(batch, state["mean"], state["std"]).reshape(len(batch), -1).numpy()


def augment_inputs(x: torch.Tensor, shape: tuple[int, int, int], how: Augmentation, mean: list[float],
                   std: list[float], generator: torch.Generator | None = None) -> torch.Tensor:
    """A batch of normalised network inputs (N, C·H·W), augmented as `augment` does on 0–1
    images (undone, augmented, normalised again): the features stay cached normalised, and
    every epoch sees new augmentations, on the device the batch is on."""
    view = (1, -1, 1, 1)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(view)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(view)
    images = (x.view(-1, *shape) * s + m).clamp(0, 1)
    return ((augment(images, how, generator) - m) / s).reshape(x.shape[0], -1)
