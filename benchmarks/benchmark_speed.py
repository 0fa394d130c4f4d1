"""How long the rules benchmark takes on a 20000-patient immunosep-screening cohort.

Times each phase of `phenotyper benchmark` (read, evaluate with bootstrap and re-measurement,
write report) and writes benchmarks/results/benchmark_speed.json. Besides seconds it gives the
evaluation time as a multiple of one scikit-learn roc_auc_score call on the same patients,
measured in the same run, which is comparable across runs on a noisy machine.

    .venv/bin/python benchmarks/benchmark_speed.py [--n 20000] [--bootstrap 1000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from results_file import write_results  # benchmarks/ is on sys.path when run
from sklearn.metrics import roc_auc_score

from phenotyper.cohort import read_cohort, write_table
from phenotyper.evaluate.benchmark import benchmark
from phenotyper.report.benchmark import write_benchmark
from phenotyper.rules import reference_rules
from phenotyper.simulate import simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--noise-repeats", type=int, default=20)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        path = write_table(simulate("immunosep-screening", args.n, seed=1),
                           Path(folder) / "cohort.parquet")
        start = time.perf_counter()
        data = read_cohort(path).data
        read_s = time.perf_counter() - start
        rules = {name: rule.fit(data) for name, rule in reference_rules().items()}
        start = time.perf_counter()
        result = benchmark(rules, data, "phenotype_true", n_boot=args.bootstrap,
                           noise_repeats=args.noise_repeats)
        evaluate_s = time.perf_counter() - start
        start = time.perf_counter()
        write_benchmark(result, Path(folder) / "report", source=str(path))
        report_s = time.perf_counter() - start
        truth = data["phenotype_true"] == "MALS"
        start = time.perf_counter()
        roc_auc_score(truth, data["ferritin_ng_ml"])
        auc_s = time.perf_counter() - start

    outcome = {
        "n": args.n, "bootstrap": args.bootstrap, "noise_repeats": args.noise_repeats,
        "phenotypers": len(rules), "read_s": round(read_s, 2),
        "evaluate_s": round(evaluate_s, 2), "report_s": round(report_s, 2),
        "total_s": round(read_s + evaluate_s + report_s, 2),
        "evaluate_over_one_sklearn_auroc": round(evaluate_s / auc_s),
    }
    write_results("benchmark_speed", outcome)
    print(json.dumps(outcome, indent=2))


if __name__ == "__main__":
    main()
