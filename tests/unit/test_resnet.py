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


# --- transfer learning (issue 17, point 5): weights from files, frozen blocks, two learning rates ---

from pipeline.train.resnet import (  # noqa: E402
    adapt_input_conv,
    blocks,
    frozen_prefixes,
    hold_frozen_norms,
    parameter_groups,
    read_weights,
    set_frozen,
)


def foreign_weights(depth: int = 18, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: torch.randn(s) if s else torch.tensor(7) for k, s in torchvision_names_and_shapes(depth).items()}


@pytest.mark.parametrize("form", ["safetensors", "pt", "checkpoint", "ddp"])
def test_weights_load_from_each_file_form_users_save(tmp_path, form):
    from safetensors.torch import save_file

    weights = foreign_weights()
    path = tmp_path / f"w.{'safetensors' if form == 'safetensors' else 'pt'}"
    if form == "safetensors":
        save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    else:
        saved = {"checkpoint": {"state_dict": weights, "epoch": 3}, "ddp": {f"module.{k}": v for k, v in weights.items()}}
        torch.save(saved.get(form, weights), path)
    back = read_weights(path)
    assert back.keys() == weights.keys() and all(torch.equal(back[k], weights[k]) for k in weights)


def test_a_weights_file_that_is_not_one_is_named(tmp_path):
    with pytest.raises(ValueError, match="not found .*downloads nothing"):
        read_weights(tmp_path / "missing.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="junk.safetensors cannot be read"):
        read_weights(tmp_path / "junk.safetensors")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="plain.pt: expected a state_dict"):
        read_weights(tmp_path / "plain.pt")

    class Payload:  # an object whose unpickling would run code: refused, never built
        def __reduce__(self):
            return (print, ("unpickled",))

    torch.save({"conv1.weight": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="evil.pt cannot be read"):
        read_weights(tmp_path / "evil.pt")


def test_rgb_weights_fit_a_grey_model_as_timm_adapts_them():
    weights = foreign_weights()
    model = ResNet(18, (1, 8, 8), classes=10)
    load_backbone(model, weights)
    assert torch.allclose(model.conv1.weight, weights["conv1.weight"].sum(dim=1, keepdim=True))
    grey = weights["conv1.weight"][:, :1]
    assert torch.allclose(adapt_input_conv(grey, 3).sum(dim=1, keepdim=True), grey)


@pytest.mark.parametrize("freeze, training", [
    ("none", None),
    ("backbone", ["fc."]),
    (2, ["layer4.0.", "layer4.1.", "fc."]),
    (3, ["layer3.1.", "layer4.0.", "layer4.1.", "fc."]),
    (9, None),  # every block of resnet18 (the stem and 8 residual blocks)
])
def test_freeze_holds_all_but_the_last_n_blocks(freeze, training):
    model = ResNet(18, (3, 32, 32), classes=4)
    assert blocks(model) == ["stem", *(f"layer{s}.{b}" for s in range(1, 5) for b in range(2))]
    set_frozen(model, frozen_prefixes(model, freeze))
    trains = sorted({n for n, p in model.named_parameters() if p.requires_grad})
    if training is None:
        assert len(trains) == len(list(model.parameters()))
    else:
        assert trains and all(n.startswith(tuple(training)) for n in trains)
        assert {t for t in training for n in trains if n.startswith(t)} == set(training)


def test_a_frozen_backbone_keeps_its_weights_and_batch_statistics_through_a_step():
    torch.manual_seed(0)
    model = ResNet(18, (1, 8, 8), classes=3)
    set_frozen(model, frozen_prefixes(model, "backbone"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam(parameter_groups(model, 1e-2, 0.1), lr=1e-2)
    model.train()
    hold_frozen_norms(model)
    loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 64)), torch.tensor([0, 1, 2] * 2 + [0, 1]))
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    changed = sorted(k for k in after if not torch.equal(after[k], before[k]))
    assert changed == ["fc.bias", "fc.weight"]  # running means and variances included: held
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(1e-3), 1e-2]


def test_a_missing_pretrained_file_is_a_config_error_before_ray_starts(tmp_path):
    from pipeline.config import load_params
    from pipeline.errors import ConfigError
    from pipeline.runners.training import pretrained_weights
    from tests.conftest import REPO

    params = load_params(REPO / "params.yaml", ["train.model=resnet18", "train.pretrained=weights/nope.pt"])
    with pytest.raises(ConfigError, match=r"train\.pretrained: pretrained weights .*weights/nope\.pt not found"):
        pretrained_weights(params, tmp_path)


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".pt", ".pth", ".safetensors", ".bin"]))
def test_any_bytes_as_a_weights_file_are_a_config_error_naming_the_key(tmp_path, data, suffix):
    """A weights file is user input: whatever its bytes, it is read as tensors or refused as
    `train.pretrained: ...`, never another exception."""
    from pipeline.config import load_params
    from pipeline.errors import ConfigError
    from pipeline.runners.training import pretrained_weights
    from tests.conftest import REPO

    (tmp_path / f"w{suffix}").write_bytes(data)
    params = load_params(REPO / "params.yaml", ["train.model=resnet18", f"train.pretrained=w{suffix}"])
    try:
        weights = pretrained_weights(params, tmp_path)
    except ConfigError as e:
        assert str(e).startswith("train.pretrained: pretrained weights") and "\n" not in str(e)
    else:
        assert weights and all(isinstance(v, torch.Tensor) for v in weights.values())
