import pytest
import torch

from pipeline.train.models import ModelSpec, build_model, load_model, save_model


@pytest.mark.parametrize(
    "kind, shape, n_features",
    [
        ("cnn", (1, 8, 8), 64), ("cnn", (3, 5, 7), 105), ("cnn", (2, 2, 2), 8), ("mlp", None, 13),
        ("lstm", None, 13), ("lstm", (1, 8, 8), 64), ("transformer", None, 13), ("transformer", (2, 4, 4), 32),
        ("resnet18", (1, 8, 8), 64), ("resnet18", (3, 5, 7), 105),
    ],
)
@pytest.mark.parametrize("norm", ["auto", "layer", "none"])
def test_forward_and_one_step(kind, shape, n_features, norm):
    spec = ModelSpec(kind, n_features, 4, shape, (8, 16), (32,), 0.1, norm=norm, width=16, depth=2, heads=4)
    model = build_model(spec)
    x, y = torch.randn(6, n_features), torch.randint(0, 4, (6,))
    logits = model(x)
    assert logits.shape == (6, 4)
    loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert torch.isfinite(model(x)).all()


def test_save_load_roundtrip(tmp_path):
    spec = ModelSpec("cnn", 64, 10, (1, 8, 8), (4,), (8,), 0.0)
    model = build_model(spec).eval()
    save_model(model, spec, str(tmp_path / "m.pt"))
    loaded, loaded_spec = load_model(str(tmp_path / "m.pt"))
    x = torch.randn(3, 64)
    assert loaded_spec == spec
    assert torch.allclose(model(x), loaded(x))


@pytest.mark.parametrize("kind", ["mlp", "cnn", "lstm", "transformer", "resnet18"])
def test_every_model_exports_for_serving(kind):
    """torch.export with a dynamic batch is how the model ships in MLflow."""
    spec = ModelSpec(kind, 64, 3, (1, 8, 8), (4,), (8,), 0.0, width=8, heads=2)
    model = build_model(spec).eval()
    exported = torch.export.export(model, (torch.zeros(2, 64),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    x = torch.randn(5, 64)
    assert torch.allclose(exported.module()(x), model(x), atol=1e-5)


def test_a_new_architecture_registers_by_name():
    from pipeline.train.models import ZOO, register

    @register("tiny_linear")
    def tiny(spec):
        return torch.nn.Linear(spec.n_features, spec.n_classes)

    try:
        assert build_model(ModelSpec("tiny_linear", 5, 2, None, (), (), 0.0))(torch.randn(3, 5)).shape == (3, 2)
    finally:
        ZOO.pop("tiny_linear")


def test_unknown_model_names_the_zoo():
    with pytest.raises(ValueError, match="unknown model 'resnet'.*cnn"):
        build_model(ModelSpec("resnet", 5, 2, None, (), (), 0.0))


def test_the_saved_model_is_renamed_into_place_with_the_bytes_a_direct_save_gives(tmp_path):
    """torch.save names its archive after the file: the temporary file keeps model.pt's name,
    so the DVC-tracked bytes stay deterministic (a run's model.pt is byte-identical to the last)."""
    import torch

    torch.manual_seed(0)
    spec = ModelSpec("mlp", 4, 3, None, (8,), (8,), 0.0)
    model = build_model(spec)
    save_model(model, spec, str(tmp_path / "a/model.pt"))
    (tmp_path / "b").mkdir()
    torch.save({"spec": spec.to_dict(), "state_dict": model.state_dict()}, tmp_path / "b/model.pt")
    assert (tmp_path / "a/model.pt").read_bytes() == (tmp_path / "b/model.pt").read_bytes()
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["model.pt"]  # no temporary left behind
