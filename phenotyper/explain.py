"""Exact SHAP for XGBoost tree models, fast enough for cohorts, and the SHAP plots people
look at.

`shap_values(booster, X)` gives the same numbers, in the same layout, as XGBoost's
`pred_contribs` (path-dependent TreeSHAP: rows x groups x features+1, bias last), typically
two orders of magnitude faster. Why it can: within one leaf's path, a feature's contribution depends
only on which of the path's conditions the row satisfies. So a region of a tree (a small subtree
with the split directions of its ancestors) is compiled once into a table indexed by the
direction bits of its split nodes; explaining a row is then a few comparisons, an index and a
handful of table reads per region, done for a block of rows at a time while the tree's tables
sit in cache. The tables are plain float64 arrays built from the booster's own JSON in well
under a second for a few hundred trees; their size is bounded (`max_table_bytes`) and reported.

DART's dropout weights scale each tree's leaves. Models outside what the tables cover
(categorical features, linear boosters, several targets, tables over the memory bound) get
XGBoost's own `pred_contribs`, with a warning that says why: slower, never wrong. Vector-leaf
models, which XGBoost cannot explain either, get an error.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from numba import njit

if TYPE_CHECKING:
    from phenotyper.packaged import PackagedPhenotyper

MAX_REGION_BITS = 8  # a region's table has at most 2**8 rows unless a lone leaf is deeper
MAX_TABLE_BYTES = 1 << 30
ROW_BLOCK = 2048  # rows explained together while one tree's tables are in cache...
BLOCK_BYTES = 4 << 20  # ...unless a block's sums would outgrow this (wide models)


class UnsupportedBooster(ValueError):
    """The booster is outside what the compiled tables cover; XGBoost's own TreeSHAP is used."""


class FallbackWarning(UserWarning):
    """Explanations come from XGBoost's pred_contribs (slower), and why."""


