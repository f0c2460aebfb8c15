"""Drift for images (issue 17), piece by piece on small generated folders: an inbox batch
folder screened file by file (nothing lost, each refusal with its reason), the champion's
embeddings cut out of an exported network, MMD's permutation test, property and embedding
drift on simulated batches, the simulated batches themselves, and appending a batch's files to
an image folder as a new DVC version that a crash cannot half-apply."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import image_monitor, monitor
from pipeline.config import Params, load_params
from pipeline.data import images, io
from pipeline.data.schema import schema_from_params
from pipeline.data.simulate import IMAGE_KINDS, write_image_batch
from pipeline.drift import mmd_test
from pipeline.preprocess import IMAGE_COLUMN
from pipeline.train.models import ModelSpec, build_model
from tests.unit.test_cli import assert_one_line, main_in_process  # at import: not under @given

PARAMS = ('data: {raw: data/raw/digits, id_column: path, target: label, classes: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], '
          'images: {size: 16}, demo: {rows: 300}}\nvalidate: {data_docs: false, min_rows: 5}\ntrain: {model: cnn}\n')


def params_in(root: Path) -> Params:
    (root / "params.yaml").write_text(PARAMS)
    return load_params(root / "params.yaml")


def test_a_batch_folder_with_class_folders_is_labelled_and_one_without_is_not(tmp_path):
    write_image_batch(tmp_path / "a", "none", 0.0, 12, seed=0, digits=300)
    write_image_batch(tmp_path / "b", "none", 0.0, 12, seed=0, digits=300, labelled=False)
    rows, refused, labelled = image_monitor.list_batch(tmp_path / "a")
    assert labelled and len(rows) == 12 and refused.empty
    assert rows["path"].map(lambda p: p.split("/")[0]).tolist() == rows["label"].tolist()
    rows, refused, labelled = image_monitor.list_batch(tmp_path / "b")
    assert not labelled and len(rows) == 12 and rows["label"].isna().all()


def test_screening_a_folder_keeps_every_file_and_says_why_each_one_is_refused(tmp_path):
    params = params_in(tmp_path)
    schema = schema_from_params(params.data)
    batch = tmp_path / "batch"
    write_image_batch(batch, "none", 0.0, 20, seed=1, digits=300)
    write_image_batch(tmp_path / "more", "none", 0.0, 1, seed=2, digits=300)
    files = sorted(p for p in batch.rglob("*") if p.is_file())
    known = frozenset({hashlib.sha256(files[5].read_bytes()).hexdigest()})  # as if the dataset held it
    first = files[0]
    (batch / first.parent.name / f"copy{first.suffix}").write_bytes(first.read_bytes())  # a duplicate
    (batch / first.parent.name / "broken.png").write_bytes(b"\x89PNG truncated")
    (batch / "cat").mkdir()
    (batch / "cat" / "x.png").write_bytes(next(p for p in (tmp_path / "more").rglob("*") if p.is_file()).read_bytes())
    (batch / "loose.png").write_bytes(first.read_bytes())
    screened = image_monitor.screen_folder(batch, schema, params, known)
    assert screened.labelled and not screened.rejected
    assert screened.rows == 24 == len(screened.valid) + len(screened.quarantine)
    reasons = " | ".join(screened.quarantine["reason"])
    for why in ("not an image", "not one of the classes", "already in the dataset", "not in a class folder"):
        assert why in reasons, reasons
    assert "an exact duplicate of" in reasons
    assert IMAGE_COLUMN in screened.valid and IMAGE_COLUMN not in screened.quarantine
    assert screened.valid["label"].map(type).eq(int).all()  # folder names typed as the classes are
    assert set(screened.raw_valid["path"]) == set(screened.valid["path"])


def test_an_unlabelled_batch_with_too_few_usable_images_is_rejected_whole(tmp_path):
    params = params_in(tmp_path)
    batch = tmp_path / "batch"
    write_image_batch(batch, "none", 0.0, 3, seed=2, digits=300, labelled=False)
    screened = image_monitor.screen_folder(batch, schema_from_params(params.data), params, frozenset())
    assert not screened.labelled and screened.rejected and screened.valid.empty
    assert len(screened.quarantine) == 3 and screened.quarantine["reason"].str.contains("under validate.min_rows").all()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(st.tuples(st.sampled_from(["", "0/", "7/", "x/", "0/deep/"]),
                                st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="/\0"),
                                        min_size=1, max_size=12),
                                st.binary(max_size=64)), min_size=1, max_size=8))
def test_any_files_in_a_batch_folder_are_screened_without_an_exception(tmp_path_factory, files):
    root = tmp_path_factory.mktemp("hostile")
    params = params_in(root)
    batch = root / "batch"
    batch.mkdir()
    written = set()
    for folder, name, data in files:
        if name in (".", "..") or name.startswith("."):
            continue
        path = batch / folder / name
        if path.exists() or any(p.is_file() for p in path.parents if p != batch and batch in p.parents):
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        except OSError:  # a name the file system refuses
            continue
        written.add(path)
    if not written:
        return
    screened = image_monitor.screen_folder(batch, schema_from_params(params.data), params, frozenset())
    assert screened.rows == len(written) == len(screened.valid) + len(screened.quarantine)
    assert screened.quarantine["reason"].notna().all()


@pytest.mark.parametrize("kind", ["cnn", "resnet18"])
def test_the_embedding_is_the_input_of_the_exported_networks_last_linear_layer(kind):
    torch.manual_seed(0)
    net = build_model(ModelSpec(kind, 3 * 16 * 16, 10, (3, 16, 16), (8, 16), (32,), 0.0)).eval()
    exported = torch.export.export(net, (torch.zeros(2, 768),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    seen = []
    last = [m for m in net.modules() if isinstance(m, torch.nn.Linear)][-1]
    last.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = torch.randn(5, 768)
    with torch.no_grad():
        net(x)
        cut = image_monitor.penultimate(exported.module())(x)
    assert cut.shape == seen[0].shape and cut.shape[1] == last.in_features
    torch.testing.assert_close(cut, seen[0])


def test_mmd_finds_a_shift_and_keeps_its_false_alarms_near_the_level():
    rng = np.random.default_rng(3)
    null = [mmd_test(rng.normal(size=(200, 8)), rng.normal(size=(60, 8)), 200, seed=i)[1] for i in range(40)]
    shifted = [mmd_test(rng.normal(size=(200, 8)), rng.normal(size=(60, 8)) + 0.5, 200, seed=i)[1] for i in range(10)]
    assert np.mean(np.array(null) < 0.05) <= 0.15  # 40 draws: a 5% level seldom shows above 15%
    assert all(p < 0.05 for p in shifted)
    assert all(0 < p <= 1 for p in null)


class _Champion:
    """A d2d python model's two parts the monitor uses: the exported network and its preprocessing state."""

    def __init__(self, size: int = 16) -> None:
        torch.manual_seed(0)
        net = build_model(ModelSpec("cnn", 3 * size * size, 10, (3, size, size), (8, 16), (32,), 0.0)).eval()
        self.net = torch.export.export(net, (torch.zeros(2, 3 * size * size),),
                                       dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
        self.state = {"kind": "images", "size": size, "mode": "RGB", "mean": [0.1] * 3, "std": [0.3] * 3,
                      "max_bytes": 2**20, "max_pixels": 10**6, "outputs": []}


def screened_batch(root: Path, name: str, kind: str, strength: float, rows: int, seed: int) -> pd.DataFrame:
    params = params_in(root)
    write_image_batch(root / name, kind, strength, rows, seed, digits=300)
    return image_monitor.screen_folder(root / name, schema_from_params(params.data), params, frozenset()).valid


@pytest.fixture(scope="module")
def drift_inputs(tmp_path_factory) -> tuple[Params, pd.DataFrame, _Champion]:
    root = tmp_path_factory.mktemp("drift")
    return params_in(root), screened_batch(root, "reference", "none", 0.0, 200, seed=10), _Champion()


@pytest.mark.parametrize("kind, strength, drifted", [("none", 0.0, False), ("brightness", 0.8, True),
                                                     ("blur", 1.0, True), ("noise", 1.0, True)])
def test_image_drift_reports_properties_and_embeddings(tmp_path, drift_inputs, kind, strength, drifted):
    params, reference, champion = drift_inputs
    current = screened_batch(tmp_path, "batch", kind, strength, 120, seed=20)
    report = image_monitor.image_drift(reference, image_monitor.embeddings(champion, reference), current,
                                       image_monitor.embeddings(champion, current), params.drift)
    assert report.drifted == drifted, report.reasons
    assert set(report.features["feature"]) == {*image_monitor.PROPERTIES, *image_monitor.KINDS_OF_FILE}
    assert report.multivariate["dimensions"] == 32 and 0 <= report.multivariate["mmd_p"] <= 1
    assert any("MMD" in r for r in report.reasons) and any("ROC-AUC" in r for r in report.reasons)
    if kind == "brightness":
        assert report.features.set_index("feature").loc["brightness", "drifted"]


def test_the_report_shows_example_images_from_both_sides(drift_inputs, tmp_path):
    from pipeline.drift import report_html

    params, reference, champion = drift_inputs
    current = screened_batch(tmp_path, "batch", "rotation", 1.0, 40, seed=21)
    report = image_monitor.image_drift(reference, image_monitor.embeddings(champion, reference), current,
                                       image_monitor.embeddings(champion, current), params.drift)
    page = report_html(report, image_monitor.properties(reference), image_monitor.properties(current),
                       examples=image_monitor.examples(reference, current))
    assert page.count('alt="reference example"') == 8 and page.count('alt="batch example"') == 8
    assert "Example images" in page and "brightness" in page


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_every_simulated_kind_writes_a_batch_folder_of_valid_images(tmp_path, kind):
    params = params_in(tmp_path)
    write_image_batch(tmp_path / "b", kind, 0.7, 30, seed=4, digits=300)
    screened = image_monitor.screen_folder(tmp_path / "b", schema_from_params(params.data), params, frozenset())
    assert screened.labelled == (kind != "new_class") and len(screened.valid) == 30
    with pytest.raises(ValueError, match="already exists"):
        write_image_batch(tmp_path / "b", kind, 0.7, 30, seed=4, digits=300)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.text(max_size=12), rows=st.integers(-3, 5))
