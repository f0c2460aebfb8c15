"""Image transforms with torch ops (issue 17, point 3), checked against Pillow where both
have the operation, and against their definitions elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.image_transforms import Augmentation, ChannelStats, augment, fit_size, normalize, to_tensor


def photo(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """A smooth image (gradients plus a few blobs): what resampling filters are built for."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [np.sin(6 * x * rng.uniform(0.5, 2) + rng.uniform(0, 3)) * np.cos(5 * y * rng.uniform(0.5, 2)) for _ in range(3)]
    array = ((np.stack(channels, axis=-1) + 1) * 127.5).astype(np.uint8)
    image = Image.fromarray(array, "RGB")
    return image if mode == "RGB" else image.convert(mode)


@pytest.mark.parametrize("mode, channels", [("RGB", 3), ("L", 1)])
def test_to_tensor_gives_channels_first_uint8_in_the_model_s_mode(mode, channels):
    image = photo(30, 20, "RGBA")
    x = to_tensor(image, mode)
    assert x.dtype == torch.uint8 and x.shape == (channels, 20, 30)
    assert torch.equal(x.permute(1, 2, 0), torch.from_numpy(np.asarray(image.convert(mode))).reshape(20, 30, channels))


@pytest.mark.parametrize("size, width, height", [(32, 96, 64), (32, 64, 96), (40, 40, 40), (48, 40, 30)])
def test_fit_size_matches_pillow_s_resize_and_centre_crop(size, width, height):
    image = photo(width, height)
    ours = fit_size(to_tensor(image), size)
    scale = size / min(width, height)
    w, h = max(size, round(width * scale)), max(size, round(height * scale))
    left, top = (w - size) // 2, (h - size) // 2
    theirs = to_tensor(image.resize((w, h), Image.Resampling.BILINEAR).crop((left, top, left + size, top + size)))
    assert ours.shape == (3, size, size)
    assert (ours.int() - theirs.int()).abs().float().mean() < 1.0  # the same filter: within rounding
    assert (ours.int() - theirs.int()).abs().max() <= 3


def test_channel_stats_fitted_in_batches_are_the_whole_set_s():
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.integers(0, 256, (10, 3, 8, 8), dtype=np.uint8))
    stats = ChannelStats()
    for part in images.split(3):
        stats.update(part)
    mean, std = stats.result()
    whole = images.double() / 255
    assert np.allclose(mean, whole.mean(dim=(0, 2, 3)).numpy()) and np.allclose(std, whole.std(dim=(0, 2, 3), unbiased=False).numpy())
    z = normalize(images, mean, std)
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    with pytest.raises(ValueError, match="no images"):
        ChannelStats().result()


def test_no_augmentation_is_the_identity_and_each_part_does_its_job():
    x = to_tensor(photo(24, 24)).float()[None] / 255
    assert augment(x, Augmentation()) is x
    flipped = augment(x.repeat(64, 1, 1, 1), Augmentation(flip=True), torch.Generator().manual_seed(0))
    mirrored = torch.flip(x, dims=[3])
    same = [torch.allclose(f, x[0], atol=1e-5) for f in flipped]
    flips = [torch.allclose(f, mirrored[0], atol=1e-5) for f in flipped]
    assert all(a or b for a, b in zip(same, flips)) and 16 < sum(flips) < 48  # half of them, exactly mirrored
    darker = augment(x.repeat(8, 1, 1, 1), Augmentation(brightness=0.5), torch.Generator().manual_seed(1))
    ratios = (darker.flatten(1).sum(1) / x.flatten().sum()).numpy()
    assert ratios.min() >= 0.5 - 1e-4 and ratios.max() <= 1.5 + 1e-4 and ratios.std() > 0.05


def test_augmentation_is_reproducible_with_a_seed_and_keeps_shape_and_range():
    x = torch.rand(6, 3, 32, 32)
    how = Augmentation(crop_scale=0.5, flip=True, rotate=15, brightness=0.3, contrast=0.3)
    a = augment(x, how, torch.Generator().manual_seed(7))
    b = augment(x, how, torch.Generator().manual_seed(7))
    c = augment(x, how, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1


@settings(max_examples=60, deadline=None)
@given(width=st.integers(1, 90), height=st.integers(1, 90), size=st.integers(1, 64),
       mode=st.sampled_from(["RGB", "L", "RGBA", "P", "LA"]))
def test_any_image_size_and_mode_gives_the_training_shape(width, height, size, mode):
    image = photo(width, height, "RGB").convert(mode)
    x = fit_size(to_tensor(image, "RGB"), size)
    assert x.shape == (3, size, size) and x.dtype == torch.uint8


def test_the_loop_augments_image_batches_only_when_params_ask():
    """data.images.augment reaches each training batch (trainer.augmentation → loop), off by default."""
    from pipeline.train.loop import image_augmentation

    assert image_augmentation({}) is None
    config = {"augment": {"crop_scale": 0.8, "flip": True, "rotate": 10.0, "brightness": 0.2, "contrast": 0.2},
              "image_shape": [3, 8, 8], "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.2, 0.2]}
    torch.manual_seed(0)
    x = torch.rand(16, 3 * 8 * 8) * 2 - 1
    out = image_augmentation(config)(x)
    assert out.shape == x.shape and not torch.allclose(out, x, atol=1e-3)
    # inputs stay in the normalised range of valid pixels (0..1 before normalisation)
    low = (0 - torch.tensor(config["image_mean"])) / torch.tensor(config["image_std"])
    high = (1 - torch.tensor(config["image_mean"])) / torch.tensor(config["image_std"])
    images = out.view(-1, 3, 8, 8)
    assert (images >= low.view(1, 3, 1, 1) - 1e-4).all() and (images <= high.view(1, 3, 1, 1) + 1e-4).all()


def test_network_inputs_decode_fit_and_normalise_bytes():
    import io as _io

    from PIL import Image

    from pipeline.image_transforms import network_inputs

    out = _io.BytesIO()
    Image.new("L", (40, 20), 255).save(out, format="PNG")
    x = network_inputs([out.getvalue()], {"size": 16, "mode": "RGB", "mean": [0.5] * 3, "std": [0.25] * 3})
    assert x.shape == (1, 3 * 16 * 16) and x.dtype == "float32"
    assert abs(float(x.min()) - 2.0) < 1e-5 and abs(float(x.max()) - 2.0) < 1e-5  # white: (1 - 0.5) / 0.25
    with pytest.raises(ValueError, match="not a decodable image"):
        network_inputs([b"junk"], {"size": 16, "mode": "RGB", "mean": [0.5] * 3, "std": [0.25] * 3})
