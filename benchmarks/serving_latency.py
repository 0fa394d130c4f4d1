"""Serving speed of the packaged model through MLflow's scoring server over loopback.

Trains a small champion into a throwaway store, starts `phenotyper serve`, then measures
single-patient latency with explanations (p50 / p99 over many requests) and batch throughput.
Target (issue 5): p99 under 50 ms for one patient with explanation. Writes
benchmarks/results/serving_latency.json.

    .venv/bin/python benchmarks/serving_latency.py [--requests 500] [--batch 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from results_file import write_results  # benchmarks/ is on sys.path when run

from phenotyper.experiment import ExperimentSpec, train
from phenotyper.serving import post, running_server
from phenotyper.simulate import simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--candidate", default="xgboost", choices=["xgboost", "logistic"])
    args = parser.parse_args()
    grid = ({"max_depth": [3], "n_estimators": [300], "learning_rate": [0.05]}
            if args.candidate == "xgboost" else {"C": [1.0]})
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        train(ExperimentSpec(name="latency", registered_model="immunophenotyper",
                             label="phenotype_true", preset="immunosep-screening", n=5000,
                             candidates={args.candidate: grid}, bootstrap=20,
                             noise_repeats=0))
        cohort = simulate("immunosep-screening", args.batch, seed=99).drop(
            columns=["site_id", "phenotype_true", "phenotype_rule", "death_28d", "synthetic"])
        records = json.loads(cohort.to_json(orient="records"))
        with running_server(cwd=Path(folder)) as url:
            singles = [json.dumps({"dataframe_records": [r], "params": {"explain": "predicted"}})
                       .encode() for r in records[: min(len(records), 50)]]
            for body in singles[:10]:  # warm up
                post(url, body)
            latency_ms = []
            for i in range(args.requests):
                start = time.perf_counter()
                status, _ = post(url, singles[i % len(singles)])
                latency_ms.append(1000 * (time.perf_counter() - start))
                assert status == 200
            body = json.dumps({"dataframe_records": records}).encode()
            start = time.perf_counter()
            for _ in range(args.batches):
                status, _ = post(url, body, timeout_s=120)
                assert status == 200
            batch_s = time.perf_counter() - start
    result = {
        "candidate": args.candidate, "requests": args.requests,
        "single_p50_ms": round(float(np.percentile(latency_ms, 50)), 1),
        "single_p99_ms": round(float(np.percentile(latency_ms, 99)), 1),
        "single_max_ms": round(float(np.max(latency_ms)), 1),
        "batch_rows": args.batch, "batches": args.batches,
        "batch_rows_per_s": round(args.batch * args.batches / batch_s),
        "p99_target_ms": 50,
    }
    write_results(f"serving_latency_{args.candidate}", result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
