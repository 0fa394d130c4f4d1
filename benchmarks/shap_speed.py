"""Exact SHAP speed: phenotyper's compiled TreeSHAP tables against the newest anchors, on the
same rows, in one process.

The reference models are phenotyper's XGBoost candidate (3 classes, 300 rounds, at depths 4, 6
and 8) on the 20 numeric markers of a simulated screening cohort (synthetic data: this measures
software, not medicine). For each depth and batch size it times, in interleaved rounds:
- the tables, pre-built (`TreeShapTables.shap_values`) and one-shot (`shap_values(booster, X)`:
  build plus explanation, numba's kernels already compiled in the process);
- XGBoost's `pred_contribs` on the installed version (the DMatrix build included);
- `shap.TreeExplainer(booster).shap_values` (which hands XGBoost models to XGBoost);
- shapiq's `TreeExplainer` (its own TreeSHAP, and the Woodelf backend), one call per class;
- FastTreeSHAP v2 where it imports (it does not on numpy 2: the reason is recorded);
- plain margin prediction, for scale.
Every method gets the machine's cores (2 here) where it can use them. The slow anchors run on
batches of at most `--anchor-rows`, and not on a batch one call would take over
`--anchor-seconds` on (judged from their speed on the batch before); a batch they skip is
compared with their speed on the largest batch they ran (`anchors_measured_on_rows`). It
reports rows/s (medians), the median of the per-round ratios, the largest difference from
`pred_contribs`, the tables' build time and memory, and each anchor's build.
CPU only: XGBoost also has a GPU TreeSHAP, which this machine (no GPU) cannot measure.
Writes benchmarks/results/shap_speed.json.

    .venv/bin/python benchmarks/shap_speed.py [--depths 4 6 8]
        [--batches 1000 4000 40000 400000] [--anchor-rows 40000] [--anchor-seconds 30]
        [--rounds 3]
    .venv/bin/python benchmarks/shap_speed.py --table-from benchmarks/results/shap_speed.json

shapiq comes with the `bench` dependency group (`make bench` installs it).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import shap
import xgboost
from results_file import code_version, write_results  # benchmarks/ is on sys.path when run

from phenotyper.models import build_candidate
from phenotyper.panel import PANEL
from phenotyper.simulate import simulate
from phenotyper.treeshap import TreeShapTables, _cores, shap_values

FEATURES = [name for name, marker in PANEL.items() if marker.is_numeric]  # 20 markers
TRAIN_ROWS = 20_000
TOLERANCE = 1e-5  # x max(1, output scale), the bar
FASTTREESHAP_MISSING = (
    "not in the bench group: fasttreeshap 0.1.6 (the newest release) installs but fails at "
    "import on numpy 2 (it calls np.obj2sctype, removed in numpy 2.0)")
TARGETS = {"one_shot_4000_rows": {4: 10.0, 6: 5.0}, "pre_built": {4: 50.0, 6: 50.0}}


def _seconds(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def _reference_model(depth: int) -> tuple[xgboost.Booster, Any]:
    """The candidate trained on simulated patients, and its feature transform."""
    train = simulate("immunosep-screening", TRAIN_ROWS, seed=1)
    model = build_candidate("xgboost", FEATURES, {"n_estimators": 300, "max_depth": depth})
    model.fit(train, train["phenotype_true"])
    return model[-1].booster_.get_booster(), model[0]


def _anchors(booster: xgboost.Booster, groups: int) -> tuple[dict[str, Callable], dict]:
    """The other exact explainers, each as X -> (rows, groups, features + 1), with the time
    each took to build and why any is missing."""
    def contribs(X: np.ndarray) -> np.ndarray:
        return booster.predict(xgboost.DMatrix(X, missing=np.nan), pred_contribs=True,
                               strict_shape=True)

    calls: dict[str, Callable] = {"xgboost_pred_contribs": contribs}
    notes: dict[str, Any] = {}
    started = time.perf_counter()
    explainer = shap.TreeExplainer(booster)
    notes["shap_tree_explainer"] = {"version": shap.__version__,
                                    "build_s": round(time.perf_counter() - started, 3)}
    calls["shap_tree_explainer"] = lambda X: _shap_layout(explainer.shap_values(X),
                                                          explainer.expected_value)
    try:
        import shapiq
    except ImportError as error:
        notes["shapiq"] = f"not installed ({error}); `make bench` installs the bench group"
    else:
        for backend in ("shapiq", "woodelf"):
            name = f"shapiq_{backend}"
            started = time.perf_counter()
            try:
                per_class = [shapiq.TreeExplainer(booster, index="SV", max_order=1,
                                                  class_index=k, backend=backend)
                             for k in range(groups)]
            except Exception as error:  # an anchor that cannot load this model is reported
                notes[name] = f"cannot explain this model: {error}"
                continue
            notes[name] = {"version": shapiq.__version__,
                           "build_s": round(time.perf_counter() - started, 3)}
            calls[name] = _shapiq_call(per_class, len(FEATURES))
    try:
        import fasttreeshap
    except ModuleNotFoundError:
        notes["fasttreeshap"] = FASTTREESHAP_MISSING
    except Exception as error:  # installed by hand: say why it cannot run
        notes["fasttreeshap"] = (f"does not import with numpy {np.__version__}: "
                                 f"{type(error).__name__}: {error}")
    else:
        fast = fasttreeshap.TreeExplainer(booster, algorithm="v2", n_jobs=_cores())
        calls["fasttreeshap_v2"] = lambda X: fast.shap_values(X)
        notes["fasttreeshap_v2"] = {"version": fasttreeshap.__version__}
    return calls, notes


def _shapiq_call(per_class: list, n_features: int) -> Callable:
    def call(X: np.ndarray) -> np.ndarray:
        out = np.zeros((len(X), len(per_class), n_features + 1))
        for k, explainer in enumerate(per_class):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                batch = explainer.explain_X(X)
            for f in range(n_features):
                if (f,) in batch.values:
                    out[:, k, f] = batch.values[(f,)]
            out[:, k, -1] = batch.baseline_value
        return out
    return call


def _shap_layout(values: Any, expected: Any) -> np.ndarray:
    """shap's answer (rows x features x classes, or a list per class in older shap) in
    pred_contribs' layout (rows x classes x features + 1, bias last)."""
    values = np.asarray(values)
    if values.ndim == 3 and values.shape[-1] == np.size(expected):
        values = values.transpose(0, 2, 1)
    elif values.ndim == 2:
        values = values[:, None, :]
    bias = np.broadcast_to(np.reshape(expected, (1, -1, 1)), (len(values), values.shape[1], 1))
    return np.concatenate([values, bias], axis=2)


