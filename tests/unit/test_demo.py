"""The demo dataset is deterministic (a fresh clone regenerates the DVC-recorded file) and its
corruptions are exactly what validation and cleaning remove."""

import pandas as pd

from pipeline.config import ValidateParams
from pipeline.data import io
from pipeline.data.clean import drop_duplicates
from pipeline.data.validate import validate
from pipeline.runners.data import make_demo
from tests.conftest import REPO


def test_demo_matches_the_dvc_record(tmp_path, repo_params):
    out = make_demo(repo_params, tmp_path)
    assert out["rows"] == 1797
    assert out["md5"] == io.dvc_recorded_md5(REPO / repo_params.data.raw)
    assert make_demo(repo_params, tmp_path)["md5"] == out["md5"]


def test_corruptions_are_caught_exactly(tmp_path, repo_params):
    from pipeline.data.schema import schema_from_params

    out = make_demo(repo_params, tmp_path)
    bad = out["corrupted"]
    assert sum(map(len, bad.values())) == round(0.03 * 1797)
    schema = schema_from_params(repo_params.data)
    report = validate(pd.read_csv(out["path"]), schema, ValidateParams())
    expected = set(bad["missing_pixel"]) | set(bad["out_of_range"]) | set(bad["unknown_label"])
    assert set(report.quarantine["id"]) == expected
    kept, removed = drop_duplicates(report.valid, schema)
    # A copy can precede its source in the file, so which of the two is dropped varies;
    # the count and the pairing do not.
    assert len(removed) == len(bad["duplicate"])
    pairs = {int(r.split()[-1]) for r in removed["reason"]} | set(removed["id"])
    assert set(bad["duplicate"]) <= pairs
    assert set(removed["reason"].str.split().str[-1].astype(int)) <= set(kept["id"])
