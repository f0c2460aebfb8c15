import pytest
import torch

from pipeline.train.models import ModelSpec, build_model, load_model, save_model


@pytest.mark.parametrize(
    "kind, shape, n_features",
    [("cnn", (1, 8, 8), 64), ("cnn", (3, 5, 7), 105), ("cnn", (2, 2, 2), 8), ("mlp", None, 13)],
)
def test_forward_and_one_step(kind, shape, n_features):
    spec = ModelSpec(kind, n_features, 4, shape, (8, 16), (32,), 0.1)
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
