"""Validation with a Great Expectations 1.x suite built from the schema.

Row-level failures become quarantine rows with a reason naming every rule they broke.
Dataset-level failures (missing columns, a numeric column of text, row count out of bounds,
too many bad rows) fail the gate, each named. Everything is vectorised: no loop over rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from pipeline.config import ValidateParams
from pipeline.data.keys import ROW_KEY, with_row_key
from pipeline.data.schema import Schema
from pipeline.errors import DataError

REASON = "reason"
EXPECTATIONS = "failed_expectations"


@dataclass
class ValidationReport:
    passed: bool
    reasons: list[str]
    valid: pd.DataFrame
    quarantine: pd.DataFrame
    summary: dict[str, Any] = field(default_factory=dict)


def build_suite(schema: Schema, params: ValidateParams) -> Any:
    """The expectation suite for a schema: table rules, then one rule per column and constraint."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name="d2d_raw")
    suite.add_expectation(gxe.ExpectTableColumnsToMatchSet(column_set=schema.columns, exact_match=False))
    suite.add_expectation(gxe.ExpectTableRowCountToBeBetween(min_value=params.min_rows, max_value=params.max_rows))
    if not schema.derived_key:  # a derived key is unique and present by construction
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=schema.id_column))
        suite.add_expectation(gxe.ExpectColumnValuesToBeUnique(column=schema.id_column))
    suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=schema.target))
    if not schema.regression:
        suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column=schema.target, value_set=list(schema.classes)))
    for f in schema.features:
        if not f.nullable:
            suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=f.name))
        if f.kind == "numeric" and (f.min is not None or f.max is not None):
            suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column=f.name, min_value=f.min, max_value=f.max))
        if f.kind == "categorical" and f.values is not None:
            suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column=f.name, value_set=list(f.values)))
    return suite


def _reason(result: Any) -> str:
    cfg = result.expectation_config
    col = cfg.kwargs.get("column")
    kind = cfg.type
    if kind == "expect_column_values_to_not_be_null":
        return f"{col} is null"
    if kind == "expect_column_values_to_be_between":
        lo, hi = cfg.kwargs.get("min_value"), cfg.kwargs.get("max_value")
        return f"{col} outside [{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}]"
    if kind == "expect_column_values_to_be_in_set":
        return f"{col} not in the allowed values"
    if kind == "expect_column_values_to_be_unique":
        return f"{col} is not unique"
    return f"{col}: {kind}"


def run_suite(df: pd.DataFrame, schema: Schema, params: ValidateParams, docs_dir: Path | None) -> Any:
    """Run the schema's suite on an in-memory frame in an ephemeral GX context.

    COMPLETE results list the index of every failing row. With `docs_dir`, a GX Checkpoint
    also renders Data Docs (HTML) there.
    """
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")  # GX needs an active context before a suite is built
    # One bar per metric batch floods a flow's log; the stage reports its own summary.
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = (
        ctx.data_sources.add_or_update_pandas("d2d")
        .add_dataframe_asset("raw")
        .add_batch_definition_whole_dataframe("all")
    )
    suite = ctx.suites.add(build_suite(schema, params))
    definition = ctx.validation_definitions.add(gx.ValidationDefinition(name="d2d_raw", data=batch, suite=suite))
    result_format = {"result_format": "COMPLETE"}
    if docs_dir is None:
        return definition.run(batch_parameters={"dataframe": df}, result_format=result_format)
    site = {
        "class_name": "SiteBuilder",
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
    }
    ctx.add_data_docs_site(site_name="d2d", site_config=site)
    checkpoint = ctx.checkpoints.add(
        gx.Checkpoint(
            name="d2d_raw",
            validation_definitions=[definition],
            actions=[UpdateDataDocsAction(name="data_docs", site_names=["d2d"])],
            result_format=result_format,
        )
    )
    return next(iter(checkpoint.run(batch_parameters={"dataframe": df}).run_results.values()))


def coerce_numeric(df: pd.DataFrame, schema: Schema) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Numeric columns read as text become numbers; returns the coerced frame and a boolean
    frame marking cells that held text that is not a number."""
    names = [f.name for f in schema.numeric] + ([schema.target] if schema.regression else [])
    bad = pd.DataFrame(False, index=df.index, columns=names)
    numbers = {}
    for name in names:
        col = df[name]
        if col.dtype.kind in "biuf":
            continue
        numbers[name] = pd.to_numeric(col, errors="coerce")
        bad[name] = numbers[name].isna() & col.notna()
    # Only text columns are replaced; a copy of a wide frame costs memory at a million rows.
    return (df.assign(**numbers) if numbers else df), bad


def require_columns_and_rows(df: pd.DataFrame, schema: Schema) -> None:
    """A frame without the schema's columns, or without rows, cannot be validated row by row."""
    missing = [c for c in schema.columns if c not in df.columns]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(f"the dataset lacks required column(s): {shown}")
    if df.empty:
        raise DataError("the dataset has no rows")


