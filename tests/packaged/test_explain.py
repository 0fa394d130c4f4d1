"""Fast exact TreeSHAP: the same numbers and layout as XGBoost's pred_contribs on random
models (shapes, depths, repeated features on a path, missing values, ties at thresholds,
binary and multi-class), the exact Shapley values of the path-dependent game, and a stated
fallback to XGBoost for models the tables do not cover. Speed is measured in
benchmarks/shap_speed.py, not here."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
import xgboost

from phenotyper.treeshap import (
    FallbackWarning,
    TreeShapTables,
    UnsupportedBooster,
    XGBoostContributions,
    shap_values,
    tree_explainer,
)


def _data(rows: int, features: int, seed: int, missing: float = 0.15
          ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, features))
    signal = X[:, 0] + X[:, 1 % features] * X[:, -1] + 0.5 * rng.normal(size=rows)
    X[rng.random(X.shape) < missing] = np.nan
    return X, signal


def _train(params: dict, rounds: int, rows: int = 600, features: int = 6, seed: int = 0,
           classes: int = 0, missing: float = 0.15) -> tuple[xgboost.Booster, np.ndarray]:
    X, signal = _data(rows, features, seed, missing)
    if classes:
        label = np.digitize(signal, np.quantile(signal, np.linspace(0, 1, classes + 1)[1:-1]))
    else:
        label = signal
    params = {"nthread": 1, "seed": seed, **params}
    if classes == 2:
        params["objective"] = "binary:logistic"
    elif classes > 2:
        params.update(objective="multi:softprob", num_class=classes)
    booster = xgboost.train(params, xgboost.DMatrix(X, label, missing=np.nan), rounds)
    return booster, X


def _xgboost(booster: xgboost.Booster, X: np.ndarray) -> np.ndarray:
    return booster.predict(xgboost.DMatrix(X, missing=np.nan), pred_contribs=True,
                           strict_shape=True)


def _tolerance(reference: np.ndarray) -> float:
    """The issue's bar: 1e-5 x max(1, the model's output scale), the scale being the largest
    margin the explained rows reach (XGBoost itself sums in float32)."""
    return 1e-5 * max(1.0, float(np.abs(reference.sum(axis=2)).max()))


MODELS = {  # name: (params, rounds, features, classes)
    "regression, depth 1 (stumps)": ({"max_depth": 1}, 30, 4, 0),
    "regression, depth 3": ({"max_depth": 3}, 25, 6, 0),
    "binary, depth 4": ({"max_depth": 4}, 30, 6, 2),
    "three classes, depth 4": ({"max_depth": 4, "eta": 0.3}, 20, 8, 3),
    "four classes, depth 6": ({"max_depth": 6}, 8, 10, 4),
    "depth 6 on two features (repeats on every path)": ({"max_depth": 6}, 15, 2, 2),
    "depth 8 on three features": ({"max_depth": 8, "min_child_weight": 0.1}, 6, 3, 3),
    "unbalanced trees (lossguide, 12 leaves)": (
        {"grow_policy": "lossguide", "max_leaves": 12, "max_depth": 0}, 15, 5, 3),
    "random forest (4 parallel trees)": (
        {"num_parallel_tree": 4, "subsample": 0.7, "colsample_bynode": 0.6, "max_depth": 5},
        3, 6, 3),
    "binary with a set base score": ({"max_depth": 3, "base_score": 0.2}, 10, 5, 2),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_same_numbers_and_layout_as_xgboost(name: str) -> None:
    params, rounds, features, classes = MODELS[name]
    booster, X = _train(params, rounds, features=features, classes=classes)
    ours = shap_values(booster, X)
    reference = _xgboost(booster, X)
    assert ours.shape == reference.shape == (len(X), max(1, classes - (classes == 2)),
                                             features + 1)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=_tolerance(reference))
    # rows the trees send down their default branch only
    nothing = np.full((3, features), np.nan)
    np.testing.assert_allclose(shap_values(booster, nothing), _xgboost(booster, nothing),
                               rtol=0, atol=_tolerance(reference))


def test_values_at_and_next_to_thresholds_go_where_xgboost_sends_them() -> None:
    """Ties: x == threshold goes right, compared in float32 as XGBoost does, also for a
    float64 input that only crosses the threshold once rounded to float32."""
    booster, X = _train({"max_depth": 4}, 20, features=5, classes=3)
    trees = json.loads(booster.save_raw("json"))["learner"]["gradient_booster"]["model"]["trees"]
    thresholds = [(f, t) for tree in trees for f, t, left in zip(
        tree["split_indices"], tree["split_conditions"], tree["left_children"], strict=True)
        if left != -1]
    rng = np.random.default_rng(3)
    rows = []
    for feature, threshold in thresholds[:300]:
        at = np.float32(threshold)
        for value in (at, np.nextafter(at, np.float32(-np.inf)), np.nextafter(at, np.inf),
                      float(at) - 1e-12):
            row = X[rng.integers(len(X))].copy()
            row[feature] = value
            rows.append(row)
    edge = np.array(rows)
    reference = _xgboost(booster, edge)
    np.testing.assert_allclose(shap_values(booster, edge), reference, rtol=0,
                               atol=_tolerance(reference))


def _shapley_by_enumeration(tree: dict, x: np.ndarray) -> np.ndarray:
    """Exact Shapley values of the path-dependent game (TreeSHAP's Algorithm 1: a feature
    outside the coalition is integrated out by the training cover) by enumerating every
    coalition: exponential, independent of the tables."""
    left, right = tree["left_children"], tree["right_children"]
    feature, default_left = tree["split_indices"], tree["default_left"]
    # the float32 numbers the booster holds (its JSON prints each as a shortest decimal)
    condition = np.asarray(tree["split_conditions"], dtype=np.float32).astype(np.float64)
    cover = np.asarray(tree["sum_hessian"], dtype=np.float32).astype(np.float64)

    def expected(node: int, coalition: frozenset) -> float:
        if left[node] == -1:
            return condition[node]
        if feature[node] in coalition:
            value = np.float32(x[feature[node]])
            go_left = bool(default_left[node]) if np.isnan(value) else bool(
                value < np.float32(condition[node]))
            return expected(left[node] if go_left else right[node], coalition)
        return (cover[left[node]] * expected(left[node], coalition)
                + cover[right[node]] * expected(right[node], coalition)) / cover[node]

    n = len(x)
    phi = np.zeros(n)
    for j in range(n):
        others = [k for k in range(n) if k != j]
        for size in range(n):
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for subset in itertools.combinations(others, size):
                coalition = frozenset(subset)
                phi[j] += weight * (expected(0, coalition | {j}) - expected(0, coalition))
    return phi


def test_tables_give_the_exact_shapley_values_of_each_tree() -> None:
    """Against the definition, in float64, where XGBoost's float32 sums cannot blur it."""
    booster, X = _train({"max_depth": 5, "eta": 0.5}, 6, features=4, classes=0, missing=0.3)
    trees = json.loads(booster.save_raw("json"))["learner"]["gradient_booster"]["model"]["trees"]
    explainer = TreeShapTables.from_booster(booster)
    rows = X[:12]
    ours = explainer.shap_values(rows)[:, 0, :-1]
    exact = np.array([sum(_shapley_by_enumeration(tree, x) for tree in trees) for x in rows])
    np.testing.assert_allclose(ours, exact, rtol=0, atol=1e-9)


