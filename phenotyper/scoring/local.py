"""The local engine of batch scoring: blocks scored in this process, read ahead and written
in threads."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from phenotyper.cohort import Cohort
from phenotyper.packaged import PackagedPhenotyper
from phenotyper.scoring.checks import ScoredBlock, finish
from phenotyper.scoring.request import ScoreRequest, Timer


def local_blocks(model: PackagedPhenotyper, request: ScoreRequest, schema: pa.Schema,
                 blocks: Iterator[tuple[Cohort, pd.DataFrame]], timer: Timer
                 ) -> Iterator[ScoredBlock]:
    """Each checked block scored by the packaged model in this process, in order."""
    for block, checks in blocks:
        with timer.stage("score"):
            scored = model.predict(block.data, explain=request.explain,
                                   rejected_values=request.rejected_values)
            out = finish(scored, checks, schema)
        yield out


def read_ahead(blocks: Iterator[Any]) -> Iterator[Any]:
    """The same items, the next one read in a thread meanwhile: parsing (Arrow, pandas' C
    parser) and scoring (numpy, XGBoost) release the GIL, so they overlap on two cores."""
    end = object()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as pool:
        upcoming = pool.submit(next, blocks, end)
        while (item := upcoming.result()) is not end:
            upcoming = pool.submit(next, blocks, end)
            yield item


@contextmanager
def writer(path: Path, schema: pa.Schema, csv: bool) -> Iterator[Callable[[pa.Table], None]]:
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
