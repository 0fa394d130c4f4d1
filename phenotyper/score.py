"""Batch scoring of retrospective cohorts: streamed, nothing lost, written atomically.

A cohort file is read block by block through the cohort reader (mappings, units, messy cells),
each block is scored by the packaged model loaded once, and the blocks are written to one
Parquet or CSV file that appears at its destination only when complete. Every input row gives
one output row, in input order, with its file row number (`row`, as the reader numbers issues)
and a `status`: `ok`, or why the model did not score it. A value the reader rejected
(unparseable, negative, implausible, an unknown code) in a feature the model uses stops the
model scoring that row, as the scoring server does; the ImmunoSep rule still answers from the
markers it can read. Problems that leave the row scorable (censored values kept at a bound,
ambiguous separators, missing or repeated ids) are listed in `issues`.

Engines: `local` scores in this process; `spark` runs the same model through
`mlflow.pyfunc.spark_udf` (see `phenotyper.spark_engine`). Reading, row checks, the summary
and the output file are shared, so the engines differ only in where the model runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from phenotyper.cohort import (
    BLOCK_ROWS,
    IMPLAUSIBLE,
    NEGATIVE,
    PARQUET_SUFFIXES,
    UNKNOWN_CATEGORY,
    UNPARSEABLE,
    Cohort,
    open_cohort,
)
from phenotyper.contract import INDETERMINATE
from phenotyper.files import atomic_path
from phenotyper.packaged import EXPLAIN_MODES, OK, PackagedPhenotyper
from phenotyper.panel import PATIENT_ID, SITE_ID

ENGINES = ("local", "spark")
ROW = "row"
ISSUES = "issues"
NOT_SCORED = "not scored"
# Reader issues that reject a value: in a model feature, the model does not score the row.
REJECTING = (UNPARSEABLE, NEGATIVE, IMPLAUSIBLE, UNKNOWN_CATEGORY)
MODEL_REJECTED = "rejected_by_model"  # a value the model's own checks refused
PROBABILITY_BINS = 20
EXAMPLES = 20  # unscored rows listed in the manifest and report
AGREEMENT_EXAMPLES = 5  # example rows per model-vs-rule cell


class ScoringError(Exception):
    """A problem with the request (paths, engine, options): the message says how to fix it."""


# --- the output contract ----------------------------------------------------------------------


def output_schema(model: PackagedPhenotyper, explain: str) -> pa.Schema:
    """The output columns and their types for a model and explanation mode (both engines)."""
    if explain not in EXPLAIN_MODES:
        raise ScoringError(f"explain must be one of {', '.join(EXPLAIN_MODES)}, not {explain!r}.")
    fields = [pa.field(ROW, pa.int64()), pa.field(PATIENT_ID, pa.string()),
              pa.field(SITE_ID, pa.string()), pa.field("phenotype", pa.string())]
    fields += [pa.field(f"prob_{name}", pa.float64()) for name in model.classes]
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
    return pa.schema(fields)


READER_STATUS, READER_KIND = "reader_status", "reader_status_kind"
# What the reader found in each row, carried beside the model's output to the final file.
CHECK_COLUMNS = (ROW, PATIENT_ID, SITE_ID, READER_STATUS, READER_KIND, ISSUES)


def row_checks(block: Cohort, features: list[str]) -> pd.DataFrame:
    """Per row (CHECK_COLUMNS): the file row number, ids, and a status from the reader's
    issues (a rejected value in a model feature stops scoring; other issues are listed)."""
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
            kind[at] = first_kind.to_numpy()
            status[at] = NOT_SCORED + ": " + status[at].astype(str)
    # the ids as read (no copy), the texts as objects (pandas would make Arrow strings of them
    # here and the writer again)
    return pd.DataFrame({
        ROW: np.arange(block.first_row, block.first_row + n, dtype=np.int64),
        PATIENT_ID: block.data[PATIENT_ID].array, SITE_ID: block.data[SITE_ID].array,
        **{name: pd.Series(values, dtype=object) for name, values in (
            (READER_STATUS, status), (READER_KIND, kind), (ISSUES, issues))}})


@dataclass(frozen=True)
class ScoredBlock:
    """One block of output in contract form, and the kind behind each row's status."""

    table: pa.Table  # the output schema's columns
    status_kind: np.ndarray  # "ok", a reader issue kind, or MODEL_REJECTED