def test_threads_and_blocks_do_not_change_a_single_number() -> None:
    booster, _ = _train({"max_depth": 4}, 10, features=6, classes=3)
    X, _ = _data(5000, 6, seed=9)  # more rows than one block, split across threads
    one = TreeShapTables.from_booster(booster, threads=1).shap_values(X)
    three = TreeShapTables.from_booster(booster, threads=3).shap_values(X)
    assert np.array_equal(one, three)
    np.testing.assert_array_equal(TreeShapTables.from_booster(booster).shap_values(X[17:18]),
                                  one[17:18])


def test_pruned_trees_with_deleted_nodes() -> None:
    """Pruning after training leaves deleted nodes in the arrays; only what the root reaches
    counts."""
    booster, X = _train({"max_depth": 5}, 10, features=5, classes=3)
    pruned = xgboost.train({"process_type": "update", "updater": "prune", "gamma": 20.0,
                            "max_depth": 5, "objective": "multi:softprob", "num_class": 3},
                           xgboost.DMatrix(X, np.arange(len(X)) % 3, missing=np.nan), 10,
                           xgb_model=booster)
    trees = json.loads(pruned.save_raw("json"))["learner"]["gradient_booster"]["model"]["trees"]
    assert sum(int(t["tree_param"]["num_deleted"]) for t in trees) > 0
    reference = _xgboost(pruned, X)
    np.testing.assert_allclose(shap_values(pruned, X), reference, rtol=0,
                               atol=_tolerance(reference))


