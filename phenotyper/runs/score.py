"""The scoring run: read, check, score, write the output, manifest and report, each file
complete before any replaces its destination."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing
from typing import Any

import pandas as pd
from mlflow.tracking import MlflowClient

from phenotyper.cohort import Cohort, open_cohort
from phenotyper.contract import SYNTHETIC_MODEL_BANNER
from phenotyper.drift import DriftTally
from phenotyper.files import atomic_path, file_sha256
from phenotyper.panel import PATIENT_ID, SAMPLE_TIME, SITE_ID
from phenotyper.scoring.checks import output_schema, row_checks
from phenotyper.scoring.local import local_blocks, read_ahead, writer
from phenotyper.scoring.request import ScoreRequest, Timer, check_kept, check_request
from phenotyper.scoring.stability import StabilityTally
from phenotyper.scoring.summary import ScoreSummary
from phenotyper.tracking.registry import describe_model, load_packaged, store_uri, using_store


def score_file(request: ScoreRequest, on_rows: Callable[[int], None] | None = None,
               tracking_uri: str | None = None) -> dict[str, Any]:
    """Score a cohort file into one output file with a manifest (and report); returns the
    manifest. Nothing reaches the destinations unless the whole run succeeds.

    `tracking_uri`: the store the model URI is looked up in ($MLFLOW_TRACKING_URI or
    ./mlflow.db when not given)."""
    check_request(request)
    with using_store(tracking_uri or store_uri()) as client:
        return _score(request, client, on_rows)


def _score(request: ScoreRequest, client: MlflowClient,
           on_rows: Callable[[int], None] | None) -> dict[str, Any]:
    timer = Timer()
    started = time.perf_counter()
    opened = open_cohort(request.input_path, request.mapping_path, request.block_rows,
                         request.csv_reader)
    with timer.stage("load_model"):
        model_info = describe_model(client, request.model_uri)
        # the alias is resolved once: a promotion during the run cannot mix two versions
        request = dataclasses.replace(request, model_uri=model_info["resolved_uri"])
        model = load_packaged(request.model_uri, threads=os.cpu_count() or 1)
    with timer.stage("input_sha256"):
        digest = file_sha256(request.input_path)
    check_kept(request.keep, opened.data_columns, output_schema(model, request.explain).names)
    schema = output_schema(model, request.explain, request.keep)
    summary = ScoreSummary(classes=list(model.classes), features=list(model.features))
    profile = model.spec.get("profile") or {}
    drift = DriftTally(profile) if profile else None
    # repeated samples: their stability needs a sample time; per-patient counts need ids only
    repeated = SAMPLE_TIME in opened.header or SAMPLE_TIME in opened.trial_columns
    stability = StabilityTally() if repeated or request.per_patient != "all" else None
    rows_in = 0

    def checked_blocks() -> Iterator[tuple[Cohort, pd.DataFrame]]:
        nonlocal rows_in
        blocks = opened.blocks()
        while True:
            with timer.stage("read_and_validate"):
                block = next(blocks, None)
                if block is None:
                    return
                checks = row_checks(block, model.features, request.rejected_values,
                                    request.keep)
            with timer.stage("drift"):
                if drift is not None:
                    drift.add(block.data, block.data[SITE_ID])
                if stability is not None:
                    stability.add_samples(block.data[PATIENT_ID], block.data.get(SAMPLE_TIME))
            rows_in += len(block.data)
            yield block, checks

    if request.engine == "local":
        outputs = local_blocks(model, request, schema, read_ahead(checked_blocks()), timer)
    else:
        from phenotyper.scoring.spark import spark_blocks

        outputs = spark_blocks(request, schema, checked_blocks(), timer)

    csv = request.output_path.suffix.lower() == ".csv"
    with ExitStack() as publish:  # every file is complete before any replaces its destination
        temporary = publish.enter_context(atomic_path(request.output_path))
        with closing(outputs), writer(temporary, schema, csv) as write:
            for block in outputs:
                with timer.stage("write"):  # waiting for the previous block's write
                    write(block.table)
                with timer.stage("summarise"):
                    summary.add(block.table, block.status_kind)
                    if stability is not None:
                        stability.add_calls(block.table["phenotype"].to_numpy(
                            zero_copy_only=False), block.table["rule_phenotype"].to_numpy(
                            zero_copy_only=False))
                if on_rows is not None:
                    on_rows(len(block.table))
        if summary.rows != rows_in:  # never publish an output that lost or invented rows
            raise RuntimeError(f"scoring wrote {summary.rows} rows for {rows_in} input rows")
        total = time.perf_counter() - started
        synthetic_input = "synthetic" in opened.header  # the simulator's marker column
        manifest = {
            "output": str(request.output_path),
            "input": str(request.input_path),
            "input_sha256": digest,
            "mapping": str(request.mapping_path) if request.mapping_path else None,
            "model": model_info,
            "engine": request.engine,
            "explain": request.explain,
            "rejected_values": request.rejected_values,
            "explainer": model.describe_explainer() if request.explain != "none" else None,
            "rows_in": rows_in,
            "rows_out": summary.rows,
            **summary.as_dict(),
            "timings_s": {**{k: round(v, 3) for k, v in timer.seconds.items()},
                          "total": round(total, 3)},
            "rows_per_s": round(summary.rows / total, 1) if total else None,
            "synthetic_input": synthetic_input,
            "training_cohort": {key: profile.get(key) for key in (
                "patients", "cohort_sha256", "synthetic")} if profile else None,
            "warnings": [SYNTHETIC_MODEL_BANNER] if profile.get("synthetic") and not
            synthetic_input else [],
            "drift": None if drift is None else drift.report(summary.phenotype_shares()),
            "per_patient": request.per_patient,
            "repeated_samples": None if stability is None else stability.report(
                request.per_patient),
        }
        if request.report_path is not None:
            # the report (matplotlib, Jinja2) loads only when one is asked for
            from phenotyper.report.scoring import score_report_html

            html = score_report_html(summary, manifest)
            publish.enter_context(atomic_path(request.report_path)).write_text(
                html, encoding="utf-8")
        publish.enter_context(atomic_path(request.manifest_path)).write_text(
            json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest
