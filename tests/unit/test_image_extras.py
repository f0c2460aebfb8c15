"""A manifest's extra columns as model inputs (issue 17, points 1 and 6): the image and the
row's other columns go into one network. The extras are preprocessed as a table's columns are
(fitted on train, shipped in the model's state), follow the pixels in each input row, join the
image features at the head, pass augmentation untouched, and are checked at every way in."""

from __future__ import annotations

import base64
import dataclasses
import io as _io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline import stages
from pipeline.config import load_params
from pipeline.data import images, io
from pipeline.data.demo import write_image_folder
from pipeline.image_transforms import Augmentation
from pipeline.preprocess import input_columns, transform
from pipeline.serve import RequestError, image_frame, predict_body
from pipeline.train.loop import image_augmentation
from pipeline.train.models import ModelSpec, build_model
from pipeline.train.resnet import load_backbone
from pipeline.train.trainer import n_inputs
from tests.unit.test_cli import main_in_process

LIMITS = (100_000, 1_000_000)
EXTRAS = [{"name": "score", "type": "double", "nullable": False, "limit": 1e30},
          {"name": "site", "type": "string", "nullable": False}]


def png(value: int = 90) -> bytes:
    out = _io.BytesIO()
    Image.new("RGB", (12, 12), value).save(out, format="PNG")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A manifest with a numeric and a categorical extra column, through init-params and the data stages."""
    root = tmp_path_factory.mktemp("extras")
    folder = root / "pics"
    write_image_folder(folder, rows=150, seed=3, flaws=0)
    rows, _ = images.list_folder(folder)
    rng = np.random.default_rng(0)
    manifest = rows.rename(columns={"path": "file"}).assign(
        score=rng.normal(size=len(rows)).round(3), site=rng.choice(["north", "south", "east"], len(rows)))
    manifest.to_csv(folder / "manifest.csv", index=False)
    (root / "params.yaml").unlink(missing_ok=True)
    return root


def test_the_split_fits_the_extras_beside_the_images(monkeypatch, capsys, project):
    code, _, err = main_in_process(monkeypatch, capsys, project, "init-params", "--data", "pics/manifest.csv",
                                   "--target", "label", "--force")
    assert code in (0, None), err
    params = load_params(project / "params.yaml", ["validate.data_docs=false", "data.images.size=8"])
    assert [f.name for f in params.data.features] == ["score", "site"]
    for name in ("validate", "clean", "split"):
        stages.run(name, params, project)
    state = json.loads((project / "data/split/preprocess.json").read_text())
    table = state["table"]
    assert table["numeric"]["names"] == ["score"] and table["categorical"][0]["name"] == "site"
    assert sorted(table["categorical"][0]["categories"]) == ["east", "north", "south"]
    assert input_columns(state) == ["image", "score", "site"]
    assert n_inputs(state) == 3 * 8 * 8 + 1 + 3

    train = io.read_table(project / "data/split/train.parquet").head(5)
    x = transform(train, state)
    assert x.shape == (5, n_inputs(state)) and x.dtype == np.float32
    centre, scale = table["numeric"]["center"][0], table["numeric"]["scale"][0]
    assert np.allclose(x[:, 192], (train["score"] - centre) / scale, atol=1e-5)  # the pixels first, then the extras
    bad = train.assign(score=[np.inf, 0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="score"):
        transform(bad, state)  # an extra is checked as a table's column is
    with pytest.raises(ValueError, match="site"):
        transform(train.drop(columns=["site"]), state)

    # the listing's random order reaches the splits: a folder lists class by class, and a
    # local shuffle buffer of a few row groups would otherwise serve one class at a time
    assert io.parquet_head(project / "data/split/train.parquet", 30)["label"].nunique() >= 5


@pytest.mark.parametrize("kind", ["cnn", "resnet18"])
def test_the_extras_reach_the_head_and_the_network_exports(kind):
    spec = ModelSpec(kind=kind, n_features=3 * 8 * 8 + 4, n_classes=3, image_shape=(3, 8, 8), channels=(8,),
                     hidden=(16,), dropout=0.0)
    model = build_model(spec).eval()
    x = torch.randn(5, spec.n_features)
    moved = x.clone()
    moved[:, -4:] += 2.0
    assert model(x).shape == (5, 3) and not torch.allclose(model(moved), model(x))
    exported = torch.export.export(model, (torch.zeros(2, spec.n_features),),
                                   dynamic_shapes=({0: torch.export.Dim("batch")},))
    assert torch.allclose(exported.module()(x), model(x), atol=1e-5)


def test_a_resnet_with_extras_still_takes_torchvision_weights():
    from pipeline.train.resnet import ResNet

    source = ResNet(18, (3, 32, 32), 1000).state_dict()  # torchvision's names and shapes
    target = ResNet(18, (3, 32, 32), 2, extras=3)
    loaded = load_backbone(target, source)
    fresh = set(target.state_dict()) - set(loaded)
    assert fresh == {"fc.weight", "fc.bias", "tabular.0.weight", "tabular.0.bias"} and target.fc.in_features == 512 + 32
    assert torch.equal(target.conv1.weight, source["conv1.weight"])


def test_augmentation_moves_the_pixels_and_leaves_the_extras():
    config = {"augment": dataclasses.asdict(Augmentation(flip=True, brightness=0.5)),
              "image_shape": [3, 8, 8], "image_mean": [0.5] * 3, "image_std": [0.25] * 3}
    augment = image_augmentation(config)
    assert augment is not None
    torch.manual_seed(0)
    x = torch.randn(16, 3 * 8 * 8 + 4).clamp(-2, 2)
    out = augment(x)
    assert out.shape == x.shape and torch.equal(out[:, -4:], x[:, -4:])
    assert not torch.allclose(out[:, :-4], x[:, :-4])


def test_a_request_carries_the_extras_beside_the_image():
    frame = image_frame([{"image": b64(png()), "score": 0.5, "site": "north", "path": "a.png"}], LIMITS,
                        {"name": "path", "type": "string"}, 10, EXTRAS)
    assert frame[["path", "score", "site"]].values.tolist() == [["a.png", 0.5, "north"]]
    assert frame["image"].iloc[0] == png()


@pytest.mark.parametrize("row, words", [
    ({"image": b64(png()), "site": "north"}, "missing column(s) score"),
    ({"image": b64(png()), "score": "x", "site": "north"}, "column score must be double"),
    ({"image": b64(png()), "score": 1.0, "site": "north", "age": 3}, "unknown column(s) age; the model takes image, score, site"),
    ({"image": b64(png()), "score": None, "site": "north"}, "score"),  # not nullable: no imputation was fitted
])
def test_a_bad_extra_is_a_422_naming_it(row, words):
    with pytest.raises(RequestError) as e:
        image_frame([row], LIMITS, None, 10, EXTRAS)
    assert e.value.status == 422 and words in str(e.value)


def form(parts: list[tuple[str, str | None, bytes]], boundary: str = "XyZ") -> tuple[bytes, str]:
    """A multipart body: file parts (with a filename) and plain fields (without)."""
    body = b""
    for name, file, data in parts:
        named = f'; filename="{file}"' if file is not None else ""
        body += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{named}\r\n\r\n'.encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_a_form_gives_each_image_its_fields_read_as_their_columns_take_them():
    body, kind = form([("image", "a.png", png()), ("image", "b.png", png(30)), ("score", None, b" 2.5 "),
                       ("site", None, b"east")])
    frame = image_frame(predict_body(body, kind), LIMITS, None, 10, EXTRAS)
    assert frame["score"].tolist() == [2.5, 2.5] and frame["site"].tolist() == ["east", "east"]
    assert frame["image"].tolist() == [png(), png(30)]
    body, kind = form([("image", "a.png", png()), ("score", None, b"lots"), ("site", None, b"east")])
    with pytest.raises(RequestError, match="column score must be double, got form text 'lots'") as e:
        image_frame(predict_body(body, kind), LIMITS, None, 10, EXTRAS)
    assert e.value.status == 422
    body, kind = form([("image", "a.png", png()), ("site", None, b"east")])
    with pytest.raises(RequestError, match=r"missing column\(s\) score"):
        image_frame(predict_body(body, kind), LIMITS, None, 10, EXTRAS)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fields=st.dictionaries(st.sampled_from(["score", "site", "path", "other", "image"]),
                              st.binary(max_size=40), max_size=4),
       json_values=st.dictionaries(st.sampled_from(["score", "site", "other"]),
                                   st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=10),
                                             st.booleans(), st.lists(st.integers(), max_size=2)), max_size=3))
def test_any_form_fields_or_json_extras_give_a_frame_or_a_4xx(fields, json_values):
    body, kind = form([("image", "a.png", png()), *((k, None, v) for k, v in fields.items())])
    for rows in (lambda: predict_body(body, kind), lambda: [{"image": b64(png()), **json_values}]):
        try:
            frame = image_frame(rows(), LIMITS, {"name": "path", "type": "string"}, 10, EXTRAS)
            assert frame["score"].map(lambda v: isinstance(v, float)).all() and frame["image"].iloc[0]
        except RequestError as e:
            assert 400 <= e.status < 500


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(scores=st.lists(st.one_of(st.none(), st.floats(allow_nan=True), st.integers(), st.text(max_size=8),
                                 st.from_regex(r"-?[0-9]{1,4}(\.[0-9]{1,3})?", fullmatch=True)),
                       min_size=1, max_size=6))
def test_batch_predict_keeps_every_manifest_row_with_an_error_for_a_bad_extra(tmp_path_factory, scores):
    """`d2d predict` from a manifest: each row's extras are checked as a table's are; a bad
    value, or a missing file, is that row's error, and the other rows are read."""
    from types import SimpleNamespace

    from pipeline.predict import Scorer

    folder = tmp_path_factory.mktemp("manifest")
    (folder / "a.png").write_bytes(png())
    scorer = Scorer.__new__(Scorer)  # a d2d image model's state, without loading one from MLflow
    scorer.image_root, scorer.id_column, scorer.extras = folder, "file", EXTRAS
    scorer.python_model = SimpleNamespace(state={"kind": "images", "max_bytes": LIMITS[0], "max_pixels": LIMITS[1]})
    batch = pd.DataFrame({"file": ["a.png" if i % 3 else "gone.png" for i in range(len(scores))],
                          "score": pd.Series(scores, dtype=object), "site": "north"})
    checked, errors = scorer.read_images(batch)
    assert len(errors) == len(batch)
    for i, score in enumerate(scores):
        number = pd.to_numeric(pd.Series([score], dtype=object), errors="coerce").iloc[0]  # text such as "1.5" reads as a number
        good = i % 3 != 0 and pd.notna(number) and np.isfinite(number) and abs(number) < 1e30
        assert (errors[i] == "") == good, (score, errors[i])
        if good:
            assert checked.loc[i, "image"] == png() and checked.loc[i, "score"] == number
