"""The packaged phenotyper: a fitted candidate as plain data, scored with exact explanations.

`phenotyper.training.export.export` turns a fitted candidate (logistic or XGBoost pipeline,
optionally
recalibrated) into files that need no pickle: `phenotyper.json` (features, preprocessing,
coefficients, class names, calibration map, rule thresholds, panel ranges) and, for trees,
the booster in XGBoost's own format. `PackagedPhenotyper` reads them back and scores a cohort
with numpy, xgboost and numba only, never scikit-learn (the trees' SHAP tables are compiled
from the booster at load, see treeshap.py); `adapters` holds what differs by model kind.

Every model here is linear in its softmax logits once the features are fixed: the logistic
model exactly, the trees through exact TreeSHAP contributions (XGBoost's numbers), and the
recalibration map is linear in the base logits. So each patient's logit for each phenotype is
exactly `base + sum(contributions)`, one contribution per panel feature.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from phenotyper.contract import (
    AS_MISSING,
    EXPLAIN_MODES,
    LATENT_ENTROPY,
    LATENT_PROB_PREFIX,
    OK,
    REJECTED_VALUES_MODES,
    SET_ASIDE_PREFIX,
    SKIP_ROW,
    is_scored,
)
from phenotyper.immunosep import RULE_MARKERS, immunosep_phenotype
from phenotyper.latent import Mixture, entropy, log_posterior, point_intervals
from phenotyper.packaged.adapters import ADAPTERS
from phenotyper.packaged.format import READABLE_FORMAT_VERSIONS, SPEC_FILE
from phenotyper.panel import PANEL, PATIENT_ID, SEX_ALIASES, SEX_CODE, to_log_scale


class PackagedPhenotyper:
    """Scores cohorts from an exported folder: phenotype, probabilities, rule, explanations."""

    def __init__(self, folder: Path, threads: int = 1) -> None:
        """`threads`: XGBoost threads per call (1 suits a server's many small requests;
        batch scoring uses every core)."""
        folder = Path(folder)
        self.spec = json.loads((folder / SPEC_FILE).read_text())
        if self.spec.get("format_version") not in READABLE_FORMAT_VERSIONS:
            raise ValueError(f"{folder / SPEC_FILE}: format version "
                             f"{self.spec.get('format_version')!r} is newer than this "
                             "phenotyper reads; upgrade phenotyper")
        if self.spec.get("kind") not in ADAPTERS:
            raise ValueError(f"{folder / SPEC_FILE}: unknown model kind "
                             f"{self.spec.get('kind')!r}; upgrade phenotyper")
        self.features: list[str] = self.spec["features"]
        self.classes: list[str] = self.spec["classes"]
        self.adapter = ADAPTERS[self.spec["kind"]](self.spec, folder, threads)
        calibration = self.spec["calibration"]
        self._calibration = None if calibration is None else (
            np.array(calibration["coef"]), np.array(calibration["intercept"]))
        # per-model constants, read once rather than on every request
        self._reads = list(dict.fromkeys([PATIENT_ID, *self.features, *RULE_MARKERS]))
        self._ranges = [tuple(self.spec["ranges"].get(name, [-np.inf, np.inf]))
                        for name in self.features]
        self._logged = [j for j, name in enumerate(self.features)  # sex is coded, not logged
                        if name in self.spec["log_features"] and name != "sex"]
        # a label-free model also carries the latent-class mixture it was distilled from
        self.latent = Mixture.from_dict(self.spec["latent"]) if "latent" in self.spec else None
        self._latent_columns = ([] if self.latent is None else
                                [self.features.index(c) for c in self.latent.columns])

    def output_columns(self) -> list[str]:
        """The latent-class columns of the output (none for a supervised model)."""
        if self.latent is None:
            return []
        return [*(f"{LATENT_PROB_PREFIX}{name}" for name in self.latent.classes), LATENT_ENTROPY]

    def _latent(self, X: np.ndarray, ok: np.ndarray) -> dict[str, np.ndarray]:
        """The mixture's posterior and its entropy per row (NaN where the row is not scored);
        the features are already on the mixture's scale (log lab markers, linear SOFA/age)."""
        low, high = point_intervals(X[:, self._latent_columns])
        proba = np.full((len(X), self.latent.n_classes), np.nan)
        if ok.any():
            proba[ok] = np.exp(log_posterior(self.latent, low[ok], high[ok]))
        names = self.output_columns()
        with np.errstate(invalid="ignore"):
            return {**{name: proba[:, k] for k, name in enumerate(names[:-1])},
                    names[-1]: np.where(ok, entropy(np.nan_to_num(proba)), np.nan)}

    @property
    def explainer(self) -> Any:
        """The tree model's SHAP engine (None for a linear model)."""
        return getattr(self.adapter, "explainer", None)

    @explainer.setter
    def explainer(self, engine: Any) -> None:
        self.adapter.explainer = engine

    @property
    def booster(self) -> Any:
        return getattr(self.adapter, "booster", None)

    # --- features -------------------------------------------------------------------------

    def _matrix(self, cells: dict[str, np.ndarray], n: int, rejected_values: str = SKIP_ROW
                ) -> tuple[np.ndarray, list[str]]:
        """Model features as floats (log where the model logs), and a status per row, from
        the cohort's `_cells`. A rejected value never reaches the model: its row is not
        scored (`skip-row`) or scored with that value missing (`missing`, see contract)."""
        if rejected_values not in REJECTED_VALUES_MODES:
            raise ValueError(f"rejected_values must be one of {REJECTED_VALUES_MODES}, not "
                             f"{rejected_values!r}")
        problems: list[list[str]] = [[] for _ in range(n)]
        X = np.full((n, len(self.features)), np.nan)
        for j, name in enumerate(self.features):
            if name not in cells:
                continue
            column = cells[name]
            if name == "sex":
                X[:, j] = _sex(column, problems)
                continue
            values, text_given = _numbers(column)
            low, high = self._ranges[j]
            with np.errstate(invalid="ignore"):
                bad = text_given | (values < low) | (values > high) | np.isinf(values)
            for row in np.flatnonzero(bad):
                unit = PANEL[name].unit if name in PANEL else ""
                problems[row].append(
                    f"{name} is not a number ({column[row]!r})" if text_given[row]
                    else f"{name}={values[row]:g} is outside {low:g}-{high:g} {unit}")
            X[:, j] = np.where(bad, np.nan, values)
        X[:, self._logged] = to_log_scale(X[:, self._logged])
        prefix = SET_ASIDE_PREFIX if rejected_values == AS_MISSING else ""
        return X, [prefix + "; ".join(found) if found else OK for found in problems]

    # --- logits and contributions -----------------------------------------------------------

    def contributions(self, cohort: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Per-row, per-class logit contributions of each feature (n, K, F), the base (K,),
        and each row's status. Rows whose status is not ok get NaN."""
        return self._contributions(*self._matrix(_cells(cohort, self.features), len(cohort)))

    def _contributions(self, X: np.ndarray, status: list[str]
                       ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        if len(X) == 0:
            return (np.empty((0, len(self.classes), len(self.features))),
                    self._base(), status)
        contributions, base = self.adapter.contributions(X)
        if self._calibration is not None:
            matrix, intercept = self._calibration
            contributions = np.einsum("kj,njf->nkf", matrix, contributions)
            base = matrix @ base + intercept
        bad = np.array([not is_scored(s) for s in status], dtype=bool)
        contributions[bad] = np.nan
        return contributions, base, status

    def describe_explainer(self) -> dict[str, Any]:
        """How the explanations are computed, for manifests and model cards."""
        return self.adapter.describe()

    def _base(self) -> np.ndarray:
        """The logits' base values, for an empty input (no row to read them from)."""
        return self.contributions(pd.DataFrame({f: [np.nan] for f in self.features}))[1]

    def logits(self, cohort: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
        """Per-row softmax logits (n, K) without explanations, and each row's status: the
        booster's margin or the linear map, no TreeSHAP (orders of magnitude cheaper)."""
        return self._logits(*self._matrix(_cells(cohort, self.features), len(cohort)))

    def _logits(self, X: np.ndarray, status: list[str]) -> tuple[np.ndarray, list[str]]:
        if len(X) == 0:
            return np.empty((0, len(self.classes))), status
        logits = self.adapter.logits(X)
        if self._calibration is not None:
            matrix, intercept = self._calibration
            logits = logits @ matrix.T + intercept
        return logits, status

    # --- the contract -----------------------------------------------------------------------

    def predict(self, cohort: pd.DataFrame, explain: str = "predicted",
                rejected_values: str = SKIP_ROW) -> pd.DataFrame:
        """One output row per input row, same order: phenotype, probabilities, the rule's
        answer, a status, and (unless explain='none') SHAP contributions and top drivers.
        `rejected_values`: what a value the range checks refuse does (contract.SKIP_ROW or
        AS_MISSING)."""
        if explain not in EXPLAIN_MODES:
            raise ValueError(f"explain must be one of {EXPLAIN_MODES}, not {explain!r}")
        n = len(cohort)
        cells = _cells(cohort, self._reads)
        X, status = self._matrix(cells, n, rejected_values)
        if explain == "none":
            logits, status = self._logits(X, status)
        else:
            contributions, base, status = self._contributions(X, status)
            logits = contributions.sum(axis=2) + base
        logits = logits - logits.max(axis=1, keepdims=True)
        proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        ok = np.array([is_scored(s) for s in status], dtype=bool)
        predicted = np.where(ok, proba.argmax(axis=1), -1)
        classes = np.array(self.classes, dtype=object)
        rule = self.spec["rule"]
        # the answer is built as one frame from columns: inserting them one by one costs
        # pandas more than the whole model on a one-patient request
        out: dict[str, Any] = {
            PATIENT_ID: cells.get(PATIENT_ID, np.full(n, None)),
            "phenotype": np.where(ok, classes[np.maximum(predicted, 0)], None),
            **{f"prob_{name}": np.where(ok, proba[:, k], np.nan)
               for k, name in enumerate(self.classes)},
            "rule_phenotype": immunosep_phenotype(
                _checked(cells, n, "ferritin_ng_ml"), _checked(cells, n, "hla_dr_mab_per_cell"),
                rule["ferritin_threshold_ng_ml"], rule["hla_dr_threshold_mab_per_cell"]),
            "status": status,
        }
        if self.latent is not None:
            out.update(self._latent(X, ok))
        if explain != "none":
            chosen = contributions[np.arange(n), np.maximum(predicted, 0)]  # (n, F)
            out["shap_base"] = np.where(ok, base[np.maximum(predicted, 0)], np.nan)
            out.update({f"shap_{name}": chosen[:, f] for f, name in enumerate(self.features)})
            if explain == "all":
                for k, label in enumerate(self.classes):
                    out[f"shap_base_{label}"] = np.where(ok, base[k], np.nan)
                    out.update({f"shap_{label}_{name}": contributions[:, k, f]
                                for f, name in enumerate(self.features)})
            out["top_drivers"] = _top_drivers(chosen, cells, self.features, ok)
        return pd.DataFrame(out, index=range(n))


SMALL_REQUEST_ROWS = 8  # up to this many rows: read in one go


def _cells(cohort: pd.DataFrame, names: list[str]) -> dict[str, np.ndarray]:
    """The columns of `names` that `cohort` has, each as a numpy array of its cells: numpy
    dtypes kept (int64 stays int64), other dtypes as objects.

    A request of a few rows (the scoring server's) is read in one go, where pandas'
    per-column cost would dominate; both give the same arrays (tested).
    """
    if len(cohort) > SMALL_REQUEST_ROWS:
        return {name: _array(cohort[name]) for name in names if name in cohort}
    wanted = set(names)
    every = cohort.to_numpy(dtype=object)
    return {name: every[:, j].astype(dtype) if isinstance(dtype, np.dtype) else every[:, j]
            for j, (name, dtype) in enumerate(zip(cohort.columns, cohort.dtypes, strict=True))
            if name in wanted}


def _array(series: pd.Series) -> np.ndarray:
    """A column's cells: its numpy array, or objects for pandas' own dtypes (text, nullable
    numbers), as `DataFrame.to_numpy(dtype=object)` gives them."""
    return (series.to_numpy() if isinstance(series.dtype, np.dtype)
            else series.to_numpy(dtype=object))


def _numbers(column: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A column's cells as floats (NaN where missing or not a number), and where a cell held
    something that is not a number (text to report)."""
    if column.dtype.kind in "iuf":  # already numbers (JSON, Parquet): nothing to parse
        return column.astype(float), np.zeros(len(column), dtype=bool)
    values = np.asarray(pd.to_numeric(column, errors="coerce"), dtype=float)
    return values, ~pd.isna(column) & np.isnan(values)


def _sex(column: np.ndarray, problems: list[list[str]]) -> np.ndarray:
    """M as 1, F as 0 (any spelling of SEX_ALIASES), missing as NaN; a text that is neither
    is NaN and added to that row's problems. Each distinct text is read once."""
    codes, texts = pd.factorize(pd.array(column, dtype="string"))  # missing: code -1
    texts = [str(text).strip() for text in texts]
    sexes = [SEX_ALIASES.get(text.lower()) for text in texts]
    for row in np.flatnonzero(codes >= 0):
        text, sex = texts[codes[row]], sexes[codes[row]]
        if text != "" and sex is None:
            problems[row].append(f"sex {text!r} is not F or M")
    value = np.array([SEX_CODE.get(sex, np.nan) for sex in sexes] + [np.nan])
    return value[codes]


def _checked(cells: dict[str, np.ndarray], n: int, column: str) -> np.ndarray:
    """A marker as numbers, with text, infinite and implausible values as missing: the rule
    must not act on a value the status rejected."""
    if column not in cells:
        return np.full(n, np.nan)
    values, _ = _numbers(cells[column])
    low, high = PANEL[column].low, PANEL[column].high
    with np.errstate(invalid="ignore"):
        return np.where((values >= low) & (values <= high), values, np.nan)


def _top_drivers(chosen: np.ndarray, cells: dict[str, np.ndarray], features: list[str],
                 ok: np.ndarray, count: int = 3) -> np.ndarray:
    """'ferritin_ng_ml=9120.0 (+2.41), platelets_10e9_l=48.0 (+0.93), ...' per row.

    Only the cells that are some row's top driver are read, feature by feature; the text is
    then one f-string per row from Python lists: formatting through pandas' per-element
    string operations cost four times as much and held the GIL the reader thread needs."""
    order = np.argsort(-np.abs(np.nan_to_num(chosen)), axis=1)[:, :count]
    shown = np.full(order.shape, "missing", dtype=object)
    for f in np.unique(order).tolist():
        if features[f] in cells:
            rows, ranks = np.nonzero(order == f)
            column = cells[features[f]][rows]
            given = ~pd.isna(column)
            shown[rows[given], ranks[given]] = [str(v) for v in column[given].tolist()]
    names = np.array(features, dtype=object)[order]
    values = np.take_along_axis(chosen, order, axis=1)
    parts = [[f"{name}={cell} ({value:+.2f})" for name, cell, value in zip(
        names[:, rank].tolist(), shown[:, rank].tolist(), values[:, rank].tolist(), strict=True)]
        for rank in range(order.shape[1])]
    text = np.array([", ".join(row) for row in zip(*parts, strict=True)], dtype=object)
    return np.where(ok, text, "")
