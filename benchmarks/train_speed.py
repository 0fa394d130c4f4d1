"""Default training on 20000 patients: wall time, and distance from the Bayes optimum.

Runs `phenotyper train --cohort --label --name` (defaults: tuning, calibration check, the
benchmark with 1000 resamples and 20 re-measurements, MLflow logging and registration) into a
throwaway SQLite store, then compares the selected model on the held-out patients with the
exact Bayes-optimal posterior of the simulator's law. Writes benchmarks/results/train_speed.json.

    .venv/bin/python benchmarks/train_speed.py [--n 20000] [--preset immunosep-screening]
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
from sklearn.metrics import accuracy_score, log_loss

from phenotyper.cohort import write_table
from phenotyper.contract import PHENOTYPES
from phenotyper.runs.train import train
from phenotyper.simulate import bayes_posterior, simulate
from phenotyper.training.spec import default_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--preset", default="immunosep-screening")
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        path = write_table(simulate(args.preset, args.n, args.seed), Path(folder) / "c.parquet")
        start = time.perf_counter()
        outcome = train(default_spec(path, "phenotype_true", "speed-check"))
        train_s = time.perf_counter() - start
    result = outcome.result
    model = result.candidates[result.selected].estimator
    test, truth = result.test, result.test["phenotype_true"]
    optimum = bayes_posterior(args.preset, test)
    labels = list(PHENOTYPES)
    proba = model.predict_proba(test)
    model_labels = [str(c) for c in model.classes_]
    outcome_json = {
        "n": args.n, "preset": args.preset, "train_s": round(train_s, 1),
        "selected": result.selected,
        "cv_scores": {k: round(c.cv_score, 4) for k, c in result.candidates.items()},
        "model_accuracy": round(accuracy_score(truth, model.predict(test)), 4),
        "bayes_accuracy": round(accuracy_score(truth, np.array(labels)[optimum.argmax(1)]), 4),
        "model_log_loss": round(log_loss(truth, proba, labels=model_labels), 4),
        "bayes_log_loss": round(log_loss(truth, optimum, labels=labels), 4),
        "gate": outcome.decision.reason,
    }
    outcome_json["accuracy_ratio"] = round(
        outcome_json["model_accuracy"] / outcome_json["bayes_accuracy"], 4)
    outcome_json["log_loss_gap"] = round(
        outcome_json["model_log_loss"] - outcome_json["bayes_log_loss"], 4)
    write_results("train_speed", outcome_json)
    print(json.dumps(outcome_json, indent=2))


if __name__ == "__main__":
    main()