@dataclass(frozen=True, eq=False)
class TreeShapTables:
    """A booster's TreeSHAP compiled to lookup tables (see the module docstring).

    Per split node: feature, float32 threshold, default direction. Per region: the split nodes
    whose directions index its table, the features it adds to, and where its table starts.
    """

    n_features: int
    bias: np.ndarray  # (groups,), XGBoost's own bias column: base score + trees' expectations
    tree_group: np.ndarray
    tree_region_start: np.ndarray  # regions of tree t: [start[t], start[t + 1])
    node_feature: np.ndarray
    node_threshold: np.ndarray
    node_default_left: np.ndarray
    region_bit_start: np.ndarray
    region_bit_count: np.ndarray
    region_bit_node: np.ndarray
    region_slot_start: np.ndarray
    region_width: np.ndarray
    region_slot_feature: np.ndarray
    region_table_start: np.ndarray
    values: np.ndarray
    build_s: float
    threads: int = 1
    feature_names: tuple[str, ...] | None = None  # the booster's, checked against a frame's

    @property
    def nbytes(self) -> int:
        """Memory held by the tables and their index arrays."""
        return sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray))

    def describe(self) -> dict[str, Any]:
        groups, width = len(self.bias), self.n_features + 1
        block = _block_rows(ROW_BLOCK, groups, width)
        return {"method": "compiled TreeSHAP tables", "trees": len(self.tree_group),
                "regions": len(self.region_width), "table_bytes": self.nbytes,
                "working_bytes_per_thread": block * width * (4 + 8 * groups),
                "build_s": round(self.build_s, 3)}

    @classmethod
    def from_booster(cls, booster: Any, threads: int | None = None,
                     max_region_bits: int = MAX_REGION_BITS,
                     max_table_bytes: int = MAX_TABLE_BYTES) -> TreeShapTables:
        """Compile `booster`; raises UnsupportedBooster (saying why) for models not covered."""
        import xgboost

        started = time.perf_counter()
        booster = _as_booster(booster)
        model = json.loads(booster.save_raw("json"))["learner"]
        n_features = int(model["learner_model_param"]["num_feature"])
        trees, groups = _supported_trees(model, booster.feature_types)
        layout = _Layout()
        for tree in trees:
            layout.add_tree(tree, max_region_bits)
        table_bytes = 8 * layout.table_size
        if table_bytes > max_table_bytes:
            raise UnsupportedBooster(
                f"its TreeSHAP tables would take {table_bytes / 2**20:,.0f} MiB, over the "
                f"{max_table_bytes / 2**20:,.0f} MiB bound (trees this deep are better served "
                "by XGBoost's own algorithm)")
        arrays = layout.arrays()
        values = np.zeros(layout.table_size)
        leaves = layout.leaf_arrays()
        threads = threads or _cores()

        def fill(span: tuple[int, int]) -> None:
            _fill_tables(*leaves, arrays["region_bit_count"], arrays["region_width"],
                         arrays["region_table_start"], values, span[0], span[1])

        spans = _region_aligned_spans(leaves[0], threads)
        if len(spans) == 1:
            fill(spans[0])
        else:
            with ThreadPoolExecutor(len(spans)) as pool:
                list(pool.map(fill, spans))  # the kernel releases the GIL
        nothing = xgboost.DMatrix(np.full((1, n_features), np.nan, dtype=np.float32),
                                  missing=np.nan, feature_names=booster.feature_names)
        bias = booster.predict(nothing, pred_contribs=True, strict_shape=True)[0, :, -1]
        tables = cls(n_features=n_features, bias=np.asarray(bias, dtype=np.float64),
                     tree_group=np.asarray(groups, dtype=np.int64), values=values,
                     build_s=0.0, threads=threads,
                     feature_names=tuple(booster.feature_names or ()) or None, **arrays)
        tables.shap_values(np.full((1, n_features), np.nan))  # compiles the kernel now
        object.__setattr__(tables, "build_s", time.perf_counter() - started)
        return tables

    def shap_values(self, X: Any) -> np.ndarray:
        """Exact SHAP of each row (rows, groups, features + 1), bias last, as pred_contribs.
        A data frame's columns must be the booster's features, in order; an array is read by
        position."""
        if isinstance(X, pd.DataFrame) and self.feature_names and tuple(
                X.columns) != self.feature_names:
            raise ValueError(f"X's columns {list(X.columns)} are not the booster's features "
                             f"{list(self.feature_names)} in that order; select them with "
                             "X[booster.feature_names]")
        X = _dense_float32(X, self.n_features)
        n = len(X)
        out = np.empty((n, len(self.bias), self.n_features + 1))
        arrays = (self.tree_group, self.tree_region_start, self.node_feature,
                  self.node_threshold, self.node_default_left, self.region_bit_start,
                  self.region_bit_count, self.region_bit_node, self.region_slot_start,
                  self.region_width, self.region_slot_feature, self.region_table_start,
                  self.values, self.bias)

        block = _block_rows(n, len(self.bias), self.n_features + 1)

        def explain(rows: tuple[int, int]) -> None:
            _explain_rows(X, rows[0], rows[1], *arrays, out, block)

        chunks = max(1, min(self.threads, math.ceil(n / block)))
        edges = np.linspace(0, n, chunks + 1).astype(int)
        pieces = list(itertools.pairwise(edges))
        if chunks == 1:
            explain(pieces[0])
        else:
            with ThreadPoolExecutor(chunks) as pool:
                list(pool.map(explain, pieces))  # the kernel releases the GIL
        return out