def measure(depth: int, batches: list[int], anchor_rows: int, anchor_seconds: float,
            rounds: int) -> dict:
    booster, transform = _reference_model(depth)
    largest = max(batches)
    X_all = np.asarray(transform.transform(simulate("immunosep-screening", largest, seed=2)),
                       dtype=np.float64)
    threads = _cores()
    booster.set_param({"nthread": threads})
    first_build_s = _seconds(lambda: TreeShapTables.from_booster(booster))
    builds = [TreeShapTables.from_booster(booster) for _ in range(rounds)]
    tables = builds[-1]
    groups, width = len(tables.bias), tables.n_features + 1
    anchors, notes = _anchors(booster, groups)
    methods = {"tables": tables.shap_values, "tables_one_shot": lambda X: shap_values(booster, X),
               **anchors, "xgboost_margin": lambda X: booster.predict(
                   xgboost.DMatrix(X, missing=np.nan), output_margin=True)}
    by_batch: dict[str, Any] = {}
    largest_run: dict[str, tuple[int, list[float]]] = {}  # anchor: (rows, rows/s per round)
    for rows in batches:
        X = X_all[:rows]
        timed = ["tables", "tables_one_shot", "xgboost_margin"] + [
            name for name in anchors if rows <= anchor_rows and (
                name not in largest_run or rows / statistics.median(largest_run[name][1])
                <= anchor_seconds)]
        seconds: dict[str, list[float]] = {m: [] for m in timed}
        for _ in range(rounds):
            for name in timed:
                seconds[name].append(_seconds(lambda name=name, X=X: methods[name](X)))
        speed = {name: [rows / t for t in s] for name, s in seconds.items()}
        result: dict[str, Any] = {"rows_per_s": {
            name: round(statistics.median(v)) for name, v in speed.items()}}
        ran = [name for name in anchors if name in seconds]
        largest_run.update({name: (rows, speed[name]) for name in ran})
        if "xgboost_pred_contribs" in ran:
            reference = anchors["xgboost_pred_contribs"](X)
            scale = max(1.0, float(np.abs(reference.sum(axis=2)).max()))
            errors = {"tables": float(np.abs(tables.shap_values(X) - reference).max())}
            for name in ran[1:]:
                errors[name] = float(np.abs(methods[name](X[:1000]) - reference[:1000]).max())
            result["max_abs_difference_from_pred_contribs"] = errors
            result["difference_over_bar"] = errors["tables"] / (TOLERANCE * scale)

        def ratio(ours: list[float], theirs: list[float]) -> float:
            return round(statistics.median(a / b for a, b in zip(ours, theirs, strict=True)), 1)

        result["speedup"] = {name: ratio(speed["tables"], largest_run[name][1])
                             for name in largest_run}
        result["speedup_one_shot"] = {name: ratio(speed["tables_one_shot"], speed[name])
                                      for name in ran}
        result["anchors_measured_on_rows"] = {name: n for name, (n, _) in largest_run.items()
                                              if n != rows}
        result["tables_vs_margin_prediction"] = ratio(speed["tables"], speed["xgboost_margin"])
        by_batch[str(rows)] = result
    return {
        "model": {"classes": groups, "rounds": booster.num_boosted_rounds(), "depth": depth,
                  "features": width - 1, "trees": len(tables.tree_group),
                  "regions": len(tables.region_width)},
        "threads": threads, "rounds": rounds, "anchors": notes, "batches": by_batch,
        "build_s": {"first_in_process": round(first_build_s, 3),  # includes numba's compile
                    "median": round(statistics.median(t.build_s for t in builds), 3)},
        "memory_bytes": {"tables": tables.nbytes,
                         "per_thread_working": tables.describe()["working_bytes_per_thread"],
                         "output_per_row": 8 * groups * width},
    }


