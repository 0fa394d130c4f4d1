"""The packaged phenotyper: a fitted candidate as plain data, scored with exact explanations.

`export` turns a fitted candidate (logistic or XGBoost pipeline, optionally recalibrated) into
files that need no pickle: `phenotyper.json` (features, preprocessing, coefficients, class
names, calibration map, rule thresholds, panel ranges) and, for trees, the booster in XGBoost's
own format. `PackagedPhenotyper` reads them back and scores a cohort with numpy, xgboost and
numba only (the trees' SHAP tables are compiled from the booster at load, see explain.py).

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

from phenotyper.explain import tree_explainer
from phenotyper.models import LINEAR_SCALE_MARKERS, LogitRecalibrated, WeightedXGBClassifier
from phenotyper.panel import PANEL, PATIENT_ID, SEX_ALIASES
from phenotyper.rules import (
    FERRITIN_MALS_NG_ML,
    HLA_DR_IMMUNOPARALYSIS_MAB_PER_CELL,
    immunosep_phenotype,
)

SPEC_FILE, BOOSTER_FILE = "phenotyper.json", "booster.ubj"
FORMAT_VERSION = 1
EXPLAIN_MODES = ("predicted", "all", "none")
OK = "ok"
_LOG_FLOOR = 1e-3  # as models.PanelFeatures


def export(model: Any, folder: Path) -> Path:
    """Write a fitted candidate as plain data into `folder`; returns the spec file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    calibration = None
    if isinstance(model, LogitRecalibrated):
        calibration = {"coef": model.calibrator_.coef_.tolist(),
                       "intercept": model.calibrator_.intercept_.tolist()}
        model = model.base_
    features_step, classifier = model[0], model[-1]
    features = list(features_step.features)
    spec: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "features": features,
        "log_features": [f for f in features if f in PANEL and f not in LINEAR_SCALE_MARKERS],
        "classes": [str(c) for c in classifier.classes_],
        "calibration": calibration,
        "rule": {"ferritin_threshold_ng_ml": FERRITIN_MALS_NG_ML,
                 "hla_dr_threshold_mab_per_cell": HLA_DR_IMMUNOPARALYSIS_MAB_PER_CELL},
        "ranges": {f: [PANEL[f].low, PANEL[f].high] for f in features
                   if f in PANEL and PANEL[f].is_numeric},
    }
    if isinstance(classifier, WeightedXGBClassifier):
        classifier.booster_.get_booster().save_model(str(folder / BOOSTER_FILE))
        spec["kind"] = "xgboost"
        spec["logit_offset"] = (-np.log(classifier.class_weight_)).tolist()
        spec["booster"] = BOOSTER_FILE
    else:
        imputer, scaler = model.named_steps["impute"], model.named_steps["scale"]
        indicator = getattr(imputer, "indicator_", None)
        spec["kind"] = "linear"
        spec["impute_median"] = imputer.statistics_.tolist()
        spec["indicator_of"] = ([] if indicator is None
                                else [int(i) for i in indicator.features_])
        spec["scale_mean"] = scaler.mean_.tolist()
        spec["scale_sd"] = scaler.scale_.tolist()
        spec["coef"] = classifier.coef_.tolist()
        spec["intercept"] = classifier.intercept_.tolist()
    path = folder / SPEC_FILE
    path.write_text(json.dumps(spec, indent=1))
    return path