@dataclass(frozen=True, eq=False)
class XGBoostContributions:
    """XGBoost's own pred_contribs, for boosters the tables do not cover."""

    booster: Any
    reason: str
    nbytes: int = 0

    def describe(self) -> dict[str, Any]:
        return {"method": "xgboost pred_contribs", "reason": self.reason}

    def shap_values(self, X: Any) -> np.ndarray:
        import xgboost

        names = None if isinstance(X, pd.DataFrame) else self.booster.feature_names
        matrix = xgboost.DMatrix(X, missing=np.nan, enable_categorical=True,
                                 feature_names=names)  # an array is read by position
        return np.asarray(self.booster.predict(matrix, pred_contribs=True, strict_shape=True),
                          dtype=np.float64)


def tree_explainer(booster: Any, threads: int | None = None
                   ) -> TreeShapTables | XGBoostContributions:
    """The fastest exact explainer for `booster`: compiled tables, or XGBoost's own (warned)."""
    try:
        return TreeShapTables.from_booster(booster, threads=threads)
    except UnsupportedBooster as reason:
        warnings.warn(f"Fast TreeSHAP does not cover this model: {reason}. Using XGBoost's "
                      "pred_contribs instead (same numbers, slower).", FallbackWarning,
                      stacklevel=2)
        return XGBoostContributions(_as_booster(booster), str(reason))


def shap_values(booster: Any, X: Any, threads: int | None = None) -> np.ndarray:
    """Exact path-dependent SHAP values of an XGBoost booster: the numbers and layout of
    `booster.predict(DMatrix(X), pred_contribs=True, strict_shape=True)` (as float64).

    Compiles the booster each call; to explain many batches keep `tree_explainer(booster)`.
    """
    return tree_explainer(booster, threads).shap_values(X)