CHECKED = (ROW, PATIENT_ID, SITE_ID, ISSUES)  # output columns taken from the row checks


def finish(scored: pd.DataFrame, checks: pd.DataFrame, schema: pa.Schema) -> ScoredBlock:
    """The model's output for a block in contract form: reader-rejected rows unscored, the
    row number, site and issues added, columns in schema order (both engines).

    Built in Arrow, column by column (a missing number is null, as pandas' NaN becomes in
    Arrow): the text columns stay Arrow strings from the model to the file, never a Python
    object per cell."""
    model = pa.Table.from_pandas(scored, preserve_index=False, nthreads=1)
    reader = pa.Table.from_pandas(checks[[*CHECKED, READER_STATUS]], preserve_index=False,
                                  nthreads=1)
    reader_status = checks[READER_STATUS].to_numpy(dtype=object)
    rejected = reader_status != OK
    unscored = rejected | ~pc.equal(model["status"], OK).to_numpy(zero_copy_only=False)
    # (where, value) per column the reader's or the model's rejection overrides
    # (a row the model did not score has no phenotype: under pandas 3, MLflow's Spark UDF
    # returns a missing string as the text 'nan')
    overrides = {"phenotype": (unscored, None), "top_drivers": (rejected, ""),
                 "status": (rejected, reader[READER_STATUS])}
    columns = []
    for column in schema:
        values = (reader if column.name in CHECKED else model)[column.name].cast(column.type)
        where, value = overrides.get(column.name, (
            rejected if column.name.startswith(("prob_", "shap_")) else None, None))
        if where is not None and where.any():
            value = value.cast(column.type) if isinstance(value, pa.ChunkedArray) else (
                pa.scalar(value, column.type))
            values = pc.if_else(where, value, values)
        columns.append(values)
    kind = np.where(rejected, checks[READER_KIND].to_numpy(dtype=object),
                    np.where(unscored, MODEL_REJECTED, OK))
    return ScoredBlock(pa.Table.from_arrays(columns, schema=schema), kind)


# --- summary: what the manifest and report say about the whole output -------------------------


