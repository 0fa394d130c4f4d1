"""Exact SHAP speed: phenotyper's compiled TreeSHAP tables against XGBoost's `pred_contribs`
and `shap.TreeExplainer`, on the same rows, in one process.

The reference models are phenotyper's XGBoost candidate (3 classes, 300 rounds, depth 4, and
the same at depth 6) on the 20 numeric markers of a simulated screening cohort (synthetic data:
this measures software, not medicine). For each depth it times, on held-out simulated rows:
- the tables (`TreeShapTables.shap_values`, all cores);
- XGBoost's `pred_contribs` (all cores, the DMatrix build included, as a user calls it);
- `shap.TreeExplainer(booster).shap_values` (which hands XGBoost models to XGBoost);
- plain margin prediction, for scale;
in interleaved rounds, and reports the median of the per-round ratios, the max absolute error
against XGBoost, the tables' build time (first build includes numba's compile) and memory.
Writes benchmarks/results/shap_speed.json.

    .venv/bin/python benchmarks/shap_speed.py [--rows 8000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import xgboost
from results_file import write_results  # benchmarks/ is on sys.path when run

from phenotyper.explain import TreeShapTables
from phenotyper.models import build_candidate
from phenotyper.panel import PANEL
from phenotyper.simulate import simulate

FEATURES = [name for name, marker in PANEL.items() if marker.is_numeric]  # 20 markers
TRAIN_ROWS = 20_000
TOLERANCE = 1e-5  # x max(1, output scale), the bar


def _rows_per_s(call: Callable[[], object], rows: int) -> float:
    started = time.perf_counter()
    call()
    return rows / (time.perf_counter() - started)


def _reference_model(depth: int) -> tuple[xgboost.Booster, np.ndarray]:
    """The candidate trained on simulated patients, and its feature matrix for new patients."""
    train = simulate("immunosep-screening", TRAIN_ROWS, seed=1)
    model = build_candidate("xgboost", FEATURES, {"n_estimators": 300, "max_depth": depth})
    model.fit(train, train["phenotype_true"])
    return model[-1].booster_.get_booster(), model[0]


def measure(depth: int, rows: int, rounds: int, explainer_rows: int) -> dict:
    booster, features = _reference_model(depth)
    X = np.asarray(features.transform(simulate("immunosep-screening", rows, seed=2)),
                   dtype=np.float64)
    started = time.perf_counter()
    tables = TreeShapTables.from_booster(booster)
    first_build_s = time.perf_counter() - started
    tables = TreeShapTables.from_booster(booster)
    threads = tables.threads
    booster.set_param({"nthread": threads})

    def contribs(data: np.ndarray) -> np.ndarray:
        return booster.predict(xgboost.DMatrix(data, missing=np.nan), pred_contribs=True,
                               strict_shape=True)

    import shap

    explainer = shap.TreeExplainer(booster)
    speeds: dict[str, list[float]] = {"tables": [], "xgboost_pred_contribs": [],
                                      "shap_tree_explainer": [], "xgboost_margin": []}
    for _ in range(rounds):
        speeds["tables"].append(_rows_per_s(lambda: tables.shap_values(X), rows))
        speeds["xgboost_pred_contribs"].append(_rows_per_s(lambda: contribs(X), rows))
        speeds["shap_tree_explainer"].append(_rows_per_s(
            lambda: explainer.shap_values(X[:explainer_rows]), explainer_rows))
        speeds["xgboost_margin"].append(_rows_per_s(lambda: booster.predict(
            xgboost.DMatrix(X, missing=np.nan), output_margin=True), rows))
    ours, reference = tables.shap_values(X), contribs(X)
    scale = float(np.abs(reference.sum(axis=2)).max())
    error = float(np.abs(ours - reference).max())

    def ratio(other: str) -> float:
        return statistics.median(a / b for a, b in zip(
            speeds["tables"], speeds[other], strict=True))

    single = TreeShapTables.from_booster(booster, threads=1)
    booster.set_param({"nthread": 1})
    one_thread = rows // 4
    single_ratio = statistics.median(
        _rows_per_s(lambda: single.shap_values(X[:one_thread]), one_thread)
        / _rows_per_s(lambda: contribs(X[:one_thread]), one_thread) for _ in range(rounds))
    groups, width = ours.shape[1], ours.shape[2]
    return {
        "model": {"classes": groups, "rounds": booster.num_boosted_rounds(), "depth": depth,
                  "features": width - 1, "trees": len(tables.tree_group),
                  "regions": len(tables.region_width)},
        "rows": rows, "threads": threads, "rounds": rounds,
        "rows_per_s": {name: round(statistics.median(v)) for name, v in speeds.items()},
        "speedup_over": {"xgboost_pred_contribs": round(ratio("xgboost_pred_contribs"), 1),
                         "shap_tree_explainer": round(ratio("shap_tree_explainer"), 1),
                         "xgboost_pred_contribs_one_thread": round(single_ratio, 1)},
        "tables_vs_margin_prediction": round(ratio("xgboost_margin"), 2),
        "max_abs_error": error, "output_scale": scale,
        "error_over_bar": error / (TOLERANCE * max(1.0, scale)),
        "build_s": {"first_in_process": round(first_build_s, 2),  # depth 4: with compile
                    "warm": round(tables.build_s, 2)},
        "memory_bytes": {"tables": tables.nbytes,
                         "per_thread_working": tables.describe()["working_bytes_per_thread"],
                         "output_per_row": 8 * groups * width},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results = {f"depth_{depth}": measure(depth, args.rows, args.rounds,
                                         explainer_rows=max(1, args.rows // 4))
               for depth in (4, 6)}
    for name, result in results.items():
        print(name, result["rows_per_s"], result["speedup_over"],
              f"max error {result['max_abs_error']:.2g}", result["build_s"],
              f"tables {result['memory_bytes']['tables'] / 2**20:.1f} MiB")
    print(write_results("shap_speed", results))


if __name__ == "__main__":
    main()