def _block_rows(rows: int, groups: int, width: int) -> int:
    """Rows per kernel block: ROW_BLOCK, fewer for a small input or a wide model (its per-block
    sums, groups x width float64 per row, stay within BLOCK_BYTES)."""
    return max(1, min(ROW_BLOCK, rows, BLOCK_BYTES // (8 * groups * width + 4 * width)))


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _dense_float32(X: Any, n_features: int) -> np.ndarray:
    """X as XGBoost sees it: C-ordered float32, NaN (or pandas NA, or an entry a sparse matrix
    does not store) missing; infinities refused as XGBoost does."""
    if hasattr(X, "tocoo"):  # scipy sparse
        stored = X.tocoo()
        X = np.full(stored.shape, np.nan, dtype=np.float32)
        X[stored.row, stored.col] = stored.data
    elif isinstance(X, pd.DataFrame):
        text = [str(c) for c, dtype in X.dtypes.items()
                if not (pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype))]
        if text:
            raise ValueError(f"X's columns {text} are not numeric; the tables explain numeric "
                             "features only")
        X = X.to_numpy(dtype=np.float32, na_value=np.nan)
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[1] != n_features:
        raise ValueError(f"X has shape {X.shape}; the booster expects (rows, {n_features})")
    infinite = np.argwhere(np.isinf(X))
    if len(infinite):
        row, column = infinite[0]
        raise ValueError(f"X[{row}, {column}] is infinite; XGBoost refuses infinite values "
                         "(use NaN for a missing value)")
    return X


def _supported_trees(model: dict, feature_types: list[str] | None
                     ) -> tuple[list[dict], list[int]]:
    """The booster's trees and the output group of each, or UnsupportedBooster saying why."""
    booster = model["gradient_booster"]
    # Dropout (DART) weighs each tree's output: XGBoost < 3.3 stores it as booster 'dart'
    # around a gbtree, 3.3 and later as a gbtree with `weight_drop`. SHAP is linear in the
    # leaf values, so a weighted tree is explained as its leaves times the weight.
    weights = booster.get("weight_drop")
    if booster["name"] == "dart":
        booster = booster["gbtree"]
    elif booster["name"] != "gbtree":
        raise UnsupportedBooster(f"booster '{booster['name']}' is not gbtree")
    trees = booster["model"]["trees"]
    weights = booster["model"].get("weight_drop", weights)
    if weights is not None and any(weight != 1.0 for weight in weights):
        trees = [_weighted(tree, weight) for tree, weight in zip(trees, weights, strict=True)]
    if any(int(tree["tree_param"].get("size_leaf_vector", 1)) > 1 for tree in trees):
        raise ValueError("the model has vector leaves (multi_strategy='multi_output_tree'); "
                         "neither these tables nor XGBoost's pred_contribs explain those")
    if int(model["learner_model_param"].get("num_target", 1)) != 1:
        raise UnsupportedBooster("it has more than one regression target")
    if "c" in (feature_types or []) or any(any(tree["split_type"]) for tree in trees):
        raise UnsupportedBooster("it has categorical features")
    return trees, booster["model"]["tree_info"]


def _weighted(tree: dict, weight: float) -> dict:
    """The tree with its leaf values (kept in `split_conditions` at leaves) times `weight`,
    rounded to float32 as XGBoost holds them."""
    leaf = np.asarray(tree["left_children"]) == -1
    conditions = np.asarray(tree["split_conditions"], dtype=np.float32)
    conditions[leaf] *= np.float32(weight)
    return {**tree, "split_conditions": conditions.tolist()}


def _as_booster(model: Any) -> Any:
    """The Booster itself, from a Booster or a fitted XGBoost scikit-learn estimator."""
    return model.get_booster() if hasattr(model, "get_booster") else model


class _Layout:
    """Flat arrays describing every tree's regions, and each leaf's path for the table fill.

    A region is the largest subtree whose split nodes plus its ancestors number at most
    `max_region_bits` (a leaf on its own if none is that small); its table is indexed by the
    directions at those nodes and holds its leaves' summed contributions to its features.
    """

    def __init__(self) -> None:
        self.table_size = 0
        self.columns: dict[str, list] = {name: [] for name in (
            "tree_region_start", "node_feature", "node_threshold", "node_default_left",
            "region_bit_start", "region_bit_count", "region_bit_node", "region_slot_start",
            "region_width", "region_slot_feature", "region_table_start")}
        self.leaves: dict[str, list] = {name: [] for name in (
            "leaf_region", "leaf_value", "leaf_path_start", "leaf_path_count", "path_bit",
            "path_left", "path_slot", "path_ratio")}

    def add_tree(self, tree: dict, max_region_bits: int) -> None:
        left, right = tree["left_children"], tree["right_children"]
        cover = tree["sum_hessian"]
        c = self.columns
        c["tree_region_start"].append(len(c["region_width"]))
        splits = _split_nodes_below(left, right, 0)
        first = len(c["node_feature"])
        position = {node: first + q for q, node in enumerate(splits)}
        c["node_feature"].extend(tree["split_indices"][node] for node in splits)
        c["node_threshold"].extend(tree["split_conditions"][node] for node in splits)
        c["node_default_left"].extend(tree["default_left"][node] for node in splits)
        pending = [(0, [])]  # (node, [(ancestor, went_left), ...])
        while pending:
            node, ancestors = pending.pop()
            inside = _split_nodes_below(left, right, node)
            if inside and len(ancestors) + len(inside) > max_region_bits:
                pending.append((right[node], [*ancestors, (node, False)]))
                pending.append((left[node], [*ancestors, (node, True)]))
                continue
            bit_nodes = [a for a, _ in ancestors] + inside
            if not bit_nodes:
                continue  # a tree that is a single leaf: only the bias
            features = list(dict.fromkeys(tree["split_indices"][q] for q in bit_nodes))
            region = len(c["region_width"])
            c["region_bit_start"].append(len(c["region_bit_node"]))
            c["region_bit_count"].append(len(bit_nodes))
            c["region_bit_node"].extend(position[q] for q in bit_nodes)
            c["region_slot_start"].append(len(c["region_slot_feature"]))
            c["region_width"].append(len(features))
            c["region_slot_feature"].extend(features)
            c["region_table_start"].append(self.table_size)
            self.table_size += (1 << len(bit_nodes)) * len(features)
            bit_of = {q: b for b, q in enumerate(bit_nodes)}
            slot_of = {f: s for s, f in enumerate(features)}
            for leaf, path in _leaf_paths(left, right, node, ancestors):
                self._add_leaf(region, tree, leaf, path, bit_of, slot_of, cover)

    def _add_leaf(self, region: int, tree: dict, leaf: int, path: list, bit_of: dict,
                  slot_of: dict, cover: list) -> None:
        v = self.leaves
        v["leaf_region"].append(region)
        v["leaf_value"].append(tree["split_conditions"][leaf])  # a leaf's value lives here
        v["leaf_path_start"].append(len(v["path_bit"]))
        v["leaf_path_count"].append(len(path))
        children = (tree["right_children"], tree["left_children"])
        for node, went_left in path:
            child = children[went_left][node]
            v["path_bit"].append(bit_of[node])
            v["path_left"].append(went_left)
            v["path_slot"].append(slot_of[tree["split_indices"][node]])
            # the share of training cover that follows this branch (XGBoost's sum_hessian)
            v["path_ratio"].append(cover[child] / cover[node] if cover[node] > 0 else 0.0)

    def arrays(self) -> dict[str, np.ndarray]:
        c = self.columns
        dtypes = {"node_threshold": np.float32, "node_default_left": np.bool_}
        out = {name: np.asarray(values, dtype=dtypes.get(name, np.int64))
               for name, values in c.items()}
        out["tree_region_start"] = np.append(out["tree_region_start"], len(c["region_width"]))
        return out

    def leaf_arrays(self) -> tuple[np.ndarray, ...]:
        v = self.leaves
        return tuple(np.asarray(v[name], dtype=dtype) for name, dtype in (
            ("leaf_region", np.int64), ("leaf_value", np.float64), ("leaf_path_start", np.int64),
            ("leaf_path_count", np.int64), ("path_bit", np.int64), ("path_left", np.bool_),
            ("path_slot", np.int64), ("path_ratio", np.float64)))


def _split_nodes_below(left: list, right: list, node: int) -> list[int]:
    """Split (non-leaf) nodes of the subtree at `node`, parents before children."""
    found, pending = [], [node]
    while pending:
        q = pending.pop()
        if left[q] != -1:
            found.append(q)
            pending.extend((right[q], left[q]))
    return found


def _leaf_paths(left: list, right: list, node: int, ancestors: list) -> list:
    """(leaf, [(split node, went_left), ...] from the root) for each leaf below `node`."""
    found, pending = [], [(node, ancestors)]
    while pending:
        q, path = pending.pop()
        if left[q] == -1:
            found.append((q, path))
        else:
            pending.append((right[q], [*path, (q, False)]))
            pending.append((left[q], [*path, (q, True)]))
    return found


def _region_aligned_spans(leaf_region: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """Up to `parts` ranges of leaves, of about equal size, that split only between regions:
    the leaves of one region add into one table, so no two threads ever write the same cell.
    Leaves are stored region by region (`_Layout.add_tree`), so `leaf_region` is sorted."""
    n = len(leaf_region)
    if parts <= 1 or n < 2 * 1024:
        return [(0, n)]
    cuts = np.searchsorted(leaf_region, leaf_region[np.linspace(0, n, parts + 1).astype(int)[1:-1]])
    edges = np.unique(np.concatenate([[0], cuts, [n]]))
    return list(itertools.pairwise(edges.tolist()))


@njit(nogil=True, cache=False)
def _fill_tables(leaf_region, leaf_value, leaf_path_start, leaf_path_count, path_bit,
                 path_left, path_slot, path_ratio, region_bit_count, region_width,
                 region_table_start, values, lo, hi):  # pragma: no cover - compiled
    """Add the Shapley contributions of leaves lo..hi to their regions' tables, for every
    combination of each region's split directions.

    On a leaf's path with unique features U (m of them), feature j has zero fraction z_j (the
    product of its branches' cover shares) and one fraction o_j (1 if the row takes all of its
    branches, else 0). TreeSHAP's value is
    phi_j = v (o_j - z_j) sum_{S subset of U-j, o_S = 1} |S|!(m-|S|-1)!/m! prod_{U-j-S} z,
    a function of which path features the row satisfies: tabulated per leaf over those 2**m
    patterns, then read for each combination of the region's direction bits.
    """
    unique = np.empty(64, np.int64)  # a path's features: the table bound keeps them < 30
    z = np.empty(64)
    e = np.empty(65)
    for leaf in range(lo, hi):
        first, count = leaf_path_start[leaf], leaf_path_count[leaf]
        m = 0
        for p in range(first, first + count):
            j = -1
            for u in range(m):
                if unique[u] == path_slot[p]:
                    j = u
            if j == -1:
                unique[m] = path_slot[p]
                z[m] = 1.0
                j = m
                m += 1
            z[j] *= path_ratio[p]
        weight = np.empty(m)
        for s in range(m):
            weight[s] = math.exp(math.lgamma(s + 1) + math.lgamma(m - s) - math.lgamma(m + 1))
        by_pattern = np.empty((1 << m, m))
        for pattern in range(1 << m):
            for j in range(m):
                # e[k]: elementary symmetric sums of the satisfied others' zero fractions
                e[0] = 1.0
                for k in range(1, m + 1):
                    e[k] = 0.0
                satisfied = 0
                unsatisfied = 1.0
                for k in range(m):
                    if k == j:
                        continue
                    if (pattern >> k) & 1:
                        satisfied += 1
                        for d in range(satisfied, 0, -1):
                            e[d] += z[k] * e[d - 1]
                    else:
                        unsatisfied *= z[k]
                total = 0.0
                for s in range(satisfied + 1):
                    total += weight[s] * e[satisfied - s]
                one = 1.0 if (pattern >> j) & 1 else 0.0
                by_pattern[pattern, j] = leaf_value[leaf] * (one - z[j]) * total * unsatisfied
        region = leaf_region[leaf]
        width = region_width[region]
        for bits in range(1 << region_bit_count[region]):
            pattern = (1 << m) - 1
            for p in range(first, first + count):
                if ((bits >> path_bit[p]) & 1) != path_left[p]:
                    for u in range(m):
                        if unique[u] == path_slot[p]:
                            pattern &= ~(1 << u)
            row = region_table_start[region] + bits * width
            for j in range(m):
                values[row + unique[j]] += by_pattern[pattern, j]


@njit(nogil=True, cache=False)
def _explain_rows(X, lo, hi, tree_group, tree_region_start, node_feature, node_threshold,
                  node_default_left, region_bit_start, region_bit_count, region_bit_node,
                  region_slot_start, region_width, region_slot_feature, region_table_start,
                  values, bias, out, block):  # pragma: no cover - compiled
    """SHAP of rows lo..hi into out, `block` rows at a time: trees outer, rows inner, so a
    tree's tables stay in cache and the inner loops vectorise across rows."""
    n_features = X.shape[1]
    groups = out.shape[1]
    columns = np.empty((n_features, block), np.float32)
    total = np.empty((groups, n_features, block))
    index = np.empty(block, np.int64)
    for start in range(lo, hi, block):
        rows = min(block, hi - start)
        for f in range(n_features):
            for i in range(rows):
                columns[f, i] = X[start + i, f]
        total[:] = 0.0
        for t in range(tree_group.shape[0]):
            k = tree_group[t]
            for r in range(tree_region_start[t], tree_region_start[t + 1]):
                index[:rows] = 0
                first_bit = region_bit_start[r]
                for b in range(region_bit_count[r]):
                    q = region_bit_node[first_bit + b]
                    f = node_feature[q]
                    threshold = node_threshold[q]
                    default_left = node_default_left[q]
                    for i in range(rows):
                        x = columns[f, i]
                        goes_left = (x < threshold) | (default_left & (x != x))
                        index[i] |= np.int64(goes_left) << b
                width = region_width[r]
                table = region_table_start[r]
                first_slot = region_slot_start[r]
                for s in range(width):
                    f = region_slot_feature[first_slot + s]
                    for i in range(rows):
                        total[k, f, i] += values[table + index[i] * width + s]
        for i in range(rows):
            for k in range(groups):
                for f in range(n_features):
                    out[start + i, k, f] = total[k, f, i]
                out[start + i, k, n_features] = bias[k]


# --- plots ----------------------------------------------------------------------------------

SUMMARY_ROWS = 2000
DPI = 110


def _png() -> bytes:
    """The current pyplot figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    figure = plt.gcf()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _values(model: PackagedPhenotyper, cohort: pd.DataFrame) -> np.ndarray:
    """Feature values as the patient has them (not log-transformed), for the plots' labels."""
    return np.column_stack([
        pd.to_numeric(cohort[f], errors="coerce").to_numpy(dtype=float) if f != "sex"
        else (cohort[f].astype("string") == "M").astype(float).to_numpy()
        for f in model.features]) if len(model.features) else np.empty((len(cohort), 0))


def waterfall_png(model: PackagedPhenotyper, patient: pd.DataFrame,
                  title: str = "", max_display: int = 12) -> bytes:
    """One patient's explanation of the predicted phenotype (softmax logit scale)."""
    import matplotlib.pyplot as plt
    import shap

    scored = model.predict(patient, explain="all").iloc[0]
    if scored["status"] != "ok":
        raise ValueError(f"patient cannot be scored: {scored['status']}")
    label = scored["phenotype"]
    explanation = shap.Explanation(
        values=np.array([scored[f"shap_{label}_{f}"] for f in model.features]),
        base_values=float(scored[f"shap_base_{label}"]),
        data=_values(model, patient)[0], feature_names=list(model.features))
    plt.figure()
    shap.plots.waterfall(explanation, max_display=max_display, show=False)
    plt.gcf().suptitle(title or f"{scored['patient_id']}: {label} "
                       f"(P = {scored['prob_' + label]:.2f}), contributions to its softmax logit")
    return _png()


def cohort_pngs(model: PackagedPhenotyper, cohort: pd.DataFrame, seed: int = 0
                ) -> dict[str, bytes]:
    """A beeswarm per phenotype and a bar plot of mean |SHAP| per feature and phenotype."""
    import matplotlib.pyplot as plt
    import shap

    rows = cohort.sample(min(SUMMARY_ROWS, len(cohort)), random_state=seed)
    contributions, base, status = model.contributions(rows)
    keep = np.array([s == "ok" for s in status])
    contributions, values = contributions[keep], _values(model, rows)[keep]
    pictures = {}
    for k, label in enumerate(model.classes):
        explanation = shap.Explanation(values=contributions[:, k, :],
                                       base_values=np.full(keep.sum(), base[k]), data=values,
                                       feature_names=list(model.features))
        plt.figure()
        shap.plots.beeswarm(explanation, max_display=15, show=False)
        plt.gcf().suptitle(f"SHAP values for {label} (softmax logit)")
        pictures[f"shap_beeswarm_{label}.png"] = _png()
    plt.figure()
    shap.summary_plot([contributions[:, k, :] for k in range(len(model.classes))], values,
                      feature_names=list(model.features), plot_type="bar",
                      class_names=list(model.classes), show=False, max_display=15)
    plt.gcf().suptitle("Mean |SHAP| (softmax logit) per feature and phenotype")
    pictures["shap_summary.png"] = _png()
    return pictures