def test_extreme_thresholds() -> None:
    """Thresholds beyond int64 and at float32's edge (XGBoost may save one as Infinity)."""
    X, signal = _data(400, 3, seed=5)
    X[:, 1] *= 1e19
    X[:, 2] = np.where(X[:, 2] > 0, np.finfo(np.float32).max, -1.0)
    booster = xgboost.train({"max_depth": 3, "nthread": 1},
                            xgboost.DMatrix(X, signal, missing=np.nan), 10)
    reference = _xgboost(booster, X)
    np.testing.assert_allclose(shap_values(booster, X), reference, rtol=0,
                               atol=_tolerance(reference))


def test_input_forms_and_input_errors() -> None:
    booster, X = _train({"max_depth": 3}, 5, features=4, classes=3)
    explainer = tree_explainer(booster)
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(4)])
    np.testing.assert_array_equal(explainer.shap_values(frame), explainer.shap_values(X))
    assert explainer.shap_values(X[:0]).shape == (0, 3, 5)
    with pytest.raises(ValueError, match=r"shape \(600, 3\).*\(rows, 4\)"):
        explainer.shap_values(X[:, :3])
    bad = X.copy()
    bad[7, 2] = np.inf
    with pytest.raises(ValueError, match=r"X\[7, 2\] is infinite"):
        explainer.shap_values(bad)
    named = xgboost.train({"max_depth": 2}, xgboost.DMatrix(frame, X[:, 0] > 0), 3)
    named_explainer = tree_explainer(named)
    np.testing.assert_array_equal(named_explainer.shap_values(frame),
                                  named_explainer.shap_values(X))
    with pytest.raises(ValueError, match=r"not the booster's features \['f0', 'f1'"):
        named_explainer.shap_values(frame[["f1", "f0", "f2", "f3"]])
    # pandas' nullable floats: NA is missing, as in XGBoost
    np.testing.assert_array_equal(explainer.shap_values(frame.astype("Float64")),
                                  explainer.shap_values(X))
    with pytest.raises(ValueError, match=r"\['f1'\] are not numeric"):
        explainer.shap_values(frame.assign(f1="high"))
    # a fitted scikit-learn estimator is explained through its booster
    regressor = xgboost.XGBRegressor(n_estimators=5, max_depth=2).fit(X, X[:, 0] > 0)
    np.testing.assert_array_equal(shap_values(regressor, X),
                                  shap_values(regressor.get_booster(), X))


