"""Exact SHAP for XGBoost tree models, fast enough for cohorts, and the SHAP plots people
look at.

`shap_values(booster, X)` gives the same numbers, in the same layout, as XGBoost's
`pred_contribs` (path-dependent TreeSHAP: rows x groups x features+1, bias last), typically
two orders of magnitude faster. Why it can: within one leaf's path, a feature's contribution depends
only on which of the path's conditions the row satisfies. So a region of a tree (a small subtree
with the split directions of its ancestors) is compiled once into a table indexed by the
direction bits of its split nodes; explaining a row is then a few comparisons, an index and a
handful of table reads per region, done for a block of rows at a time while the tree's tables
sit in cache. The tables are plain float64 arrays, laid out and filled by compiled kernels
from the arrays of the booster's binary (UBJSON) model: about 60 ms for 900 depth-4 trees,
0.12 s at depth 6 (2 cores). Their size is bounded (`max_table_bytes`) and reported.

DART's dropout weights scale each tree's leaves. Models outside what the tables cover
(categorical features, linear boosters, several targets, tables over the memory bound) get
XGBoost's own `pred_contribs`, with a warning that says why: slower, never wrong. Vector-leaf
models, which XGBoost cannot explain either, get an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import os
import struct
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from numba import njit
from numba.core.caching import (
    CompileResultCacheImpl,
    FunctionCache,
    _CacheLocator,
    _SourceFileBackedLocatorMixin,
)

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
        model = _ubjson(booster.save_raw("ubj"))["learner"]
        n_features = int(model["learner_model_param"]["num_feature"])
        trees, groups = _supported_trees(model, booster.feature_types)
        arrays, leaves, table_size = _layout(trees, n_features, max_region_bits)
        table_bytes = 8 * table_size
        if table_bytes > max_table_bytes:
            raise UnsupportedBooster(
                f"its TreeSHAP tables would take {table_bytes / 2**20:,.0f} MiB, over the "
                f"{max_table_bytes / 2**20:,.0f} MiB bound (trees this deep are better served "
                "by XGBoost's own algorithm)")
        values = np.zeros(table_size)
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
    return {**tree, "split_conditions": conditions}


def _as_booster(model: Any) -> Any:
    """The Booster itself, from a Booster or a fitted XGBoost scikit-learn estimator."""
    return model.get_booster() if hasattr(model, "get_booster") else model


def _ubjson(raw: bytes | bytearray) -> Any:
    """Decode XGBoost's UBJSON model (`save_raw("ubj")`): typed arrays become numpy arrays
    without a Python object per element, which makes it several times faster to read than
    the JSON text (no UBJSON library returns arrays)."""
    raw = bytes(raw)
    int64 = _UBJ_SCALARS[ord("L")]

    def length_at(at: int) -> tuple[int, int]:
        if raw[at] == _INT64:  # what XGBoost writes for every length: one call saved each
            return int64.unpack_from(raw, at + 1)[0], at + 9
        return value_at(at)

    def value_at(at: int, marker: int = 0) -> tuple[Any, int]:
        if not marker:
            marker, at = raw[at], at + 1
        if marker in _UBJ_SCALARS:
            number = _UBJ_SCALARS[marker]
            return number.unpack_from(raw, at)[0], at + number.size
        if marker == _S:
            size, at = length_at(at)
            return raw[at:at + size].decode(), at + size
        if marker == _OBJECT:
            found = {}
            while raw[at] != _OBJECT_END:
                size, at = length_at(at)
                key = raw[at:at + size].decode()
                found[key], at = value_at(at + size)
            return found, at + 1
        if marker == _ARRAY:
            kind = 0
            if raw[at] == _TYPED:
                kind, at = raw[at + 1], at + 2
            if raw[at] != _COUNTED:
                items = []
                while raw[at] != _ARRAY_END:
                    item, at = value_at(at)
                    items.append(item)
                return items, at + 1
            count, at = length_at(at + 1)
            if kind in _UBJ_SCALARS:
                dtype = _UBJ_ARRAYS[kind]
                return np.frombuffer(raw, dtype, count, at), at + count * dtype.itemsize
            items = []
            for _ in range(count):
                item, at = value_at(at, kind)
                items.append(item)
            return items, at
        if marker in _UBJ_CONSTANTS:
            return _UBJ_CONSTANTS[marker], at
        raise ValueError(f"unknown UBJSON marker {chr(marker)!r} at byte {at - 1}")

    return value_at(0)[0]


_UBJ_FORMATS = {"i": "b", "U": "B", "I": ">h", "l": ">i", "L": ">q", "d": ">f", "D": ">d"}
_UBJ_SCALARS = {ord(marker): struct.Struct(code) for marker, code in _UBJ_FORMATS.items()}
_UBJ_ARRAYS = {ord(marker): np.dtype(code) for marker, code in _UBJ_FORMATS.items()}
_UBJ_CONSTANTS = {ord("T"): True, ord("F"): False, ord("Z"): None}
_S, _OBJECT, _OBJECT_END, _ARRAY, _ARRAY_END, _TYPED, _COUNTED, _INT64 = b"S{}[]$#L"
_TREE_ARRAYS = (("left_children", np.int64), ("right_children", np.int64),
                ("split_indices", np.int64), ("split_conditions", np.float32),
                ("default_left", np.bool_), ("sum_hessian", np.float64))
# What `_lay_out` counts, in the order it returns the counts...
_COUNTS = ("splits", "regions", "region_bits", "slots", "leaves", "steps", "table")
# ...and the arrays it writes, with the count each one's length is ("trees" is trees + 1).
_LAYOUT_ARRAYS = (("node_feature", np.int64, "splits"), ("node_threshold", np.float32, "splits"),
                  ("node_default_left", np.bool_, "splits"),
                  ("tree_region_start", np.int64, "trees"),
                  ("region_bit_start", np.int64, "regions"),
                  ("region_bit_count", np.int64, "regions"),
                  ("region_bit_node", np.int64, "region_bits"),
                  ("region_slot_start", np.int64, "regions"),
                  ("region_width", np.int64, "regions"),
                  ("region_slot_feature", np.int64, "slots"),
                  ("region_table_start", np.int64, "regions"))
_LEAF_ARRAYS = (("leaf_region", np.int64, "leaves"), ("leaf_value", np.float64, "leaves"),
                ("leaf_path_start", np.int64, "leaves"), ("leaf_path_count", np.int64, "leaves"),
                ("path_bit", np.int64, "steps"), ("path_left", np.bool_, "steps"),
                ("path_slot", np.int64, "steps"), ("path_ratio", np.float64, "steps"))


def _layout(trees: list[dict], n_features: int, max_region_bits: int
            ) -> tuple[dict[str, np.ndarray], tuple[np.ndarray, ...], int]:
    """The tables' index arrays, the leaves' arrays for the fill, and the table size."""
    starts = np.zeros(len(trees) + 1, np.int64)
    starts[1:] = np.cumsum([len(tree["left_children"]) for tree in trees])
    flat = [np.concatenate([np.asarray(tree[name]).astype(dtype, copy=False) for tree in trees]
                           or [np.empty(0, dtype)])
            for name, dtype in _TREE_ARRAYS]
    named = (*_LAYOUT_ARRAYS, *_LEAF_ARRAYS)
    nothing = [np.empty(0, dtype) for _, dtype, _ in named]
    counts = dict(zip(_COUNTS, _lay_out(starts, *flat, max_region_bits, n_features, False,
                                        *nothing), strict=True))
    counts["trees"] = len(trees) + 1
    arrays = [np.empty(counts[count], dtype) for _, dtype, count in named]
    _lay_out(starts, *flat, max_region_bits, n_features, True, *arrays)
    layout = {name: array for (name, _, _), array in zip(_LAYOUT_ARRAYS, arrays, strict=False)}
    return layout, tuple(arrays[len(_LAYOUT_ARRAYS):]), int(counts["table"])


@njit(nogil=True, cache=False)
def _lay_out(tree_node_start, left, right, split_index, split_condition, default_left, cover,
             max_region_bits, n_features, fill, node_feature, node_threshold,
             node_default_left, tree_region_start, region_bit_start, region_bit_count,
             region_bit_node, region_slot_start, region_width, region_slot_feature,
             region_table_start, leaf_region, leaf_value, leaf_path_start, leaf_path_count,
             path_bit, path_left, path_slot, path_ratio):  # pragma: no cover - compiled
    """Cut every tree into regions and list each leaf's path (see TreeShapTables): run with
    `fill` False to count what the arrays need, then with it True, on arrays of those sizes,
    to write them. Only nodes the root reaches count (pruning leaves deleted ones behind).

    A region is the largest subtree whose split nodes plus its ancestors number at most
    `max_region_bits` (a leaf on its own if none is that small); its table is indexed by the
    directions at those nodes and holds its leaves' summed contributions to its features.
    Returns the counts `_COUNTS` names.
    """
    widest = 1
    for t in range(len(tree_node_start) - 1):
        widest = max(widest, tree_node_start[t + 1] - tree_node_start[t])
    stack = np.empty(widest, np.int64)
    inner = np.empty(widest, np.int64)
    order = np.empty(widest, np.int64)
    parent = np.empty(widest, np.int64)
    depth = np.empty(widest, np.int64)
    splits_below = np.empty(widest, np.int64)
    position = np.empty(widest, np.int64)
    bit_of = np.empty(widest, np.int64)
    bits = np.empty(widest, np.int64)
    ancestors = np.empty(widest, np.int64)
    slot_of = np.full(n_features, -1, np.int64)
    features = np.empty(n_features, np.int64)
    nodes = regions = region_bits = slots = leaves = steps = table_size = 0
    for t in range(len(tree_node_start) - 1):
        base = tree_node_start[t]
        if fill:
            tree_region_start[t] = regions
        reached = 0
        stack[0], parent[0], depth[0] = 0, -1, 0
        top = 1
        while top:  # preorder, left first: split nodes get their positions in this order
            top -= 1
            q = stack[top]
            order[reached] = q
            reached += 1
            if left[base + q] != -1:
                position[q] = nodes
                if fill:
                    node_feature[nodes] = split_index[base + q]
                    node_threshold[nodes] = split_condition[base + q]
                    node_default_left[nodes] = default_left[base + q]
                nodes += 1
                for child in (right[base + q], left[base + q]):
                    parent[child], depth[child] = q, depth[q] + 1
                    stack[top] = child
                    top += 1
        for i in range(reached - 1, -1, -1):
            q = order[i]
            splits_below[q] = 0 if left[base + q] == -1 else (
                1 + splits_below[left[base + q]] + splits_below[right[base + q]])
        stack[0] = 0
        top = 1
        while top:
            top -= 1
            root = stack[top]
            if splits_below[root] and depth[root] + splits_below[root] > max_region_bits:
                stack[top] = right[base + root]
                stack[top + 1] = left[base + root]
                top += 2
                continue
            if depth[root] == 0 and splits_below[root] == 0:
                continue  # a tree that is a single leaf: only the bias
            count = depth[root]
            a = root
            for i in range(count):
                a = parent[a]
                ancestors[count - 1 - i] = a
            for i in range(count):
                bits[i] = ancestors[i]
            inner[0] = root
            below = 1
            while below:  # the region's split nodes in preorder
                below -= 1
                q = inner[below]
                if left[base + q] != -1:
                    bits[count] = q
                    count += 1
                    inner[below] = right[base + q]
                    inner[below + 1] = left[base + q]
                    below += 2
            width = 0
            for b in range(count):
                bit_of[bits[b]] = b
                f = split_index[base + bits[b]]
                if slot_of[f] == -1:
                    slot_of[f] = width
                    features[width] = f
                    width += 1
            if fill:
                region_bit_start[regions] = region_bits
                region_bit_count[regions] = count
                region_slot_start[regions] = slots
                region_width[regions] = width
                region_table_start[regions] = table_size
                for b in range(count):
                    region_bit_node[region_bits + b] = position[bits[b]]
                for s in range(width):
                    region_slot_feature[slots + s] = features[s]
            region_bits += count
            slots += width
            table_size += (1 << count) * width
            inner[0] = root
            below = 1
            while below:  # the region's leaves, left first, each with its path from the root
                below -= 1
                q = inner[below]
                if left[base + q] != -1:
                    inner[below] = right[base + q]
                    inner[below + 1] = left[base + q]
                    below += 2
                    continue
                length = depth[q]
                if fill:
                    leaf_region[leaves] = regions
                    leaf_value[leaves] = split_condition[base + q]  # a leaf's value lives here
                    leaf_path_start[leaves] = steps
                    leaf_path_count[leaves] = length
                    child = q
                    for i in range(length):
                        node = parent[child]
                        p = steps + length - 1 - i
                        path_bit[p] = bit_of[node]
                        path_left[p] = left[base + node] == child
                        path_slot[p] = slot_of[split_index[base + node]]
                        # the share of training cover that follows this branch (sum_hessian)
                        share = cover[base + node]
                        path_ratio[p] = cover[base + child] / share if share > 0 else 0.0
                        child = node
                leaves += 1
                steps += length
            for s in range(width):
                slot_of[features[s]] = -1
            regions += 1
    if fill:
        tree_region_start[len(tree_node_start) - 1] = regions
    return nodes, regions, region_bits, slots, leaves, steps, table_size


def _region_aligned_spans(leaf_region: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """Up to `parts` ranges of leaves, of about equal size, that split only between regions:
    the leaves of one region add into one table, so no two threads ever write the same cell.
    Leaves are stored region by region (`_lay_out`), so `leaf_region` is sorted."""
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
    others = np.empty(65)
    step_unique = np.empty(64, np.int64)  # which of `unique` each step of the path tests
    step_at_bit = np.empty(64, np.int64)  # the path step (if any) that tests each region bit
    missed = np.empty(64, np.int64)  # per unique feature: its steps the combination misses
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
            step_unique[p - first] = j
        weight = np.empty(m)
        for s in range(m):
            weight[s] = math.exp(math.lgamma(s + 1) + math.lgamma(m - s) - math.lgamma(m + 1))
        by_pattern = np.empty((1 << m, m))
        for pattern in range(1 << m):
            # e[k]: elementary symmetric sums of the satisfied features' zero fractions
            e[0] = 1.0
            satisfied = 0
            for k in range(m):
                if (pattern >> k) & 1:
                    satisfied += 1
                    e[satisfied] = 0.0
                    for d in range(satisfied, 0, -1):
                        e[d] += z[k] * e[d - 1]
            for j in range(m):
                if (pattern >> j) & 1:  # the others' sums: e divided by (1 + z_j x)
                    others[0] = 1.0
                    for d in range(1, satisfied):
                        others[d] = e[d] - z[j] * others[d - 1]
                    count_others = satisfied - 1
                    one = 1.0
                else:
                    for d in range(satisfied + 1):
                        others[d] = e[d]
                    count_others = satisfied
                    one = 0.0
                unsatisfied = 1.0
                for k in range(m):
                    if k != j and not (pattern >> k) & 1:
                        unsatisfied *= z[k]
                total = 0.0
                for s in range(count_others + 1):
                    total += weight[s] * others[count_others - s]
                by_pattern[pattern, j] = leaf_value[leaf] * (one - z[j]) * total * unsatisfied
        # Every combination of the region's bits, in Gray-code order: one bit flips per
        # step, so the pattern follows from the step that tests it (if any) in O(1).
        region = leaf_region[leaf]
        width = region_width[region]
        n_bits = region_bit_count[region]
        step_at_bit[:n_bits] = -1
        pattern = (1 << m) - 1
        for u in range(m):
            missed[u] = 0
        for p in range(first, first + count):
            step_at_bit[path_bit[p]] = p
            if path_left[p]:  # all bits 0: every branch to the right is taken
                missed[step_unique[p - first]] += 1
                pattern &= ~(1 << step_unique[p - first])
        bits = 0
        for g in range(1 << n_bits):
            if g:
                flip = 0
                while not (g >> flip) & 1:
                    flip += 1
                bits ^= 1 << flip
                p = step_at_bit[flip]
                if p >= 0:
                    u = step_unique[p - first]
                    missed[u] += 1 if ((bits >> flip) & 1) != path_left[p] else -1
                    if missed[u]:
                        pattern &= ~(1 << u)
                    else:
                        pattern |= 1 << u
            row = region_table_start[region] + bits * width
            for j in range(m):
                values[row + unique[j]] += by_pattern[pattern, j]


@njit(nogil=True, cache=False)
def _explain_rows(X, lo, hi, tree_group, tree_region_start, node_feature, node_threshold,
                  node_default_left, region_bit_start, region_bit_count, region_bit_node,
                  region_slot_start, region_width, region_slot_feature, region_table_start,
                  values, bias, out, block):  # pragma: no cover - compiled
    """SHAP of rows lo..hi into out, `block` rows at a time: trees outer, rows inner, so a
    tree's tables stay in cache and the inner loops vectorise across rows.

    A region's table index starts with its ancestors' direction bits, which the previous
    region of the tree often shares (siblings have the same ancestors): `partial[b]` holds
    the index from the first b bits, so only the bits after the shared ones are compared.
    """
    n_features = X.shape[1]
    groups = out.shape[1]
    most_bits = 0
    for r in range(region_bit_count.shape[0]):
        most_bits = max(most_bits, region_bit_count[r])
    columns = np.empty((n_features, block), np.float32)
    total = np.empty((groups, n_features, block))
    partial = np.zeros((most_bits + 1, block), np.int64)
    offset = np.empty(block, np.int64)
    read = np.empty(block)
    for start in range(lo, hi, block):
        rows = min(block, hi - start)
        for f in range(n_features):
            for i in range(rows):
                columns[f, i] = X[start + i, f]
        total[:] = 0.0
        for t in range(tree_group.shape[0]):
            k = tree_group[t]
            previous = -1
            for r in range(tree_region_start[t], tree_region_start[t + 1]):
                first_bit, count = region_bit_start[r], region_bit_count[r]
                shared = 0
                if previous >= 0:
                    limit = min(count, region_bit_count[previous])
                    while shared < limit and region_bit_node[first_bit + shared] == \
                            region_bit_node[region_bit_start[previous] + shared]:
                        shared += 1
                previous = r
                for b in range(shared, count):
                    q = region_bit_node[first_bit + b]
                    f = node_feature[q]
                    threshold = node_threshold[q]
                    default_left = node_default_left[q]
                    before, after = partial[b], partial[b + 1]
                    for i in range(rows):
                        x = columns[f, i]
                        goes_left = (x < threshold) | (default_left & (x != x))
                        after[i] = before[i] | (np.int64(goes_left) << b)
                width = region_width[r]
                index = partial[count]
                for i in range(rows):
                    offset[i] = region_table_start[r] + index[i] * width
                first_slot = region_slot_start[r]
                for s in range(width):
                    for i in range(rows):  # the gather alone, so the sum below vectorises
                        read[i] = values[offset[i] + s]
                    into = total[k, region_slot_feature[first_slot + s]]
                    for i in range(rows):
                        into[i] += read[i]
        for i in range(rows):
            for k in range(groups):
                for f in range(n_features):
                    out[start + i, k, f] = total[k, f, i]
                out[start + i, k, n_features] = bias[k]


# --- the compiled kernels' cache ------------------------------------------------------------
# Compiling the three kernels takes seconds, more than a small scoring job's own work. They are
# cached under the user's cache folder (never in a model artifact), one folder per phenotyper
# version; numba keys each entry by its version, the source's hash and the CPU. numba reads an
# entry with pickle, so the folder is used only if it is the user's alone, and an entry that
# cannot be read is ignored (the kernel compiles, as without a cache).


# Compiled kernels belong to this file's exact source: a changed kernel gets a new folder.
_SOURCE_DIGEST = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def kernel_cache_dir() -> Path | None:
    """Where compiled kernels are kept, or None (compile in memory) where that folder is not
    the user's own and closed to others."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "phenotyper"
    path = root / f"kernels-{_SOURCE_DIGEST}"
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        folders = [root.stat(), path.stat()]
    except OSError:
        return None
    if any(s.st_uid != os.getuid() or s.st_mode & 0o022 for s in folders):
        return None
    return path


