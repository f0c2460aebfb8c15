"""Validation with a Great Expectations 1.x suite built from the schema.

Row-level failures become quarantine rows with a reason naming every rule they broke.
Dataset-level failures (missing columns, a numeric column of text, row count out of bounds,
too many bad rows) fail the gate, each named. Everything is vectorised: no loop over rows.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from pipeline.config import ValidateParams
from pipeline.data.keys import ROW_KEY, cell_hashes, with_row_key
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


def build_suite(schema: Schema) -> Any:
    """The expectation suite for a schema: the column set, then one rule per column and constraint."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name="d2d_raw")
    suite.add_expectation(gxe.ExpectTableColumnsToMatchSet(column_set=schema.columns, exact_match=False))
    # The row count is a dataset-level rule: the suite checks batches, so it is checked on the
    # total (row_count_reason), in GX's words.
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


class SuiteRunner:
    """One ephemeral GX context, with the schema's suite and its validation definition built
    once (building them costs about 2 s, more than checking 250,000 rows), then run on each
    batch. COMPLETE results list the index of every failing row. With `docs_dir`, a GX
    Checkpoint runs instead and renders each batch's results into Data Docs there, named
    by the rows they cover."""

    def __init__(self, schema: Schema, docs_dir: Path | None) -> None:
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
        self.suite = ctx.suites.add(build_suite(schema))
        self.definition = ctx.validation_definitions.add(gx.ValidationDefinition(name="d2d_raw", data=batch, suite=self.suite))
        self.checkpoint = None
        self.last_passed = True
        if docs_dir is not None:
            site = {
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
            }
            ctx.add_data_docs_site(site_name="d2d", site_config=site)
            self.checkpoint = ctx.checkpoints.add(
                gx.Checkpoint(
                    name="d2d_raw",
                    validation_definitions=[self.definition],
                    actions=[UpdateDataDocsAction(name="data_docs", site_names=["d2d"])],
                    result_format={"result_format": "COMPLETE"},
                )
            )

    def run(self, df: pd.DataFrame, name: str) -> Any:
        """The suite's results on one batch; `name` labels its Data Docs page.

        Without Data Docs, a batch after one that passed is checked with BOOLEAN_ONLY results
        first (0.5 s a run against 1.1 s for COMPLETE, nearly all of it GX's per-rule work,
        whatever the rows). Only failed rules are read from the results, so a batch that
        passes needs nothing more; one that fails is checked again with COMPLETE, and so is
        the batch after it."""
        from great_expectations.core.run_identifier import RunIdentifier

        if self.checkpoint is None:
            if self.last_passed:
                quick = self.definition.run(batch_parameters={"dataframe": df}, result_format={"result_format": "BOOLEAN_ONLY"})
                if quick.success:
                    return quick
            result = self.definition.run(batch_parameters={"dataframe": df}, result_format={"result_format": "COMPLETE"})
            self.last_passed = bool(result.success)
            return result
        run = self.checkpoint.run(batch_parameters={"dataframe": df}, run_id=RunIdentifier(run_name=name))
        return next(iter(run.run_results.values()))


def run_suite(df: pd.DataFrame, schema: Schema, docs_dir: Path | None) -> Any:
    """The suite's results on one in-memory frame."""
    return SuiteRunner(schema, docs_dir).run(df, "all rows")


