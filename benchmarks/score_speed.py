"""Batch scoring speed and memory: `phenotyper score` end to end against the bare model call.

Trains one candidate (default settings, 20000 screening patients) into a throwaway SQLite
store, simulates a cohort of `--rows` patients as CSV and as Parquet, and in one process times
- the bare model: `PackagedPhenotyper.predict` on the same rows already in memory, in the same
  blocks (reading, validation and writing excluded);
- `score` end to end: CSV or Parquet in, reader checks, the model, Parquet out, manifest;
each with and without explanations, so the overhead ratio compares like with like. Then it
scores a `--memory-rows` Parquet file in a child process and reports the child's peak RSS.
Writes benchmarks/results/score_speed_<candidate>.json.

    .venv/bin/python benchmarks/score_speed.py [--candidate logistic|xgboost] [--rows 1000000]
        [--memory-rows 5000000]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from results_file import write_results  # benchmarks/ is on sys.path when run

from phenotyper.cohort import BLOCK_ROWS, write_table
from phenotyper.runs.score import score_file
from phenotyper.runs.train import train
from phenotyper.scoring.request import ScoreRequest
from phenotyper.simulate import simulate
from phenotyper.tracking.registry import load_packaged
from phenotyper.training.spec import default_spec

SIMULATION_BLOCK = 500_000


def _write_cohort(paths: list[Path], rows: int, seed: int) -> None:
    """One simulated cohort written to each path (.csv or .parquet), piece by piece (the
    simulator holds one piece at a time)."""
    writers: dict[Path, pq.ParquetWriter] = {}
    for start in range(0, rows, SIMULATION_BLOCK):
        piece = simulate("immunosep-screening", min(SIMULATION_BLOCK, rows - start),
                         seed + start)
        piece["patient_id"] = [f"P{start + i:09d}" for i in range(len(piece))]
        for path in paths:
            if path.suffix == ".csv":
                piece.to_csv(path, mode="a", header=start == 0, index=False)
                continue
            table = pa.Table.from_pandas(piece, preserve_index=False)
            if path not in writers:
                writers[path] = pq.ParquetWriter(path, table.schema)
            writers[path].write_table(table, row_group_size=BLOCK_ROWS)
    for writer in writers.values():
        writer.close()


def _bare_model_s(model_uri: str, cohort: Path, explain: str) -> float:
    """Seconds the packaged model alone takes on the file's rows, read beforehand."""
    from phenotyper.cohort import open_cohort

    model = load_packaged(model_uri, threads=os.cpu_count() or 1)
    blocks = [block.data for block in open_cohort(cohort).blocks()]
    start = time.perf_counter()
    for data in blocks:
        model.predict(data, explain=explain)
    return time.perf_counter() - start


def _peak_rss_mb(model_uri: str, cohort: Path, output: Path) -> tuple[float, float]:
    """Peak resident memory (MB) and wall time of `phenotyper score` in a child process."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "phenotyper.cli", "score", "--model", model_uri,
                    "--input", str(cohort), "--output", str(output)], check=True,
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--candidate", default="logistic", choices=("logistic", "xgboost"))
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--memory-rows", type=int, default=5_000_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder_name:
        folder = Path(folder_name)
        os.chdir(folder)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
        train_path = write_table(simulate("immunosep-screening", 20_000, 5),
                                 folder / "train.parquet")
        spec = default_spec(train_path, "phenotype_true", "score-speed")
        spec = dataclasses.replace(
            spec, candidates={args.candidate: spec.candidates[args.candidate]})
        train(spec)
        model_uri = "models:/score-speed/1"
        cohorts = {"csv": folder / "cohort.csv", "parquet": folder / "cohort.parquet"}
        _write_cohort(list(cohorts.values()), args.rows, seed=100)

        results: dict = {"candidate": args.candidate, "rows": args.rows,
                         "cpu_count": os.cpu_count(), "block_rows": BLOCK_ROWS}
        for explain in ("predicted", "none"):
            bare_s = _bare_model_s(model_uri, cohorts["parquet"], explain)
            results[f"explain_{explain}"] = {"bare_model_s": round(bare_s, 2),
                                             "bare_model_rows_per_s": round(args.rows / bare_s)}
            for input_format, cohort in cohorts.items():
                start = time.perf_counter()
                manifest = score_file(ScoreRequest(model_uri, cohort,
                                                   folder / "scored.parquet", explain=explain))
                end_to_end_s = time.perf_counter() - start
                results[f"explain_{explain}"][f"{input_format}_input"] = {
                    "score_s": round(end_to_end_s, 2),
                    "score_rows_per_s": round(args.rows / end_to_end_s),
                    "overhead_ratio": round(end_to_end_s / bare_s - 1, 3),
                    "stages_s": manifest["timings_s"],
                }
            print(json.dumps({explain: results[f"explain_{explain}"]}, indent=1), flush=True)
        for cohort in cohorts.values():
            cohort.unlink()
        if args.memory_rows:
            big = folder / "big.parquet"
            _write_cohort([big], args.memory_rows, seed=7)
            peak_mb, wall_s = _peak_rss_mb(model_uri, big, folder / "big_scored.parquet")
            results["memory"] = {"rows": args.memory_rows, "peak_rss_mb": round(peak_mb),
                                 "wall_s": round(wall_s, 1),
                                 "rows_per_s": round(args.memory_rows / wall_s)}
    path = write_results(f"score_speed_{args.candidate}", results)
    print(json.dumps(results, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
