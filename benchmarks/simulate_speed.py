"""How fast the simulator makes and writes a large cohort, and the reader reads it back.

Writes benchmarks/results/simulate_speed.json. The machine is shared and noisy, so besides
seconds it reports each step as a ratio to a baseline measured in the same run (drawing the
same number of standard normals with numpy), which is comparable across runs.

    .venv/bin/python benchmarks/simulate_speed.py [--n 1000000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from results_file import write_results  # benchmarks/ is on sys.path when run

from phenotyper.cohort import read_cohort, write_table
from phenotyper.simulate import simulate


def _seconds(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--preset", default="immunosep-screening")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    baseline_s = _seconds(lambda: rng.standard_normal((args.n, 26)))
    frames = {}
    simulate_s = _seconds(lambda: frames.setdefault("cohort", simulate(args.preset, args.n, 1)))
    with tempfile.TemporaryDirectory() as folder:
        parquet_s = _seconds(lambda: write_table(frames["cohort"], Path(folder) / "c.parquet"))
        csv_s = _seconds(lambda: write_table(frames["cohort"], Path(folder) / "c.csv"))
        read_parquet_s = _seconds(lambda: read_cohort(Path(folder) / "c.parquet"))
        read_csv_s = _seconds(lambda: read_cohort(Path(folder) / "c.csv"))
    result = {
        "n": args.n,
        "preset": args.preset,
        "baseline_normals_s": round(baseline_s, 3),
        "simulate_s": round(simulate_s, 3),
        "write_parquet_s": round(parquet_s, 3),
        "write_csv_s": round(csv_s, 3),
        "read_cohort_parquet_s": round(read_parquet_s, 3),
        "read_cohort_csv_s": round(read_csv_s, 3),
        "simulate_over_baseline": round(simulate_s / baseline_s, 1),
        "rows_per_s": round(args.n / simulate_s),
    }
    write_results("simulate_speed", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
