"""The residual network keeps torchvision's ResNet parameter names and shapes (issue 17,
point 4), so a `state_dict` saved from torchvision or timm loads into it unchanged.

torchvision does not import next to this machine's CPU build of torch, so the reference is
written out here from torchvision's naming scheme, independently of the module under test,
and checked against the parameter counts torchvision publishes for its ImageNet weights
(resnet18: 11,689,512; resnet50: 25,557,032)."""

from __future__ import annotations

import pytest
import torch

from pipeline.train.resnet import ResNet, load_backbone

PUBLISHED_PARAMETERS = {18: 11_689_512, 50: 25_557_032}
STAGES = {18: ("basic", (2, 2, 2, 2)), 50: ("bottleneck", (3, 4, 6, 3))}
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def torchvision_names_and_shapes(depth: int, classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Every tensor of torchvision's `resnet{depth}(num_classes=classes).state_dict()`, by name."""
    kind, stages = STAGES[depth]
    out: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, n: int) -> None:
        for k in BN:
            out[f"{prefix}.{k}"] = () if k == "num_batches_tracked" else (n,)

    out["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    inputs = 64
    for s, (planes, blocks) in enumerate(zip((64, 128, 256, 512), stages), start=1):
        expansion = 1 if kind == "basic" else 4
        for b in range(blocks):
            p = f"layer{s}.{b}"
            if kind == "basic":
                convs = [(inputs, planes, 3), (planes, planes, 3)]
            else:
                convs = [(inputs, planes, 1), (planes, planes, 3), (planes, planes * 4, 1)]
            for i, (cin, cout, k) in enumerate(convs, start=1):
                out[f"{p}.conv{i}.weight"] = (cout, cin, k, k)
                bn(f"{p}.bn{i}", cout)
            if b == 0 and (s > 1 or inputs != planes * expansion):
                out[f"{p}.downsample.0.weight"] = (planes * expansion, inputs, 1, 1)
                bn(f"{p}.downsample.1", planes * expansion)
            inputs = planes * expansion
    out["fc.weight"], out["fc.bias"] = (classes, inputs), (classes,)
    return out


@pytest.mark.parametrize("depth", [18, 50])
def test_names_and_shapes_are_torchvision_s(depth):
    reference = torchvision_names_and_shapes(depth)
    parameters = sum(torch.Size(s).numel() for k, s in reference.items()
                     if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert parameters == PUBLISHED_PARAMETERS[depth]  # the reference itself is torchvision's
    for image in ((3, 224, 224), (3, 32, 32)):  # the small-input stem holds the same tensors
        model = ResNet(depth, image, 1000)
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == reference
        assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMETERS[depth]


def test_a_saved_backbone_loads_unchanged_and_the_head_is_new(tmp_path):
    torch.manual_seed(0)
    foreign = {k: torch.randn(s) if s else torch.tensor(7) for k, s in torchvision_names_and_shapes(18).items()}
    torch.save(foreign, tmp_path / "resnet18.pt")
    model = ResNet(18, (3, 32, 32), classes=5)
    head = model.fc.weight.detach().clone()
    loaded = load_backbone(model, torch.load(tmp_path / "resnet18.pt", weights_only=True))
    state = model.state_dict()
    assert loaded == sorted(k for k in foreign if not k.startswith("fc."))
    assert all(torch.equal(state[k], foreign[k]) for k in loaded)
    assert model.fc.weight.shape == (5, 512) and torch.equal(model.fc.weight, head)


def test_weights_that_do_not_fit_are_named():
    reference = torchvision_names_and_shapes(18)
    wrong = {k: torch.zeros(s) for k, s in reference.items()}
    wrong["layer3.1.conv2.weight"] = torch.zeros(256, 256, 1, 1)
    with pytest.raises(ValueError, match=r"other shapes: layer3\.1\.conv2\.weight \(256, 256, 1, 1\)"):
        load_backbone(ResNet(18, (3, 32, 32), 2), wrong)
    with pytest.raises(ValueError, match=r"unexpected: layer1\.0\.bn3\.bias.*other shapes: layer1\.0\.conv1\.weight"):
        # a resnet50's weights for a resnet18
        load_backbone(ResNet(18, (3, 32, 32), 2), {k: torch.zeros(s) for k, s in torchvision_names_and_shapes(50).items()})


def test_flat_rows_and_images_give_the_same_logits_and_gradients_flow():
    torch.manual_seed(0)
    model = ResNet(18, (1, 8, 8), classes=3).eval()
    x = torch.randn(4, 1, 8, 8)
    assert torch.allclose(model(x), model(x.flatten(1)))
    model.train()
    loss = torch.nn.functional.cross_entropy(model(x.flatten(1)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0


def test_an_unknown_depth_is_a_clear_error():
    with pytest.raises(ValueError, match="18, 34, 50, 101, 152, not 20"):
        ResNet(20, (3, 32, 32), 2)
