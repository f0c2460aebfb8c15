import pandas as pd
import pytest

from pipeline.config import ValidateParams
from pipeline.data.validate import REASON, validate
from pipeline.errors import DataError
from tests.conftest import make_frame

LOOSE = ValidateParams(max_bad_row_fraction=0.5, min_rows=5)


def test_clean_frame_passes(tiny_schema):
    df = make_frame(tiny_schema, 20)
    report = validate(df, tiny_schema, LOOSE)
    assert report.passed and report.reasons == []
    assert len(report.valid) == 20 and report.quarantine.empty


@pytest.mark.parametrize(
    "column, value, reason",
    [
        ("f1", None, "f1 is null"),
        ("f2", 11, "f2 outside [0, 10]"),
        ("f0", -1, "f0 outside [0, 10]"),
        ("label", 7, "label not in the allowed values"),
        ("label", None, "label is null"),
        ("id", None, "id is null"),
    ],
)
def test_each_row_rule_quarantines_with_its_reason(tiny_schema, column, value, reason):
    df = make_frame(tiny_schema, 20).astype("object")
    df.loc[3, column] = value
    report = validate(df, tiny_schema, LOOSE)
    assert report.passed
    assert len(report.valid) == 19
    assert report.quarantine[REASON].tolist() == [reason]
    assert report.quarantine[tiny_schema.id_column].tolist() == ([3] if column != "id" else [None])


def test_every_broken_rule_is_named(tiny_schema):
    df = make_frame(tiny_schema, 20).astype("object")
    df.loc[5, ["f0", "f3", "label"]] = [None, 99, 9]
    row = validate(df, tiny_schema, LOOSE).quarantine.iloc[0]
    assert set(row[REASON].split("; ")) == {"f0 is null", "f3 outside [0, 10]", "label not in the allowed values"}
    assert set(row["failed_expectations"].split("; ")) == {
        "expect_column_values_to_not_be_null(f0)",
        "expect_column_values_to_be_between(f3)",
        "expect_column_values_to_be_in_set(label)",
    }


def test_text_in_a_numeric_column_is_quarantined(tiny_schema):
    df = make_frame(tiny_schema, 20).astype({"f2": "object"})
    df.loc[4, "f2"] = "seven"
    report = validate(df, tiny_schema, LOOSE)
    assert report.quarantine["id"].tolist() == [4]
    assert "f2 is not a number" in report.quarantine[REASON].iloc[0]
    assert report.valid["f2"].dtype.kind in "if"


def test_duplicate_ids_are_quarantined(tiny_schema):
    df = make_frame(tiny_schema, 20)
    df.loc[7, "id"] = 6
    report = validate(df, tiny_schema, LOOSE)
    assert sorted(report.quarantine["id"]) == [6, 6]
    assert set(report.quarantine[REASON]) == {"id is not unique"}


def test_missing_column_stops_the_run(tiny_schema):
    df = make_frame(tiny_schema, 20).drop(columns=["label", "f2"])
    with pytest.raises(DataError, match="lacks required column.*f2.*label"):
        validate(df, tiny_schema, LOOSE)


def test_too_many_bad_rows_fail_the_gate(tiny_schema):
    df = make_frame(tiny_schema, 20)
    df.loc[:5, "f0"] = 50
    report = validate(df, tiny_schema, ValidateParams(max_bad_row_fraction=0.2, min_rows=5))
    assert not report.passed
    assert "30.0% of rows failed row-level expectations" in report.reasons[0]
    assert len(report.quarantine) == 6


def test_too_few_rows_fail_the_gate(tiny_schema):
    report = validate(make_frame(tiny_schema, 4), tiny_schema, LOOSE)
    assert not report.passed
    assert report.reasons[0].startswith("expect_table_row_count_to_be_between: 4 rows, expected 5..any")


def test_input_frame_is_not_modified(tiny_schema):
    df = make_frame(tiny_schema, 20)
    df.loc[2, "f1"] = 40
    before = df.copy()
    validate(df, tiny_schema, LOOSE)
    pd.testing.assert_frame_equal(df, before)


def test_a_batch_is_checked_quickly_only_when_it_passes(tiny_schema, monkeypatch):
    """SuiteRunner checks a batch after a passing one with BOOLEAN_ONLY results first and
    again with COMPLETE when that fails: the quarantine and the tally must be what COMPLETE
    alone gives, batch by batch, whatever the order of clean and dirty batches."""
    import numpy as np

    from pipeline.data.validate import Validator

    def batches() -> list[pd.DataFrame]:
        out = []
        for i, dirty in enumerate([False, True, True, False, False, True, False]):
            df = make_frame(tiny_schema, 20, seed=i).astype("object")
            df[tiny_schema.id_column] = range(20 * i, 20 * i + 20)
            if dirty:
                df.loc[3, "f2"], df.loc[7, "label"] = 11, 9
            out.append(df)
        return out

    from great_expectations import ValidationDefinition

    formats: list[str] = []
    real_run = ValidationDefinition.run

    def spy(self, *a, **k):
        formats.append(k["result_format"]["result_format"])
        return real_run(self, *a, **k)

    def check_all(always_complete: bool) -> list[tuple[pd.DataFrame, pd.DataFrame]]:
        v = Validator(tiny_schema, LOOSE, None, np.empty(0, dtype="uint64"))
        out = []
        for b in batches():
            if always_complete:
                v.runner.last_passed = False
            out.append(v.check(b))
        return [*out, (pd.DataFrame([v.summary()[1]]), pd.DataFrame())]

    monkeypatch.setattr(ValidationDefinition, "run", spy)
    adaptive = check_all(always_complete=False)
    assert formats == ["BOOLEAN_ONLY",                  # clean: passes quickly
                       "BOOLEAN_ONLY", "COMPLETE",      # dirty: fails quickly, then in full
                       "COMPLETE",                      # dirty, straight to COMPLETE
                       "COMPLETE",                      # clean, after a dirty batch
                       "BOOLEAN_ONLY",                  # clean again
                       "BOOLEAN_ONLY", "COMPLETE",      # dirty
                       "COMPLETE"]                      # clean, after a dirty batch
    formats.clear()
    full = check_all(always_complete=True)
    assert set(formats) == {"COMPLETE"}
    for (ok_a, bad_a), (ok_f, bad_f) in zip(adaptive, full, strict=True):
        pd.testing.assert_frame_equal(ok_a, ok_f)
        pd.testing.assert_frame_equal(bad_a, bad_f)
    assert len(full[1][1]) == 2 and full[1][1][REASON].tolist() == ["f2 outside [0, 10]", "label not in the allowed values"]