def test_a_sparse_matrix_reads_absent_entries_as_missing_as_xgboost_does() -> None:
    from scipy import sparse

    booster, X = _train({"max_depth": 4}, 10, features=6, classes=3, missing=0.0)
    rng = np.random.default_rng(8)
    values = np.where(rng.random(X.shape) < 0.5, 0.0, X)  # half the entries not stored
    matrix = sparse.csr_matrix(values)
    reference = booster.predict(xgboost.DMatrix(matrix), pred_contribs=True, strict_shape=True)
    np.testing.assert_allclose(shap_values(booster, matrix), reference, rtol=0,
                               atol=_tolerance(reference))


def _categorical_booster() -> tuple[xgboost.Booster, pd.DataFrame]:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.normal(size=400),
                          "c": pd.Categorical(rng.choice(list("abcd"), 400))})
    label = frame["x"] + (frame["c"] == "b") * 2.0
    booster = xgboost.train({"max_depth": 3, "nthread": 1},
                            xgboost.DMatrix(frame, label, enable_categorical=True), 5)
    return booster, frame


def test_trees_weighted_by_dropout_are_exact_in_the_tables() -> None:
    """DART's dropout weighs each tree. XGBoost 3.2 stores it as booster 'dart', 3.3 and later
    (which deprecate 'dart' and train it as a gbtree with dropout) as a gbtree with
    `weight_drop`: CI runs this on both, and either way the tables explain it exactly."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # XGBoost >= 3.3 warns that booster='dart' is deprecated
        model, X = _train({"booster": "dart", "max_depth": 3, "rate_drop": 0.3}, 12,
                          features=4, classes=3)
    weights = _tree_weights(model)
    assert not np.allclose(weights, 1.0)  # dropout did weigh the trees: the case is real
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        explainer = tree_explainer(model)
    assert isinstance(explainer, TreeShapTables)
    reference = _xgboost(model, X)
    np.testing.assert_allclose(explainer.shap_values(X), reference, rtol=0,
                               atol=_tolerance(reference))


def _tree_weights(booster: xgboost.Booster) -> np.ndarray:
    gradient = json.loads(booster.save_raw("json"))["learner"]["gradient_booster"]
    return np.asarray(gradient.get("weight_drop") or gradient["model"]["weight_drop"])


def test_models_outside_the_tables_fall_back_to_xgboost_and_say_why() -> None:
    linear, X = _train({"booster": "gblinear"}, 8, features=4, classes=3)
    with pytest.warns(FallbackWarning, match="booster 'gblinear' is not gbtree"):
        explainer = tree_explainer(linear)
    assert isinstance(explainer, XGBoostContributions)
    np.testing.assert_array_equal(explainer.shap_values(X), _xgboost(linear, X))

    categorical, frame = _categorical_booster()
    with pytest.raises(UnsupportedBooster, match="categorical features"):
        TreeShapTables.from_booster(categorical)
    with pytest.warns(FallbackWarning, match="categorical features"):
        values = shap_values(categorical, frame)
    np.testing.assert_array_equal(values, categorical.predict(
        xgboost.DMatrix(frame, enable_categorical=True), pred_contribs=True, strict_shape=True))

    booster, X = _train({"max_depth": 6}, 20, features=6, classes=3)
    with pytest.raises(UnsupportedBooster, match=r"MiB, over the 0 MiB bound"):
        TreeShapTables.from_booster(booster, max_table_bytes=1000)

    vector_leaves, X = _train({"multi_strategy": "multi_output_tree", "tree_method": "hist",
                               "max_depth": 3}, 3, features=4, classes=3)
    with pytest.raises(ValueError, match="neither these tables nor XGBoost's pred_contribs"):
        tree_explainer(vector_leaves)


def test_a_categorical_feature_no_tree_splits_on_still_falls_back() -> None:
    """Its data cannot be read as numbers, so the tables would fail on it: XGBoost reads it."""
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"x": rng.normal(size=300),
                          "c": pd.Categorical(rng.choice(list("ab"), 300))})
    booster = xgboost.train({"max_depth": 2, "nthread": 1},
                            xgboost.DMatrix(frame, frame["x"] * 2, enable_categorical=True), 3)
    with pytest.warns(FallbackWarning, match="categorical features"):
        values = shap_values(booster, frame)
    assert values.shape == (300, 1, 3) and np.all(values[:, 0, 1] == 0)


def test_tables_filled_by_several_threads_equal_one_threads() -> None:
    """The fill splits the leaves between threads only where a region ends, so every cell is
    summed by one thread in the same order: the same tables to the bit."""
    booster, X = _train({"max_depth": 5}, 60, features=8, classes=3)
    one = TreeShapTables.from_booster(booster, threads=1)
    two = TreeShapTables.from_booster(booster, threads=2)
    trees = json.loads(booster.save_raw("json"))["learner"]["gradient_booster"]["model"]["trees"]
    assert sum(tree["left_children"].count(-1) for tree in trees) > 2 * 1024  # split in two
    np.testing.assert_array_equal(one.values, two.values)
    np.testing.assert_allclose(two.shap_values(X), _xgboost(booster, X), rtol=0,
                               atol=_tolerance(_xgboost(booster, X)))


def test_reported_size_and_build_time() -> None:
    booster, _ = _train({"max_depth": 4}, 30, features=8, classes=3)
    explainer = TreeShapTables.from_booster(booster)
    facts = explainer.describe()
    assert facts["trees"] == 90 and facts["table_bytes"] == explainer.nbytes
    # at most 2**8 rows of at most 8 features per region, 2 regions per depth-4 tree
    assert explainer.values.nbytes <= 90 * 2 * 2**8 * 8 * 8
    assert 0 < facts["build_s"] < 60


_CACHE_PROBE = """
import json, sys
import numpy as np, xgboost
from phenotyper import treeshap as explain
rng = np.random.default_rng(0)
X = rng.normal(size=(200, 4))
booster = xgboost.train({"max_depth": 3, "nthread": 1}, xgboost.DMatrix(X, X[:, 0]), 5)
values = explain.shap_values(booster, X)
kernels = (explain._lay_out, explain._fill_tables, explain._explain_rows)
print(json.dumps({"folder": str(explain.kernel_cache_dir()),
                  "hits": sum(sum(k.stats.cache_hits.values()) for k in kernels),
                  "misses": sum(sum(k.stats.cache_misses.values()) for k in kernels),
                  "sum": float(values.sum())}))
