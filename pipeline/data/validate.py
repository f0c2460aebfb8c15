"""Validation with a Great Expectations 1.x suite built from the schema.

Row-level failures become quarantine rows with a reason naming every rule they broke.
Dataset-level failures (missing columns, too few rows, too many bad rows) fail the gate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from pipeline.config import ValidateParams
from pipeline.data.schema import Schema
from pipeline.errors import DataError

REASON = "reason"


@dataclass
class ValidationReport:
    passed: bool
    reasons: list[str]
    valid: pd.DataFrame
    quarantine: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)


def build_suite(schema: Schema) -> Any:
    """The expectation suite for a schema: the column set, then one rule per column and value."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name="d2d_raw")
    suite.add_expectation(gxe.ExpectTableColumnsToMatchSet(column_set=schema.columns, exact_match=False))
    suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=schema.id_column))
    suite.add_expectation(gxe.ExpectColumnValuesToBeUnique(column=schema.id_column))
    suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=schema.target))
    suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column=schema.target, value_set=list(schema.classes)))
    for f in schema.features:
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=f.name))
        suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column=f.name, min_value=f.min, max_value=f.max))
    return suite


def _reason(result: Any) -> str:
    cfg = result.expectation_config
    col = cfg.kwargs.get("column")
    kind = cfg.type
    if kind == "expect_column_values_to_not_be_null":
        return f"{col} is null"
    if kind == "expect_column_values_to_be_between":
        return f"{col} outside [{cfg.kwargs['min_value']:g}, {cfg.kwargs['max_value']:g}]"
    if kind == "expect_column_values_to_be_in_set":
        return f"{col} not in the known classes"
    if kind == "expect_column_values_to_be_unique":
        return f"{col} is not unique"
    return f"{col}: {kind}"


def run_suite(df: pd.DataFrame, schema: Schema) -> Any:
    """Run the schema's suite on an in-memory frame in an ephemeral GX context.

    COMPLETE results list the index of every failing row.
    """
    import great_expectations as gx

    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")  # GX needs an active context before a suite is built
    # One bar per metric batch floods a flow's log; the stage reports its own summary.
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    suite = build_suite(schema)
    batch = (
        ctx.data_sources.add_or_update_pandas("d2d")
        .add_dataframe_asset("raw")
        .add_batch_definition_whole_dataframe("all")
    )
    suite = ctx.suites.add(suite)
    definition = ctx.validation_definitions.add(gx.ValidationDefinition(name="d2d_raw", data=batch, suite=suite))
    return definition.run(batch_parameters={"dataframe": df}, result_format={"result_format": "COMPLETE"})


def validate(df: pd.DataFrame, schema: Schema, params: ValidateParams) -> ValidationReport:
    """Split `df` into valid rows and quarantined rows (with reasons) and decide the dataset gate."""
    missing = [c for c in schema.columns if c not in df.columns]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(f"the dataset lacks required column(s): {shown}")

    # Positional index: GX reports failing rows by index, which stays unambiguous even
    # when the id column itself is null or duplicated.
    df = df.reset_index(drop=True)
    result = run_suite(df, schema)

    failures = [
        pd.Series(_reason(r), index=pd.Index(r.result["unexpected_index_list"], dtype="int64"))
        for r in result.results
        if not r.success and r.result.get("unexpected_index_list")
    ]
    reasons = pd.concat(failures).groupby(level=0).agg("; ".join) if failures else pd.Series(dtype=str)
    bad = df.index.isin(reasons.index)
    quarantine = df[bad].assign(**{REASON: reasons.reindex(df.index[bad]).to_numpy()})
    valid = df[~bad].reset_index(drop=True)

    gate: list[str] = []
    if len(df) < params.min_rows:
        gate.append(f"{len(df)} rows, fewer than validate.min_rows={params.min_rows}")
    bad_share = float(bad.mean()) if len(df) else 0.0
    if bad_share > params.max_bad_row_fraction:
        gate.append(
            f"{bad_share:.1%} of rows failed validation, above validate.max_bad_row_fraction="
            f"{params.max_bad_row_fraction:g}"
        )
    failed_rules = {
        _reason(r): int(r.result.get("unexpected_count", 0)) for r in result.results if not r.success
    }
    summary = {
        "rows_in": len(df),
        "rows_valid": len(valid),
        "rows_quarantined": int(bad.sum()),
        "bad_row_fraction": round(bad_share, 6),
        "expectations": len(result.results),
        "expectations_failed": len(failed_rules),
        "failed_rules": failed_rules,
        "passed": not gate,
        "reasons": gate,
    }
    return ValidationReport(not gate, gate, valid, quarantine.reset_index(drop=True), summary)