def coerce_numeric(df: pd.DataFrame, schema: Schema) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Numeric columns read as text become numbers (64-bit, as GX's vectorised rules need);
    returns the coerced frame and a boolean frame marking cells that held text that is not a number."""
    names = [f.name for f in schema.numeric] + ([schema.target] if schema.regression else [])
    bad = pd.DataFrame(False, index=df.index, columns=names)
    numbers = {}
    for name in names:
        col = df[name]
        if col.dtype in ("float64", "int64"):
            continue
        if col.dtype.kind in "biuf":
            # GX vectorises its range rule for 64-bit numbers only; float32 took it to a Python
            # call per value (half of validate's time at 1M rows)
            numbers[name] = col.astype("float64")
            continue
        numbers[name] = pd.to_numeric(col, errors="coerce")
        bad[name] = numbers[name].isna() & col.notna()
    # Only text columns are replaced; a copy of a wide frame costs memory at a million rows.
    return (df.assign(**numbers) if numbers else df), bad


def require_columns(columns: pd.Index, schema: Schema) -> None:
    """A dataset without the schema's columns cannot be validated row by row."""
    missing = [c for c in schema.columns if c not in columns]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(f"the dataset lacks required column(s): {shown}")


def require_columns_and_rows(df: pd.DataFrame, schema: Schema) -> None:
    require_columns(df.columns, schema)
    if df.empty:
        raise DataError("the dataset has no rows")


def with_identity(df: pd.DataFrame, schema: Schema) -> pd.DataFrame:
    """Every row, valid or quarantined, carries its row key; the index becomes positional,
    because GX reports failing rows by index, which stays unambiguous even when the id column
    itself is null or duplicated."""
    if ROW_KEY not in df.columns:
        df = with_row_key(df, schema)
    return df.reset_index(drop=True)


def id_hashes(ids: pd.Series) -> np.ndarray:
    """A 64-bit hash of each id's value (5, 5.0 and "5" are one id, as a CSV read in chunks
    may type them); nulls are left out, as GX's uniqueness rule leaves them out."""
    return cell_hashes(ids[ids.notna()])


def repeated(hashes: np.ndarray) -> np.ndarray:
    """The hashes that occur more than once, sorted."""
    values, counts = np.unique(hashes, return_counts=True)
    return values[counts > 1]


def text_share_reasons(not_number: pd.Series, rows: int, params: ValidateParams) -> list[str]:
    """Numeric columns that hold too much text to be numeric at all (validate.max_non_numeric_fraction);
    `not_number`: each column's count of cells that are text, over `rows` rows."""
    text_share = not_number / max(rows, 1)
    return [f"column {name} is declared numeric but {share:.0%} of its values are text"
            for name, share in text_share[text_share > params.max_non_numeric_fraction].items()]


def row_failures(result: Any, not_number: pd.DataFrame, not_unique: np.ndarray, schema: Schema) -> pd.DataFrame:
    """Every failing row's reasons and the GX expectations behind them, joined by "; ", indexed
    by the row's position. `not_unique`: rows whose id repeats one in another batch (GX sees
    one batch), named as GX names a repeat within the batch."""
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
    if len(not_unique):
        failures.append(pd.DataFrame(
            {REASON: f"{schema.id_column} is not unique",
             EXPECTATIONS: f"expect_column_values_to_be_unique({schema.id_column})"},
            index=pd.Index(not_unique, dtype="int64"),
        ))
    if not failures:
        return pd.DataFrame(columns=[REASON, EXPECTATIONS], dtype=str)
    every = pd.concat(failures)
    # a repeat GX found in the batch is also a cross-batch repeat: name each rule once per row
    pairs = pd.DataFrame({"row": every.index.to_numpy(), REASON: every[REASON].to_numpy()})
    every = every[~pairs.duplicated().to_numpy()]
    return every.groupby(level=0).agg("; ".join)


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


@dataclass
class Tally:
    """What the dataset-level decision needs, summed over the batches: exact counts, the rules
    that failed, the distinct labels among valid rows (two are enough to learn from)."""

    rows_in: int = 0
    rows_valid: int = 0
    not_number: pd.Series = field(default_factory=lambda: pd.Series(dtype="int64"))
    rules: dict[str, int] = field(default_factory=dict)  # reason → values that broke it
    expectations_failed: set[str] = field(default_factory=set)
    table_failures: dict[str, None] = field(default_factory=dict)  # ordered set of messages
    labels: set[Any] = field(default_factory=set)

    def add(self, result: Any, not_number: pd.DataFrame, per_row: pd.DataFrame, valid: pd.DataFrame,
            schema: Schema) -> None:
        self.rows_in += len(not_number)
        self.rows_valid += len(valid)
        self.not_number = self.not_number.add(not_number.sum(), fill_value=0).astype("int64")
        for reason, n in per_row[REASON].str.split("; ").explode().value_counts().items():
            self.rules[reason] = self.rules.get(reason, 0) + int(n)
        for r in result.results:
            if r.success:
                continue
            cfg = r.expectation_config
            self.expectations_failed.add(f"{cfg.type}({cfg.kwargs.get('column')})")
            if "unexpected_index_list" not in r.result:  # a table-level rule: it fails the dataset
                self.table_failures[f"{cfg.type}: observed {r.result.get('observed_value')}"] = None
                self.rules.setdefault(_reason(r), 0)
        if self.not_number.any():
            self.expectations_failed.add("numeric_type")
        if len(self.labels) < 2 or not schema.regression:
            self.labels.update(valid[schema.target].dropna().unique()[: None if not schema.regression else 2])

    @property
    def rows_quarantined(self) -> int:
        return self.rows_in - self.rows_valid

    def merge(self, other: Tally) -> Tally:
        """The totals of two disjoint parts of a dataset (checked in separate processes)."""
        self.rows_in += other.rows_in
        self.rows_valid += other.rows_valid
        self.not_number = self.not_number.add(other.not_number, fill_value=0).astype("int64")
        for reason, n in other.rules.items():
            self.rules[reason] = self.rules.get(reason, 0) + n
        self.expectations_failed |= other.expectations_failed
        self.table_failures.update(other.table_failures)
        self.labels |= other.labels
        return self


def row_count_reason(rows: int, params: ValidateParams) -> str | None:
    """The dataset-level row count rule, in GX's words (expect_table_row_count_to_be_between)."""
    if rows >= params.min_rows and (params.max_rows is None or rows <= params.max_rows):
        return None
    return (f"expect_table_row_count_to_be_between: {rows} rows, expected "
            f"{params.min_rows}..{params.max_rows or 'any'} (validate.min_rows/max_rows)")


def validation_gate(tally: Tally, schema: Schema, params: ValidateParams) -> Gate:
    """The dataset as a whole fails on its row count, table-level expectations, numeric columns
    of text, a target with nothing to learn among the valid rows, or too many quarantined rows."""
    gate = [r for r in [row_count_reason(tally.rows_in, params)] if r]
    gate += list(tally.table_failures)
    gate += text_share_reasons(tally.not_number, tally.rows_in, params)
    if len(tally.labels) < 2:
        what = "distinct value(s)" if schema.regression else "class(es)"
        gate.append(f"target '{schema.target}' has {len(tally.labels)} {what} among valid rows: nothing to learn")
    bad_share = tally.rows_quarantined / max(tally.rows_in, 1)
    if bad_share > params.max_bad_row_fraction:
        gate.append(
            f"{bad_share:.1%} of rows failed row-level expectations, above validate.max_bad_row_fraction="
            f"{params.max_bad_row_fraction:g}"
        )
    return Gate(not gate, gate)


class Validator:
    """Validates a dataset batch by batch: one GX context and suite for all of them, rows
    quarantined per batch, dataset-level rules decided on the exact totals (`summary`).
    `repeats`: the sorted hashes (`id_hashes`) of ids that occur more than once anywhere in the
    dataset, found beforehand (the suite's uniqueness rule sees one batch)."""

    def __init__(self, schema: Schema, params: ValidateParams, docs_dir: Path | None, repeats: np.ndarray,
                 runner: Future[SuiteRunner] | None = None) -> None:
        self.schema, self.params, self.repeats, self.docs_dir = schema, params, repeats, docs_dir
        self._building = runner
        self.tally = Tally()

    @cached_property
    def runner(self) -> SuiteRunner:
        """The suite, built on first use, or by the thread that `runner` came from: GX's import,
        context and suite take about 3 s, which a caller can spend reading the first batch."""
        return self._building.result() if self._building is not None else SuiteRunner(self.schema, self.docs_dir)

    def check(self, df: pd.DataFrame, first: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
        """One batch's valid rows (numbers coerced) and quarantined rows (raw values, reasons);
        `first`, the batch's first row in the dataset (Data Docs name pages by their rows)."""
        first = self.tally.rows_in if first is None else first
        df = with_identity(df, self.schema)
        coerced, not_number = coerce_numeric(df, self.schema)
        result = self.runner.run(coerced, f"rows {first}-{first + len(df) - 1}")
        not_unique = np.empty(0, dtype="int64")
        if len(self.repeats) and not self.schema.derived_key:
            ids = df[self.schema.id_column]
            present = np.flatnonzero(ids.notna().to_numpy())
            not_unique = present[np.isin(id_hashes(ids), self.repeats)]
            if len(not_unique):
                self.tally.expectations_failed.add(f"expect_column_values_to_be_unique({self.schema.id_column})")
        per_row = row_failures(result, not_number, not_unique, self.schema)
        valid, quarantine, _ = quarantine_rows(df, coerced, per_row)
        self.tally.add(result, not_number, per_row, valid, self.schema)
        return valid, quarantine

    @property
    def expectations(self) -> int:
        return len(self.runner.suite.expectations)

    def summary(self) -> tuple[Gate, dict[str, Any]]:
        """The gate and the report, once every batch is checked."""
        return dataset_summary(self.tally, self.expectations, self.schema, self.params)


def dataset_summary(t: Tally, expectations: int, schema: Schema, params: ValidateParams) -> tuple[Gate, dict[str, Any]]:
    """The gate and the report from a dataset's totals; `expectations`, the suite's size."""
    if t.rows_in == 0:
        raise DataError("the dataset has no rows")
    gate = validation_gate(t, schema, params)
    rules = t.rules | {f"{c} is not a number": int(n) for c, n in t.not_number.items() if n}
    if row_count_reason(t.rows_in, params):
        rules["row count outside validate.min_rows/max_rows"] = 0
    summary = {
        "rows_in": t.rows_in,
        "rows_valid": t.rows_valid,
        "rows_quarantined": t.rows_quarantined,
        "bad_row_fraction": round(t.rows_quarantined / t.rows_in, 6),
        "expectations": expectations + 2,  # + the row count and numeric types
        "expectations_failed": len(t.expectations_failed) + bool(row_count_reason(t.rows_in, params)),
        "failed_rules": rules,
        "passed": gate.passed,
        "reasons": gate.reasons,
    }
    return gate, summary


def validate(df: pd.DataFrame, schema: Schema, params: ValidateParams, docs_dir: Path | None = None) -> ValidationReport:
    """Split an in-memory `df` into valid rows and quarantined rows (with reasons) and decide
    the dataset gate: the whole frame as one batch. Numeric columns of text fail at once."""
    require_columns_and_rows(df, schema)
    df = with_identity(df, schema)
    _, not_number = coerce_numeric(df, schema)
    text = text_share_reasons(not_number.sum(), len(df), params)
    if text:
        raise DataError("validation failed: " + "; ".join(text))
    repeats = np.empty(0, dtype="uint64") if schema.derived_key else repeated(id_hashes(df[schema.id_column]))
    validator = Validator(schema, params, docs_dir, repeats)
    valid, quarantine = validator.check(df)
    gate, summary = validator.summary()
    return ValidationReport(gate.passed, gate.reasons, valid, quarantine, summary)