class _UserCacheLocator(_SourceFileBackedLocatorMixin, _CacheLocator):
    def __init__(self, py_func: Any, py_file: str) -> None:
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno

    def get_cache_path(self) -> str:
        return str(_KERNEL_CACHE_DIR)

    @classmethod
    def from_function(cls, py_func: Any, py_file: str) -> _UserCacheLocator:
        return cls(py_func, py_file)


class _UserCacheImpl(CompileResultCacheImpl):
    _locator_classes: ClassVar[list] = [_UserCacheLocator]


class _KernelCache(FunctionCache):
    """numba's cache in the user's folder; an unreadable entry is a miss, not an error."""

    _impl_class = _UserCacheImpl

    def load_overload(self, sig: Any, target_context: Any) -> Any:
        try:
            return super().load_overload(sig, target_context)
        except Exception:  # corrupt, truncated or foreign: start an empty index, compile
            with contextlib.suppress(Exception):
                self.flush()
            return None

    def save_overload(self, sig: Any, data: Any) -> None:
        try:
            super().save_overload(sig, data)
        except Exception:  # a full disk must not stop an explanation
            return


_KERNEL_CACHE_DIR = kernel_cache_dir()
if _KERNEL_CACHE_DIR is not None:
    for _kernel in (_lay_out, _fill_tables, _explain_rows):
        _kernel._cache = _KernelCache(_kernel.py_func)  # what njit(cache=True) sets