class PackagedPhenotyper:
    """Scores cohorts from an exported folder: phenotype, probabilities, rule, explanations."""

    def __init__(self, folder: Path, threads: int = 1) -> None:
        """`threads`: XGBoost threads per call (1 suits a server's many small requests;
        batch scoring uses every core)."""
        folder = Path(folder)
        self.spec = json.loads((folder / SPEC_FILE).read_text())
        if self.spec.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{folder / SPEC_FILE}: unsupported format version")
        self.features: list[str] = self.spec["features"]
        self.classes: list[str] = self.spec["classes"]
        self.booster = self.explainer = None
        if self.spec["kind"] == "xgboost":
            import xgboost

            self.booster = xgboost.Booster()
            self.booster.load_model(str(folder / self.spec["booster"]))
            self.booster.set_param({"nthread": threads})
            self.explainer = tree_explainer(self.booster, threads)  # compiled at load

    # --- features -------------------------------------------------------------------------

    def _matrix(self, cohort: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
        """Model features as floats (log where the model logs), and a status per row."""
        n = len(cohort)
        status = [OK] * n
        columns = []
        for name in self.features:
            if name not in cohort:
                columns.append(np.full(n, np.nan))
                continue
            if name == "sex":
                text = cohort[name].astype("string").str.strip()
                sex = text.str.lower().map(SEX_ALIASES)
                unknown = (text.notna() & (text != "") & sex.isna()).to_numpy(dtype=bool)
                for row in np.flatnonzero(unknown):
                    problem = f"sex {text.iloc[row]!r} is not F or M"
                    status[row] = problem if status[row] == OK else f"{status[row]}; {problem}"
                columns.append(np.where(sex == "M", 1.0, np.where(sex == "F", 0.0, np.nan)))
                continue
            raw = cohort[name]
            if pd.api.types.is_numeric_dtype(raw) and not pd.api.types.is_bool_dtype(raw):
                # already numbers (JSON, Parquet): nothing to parse, no text to report
                values = raw.to_numpy(dtype=float, na_value=np.nan)
                text_given = np.zeros(n, dtype=bool)
            else:
                values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=float)
                text_given = raw.notna().to_numpy() & np.isnan(values)
            low, high = self.spec["ranges"].get(name, [-np.inf, np.inf])
            with np.errstate(invalid="ignore"):
                bad = text_given | (values < low) | (values > high) | np.isinf(values)
            for row in np.flatnonzero(bad):
                unit = PANEL[name].unit if name in PANEL else ""
                problem = (f"{name} is not a number ({raw.iloc[row]!r})" if text_given[row]
                           else f"{name}={values[row]:g} is outside {low:g}-{high:g} {unit}")
                status[row] = problem if status[row] == OK else f"{status[row]}; {problem}"
            values = np.where(bad, np.nan, values)  # a rejected value never reaches the model
            if name in self.spec["log_features"]:
                values = np.log(np.clip(values, 0, None) + _LOG_FLOOR)
            columns.append(values)
        return np.column_stack(columns), status

    # --- logits and contributions -----------------------------------------------------------

    def contributions(self, cohort: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Per-row, per-class logit contributions of each feature (n, K, F), the base (K,),
        and each row's status. Rows whose status is not ok get NaN."""
        X, status = self._matrix(cohort)
        if len(X) == 0:
            return (np.empty((0, len(self.classes), len(self.features))),
                    self._base(), status)
        if self.spec["kind"] == "xgboost":
            raw = self.explainer.shap_values(X)  # (n, K, F + 1), bias last
            contributions, base = raw[:, :, :-1], raw[0, :, -1] + np.array(
                self.spec["logit_offset"])
        else:
            contributions, base = self._linear(X)
        calibration = self.spec["calibration"]
        if calibration is not None:
            matrix = np.array(calibration["coef"])
            contributions = np.einsum("kj,njf->nkf", matrix, contributions)
            base = matrix @ base + np.array(calibration["intercept"])
        bad = np.array([s != OK for s in status], dtype=bool)
        contributions[bad] = np.nan
        return contributions, base, status

    def describe_explainer(self) -> dict[str, Any]:
        """How the explanations are computed, for manifests and model cards."""
        if self.explainer is None:
            return {"method": "exact linear contributions (coefficient x standardised value)"}
        return self.explainer.describe()

    def _base(self) -> np.ndarray:
        """The logits' base values, for an empty input (no row to read them from)."""
        return self.contributions(pd.DataFrame({f: [np.nan] for f in self.features}))[1]

    def logits(self, cohort: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
        """Per-row softmax logits (n, K) without explanations, and each row's status: the
        booster's margin or the linear map, no TreeSHAP (orders of magnitude cheaper)."""
        X, status = self._matrix(cohort)
        if len(X) == 0:
            return np.empty((0, len(self.classes))), status
        if self.spec["kind"] == "xgboost":
            import xgboost

            margin = self.booster.predict(xgboost.DMatrix(X, missing=np.nan), output_margin=True)
            logits = (np.asarray(margin).reshape(len(X), len(self.classes))
                      + np.array(self.spec["logit_offset"]))
        else:
            logits = self._standardised(X) @ np.array(self.spec["coef"]).T + np.array(
                self.spec["intercept"])
        calibration = self.spec["calibration"]
        if calibration is not None:
            logits = logits @ np.array(calibration["coef"]).T + np.array(calibration["intercept"])
        return logits, status

    def _standardised(self, X: np.ndarray) -> np.ndarray:
        """The linear model's columns: imputed features, then missing indicators, scaled."""
        spec = self.spec
        missing = np.isnan(X)
        imputed = np.where(missing, np.array(spec["impute_median"]), X)
        indicators = missing[:, spec["indicator_of"]].astype(float)
        columns = np.hstack([imputed, indicators])
        return (columns - np.array(spec["scale_mean"])) / np.array(spec["scale_sd"])

    def _linear(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """coef x standardised value per model column, folded back onto panel features
        (a marker's missing-indicator column counts towards that marker)."""
        standard = self._standardised(X)
        coef = np.array(self.spec["coef"])  # (K, columns)
        width = X.shape[1]
        contributions = standard[:, None, :width] * coef[None, :, :width]
        for position, feature in enumerate(self.spec["indicator_of"]):  # (n, K) at a time
            column = width + position
            contributions[:, :, feature] += standard[:, None, column] * coef[None, :, column]
        return contributions, np.array(self.spec["intercept"])

    def _checked(self, cohort: pd.DataFrame, column: str) -> np.ndarray:
        """A marker as numbers, with text, infinite and implausible values as missing: the
        rule must not act on a value the status rejected."""
        if column not in cohort:
            return np.full(len(cohort), np.nan)
        values = pd.to_numeric(cohort[column], errors="coerce").to_numpy(dtype=float)
        low, high = PANEL[column].low, PANEL[column].high
        with np.errstate(invalid="ignore"):
            return np.where((values >= low) & (values <= high), values, np.nan)

    # --- the contract -----------------------------------------------------------------------

    def predict(self, cohort: pd.DataFrame, explain: str = "predicted") -> pd.DataFrame:
        """One output row per input row, same order: phenotype, probabilities, the rule's
        answer, a status, and (unless explain='none') SHAP contributions and top drivers."""
        if explain not in EXPLAIN_MODES:
            raise ValueError(f"explain must be one of {EXPLAIN_MODES}, not {explain!r}")
        if explain == "none":
            logits, status = self.logits(cohort)
        else:
            contributions, base, status = self.contributions(cohort)
            logits = contributions.sum(axis=2) + base
        logits = logits - logits.max(axis=1, keepdims=True)
        proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        ok = np.array([s == OK for s in status], dtype=bool)
        predicted = np.where(ok, proba.argmax(axis=1), -1)
        classes = np.array(self.classes, dtype=object)
        out = pd.DataFrame(index=range(len(cohort)))
        out[PATIENT_ID] = (cohort[PATIENT_ID].to_numpy() if PATIENT_ID in cohort
                           else np.full(len(cohort), None))
        out["phenotype"] = np.where(ok, classes[np.maximum(predicted, 0)], None)
        for k, name in enumerate(self.classes):
            out[f"prob_{name}"] = np.where(ok, proba[:, k], np.nan)
        out["rule_phenotype"] = immunosep_phenotype(
            self._checked(cohort, "ferritin_ng_ml"), self._checked(cohort, "hla_dr_mab_per_cell"),
            self.spec["rule"]["ferritin_threshold_ng_ml"],
            self.spec["rule"]["hla_dr_threshold_mab_per_cell"])
        out["status"] = status
        if explain == "none":
            return out
        rows = np.arange(len(cohort))
        chosen = contributions[rows, np.maximum(predicted, 0)]  # (n, F)
        out["shap_base"] = np.where(ok, base[np.maximum(predicted, 0)], np.nan)
        for f, name in enumerate(self.features):
            out[f"shap_{name}"] = chosen[:, f]
        if explain == "all":
            for k, label in enumerate(self.classes):
                out[f"shap_base_{label}"] = np.where(ok, base[k], np.nan)
                for f, name in enumerate(self.features):
                    out[f"shap_{label}_{name}"] = contributions[:, k, f]
        out["top_drivers"] = _top_drivers(chosen, cohort, self.features, ok)
        return out


SMALL_REQUEST_ROWS = 8  # up to this many rows, _top_drivers formats row by row


def _top_drivers(chosen: np.ndarray, cohort: pd.DataFrame, features: list[str],
                 ok: np.ndarray, count: int = 3) -> np.ndarray:
    """'ferritin_ng_ml=9120.0 (+2.41), platelets_10e9_l=48.0 (+0.93), ...' per row.

    Built column-wise: only the cells that are some row's top driver are formatted. A request
    of a few rows (the scoring server's) is formatted row by row instead, where pandas'
    per-column cost would dominate; both give the same text (tested).
    """
    n = len(chosen)
    order = np.argsort(-np.abs(np.nan_to_num(chosen)), axis=1)[:, :count]
    if n <= SMALL_REQUEST_ROWS:
        def cell(row: int, f: int) -> str:
            value = cohort[features[f]].iloc[row] if features[f] in cohort else None
            return "missing" if value is None or pd.isna(value) else str(value)

        return np.array([", ".join(f"{features[f]}={cell(row, f)} ({chosen[row, f]:+.2f})"
                                   for f in order[row]) if ok[row] else ""
                         for row in range(n)], dtype=object)
    rows = np.arange(n)
    names = np.array(features, dtype=object)
    joined = pd.Series("", index=rows, dtype=object)
    for rank in range(order.shape[1]):
        feature = order[:, rank]
        shown = np.full(n, "missing", dtype=object)
        for f in np.unique(feature):
            if names[f] in cohort:
                where = np.flatnonzero(feature == f)
                cells = cohort[names[f]].iloc[where]
                shown[where] = np.where(cells.isna(), "missing", cells.astype(str))
        part = (pd.Series(names[feature]) + "=" + pd.Series(shown) + " ("
                + pd.Series(chosen[rows, feature]).map("{:+.2f}".format) + ")")
        joined = part if rank == 0 else joined + ", " + part
    return np.where(ok, joined.to_numpy(dtype=object), "")