def test_simulate_drift_on_images_takes_any_kind_or_says_why_in_one_line(monkeypatch, capsys, tmp_path_factory,
                                                                         kind, rows):
    root = tmp_path_factory.mktemp("simulate")
    (root / "params.yaml").write_text(PARAMS)
    code, out, err = main_in_process(monkeypatch, capsys, root, "simulate-drift", "--kind", kind, "--rows", str(rows),
                                     "--out", "inbox")
    if kind in IMAGE_KINDS and rows >= 1:
        assert code == 0, out + err
        assert len([p for p in (root / "inbox").rglob("*") if p.is_file()]) == rows
    else:
        assert code == 2
        if rows >= 1:
            assert_one_line(code, out, err, "unknown image drift kind")


def test_a_batch_joins_the_image_folder_as_new_files_and_a_crash_cannot_half_apply_it(tmp_path):
    from pipeline.data.demo import write_image_folder

    raw = tmp_path / "data/raw/digits"
    write_image_folder(raw, rows=30, seed=0, flaws=0)
    before = {p: p.read_bytes() for p in raw.rglob("*") if p.is_file()}
    write_image_batch(tmp_path / "inbox" / "b", "blur", 0.5, 10, seed=5, digits=300)
    rows = image_monitor.list_batch(tmp_path / "inbox" / "b")[0]
    staged = image_monitor.stage_files(rows, tmp_path / "inbox" / "b", raw, "b-1234abcd", "path")
    after = image_monitor.md5_with_files(raw, staged)
    assert io.dvc_md5(raw) != after
    moved = sorted(p for p in staged.rglob("*") if p.is_file())
    (raw / moved[0].relative_to(staged)).parent.mkdir(parents=True, exist_ok=True)
    moved[0].rename(raw / moved[0].relative_to(staged))  # a run killed after moving one file in
    image_monitor.install_files(staged, raw)  # the next run finishes the rest
    assert io.dvc_md5(raw) == after and not staged.exists()
    assert all(path.read_bytes() == data for path, data in before.items())  # no existing byte changed
    new = [p.relative_to(raw) for p in raw.rglob("*") if p.is_file() and p not in before]
    assert len(new) == 10 and all(p.parts[1] == "b-1234abcd" for p in new)
    listed = images.list_folder(raw)[0]  # the layout's label is the class folder, however deep
    assert set(listed[listed["path"].str.contains("b-1234abcd")]["label"]) <= {str(c) for c in range(10)}