ANCHOR_NAMES = {"xgboost_pred_contribs": "XGBoost `pred_contribs`",
                "shap_tree_explainer": "`shap.TreeExplainer`",
                "shapiq_shapiq": "shapiq TreeSHAP", "shapiq_woodelf": "shapiq Woodelf"}


def markdown_table(results: dict) -> str:
    """The README's table: rows/s per method, depth and batch, the tables' speed-up over each
    anchor (pre-built; one-shot in brackets) and the largest difference from pred_contribs."""
    versions = results["versions"]
    lines = [f"XGBoost {versions['xgboost']}, Python {versions['python']}, numpy "
             f"{versions['numpy']}, shap {versions['shap']}; rows/s, and in the anchors' columns "
             "the tables' speed-up pre-built (one-shot: build + explain)", "",
             "| depth | rows | tables | one-shot | margin only | " + " | ".join(
                 ANCHOR_NAMES.values()) + " | max abs diff |",
             "|---" * (5 + len(ANCHOR_NAMES)) + "|---|"]
    for key in sorted(k for k in results if k.startswith("depth_")):
        depth = results[key]
        for rows, batch in depth["batches"].items():
            speed, cells = batch["rows_per_s"], []
            for name in ANCHOR_NAMES:
                if name not in batch["speedup"]:
                    cells.append("not installed")
                    continue
                cell = f"{batch['speedup'][name]:.0f}x"
                if name in batch["speedup_one_shot"]:
                    cell = f"{speed[name]:,} ({cell}; {batch['speedup_one_shot'][name]:.1f}x)"
                else:
                    cell += f" (vs {batch['anchors_measured_on_rows'][name]:,} rows)"
                cells.append(cell)
            difference = batch.get("max_abs_difference_from_pred_contribs", {}).get("tables")
            lines.append(f"| {depth['model']['depth']} | {int(rows):,} | {speed['tables']:,} | "
                         f"{speed['tables_one_shot']:,} | {speed['xgboost_margin']:,} | "
                         + " | ".join(cells) + " | "
                         + (f"{difference:.1e}" if difference is not None else "") + " |")
    lines.append("")
    lines.append("| depth | trees | regions | build (s) | first build in a process (s) | "
                 "tables' memory (MiB) |")
    lines.append("|---|---|---|---|---|---|")
    for key in sorted(k for k in results if k.startswith("depth_")):
        depth = results[key]
        lines.append(f"| {depth['model']['depth']} | {depth['model']['trees']} | "
                     f"{depth['model']['regions']:,} | {depth['build_s']['median']} | "
                     f"{depth['build_s']['first_in_process']} | "
                     f"{depth['memory_bytes']['tables'] / 2**20:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 6, 8])
    parser.add_argument("--batches", type=int, nargs="+", default=[1000, 4000, 40000, 400000])
    parser.add_argument("--anchor-rows", type=int, default=40_000)
    parser.add_argument("--anchor-seconds", type=float, default=30.0,
                        help="skip an anchor on a batch one call of it would take longer on")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--table-from", type=Path,
                        help="print the README table of a results file and stop")
    args = parser.parse_args()
    if args.table_from:
        print(markdown_table(json.loads(args.table_from.read_text())))
        return
    batches = sorted(args.batches)
    if batches[0] > args.anchor_rows:
        parser.error("the smallest batch must be at most --anchor-rows")
    results: dict[str, Any] = {
        "versions": {"python": platform.python_version(), "xgboost": xgboost.__version__,
                     "numpy": np.__version__, "shap": shap.__version__},
        "code": code_version(), "targets": TARGETS,
        "gpu": "not measured: XGBoost has a GPU TreeSHAP; this machine has no GPU"}
    for depth in args.depths:
        result = measure(depth, batches, args.anchor_rows, args.anchor_seconds,
                         args.rounds)
        results[f"depth_{depth}"] = result
        for rows, batch in result["batches"].items():
            print(f"depth {depth} rows {rows}", batch["rows_per_s"], batch["speedup"],
                  batch["speedup_one_shot"])
        print(f"depth {depth} build", result["build_s"],
              f"tables {result['memory_bytes']['tables'] / 2**20:.1f} MiB", result["anchors"])
    print(write_results("shap_speed", results))
    print(markdown_table(results))


if __name__ == "__main__":
    main()
