"""The Spark engine of batch scoring: the registered model through `mlflow.pyfunc.spark_udf`.

The cohort reader runs once on the driver, as for the local engine: duplicate ids, the
decimal-comma evidence and row numbers are whole-file facts, and reading is cheap next to
scoring. Its canonical blocks are staged as Parquet; Spark scores them with the model's pyfunc
on the executors (explanations are the expensive part) and writes the results as Parquet
parts; the driver streams the parts back in row order into the same `finish` step and output
writer as the local engine. So both engines give the same rows, columns and values.

The session is `local[*]` unless Spark is configured otherwise (spark-submit, `spark.master`
in spark-defaults.conf, or $PHENOTYPER_SPARK_MASTER); a local session binds to 127.0.0.1 and
runs no web UI. On a cluster the scratch folder (beside the output) must be on storage the
executors share. pyspark is an optional extra: `pip install 'phenotyper[spark]'`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from phenotyper.cohort import Cohort
from phenotyper.panel import CANONICAL_COLUMNS
from phenotyper.scoring.checks import CHECK_COLUMNS, ROW, ScoredBlock, finish
from phenotyper.scoring.request import ScoreRequest, ScoringError, Timer

MASTER_VARIABLE = "PHENOTYPER_SPARK_MASTER"
_MODEL_OUTPUT = "model_output"
_CHECK_PREFIX = "check__"  # staged reader columns, apart from the model's input columns


@contextmanager
def spark_session() -> Iterator[Any]:
    """The running SparkSession if there is one (left running), else a new one (stopped after):
    the configured master, or local[*] on loopback without a web UI."""
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        yield active
        return
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder.appName("phenotyper score")
    master = os.environ.get(MASTER_VARIABLE)
    if master is None and not _master_configured():
        master = "local[*]"
    if master is not None:
        builder = builder.master(master)
    if master is None or master.startswith("local"):
        builder = (builder.config("spark.driver.host", "127.0.0.1")
                   .config("spark.driver.bindAddress", "127.0.0.1")
                   .config("spark.ui.enabled", "false")
                   .config("spark.ui.showConsoleProgress", "false"))
    try:
        session = builder.getOrCreate()
    except Exception as error:  # e.g. no Java: pyspark's own message says what is missing
        raise ScoringError(f"Cannot start Spark: {error}. The spark engine needs Java 17 "
                           "(or use --engine local).") from None
    session.sparkContext.setLogLevel("ERROR")
    try:
        yield session
    finally:
        session.stop()


def _master_configured() -> bool:
    """Whether Spark's usual settings name a master: spark-submit (which starts this process
    with a gateway) or `spark.master` in spark-defaults.conf."""
    if "PYSPARK_GATEWAY_PORT" in os.environ or "MASTER" in os.environ:
        return True
    folder = os.environ.get("SPARK_CONF_DIR") or (
        os.path.join(os.environ["SPARK_HOME"], "conf") if "SPARK_HOME" in os.environ else None)
    defaults = Path(folder) / "spark-defaults.conf" if folder else None
    return bool(defaults and defaults.is_file() and any(
        line.split()[:1] == ["spark.master"] for line in defaults.read_text().splitlines()))


def spark_blocks(request: ScoreRequest, schema: pa.Schema,
                 blocks: Iterator[tuple[Cohort, pd.DataFrame]], timer: Timer
                 ) -> Iterator[ScoredBlock]:
    """Scored blocks in input order, the model run by Spark (same contract as the local
    engine's blocks)."""
    import mlflow.pyfunc
    from pyspark.sql import functions as spark_functions

    with tempfile.TemporaryDirectory(prefix=".phenotyper-spark-",
                                     dir=request.output_path.parent) as work:
        staged, results = Path(work) / "staged.parquet", Path(work) / "scored"
        with timer.stage("read_and_validate"):
            _stage(blocks, staged)
        with timer.stage("score"), spark_session() as spark:
            model_output = [field for field in schema
                            if field.name not in CHECK_COLUMNS or field.name == "patient_id"]
            udf = mlflow.pyfunc.spark_udf(
                spark, request.model_uri, result_type=_ddl(model_output), env_manager="local",
                params={"explain": request.explain,
                        "rejected_values": request.rejected_values})
            frame = spark.read.parquet(str(staged))
            inputs = [column for column in frame.columns if not column.startswith(_CHECK_PREFIX)]
            checks = [spark_functions.col(_CHECK_PREFIX + name).alias(_CHECK_PREFIX + name)
                      for name in CHECK_COLUMNS]
            scored = frame.select(*checks, udf(spark_functions.struct(*inputs)).alias(
                _MODEL_OUTPUT))
            scored.select(*checks, f"{_MODEL_OUTPUT}.*").write.parquet(str(results))
        yield from _in_row_order(results, schema, timer)


def _stage(blocks: Iterator[tuple[Cohort, pd.DataFrame]], staged: Path) -> None:
    """The canonical model inputs and the reader's row checks, one row group per block."""
    writer = None
    try:
        for block, checks in blocks:
            frame = block.data[list(CANONICAL_COLUMNS)].copy()
            for name in CHECK_COLUMNS:
                frame[_CHECK_PREFIX + name] = checks[name].to_numpy()
            table = pa.Table.from_pandas(frame, preserve_index=False)
            if writer is None:
                types = [pa.string() if pa.types.is_null(f.type) else f.type
                         for f in table.schema]
                stage_schema = pa.schema([pa.field(f.name, t) for f, t in
                                          zip(table.schema, types, strict=True)])
                writer = pq.ParquetWriter(staged, stage_schema)
            writer.write_table(table.cast(writer.schema))
    finally:
        if writer is not None:
            writer.close()


def _ddl(fields: list[pa.Field]) -> str:
    """A Spark DDL struct for Arrow fields of type string, float64 or int64."""
    names = {pa.string(): "string", pa.float64(): "double", pa.int64(): "bigint"}
    return ", ".join(f"`{field.name}` {names[field.type]}" for field in fields)


def _in_row_order(results: Path, schema: pa.Schema, timer: Timer) -> Iterator[ScoredBlock]:
    """Spark's result parts streamed back by row number; a gap or overlap is an error."""
    starts = []
    for part in results.glob("part-*.parquet"):
        metadata = pq.ParquetFile(part).metadata
        column = metadata.schema.to_arrow_schema().get_field_index(_CHECK_PREFIX + ROW)
        mins = [metadata.row_group(g).column(column).statistics.min
                for g in range(metadata.num_row_groups)]
        if mins:
            starts.append((min(mins), part))
    expected = 1
    for _start, part in sorted(starts):
        for batch in pq.ParquetFile(part).iter_batches():
            with timer.stage("score"):
                frame = batch.to_pandas()
                checks = frame[[_CHECK_PREFIX + n for n in CHECK_COLUMNS]]
                checks.columns = list(CHECK_COLUMNS)
                rows = checks[ROW].to_numpy()
                if len(rows) and not np.array_equal(rows, np.arange(expected,
                                                                     expected + len(rows))):
                    raise RuntimeError(f"Spark returned rows out of order near row {expected}")
                expected += len(rows)
                scored = frame.drop(columns=[_CHECK_PREFIX + n for n in CHECK_COLUMNS])
                block = finish(scored, checks, schema)
            yield block
