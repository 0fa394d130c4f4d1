"""Per-block row checks and the output table: what the reader found per row, the output
schema, and the step that joins the model's answers to the checks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from phenotyper.cohort import IMPLAUSIBLE, NEGATIVE, UNKNOWN_CATEGORY, UNPARSEABLE, Cohort
from phenotyper.contract import (
    AS_MISSING,
    EXPLAIN_MODES,
    LATENT_ENTROPY,
    LATENT_PROB_PREFIX,
    MODEL_REJECTED,
    NOT_SCORED,
    OK,
    SCORED_KINDS,
    SET_ASIDE_PREFIX,
    SKIP_ROW,
    VALUE_SET_ASIDE,
    is_scored,
)
from phenotyper.packaged.model import PackagedPhenotyper
from phenotyper.panel import PATIENT_ID, SITE_ID
from phenotyper.scoring.request import ScoringError

ROW = "row"
ISSUES = "issues"
# Reader issues that reject a value: in a model feature, the model does not score the row.
REJECTING = (UNPARSEABLE, NEGATIVE, IMPLAUSIBLE, UNKNOWN_CATEGORY)
# Output columns (by prefix) that hold the model's numbers: empty where a row is not scored.
_MODEL_NUMBERS = ("prob_", "shap_", LATENT_PROB_PREFIX, LATENT_ENTROPY)


# --- the output contract ----------------------------------------------------------------------


def output_schema(model: PackagedPhenotyper, explain: str, keep: tuple[str, ...] = ()
                  ) -> pa.Schema:
    """The output columns and their types for a model and explanation mode (both engines),
    then the input columns `keep` carries, as text as the file had them."""
    if explain not in EXPLAIN_MODES:
        raise ScoringError(f"explain must be one of {', '.join(EXPLAIN_MODES)}, not {explain!r}.")
    fields = [pa.field(ROW, pa.int64()), pa.field(PATIENT_ID, pa.string()),
              pa.field(SITE_ID, pa.string()), pa.field("phenotype", pa.string())]
    fields += [pa.field(f"prob_{name}", pa.float64()) for name in model.classes]
    fields += [pa.field(name, pa.float64()) for name in model.output_columns()]
    fields += [pa.field(name, pa.string()) for name in ("rule_phenotype", "status", ISSUES)]
    if explain != "none":
        fields += [pa.field("shap_base", pa.float64())]
        fields += [pa.field(f"shap_{name}", pa.float64()) for name in model.features]
        if explain == "all":
            for label in model.classes:
                fields.append(pa.field(f"shap_base_{label}", pa.float64()))
                fields += [pa.field(f"shap_{label}_{name}", pa.float64())
                           for name in model.features]
        fields.append(pa.field("top_drivers", pa.string()))
    fields += [pa.field(name, pa.string()) for name in keep]
    return pa.schema(fields)


READER_STATUS, READER_KIND = "reader_status", "reader_status_kind"
# What the reader found in each row, carried beside the model's output to the final file.
CHECK_COLUMNS = (ROW, PATIENT_ID, SITE_ID, READER_STATUS, READER_KIND, ISSUES)


def row_checks(block: Cohort, features: list[str], rejected_values: str = SKIP_ROW,
               keep: tuple[str, ...] = ()) -> pd.DataFrame:
    """Per row (CHECK_COLUMNS): the file row number, ids, and a status from the reader's
    issues (a rejected value in a model feature stops scoring, or under `missing` is set
    aside and the row scored without it; other issues are listed); then the `keep` columns
    as text."""
    n = len(block.data)
    status = np.full(n, OK, dtype=object)
    kind = np.full(n, OK, dtype=object)
    issues = np.full(n, "", dtype=object)
    table = block.issues
    if len(table):
        position = table["row"].to_numpy() - block.first_row
        shown = (table["column"] + " " + table["value"].map(repr) + ": "
                 + table["detail"].str.replace("; set to missing", "", regex=False))
        rejects = (table["kind"].isin(REJECTING) & table["column"].isin(features)).to_numpy()
        for rows, target in ((rejects, status), (~rejects, issues)):
            if rows.any():
                joined = shown[rows].groupby(position[rows]).agg("; ".join)
                target[joined.index.to_numpy()] = joined.to_numpy()
        if rejects.any():
            first_kind = table["kind"][rejects].groupby(position[rejects]).first()
            at = first_kind.index.to_numpy()
            if rejected_values == AS_MISSING:  # the reader already set the value missing
                kind[at] = VALUE_SET_ASIDE
                status[at] = SET_ASIDE_PREFIX + status[at].astype(str)
            else:
                kind[at] = first_kind.to_numpy()
                status[at] = NOT_SCORED + ": " + status[at].astype(str)
    # the ids as read (no copy), the texts as objects (pandas would make Arrow strings of them
    # here and the writer again)
    return pd.DataFrame({
        ROW: np.arange(block.first_row, block.first_row + n, dtype=np.int64),
        PATIENT_ID: block.data[PATIENT_ID].array, SITE_ID: block.data[SITE_ID].array,
        **{name: pd.Series(values, dtype=object) for name, values in (
            (READER_STATUS, status), (READER_KIND, kind), (ISSUES, issues))},
        **{name: _as_text(block.data[name]) for name in keep}})


def _as_text(values: pd.Series) -> pd.Series:
    """A carried column as text (missing stays missing), whatever type the reader gave it."""
    return pd.Series(values.astype(object).where(values.notna(), None).map(
        lambda v: v if v is None or isinstance(v, str) else str(v)).to_numpy(), dtype=object)


@dataclass(frozen=True)
class ScoredBlock:
    """One block of output in contract form, and the kind behind each row's status."""

    table: pa.Table  # the output schema's columns
    status_kind: np.ndarray  # "ok", VALUE_SET_ASIDE, a reader issue kind, or MODEL_REJECTED


CHECKED = (ROW, PATIENT_ID, SITE_ID, ISSUES)  # output columns taken from the row checks


def finish(scored: pd.DataFrame, checks: pd.DataFrame, schema: pa.Schema) -> ScoredBlock:
    """The model's output for a block in contract form: reader-rejected rows unscored, the
    row number, site and issues added, columns in schema order (both engines).

    Built in Arrow, column by column (a missing number is null, as pandas' NaN becomes in
    Arrow): the text columns stay Arrow strings from the model to the file, never a Python
    object per cell."""
    model = pa.Table.from_pandas(scored, preserve_index=False, nthreads=1)
    carried = (*CHECKED, *(name for name in checks if name not in CHECK_COLUMNS))
    reader = pa.Table.from_pandas(checks[[*carried, READER_STATUS]], preserve_index=False,
                                  nthreads=1)
    reader_kind = checks[READER_KIND].to_numpy(dtype=object)
    rejected = ~np.isin(reader_kind, list(SCORED_KINDS))
    set_aside = reader_kind == VALUE_SET_ASIDE
    model_status = model["status"].to_numpy(zero_copy_only=False)
    model_flagged = model_status != OK  # the model refused a value (row skipped or set aside)
    unscored = rejected
    if model_flagged.any():
        model_scored = np.array([is_scored(s) for s in model_status[model_flagged]])
        unscored = rejected.copy()
        unscored[np.flatnonzero(model_flagged)[~model_scored]] = True
    # the status: the reader's where it rejected or set a value aside, joined with what the
    # model's own range checks set aside
    status = reader[READER_STATUS]
    if set_aside.any():
        texts = checks[READER_STATUS].to_numpy(dtype=object).copy()
        for row in np.flatnonzero(set_aside & model_flagged):
            texts[row] += "; " + model_status[row].removeprefix(SET_ASIDE_PREFIX)
        status = pa.chunked_array([pa.array(texts, pa.string())])
    # (where, value) per column the reader's or the model's rejection overrides
    # (a row the model did not score has no phenotype: under pandas 3, MLflow's Spark UDF
    # returns a missing string as the text 'nan')
    overrides = {"phenotype": (unscored, None), "top_drivers": (rejected, ""),
                 "status": (rejected | set_aside, status)}
    columns = []
    for column in schema:
        values = (reader if column.name in carried else model)[column.name].cast(column.type)
        where, value = overrides.get(column.name, (
            rejected if column.name.startswith(_MODEL_NUMBERS) else None, None))
        if where is not None and where.any():
            value = value.cast(column.type) if isinstance(value, pa.ChunkedArray) else (
                pa.scalar(value, column.type))
            values = pc.if_else(where, value, values)
        columns.append(values)
    kind = np.where(rejected, reader_kind, np.where(
        unscored, MODEL_REJECTED, np.where(set_aside | model_flagged, VALUE_SET_ASIDE, OK)))
    return ScoredBlock(pa.Table.from_arrays(columns, schema=schema), kind)