def test_a_manifest_dataset_is_not_appended_to_and_the_reasons_say_so(tmp_path):
    (tmp_path / "params.yaml").write_text(PARAMS.replace("raw: data/raw/digits", "raw: data/raw/m.csv"))
    params = load_params(tmp_path / "params.yaml")
    from pipeline.drift import DriftReport, PredictionDrift

    inspection = monitor.Inspection(DriftReport(pd.DataFrame({"drifted": [True]}), 1.0, None, True, ["drifted"]),
                                    PredictionDrift("chi2", 0.9, 0.05, False, 0.0), None)
    screened = monitor.Screened(3, pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), True, [])
    decision = monitor.decide(inspection, screened, [], monitor.utc_now(), params, "flow")
    assert (decision.action, decision.retrain, decision.alarm) == ("alert", False, True)
    assert any("the manifest data/raw/m.csv" in r for r in decision.reasons)


def test_the_inbox_of_an_image_project_is_its_folders_and_a_linked_folder_is_refused(tmp_path):
    params = params_in(tmp_path)
    inbox = tmp_path / "data/inbox"
    write_image_batch(inbox / "batch-a.v2", "none", 0.0, 6, seed=0, digits=300)
    (inbox / "notes.csv").write_text("a,b\n1,2\n")  # a table file is not an image batch
    (inbox / ".incoming").mkdir()  # hidden: a batch still being copied in
    elsewhere = tmp_path / "elsewhere"
    write_image_batch(elsewhere, "none", 0.0, 6, seed=1, digits=300)
    (inbox / "linked").symlink_to(elsewhere, target_is_directory=True)
    batches = {b.name: b for b in monitor.pending_batches(params, tmp_path, {"batches": {}, "retrains": []})}
    assert set(batches) == {"batch-a.v2", "linked"}
    assert batches["batch-a.v2"].md5 == io.dvc_md5(inbox / "batch-a.v2") and not batches["batch-a.v2"].refused
    assert batches["batch-a.v2"].key == f"batch-a.v2-{batches['batch-a.v2'].md5[:8]}"  # a folder's whole name
    assert "symbolic link" in batches["linked"].refused
    screened = monitor.screen(batches["batch-a.v2"], schema_from_params(params.data), params, frozenset())
    assert len(screened.valid) + len(screened.quarantine) == 6