@dataclass
class ScoreSummary:
    """Counts accumulated block by block, so a summary of any size costs flat memory."""

    classes: list[str]
    features: list[str]
    rows: int = 0
    by_status: Counter = field(default_factory=Counter)
    phenotypes: Counter = field(default_factory=Counter)
    rule: Counter = field(default_factory=Counter)
    agreement: Counter = field(default_factory=Counter)  # (rule, model) -> rows
    agreement_rows: dict = field(default_factory=dict)  # (rule, model) -> first row numbers
    sites: dict = field(default_factory=dict)  # site -> Counter of phenotypes
    histograms: dict = field(default_factory=dict)  # class -> counts per probability bin
    shap_abs_sum: np.ndarray | None = None
    explained: int = 0
    unscored_examples: list = field(default_factory=list)
    issue_rows: int = 0

    def add(self, out: pa.Table, status_kind: np.ndarray) -> None:
        """Count one block of output (ScoredBlock.table): every tally a whole column at a
        time, names kept in the order they first appear (the order the counts are listed)."""
        self.rows += len(out)
        kinds, kind_names = _codes(pa.array(status_kind, pa.string()))
        _tally(self.by_status, kind_names, kinds)
        model, model_names = _codes(out["phenotype"], NOT_SCORED)
        rule, rule_names = _codes(out["rule_phenotype"], INDETERMINATE)
        _tally(self.phenotypes, model_names, model)
        _tally(self.rule, rule_names, rule)
        row = out[ROW].to_numpy()
        pair = rule * len(model_names) + model
        _, first = np.unique(pair, return_index=True)
        for code in pair[np.sort(first)]:  # pairs in the order they first appear
            key = (rule_names[code // len(model_names)], model_names[code % len(model_names)])
            where = np.flatnonzero(pair == code)
            self.agreement[key] += len(where)
            known = self.agreement_rows.setdefault(key, [])
            known.extend(row[where[:max(AGREEMENT_EXAMPLES - len(known), 0)]].tolist())
        site, site_names = _codes(out[SITE_ID], "(no site)")
        by_site = np.bincount(site * len(model_names) + model,
                              minlength=len(site_names) * len(model_names))
        for site_name, model_name, count in sorted(
                (site_names[code // len(model_names)], model_names[code % len(model_names)],
                 count) for code, count in enumerate(by_site.tolist()) if count):
            self.sites.setdefault(site_name, Counter())[model_name] += count
        scored = (status_kind == OK)
        edges = np.linspace(0, 1, PROBABILITY_BINS + 1)
        for name in self.classes:
            counts, _ = np.histogram(out[f"prob_{name}"].to_numpy()[scored], bins=edges)
            self.histograms[name] = self.histograms.get(name, 0) + counts
        shap_columns = [f"shap_{name}" for name in self.features]
        if all(column in out.column_names for column in shap_columns):
            values = np.abs(np.column_stack([out[column].to_numpy() for column in shap_columns]
                                            )[scored])
            values = values[np.isfinite(values).all(axis=1)]
            total = values.sum(axis=0)
            self.shap_abs_sum = total if self.shap_abs_sum is None else self.shap_abs_sum + total
            self.explained += len(values)
        if len(self.unscored_examples) < EXAMPLES and not scored.all():
            rows = out.select([ROW, PATIENT_ID, "status"]).take(
                np.flatnonzero(~scored)[:EXAMPLES - len(self.unscored_examples)])
            self.unscored_examples += [
                {"row": r, "patient_id": p, "status": s} for r, p, s in zip(
                    *(rows[name].to_pylist() for name in rows.column_names), strict=True)]
        self.issue_rows += len(out) - (pc.sum(pc.equal(out[ISSUES], "")).as_py() or 0)

    def mean_abs_shap(self) -> dict[str, float]:
        """Mean |contribution| to the predicted class's logit per feature, largest first."""
        if self.shap_abs_sum is None or not self.explained:
            return {}
        means = self.shap_abs_sum / self.explained
        order = np.argsort(-means)
        return {self.features[i]: float(means[i]) for i in order}

    def as_dict(self) -> dict[str, Any]:
        """Plain data for the manifest (JSON)."""
        return {
            "rows_by_status": dict(self.by_status.most_common()),
            "phenotype_counts": dict(self.phenotypes.most_common()),
            "rule_phenotype_counts": dict(self.rule.most_common()),
            "model_vs_rule": [{"rule": r, "model": m, "rows": n,
                               "example_rows": self.agreement_rows[(r, m)]}
                              for (r, m), n in sorted(self.agreement.items())],
            "rows_with_issues": self.issue_rows,
            "by_site": {site: dict(counts) for site, counts in sorted(self.sites.items())},
            "probability_histograms": {
                "bin_edges": np.linspace(0, 1, PROBABILITY_BINS + 1).round(6).tolist(),
                **{name: np.asarray(counts).tolist() for name, counts in self.histograms.items()}},
            "unscored_examples": self.unscored_examples,
            "mean_abs_shap": self.mean_abs_shap(),
        }


def _codes(values: pa.Array | pa.ChunkedArray, missing: str | None = None
           ) -> tuple[np.ndarray, list[str]]:
    """Each cell's code and the distinct texts in the order they first appear; a missing
    cell counts as the text `missing`."""
    if missing is not None:
        values = pc.fill_null(values, missing)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    encoded = pc.dictionary_encode(values)
    return (encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64),
            encoded.dictionary.to_pylist())


def _tally(counter: Counter, names: list[str], codes: np.ndarray) -> None:
    """Add the count of each code to `counter` under its name, in the names' order."""
    counter.update(dict(zip(names, np.bincount(codes, minlength=len(names)).tolist(),
                            strict=True)))


# --- the run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreRequest:
    """What to score, with what, and where the results go."""

    model_uri: str
    input_path: Path
    output_path: Path
    mapping_path: Path | None = None
    explain: str = "predicted"
    engine: str = "local"
    report_path: Path | None = None
    block_rows: int = BLOCK_ROWS
    csv_reader: str = "arrow"  # cohort.CSV_READERS (open_cohort)

    @property
    def manifest_path(self) -> Path:
        return self.output_path.with_name(self.output_path.name + ".manifest.json")


@dataclass
class Timer:
    """Seconds spent per stage."""

    seconds: Counter = field(default_factory=Counter)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


def check_request(request: ScoreRequest) -> None:
    """Refuse a request that would fail late or destroy data, before any work is done."""
    if request.engine not in ENGINES:
        raise ScoringError(f"--engine must be one of {', '.join(ENGINES)}, not "
                           f"{request.engine!r}.")
    if request.explain not in EXPLAIN_MODES:
        raise ScoringError(f"--explain must be one of {', '.join(EXPLAIN_MODES)}, not "
                           f"{request.explain!r}.")
    suffix = request.output_path.suffix.lower()
    if suffix not in (*PARQUET_SUFFIXES, ".csv"):
        raise ScoringError(f"Cannot write {request.output_path}: name the output .parquet or "
                           f".csv (got '{request.output_path.suffix or 'no suffix'}').")
    inputs = request.input_path.resolve()
    for name, path in (("output", request.output_path), ("report", request.report_path),
                       ("manifest", request.manifest_path)):
        if path is not None and path.resolve() == inputs:
            raise ScoringError(f"The {name} path {path} is the input file; choose another "
                               "name so the input is kept.")
    if request.report_path is not None and request.report_path.suffix.lower() not in (
            ".html", ".htm"):
        raise ScoringError(f"Cannot write the report to {request.report_path}: name it "
                           ".html.")
    for path in (request.output_path, request.report_path):
        if path is not None and path.is_dir():
            raise ScoringError(f"{path} is a folder; give a file name for the output.")
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    if request.engine == "spark" and importlib.util.find_spec("pyspark") is None:
        raise ScoringError("The spark engine needs pyspark: pip install 'phenotyper[spark]' "
                           "(or use --engine local).")


def score_file(request: ScoreRequest, on_rows: Callable[[int], None] | None = None
               ) -> dict[str, Any]:
    """Score a cohort file into one output file with a manifest (and report); returns the
    manifest. Nothing reaches the destinations unless the whole run succeeds."""
    from phenotyper import registry

    check_request(request)
    timer = Timer()
    started = time.perf_counter()
    opened = open_cohort(request.input_path, request.mapping_path, request.block_rows,
                         request.csv_reader)
    with timer.stage("load_model"):
        model_info = registry.describe_model(request.model_uri)
        # the alias is resolved once: a promotion during the run cannot mix two versions
        request = dataclasses.replace(request, model_uri=model_info["resolved_uri"])
        model = registry.load_packaged(request.model_uri, threads=os.cpu_count() or 1)
    with timer.stage("input_sha256"):
        digest = _sha256(request.input_path)
    schema = output_schema(model, request.explain)
    summary = ScoreSummary(classes=list(model.classes), features=list(model.features))
    rows_in = 0

    def checked_blocks() -> Iterator[tuple[Cohort, pd.DataFrame]]:
        nonlocal rows_in
        blocks = opened.blocks()
        while True:
            with timer.stage("read_and_validate"):
                block = next(blocks, None)
                if block is None:
                    return
                checks = row_checks(block, model.features)
            rows_in += len(block.data)
            yield block, checks

    if request.engine == "local":
        outputs = _local_blocks(model, request.explain, schema, _read_ahead(checked_blocks()),
                                timer)
    else:
        from phenotyper.spark_engine import spark_blocks

        outputs = spark_blocks(request, schema, checked_blocks(), timer)

    csv = request.output_path.suffix.lower() == ".csv"
    with ExitStack() as publish:  # every file is complete before any replaces its destination
        temporary = publish.enter_context(atomic_path(request.output_path))
        with closing(outputs), _writer(temporary, schema, csv) as write:
            for block in outputs:
                with timer.stage("write"):  # waiting for the previous block's write
                    write(block.table)
                with timer.stage("summarise"):
                    summary.add(block.table, block.status_kind)
                if on_rows is not None:
                    on_rows(len(block.table))
        if summary.rows != rows_in:  # never publish an output that lost or invented rows
            raise RuntimeError(f"scoring wrote {summary.rows} rows for {rows_in} input rows")
        total = time.perf_counter() - started
        manifest = {
            "output": str(request.output_path),
            "input": str(request.input_path),
            "input_sha256": digest,
            "mapping": str(request.mapping_path) if request.mapping_path else None,
            "model": model_info,
            "engine": request.engine,
            "explain": request.explain,
            "explainer": model.describe_explainer() if request.explain != "none" else None,
            "rows_in": rows_in,
            "rows_out": summary.rows,
            **summary.as_dict(),
            "timings_s": {**{k: round(v, 3) for k, v in timer.seconds.items()},
                          "total": round(total, 3)},
            "rows_per_s": round(summary.rows / total, 1) if total else None,
            "synthetic_input": "synthetic" in opened.header,  # the simulator's marker column
        }
        if request.report_path is not None:
            from phenotyper.report import score_report_html

            html = score_report_html(summary, manifest)
            publish.enter_context(atomic_path(request.report_path)).write_text(
                html, encoding="utf-8")
        publish.enter_context(atomic_path(request.manifest_path)).write_text(
            json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest


def _local_blocks(model: PackagedPhenotyper, explain: str, schema: pa.Schema,
                  blocks: Iterator[tuple[Cohort, pd.DataFrame]], timer: Timer
                  ) -> Iterator[ScoredBlock]:
    for block, checks in blocks:
        with timer.stage("score"):
            scored = model.predict(block.data, explain=explain)
            out = finish(scored, checks, schema)
        yield out


def _read_ahead(blocks: Iterator[Any]) -> Iterator[Any]:
    """The same items, the next one read in a thread meanwhile: parsing (Arrow, pandas' C
    parser) and scoring (numpy, XGBoost) release the GIL, so they overlap on two cores."""
    end = object()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as pool:
        upcoming = pool.submit(next, blocks, end)
        while (item := upcoming.result()) is not end:
            upcoming = pool.submit(next, blocks, end)
            yield item


@contextmanager
def _writer(path: Path, schema: pa.Schema, csv: bool) -> Iterator[Callable[[pa.Table], None]]:
    """A streaming CSV or Parquet writer into `path`, writing in a thread: Arrow encodes and
    compresses without the GIL, so a block is written while the next one is scored. Blocks
    are written one at a time in the order given; `write` first waits for the previous one
    (raising its error), and leaving waits for the last, so the file is complete (or the
    error raised) before the writer closes."""
    writer = pa_csv.CSVWriter(str(path), schema) if csv else pq.ParquetWriter(str(path), schema)
    pending: list[Future] = []

    def write(table: pa.Table) -> None:
        while pending:
            pending.pop().result()
        pending.append(pool.submit(writer.write_table, table))

    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="write") as pool:
            try:
                yield write
            finally:
                done = pending.pop().exception() if pending else None
            if done is not None:
                raise done
    finally:
        writer.close()


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()