"""


def _probe_kernel_cache(cache_home) -> dict:
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _CACHE_PROBE], capture_output=True, text=True,
                          env={**os.environ, "XDG_CACHE_HOME": str(cache_home)}, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_compiled_kernels_are_cached_for_the_user_and_a_bad_entry_is_ignored(tmp_path) -> None:
    """A second process loads the kernels instead of compiling them; a corrupt entry is
    recompiled, not an error; a folder others can write to is not used (numba reads entries
    with pickle)."""
    first = _probe_kernel_cache(tmp_path)
    folder = tmp_path / "phenotyper" / first["folder"].rsplit("/", 1)[-1]
    assert first["folder"] == str(folder) and first["misses"] == 3 and first["hits"] == 0
    assert (folder.stat().st_mode & 0o777) == 0o700
    entries = sorted(folder.iterdir())
    assert any(p.suffix == ".nbc" for p in entries)

    second = _probe_kernel_cache(tmp_path)
    assert (second["hits"], second["misses"]) == (3, 0)
    assert second["sum"] == first["sum"]

    for entry in entries:
        entry.write_bytes(b"not a numba cache entry \x00\xff" * 7)
    corrupt = _probe_kernel_cache(tmp_path)
    assert corrupt["misses"] == 3 and corrupt["sum"] == first["sum"]
    assert _probe_kernel_cache(tmp_path)["hits"] == 3  # the bad entries were replaced

    folder.chmod(0o777)
    shared = _probe_kernel_cache(tmp_path)
    assert shared["folder"] == "None" and shared["hits"] == 0 and shared["sum"] == first["sum"]
