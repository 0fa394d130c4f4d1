"""A scoring request, checked before any work is done, and its timings."""

from __future__ import annotations

import importlib.util
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from phenotyper.cohort import BLOCK_ROWS, PARQUET_SUFFIXES
from phenotyper.contract import EXPLAIN_MODES, REJECTED_VALUES_MODES, SKIP_ROW
from phenotyper.scoring.stability import PER_PATIENT_MODES
from phenotyper.suggest import did_you_mean

ENGINES = ("local", "spark")


class ScoringError(Exception):
    """A problem with the request (paths, engine, options): the message says how to fix it."""


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
    rejected_values: str = SKIP_ROW  # contract.REJECTED_VALUES_MODES
    per_patient: str = "all"  # stability.PER_PATIENT_MODES: what the summary counts
    keep: tuple[str, ...] = ()  # input columns carried into the output (local engine)

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


def check_kept(keep: tuple[str, ...], available: list[str], output: list[str]) -> None:
    """Refuse a --keep column the input lacks or the output already has."""
    for name in keep:
        if keep.count(name) > 1:
            raise ScoringError(f"--keep {name} is given {keep.count(name)} times; give it once.")
        if name in output:
            raise ScoringError(f"--keep {name}: the output already has a column {name}; "
                               "keep only columns the output lacks.")
        if name not in available:
            raise ScoringError(f"--keep {name}: the input has no column {name}."
                               f"{did_you_mean(name, available)} Its columns are: "
                               f"{', '.join(available)}.")


def check_request(request: ScoreRequest) -> None:
    """Refuse a request that would fail late or destroy data, before any work is done."""
    if request.engine not in ENGINES:
        raise ScoringError(f"--engine must be one of {', '.join(ENGINES)}, not "
                           f"{request.engine!r}.")
    if request.explain not in EXPLAIN_MODES:
        raise ScoringError(f"--explain must be one of {', '.join(EXPLAIN_MODES)}, not "
                           f"{request.explain!r}.")
    if request.rejected_values not in REJECTED_VALUES_MODES:
        raise ScoringError(f"--rejected-values must be one of "
                           f"{', '.join(REJECTED_VALUES_MODES)}, not {request.rejected_values!r}.")
    if request.per_patient not in PER_PATIENT_MODES:
        raise ScoringError(f"--per-patient must be one of {', '.join(PER_PATIENT_MODES)}, not "
                           f"{request.per_patient!r}.")
    if request.keep and request.engine != "local":
        raise ScoringError("--keep carries input columns with --engine local only; score "
                           "locally, or join the output back to the input on its row number.")
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
    if request.engine == "spark" and importlib.util.find_spec("pyspark") is None:
        raise ScoringError("The spark engine needs pyspark: pip install 'phenotyper[spark]' "
                           "(or use --engine local).")
