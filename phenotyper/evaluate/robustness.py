"""Robustness to assay re-measurement: the same patients measured again (within a laboratory,
or in another), and how often each phenotyper's answer flips."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from phenotyper.contract import FERRITIN_MALS_NG_ML, HLA_DR_IMMUNOPARALYSIS_MAB_PER_CELL, PHENOTYPES
from phenotyper.evaluate.benchmark import Predictions
from phenotyper.evaluate.metrics import _label_pairs
from phenotyper.panel import LINEAR_SCALE_MARKERS, NUMERIC_MARKERS
from phenotyper.presets import marker_values

# Re-measurement scenarios, each a coefficient of variation per marker, read from the marker
# law with their sources (presets/_markers.toml): the same sample run again in the same
# laboratory, and the same patient measured in another laboratory, on another platform.
ASSAY_NOISE_CV: dict[str, dict[str, float]] = {
    "within_lab": marker_values("assay_cv"),
    "between_labs": marker_values("between_lab_cv"),
}
# The agreement gate compares a model's kappa with the rule to the rule's kappa with itself
# when the same patients are measured in another laboratory.
AGREEMENT_SCENARIO = "between_labs"
NEAR_CUTOFF_RELATIVE = 0.25  # "near the cut-off": within 25% of 4420 ng/mL or 5000 /cell


def remeasure(X: pd.DataFrame, cv_by_marker: Mapping[str, float], rng: np.random.Generator
              ) -> pd.DataFrame:
    """The same patients measured again: each marker times log-normal noise of the given CV."""
    out = X.copy()
    for column in NUMERIC_MARKERS:
        if column in out and column not in LINEAR_SCALE_MARKERS:
            cv = cv_by_marker[column] if column in cv_by_marker else cv_by_marker["other"]
            sd = np.sqrt(np.log1p(cv**2))
            out[column] = out[column].to_numpy(dtype=float) * np.exp(rng.normal(0, sd, len(out)))
    return out


def _noise_outcomes(phenotypers: Mapping[str, Any], predictions: Mapping[str, Predictions],
                    data: pd.DataFrame, truth: np.ndarray, repeats: int, seed: int,
                    assay_noise_cv: Mapping[str, Mapping[str, float]],
                    ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Per-patient shares of re-measurements that flip the phenotype or get it right, and per
    phenotyper the per-patient share of (original label, re-measured label) pairs in
    AGREEMENT_SCENARIO, (patients, labels x labels), for its agreement with itself.

    Every phenotyper sees the same re-measured cohorts. `flip_rate_near_cutoff_*` is a ratio
    (flips among patients near a rule cut-off), stored as numerator and denominator rows.
    """
    out: dict[str, dict[str, np.ndarray]] = {name: {} for name in phenotypers}
    pairs: dict[str, np.ndarray] = {}
    if repeats < 1:
        return out, pairs
    near = np.zeros(len(data), bool)
    for column, cutoff in (("ferritin_ng_ml", FERRITIN_MALS_NG_ML),
                           ("hla_dr_mab_per_cell", HLA_DR_IMMUNOPARALYSIS_MAB_PER_CELL)):
        if column in data:
            relative = np.abs(data[column].to_numpy(dtype=float) / cutoff - 1)
            near |= np.nan_to_num(relative, nan=np.inf) <= NEAR_CUTOFF_RELATIVE
    for offset, (scenario, cvs) in enumerate(assay_noise_cv.items()):
        rng = np.random.default_rng([seed, offset])
        flips = {name: np.zeros(len(data)) for name in phenotypers}
        right = {name: np.zeros(len(data)) for name in phenotypers}
        for _ in range(repeats):
            again = remeasure(data, cvs, rng)
            for name, estimator in phenotypers.items():
                labels = np.asarray(estimator.predict(again), dtype=object)
                flips[name] += labels != predictions[name].labels
                right[name] += labels == np.asarray(PHENOTYPES, dtype=object)[truth]
                if scenario == AGREEMENT_SCENARIO:
                    pairs[name] = pairs.get(name, 0) + _label_pairs(
                        predictions[name].labels, labels) / repeats
        for name in phenotypers:
            out[name][f"flip_rate_{scenario}"] = flips[name] / repeats
            out[name][f"accuracy_remeasured_{scenario}"] = right[name] / repeats
            out[name][f"flip_rate_near_cutoff_{scenario}"] = np.vstack(
                [flips[name] / repeats * near, near.astype(float)])
    return out, pairs