def with_identity(df: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """Every row, valid or quarantined, carries its row key; the index becomes positional,
    because GX reports failing rows by index, which stays unambiguous even when the id column
    itself is null or duplicated."""
    if ROW_KEY not in df.columns:
        df = with_row_key(df, schema)
    return df.reset_index(drop=True)


def text_share_reasons(not_number: pd.DataFrame, params: ValidateParams) -> list[str]:
    """Numeric columns that hold too much text to be numeric at all (validate.max_non_numeric_fraction)."""
    text_share = not_number.mean()
    return [f"column {name} is declared numeric but {share:.0%} of its values are text"
            for name, share in text_share[text_share > params.max_non_numeric_fraction].items()]


def row_failures(result: Any, not_number: pd.DataFrame) -> pd.DataFrame:
    """Every failing row's reasons and the GX expectations behind them, joined by "; ", indexed
    by the row's position."""
    # One entry per (row, failed rule): a readable reason and the GX expectation behind it.
    failures = [
        pd.DataFrame(
            {REASON: _reason(r), EXPECTATIONS: f"{r.expectation_config.type}({r.expectation_config.kwargs.get('column')})"},
            index=pd.Index(r.result["unexpected_index_list"], dtype="int64"),
        )
        for r in result.results
        if not r.success and r.result.get("unexpected_index_list")
    ]
    rows, cols = np.nonzero(not_number.to_numpy())
    if len(rows):
        names = not_number.columns[cols]
        failures.append(pd.DataFrame(
            {REASON: names + " is not a number", EXPECTATIONS: "numeric_type(" + names + ")"},
            index=pd.Index(rows, dtype="int64"),
        ))
    return (
        pd.concat(failures).groupby(level=0).agg("; ".join)
        if failures else pd.DataFrame(columns=[REASON, EXPECTATIONS], dtype=str)
    )


def quarantine_rows(
    df: pd.DataFrame, coerced: pd.DataFrame, per_row: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """The valid rows, the quarantined rows with their reasons, and the mask of quarantined rows."""
    bad = df.index.isin(per_row.index)
    # Quarantine keeps the raw values as they were read; valid rows carry the coerced numbers.
    reasons = per_row.reindex(df.index[bad])
    quarantine = df[bad].assign(**{REASON: reasons[REASON].to_numpy(), EXPECTATIONS: reasons[EXPECTATIONS].to_numpy()})
    return coerced[~bad].reset_index(drop=True), quarantine.reset_index(drop=True), bad


class Gate(NamedTuple):
    """The validation gate's decision: whether the dataset may go on, and every reason it may not."""

    passed: bool
    reasons: list[str]


def validation_gate(
    result: Any, valid: pd.DataFrame, bad_share: float, schema: Schema, params: ValidateParams
) -> Gate:
    """The dataset as a whole fails on table-level expectations, a target with nothing to
    learn among the valid rows, or too many quarantined rows."""
    gate: list[str] = []
    for r in result.results:
        if r.success or "unexpected_index_list" in r.result:
            continue  # a passed rule, or a row-level one (its rows are quarantined)
        cfg = r.expectation_config
        if cfg.type == "expect_table_row_count_to_be_between":
            gate.append(
                f"{cfg.type}: {r.result.get('observed_value')} rows, expected "
                f"{params.min_rows}..{params.max_rows or 'any'} (validate.min_rows/max_rows)"
            )
        else:
            gate.append(f"{cfg.type}: observed {r.result.get('observed_value')}")
    labels = valid[schema.target].dropna().unique()
    if len(labels) < 2:
        what = "distinct value(s)" if schema.regression else "class(es)"
        gate.append(f"target '{schema.target}' has {len(labels)} {what} among valid rows: nothing to learn")
    if bad_share > params.max_bad_row_fraction:
        gate.append(
            f"{bad_share:.1%} of rows failed row-level expectations, above validate.max_bad_row_fraction="
            f"{params.max_bad_row_fraction:g}"
        )
    return Gate(not gate, gate)


def failed_rules(result: Any, not_number: pd.DataFrame) -> dict[str, int]:
    """Each failed rule's reason and how many values broke it."""
    counts = {_reason(r): int(r.result.get("unexpected_count", 0)) for r in result.results if not r.success}
    return counts | {f"{c} is not a number": int(n) for c, n in not_number.sum().items() if n}


def validate(df: pd.DataFrame, schema: Schema, params: ValidateParams, docs_dir: Path | None = None) -> ValidationReport:
    """Split `df` into valid rows and quarantined rows (with reasons) and decide the dataset gate."""
    require_columns_and_rows(df, schema)
    df = with_identity(df, schema)
    coerced, not_number = coerce_numeric(df, schema)
    text = text_share_reasons(not_number, params)
    if text:
        raise DataError("validation failed: " + "; ".join(text))
    result = run_suite(coerced, schema, params, docs_dir)
    valid, quarantine, bad = quarantine_rows(df, coerced, row_failures(result, not_number))
    bad_share = float(bad.mean())
    gate = validation_gate(result, valid, bad_share, schema, params)
    summary = {
        "rows_in": len(df),
        "rows_valid": len(valid),
        "rows_quarantined": int(bad.sum()),
        "bad_row_fraction": round(bad_share, 6),
        "expectations": len(result.results),
        "expectations_failed": sum(not r.success for r in result.results),
        "failed_rules": failed_rules(result, not_number),
        "passed": gate.passed,
        "reasons": gate.reasons,
    }
    return ValidationReport(gate.passed, gate.reasons, valid, quarantine, summary)