def test_a_batch_of_decoded_images_is_bounded_in_bytes_whatever_the_dataset_size():
    assert io.score_rows(64) == io.SCORE_ROWS  # a table: as many rows as before
    for side in (64, 224):
        rows = io.score_rows(3 * side * side)
        assert 1 <= rows < io.SCORE_ROWS and rows * 3 * side * side * 4 <= io.BATCH_INPUT_BYTES
    assert io.score_rows(10**9) == 1


def test_a_batch_too_small_for_the_embedding_tests_is_judged_on_its_properties_and_says_so(drift_inputs, tmp_path):
    params, reference, champion = drift_inputs
    current = screened_batch(tmp_path, "batch", "brightness", 1.0, 8, seed=22)
    report = image_monitor.image_drift(reference, image_monitor.embeddings(champion, reference), current,
                                       image_monitor.embeddings(champion, current), params.drift)
    assert report.multivariate is None and "embeddings: not compared, 8 images in the batch" in report.reasons[-1]
    assert len(report.features) == 8


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["mmd_p", "mmd_permutations", "mmd_max_rows"]),
       value=st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                       st.text(max_size=30), st.lists(st.text(max_size=5), max_size=3)))
def test_any_value_of_an_mmd_key_loads_or_is_one_line_naming_it(monkeypatch, capsys, tmp_path, key, value):
    import json

    (tmp_path / "params.yaml").write_text(PARAMS)
    code, out, err = main_in_process(monkeypatch, capsys, tmp_path, "stage", "validate",
                                     "--set", f"drift.{key}={json.dumps(value)}")
    # params are read whole before any stage: a bad value names its key; a good one reaches the missing raw folder
    assert_one_line(code, out, err)
    assert f"drift.{key}" in err or "raw data not found" in err, err
