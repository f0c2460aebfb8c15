from pathlib import Path

import pytest
import yaml

from pipeline.config import load_params, parse_override
from pipeline.errors import ConfigError
from tests.conftest import REPO


def write(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    mutate(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_repo_params_load(repo_params):
    assert repo_params.split.train == 0.70
    assert repo_params.data.image_shape == [1, 8, 8]
    assert sum(g.count for g in repo_params.data.features) == 64


def test_overrides_change_values():
    p = load_params(REPO / "params.yaml", ["train.epochs=3", "split.seed=7", "train.hidden=[64, 32]"])
    assert (p.train.epochs, p.split.seed, p.train.hidden) == (3, 7, [64, 32])


@pytest.mark.parametrize(
    "mutate, key",
    [
        (lambda r: r["train"].update(epohcs=3), "train.epohcs"),
        (lambda r: r.update(trian={}), "trian"),
        (lambda r: r["train"].update(epochs=0), "train.epochs"),
        (lambda r: r["train"].update(model="resnet"), "train.model"),
        (lambda r: r["split"].update(train=0.9), "split"),
        (lambda r: r["data"].update(image_shape=[1, 4, 4]), "data"),
        (lambda r: r["register"].update(min_test_accuracy=1.5), "register.min_test_accuracy"),
        (lambda r: r["validate"].update(max_bad=0.1), "validate.max_bad"),
    ],
)
def test_bad_params_name_the_key(tmp_path, mutate, key):
    with pytest.raises(ConfigError) as err:
        load_params(write(tmp_path, mutate))
    assert key in str(err.value)


def test_cnn_needs_image_shape(tmp_path):
    with pytest.raises(ConfigError, match="image_shape"):
        load_params(write(tmp_path, lambda r: r["data"].update(image_shape=None)))


@pytest.mark.parametrize("model", ["resnet18", "resnet50"])
def test_a_resnet_needs_image_shape(tmp_path, model):
    def change(r):
        r["data"].update(image_shape=None)
        r["train"].update(model=model)

    with pytest.raises(ConfigError, match=f"train.model '{model}' needs data.image_shape"):
        load_params(write(tmp_path, change))


def test_an_unknown_resnet_depth_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="train.model"):
        load_params(write(tmp_path, lambda r: r["train"].update(model="resnet20")))


@pytest.mark.parametrize("overrides, message", [
    (["train.freeze=2"], "freeze is for the resnet models, not cnn"),
    (["train.model=mlp", "train.pretrained=w.pt"], "pretrained is for the resnet models, not mlp"),
    (["train.model=resnet18", "train.freeze=-1"], "train.freeze: .*0 or more.*not -1"),
    (["train.model=resnet18", "train.freeze=all"], "train.freeze: .*not 'all'"),
    (["train.model=resnet18", "train.unfreeze_epoch=3"], "unfreeze_epoch needs freeze"),
    (["train.model=resnet18", "train.freeze=backbone", "train.unfreeze_epoch=1"], "train.unfreeze_epoch"),
    (["train.model=resnet18", "train.backbone_lr_scale=2"], "train.backbone_lr_scale"),
    (["train.model=resnet18", "train.pretrained=w.pt", "train.init_from=models:/m@champion"], "not both"),
])
def test_transfer_learning_params_are_checked_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_params(REPO / "params.yaml", overrides)


def test_transfer_learning_params_that_fit_load():
    params = load_params(REPO / "params.yaml", ["train.model=resnet18", "train.freeze=3", "train.unfreeze_epoch=4",
                                                "train.backbone_lr_scale=0.1", "train.pretrained=weights/r18.safetensors"])
    assert (params.train.freeze, params.train.unfreeze_epoch, str(params.train.pretrained)) == (3, 4, "weights/r18.safetensors")


@pytest.mark.parametrize("override, key", [("train.epochz=3", "train.epochz"), ("train.lr=-1", "train.lr")])
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_params(REPO / "params.yaml", [override])


@pytest.mark.parametrize("text", ["train.epochs", "=3", "train.epochs=[1,"])
def test_malformed_override(text):
    with pytest.raises(ConfigError):
        parse_override(text)


def test_override_into_scalar_is_an_error():
    with pytest.raises(ConfigError, match="not a section"):
        load_params(REPO / "params.yaml", ["train.epochs.x=1"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_digest_changes_with_params():
    a = load_params(REPO / "params.yaml")
    b = load_params(REPO / "params.yaml", ["train.lr=0.01"])
    assert a.digest() == load_params(REPO / "params.yaml").digest()
    assert a.digest() != b.digest()
