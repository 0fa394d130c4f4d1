"""One evaluator for every phenotyper: rules and learned models go through the same code.

For each phenotyper on the same held-out patients it computes label metrics, probability
metrics (for phenotypers whose probabilities mean something), treatment terms, decision curves,
robustness to assay re-measurement and subgroup metrics, each with a 95% bootstrap interval
resampled by patient, plus paired intervals for each phenotyper's difference from the reference
rule (the same resamples for both).

Every metric is written as a function of a matrix of bootstrap weights (one row per resample,
one column per patient), so the point estimate (all weights 1) and thousands of resamples run
through the same vectorised code; tests check the point estimates against scikit-learn.

An interval is only given when it means something: resampling needs at least
`MIN_RESAMPLING_GROUPS` patients, and a metric left undefined (NaN) by more than
`MAX_UNDEFINED_SHARE` of the resamples (a phenotype with too few patients, say) gets no interval,
rather than one from the resamples where it happens to be defined.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.calibration import calibration_curve

from phenotyper.contract import INDETERMINATE, PHENOTYPES
from phenotyper.evaluate.bootstrap import (
    CONFIDENCE,
    MIN_RESAMPLING_GROUPS,
    _interval,
    bootstrap_weights,
    resampling_groups,
)
from phenotyper.evaluate.metrics import (
    PREDICTED_LABELS,
    TREATED_PHENOTYPE,
    TREATMENTS,
    EvaluationError,
    Predictions,
    _divide,
    _kappa,
    _label_pairs,
    _Scorer,
    predict,
    treatment_table,
)
from phenotyper.evaluate.outcomes import OutcomeError, OutcomeScorer, OutcomeSpec
from phenotyper.evaluate.robustness import (
    AGREEMENT_SCENARIO,
    ASSAY_NOISE_CV,
    NEAR_CUTOFF_RELATIVE,
    _noise_outcomes,
)
from phenotyper.labels import LabelReading, read_labels, rule_derived_warning
from phenotyper.panel import PATIENT_ID, SITE_ID
from phenotyper.suggest import did_you_mean

DECISION_CURVE_GRID = np.round(np.arange(0.02, 0.91, 0.02), 2)
AGE_BANDS = ((0, 50, "<50"), (50, 65, "50-64"), (65, 80, "65-79"), (80, 200, ">=80"))
SUBGROUP_METRICS = ("n", "accuracy", "balanced_accuracy", "macro_f1", "coverage")
# The patients the reference rule can type: headline metrics and paired differences are also
# given here, so a phenotyper cannot beat the rule by answering where the rule abstains alone.
RULE_DETERMINATE = "rule=determinate"
PAIRED_SUBGROUPS = (RULE_DETERMINATE,)


# --- the benchmark ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Benchmark:
    """Everything the report needs; `records` is the table of numbers with intervals."""

    records: pd.DataFrame  # RECORD_COLUMNS
    confusion: dict[str, pd.DataFrame]
    treatment: dict[str, pd.DataFrame]
    decision_curves: pd.DataFrame  # phenotyper, treatment, threshold, net_benefit
    reliability: pd.DataFrame  # phenotyper, phenotype, predicted, observed
    meta: dict[str, Any] = field(default_factory=dict)

    def numbers(self) -> Numbers:
        """(phenotyper, metric, subgroup) -> (value, ci_low, ci_high), for cheap look-ups."""
        rows = self.records[list(RECORD_COLUMNS)].itertuples(index=False)
        return {(p, m, s): (float(v), float(lo), float(hi)) for p, m, s, v, lo, hi in rows}

    def remeasured_scenarios(self) -> list[str]:
        """Re-measurement scenarios the benchmark ran (none when noise_repeats was 0)."""
        reference = self.meta["reference"]
        columns = set(zip(self.records.phenotyper, self.records.metric, strict=True))
        return [scenario for scenario in self.meta.get("assay_noise_cv", {})
                if (reference, f"flip_rate_{scenario}") in columns]


RECORD_COLUMNS = ("phenotyper", "metric", "subgroup", "value", "ci_low", "ci_high")
# `Benchmark.numbers()`: a record's estimate and interval by (phenotyper, metric, subgroup);
# MISSING stands in for a number the benchmark did not compute.
Numbers = dict[tuple[str, str, str], tuple[float, float, float]]
MISSING = (math.nan, math.nan, math.nan)


def reference_labels(frame: pd.DataFrame, label: str,
                     recode: Mapping[str, str] | None = None) -> LabelReading:
    """The reference phenotype read through the one label vocabulary (`labels.read_labels`):
    any case, `intermediate` = unclassified, a mapping's `[labels]` recode; unreadable values
    are counted and left out, not an error."""
    if label not in frame.columns:
        hint = did_you_mean(label, [str(c) for c in frame.columns])
        raise EvaluationError(f"label column '{label}' is not in the cohort.{hint} Give the "
                              "column that holds the reference phenotype with --label.")
    return read_labels(frame[label], label, recode)


def _subgroups(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Masks for site, age band, sex and HLA-DR measured or not, where present."""
    masks: dict[str, np.ndarray] = {}
    if SITE_ID in frame:
        for site in sorted(frame[SITE_ID].dropna().unique()):
            masks[f"site={site}"] = (frame[SITE_ID] == site).to_numpy(bool)
    if "age_years" in frame:
        age = frame["age_years"].to_numpy(dtype=float)
        for low, high, name in AGE_BANDS:
            masks[f"age={name}"] = (age >= low) & (age < high)
    if "sex" in frame:
        for sex in sorted(frame["sex"].dropna().unique()):
            masks[f"sex={sex}"] = (frame["sex"] == sex).to_numpy(bool)
    if "hla_dr_mab_per_cell" in frame:
        measured = frame["hla_dr_mab_per_cell"].notna().to_numpy(bool)
        masks["hla_dr=measured"], masks["hla_dr=not measured"] = measured, ~measured
    return {name: mask for name, mask in masks.items() if mask.any()}


def benchmark(
    phenotypers: Mapping[str, Any],
    frame: pd.DataFrame,
    label: str | None = None,
    reference: str = "immunosep",
    n_boot: int = 1000,
    seed: int = 0,
    noise_repeats: int = 20,
    assay_noise_cv: Mapping[str, Mapping[str, float]] = ASSAY_NOISE_CV,
    synthetic: bool = False,
    outcomes: OutcomeSpec | None = None,
    label_recode: Mapping[str, str] | None = None,
    comparators: Sequence[str] = (),
) -> Benchmark:
    """Judge fitted phenotypers on the same patients; `reference` is the comparator.

    Against a reference `label` (label metrics), against `outcomes` (prognosis, treatment
    effect within each predicted phenotype, policy value), or both; at least one. Patients
    whose label is empty, `indeterminate` or unreadable (`label_recode`: a mapping's `[labels]`
    table) are left out of the label metrics (counted in `meta["labels"]`) and stay in the
    outcome metrics; a label that is the rule's own answer gets `meta["label_warning"]`.
    `noise_repeats` re-measurements per scenario of `assay_noise_cv` measure robustness
    (against the label). Label metrics are also given on the patients the reference rule can
    type (`rule=determinate`), with paired differences there too; `comparators` are other
    phenotypers every one is also differenced from (a learned two-marker reference, say). The
    bootstrap resamples patients
    by `patient_id`, the same resamples for every phenotyper and for both sections; a row
    without an id is a patient of its own. With fewer than `MIN_RESAMPLING_GROUPS` patients
    (in the cohort, or in a subgroup) there are no bootstrap intervals, and `meta["warning"]`
    says why. `synthetic` (the cohort was simulated) is recorded in `meta` for the report.
    """
    if reference not in phenotypers:
        raise EvaluationError(f"reference phenotyper '{reference}' is not among "
                              f"{', '.join(phenotypers)}")
    if label is None and outcomes is None:
        raise EvaluationError("nothing to judge against: give a reference label (--label) or "
                              "outcome columns (--outcome, with --treatment for treatment "
                              "effects and policy values)")
    frame = frame.reset_index(drop=True)
    if not len(frame):
        raise EvaluationError("the cohort has no patients")
    ids = frame[PATIENT_ID] if PATIENT_ID in frame else pd.Series(np.nan, index=frame.index)
    groups, n_groups = resampling_groups(ids)
    predictions = {name: predict(est, frame) for name, est in phenotypers.items()}

    labelled = np.zeros(len(frame), bool)
    scorers: dict[str, _Scorer] = {}
    noise: dict[str, dict[str, np.ndarray]] = {}
    subgroups: dict[str, np.ndarray] = {}
    truth = np.empty(0, int)
    reading = None
    if label is not None:
        reading = reference_labels(frame, label, label_recode)
        codes, labelled = reading.codes, reading.labelled
        if not labelled.any():
            raise EvaluationError(f"no patient has a reference phenotype in '{label}'. "
                                  f"{reading.summary()}")
        data = frame.loc[labelled].reset_index(drop=True)
        truth = codes[labelled].astype(int)
        scorers = {name: _Scorer(truth, p.subset(labelled)) for name, p in predictions.items()}
        noise, self_pairs = _noise_outcomes(
            phenotypers, {n: p.subset(labelled) for n, p in predictions.items()}, data, truth,
            noise_repeats, seed, assay_noise_cv)
        # agreement with the rule where the rule could use HLA-DR, against its own agreement
        # with itself when the same patients are measured in another laboratory
        measured = (data["hla_dr_mab_per_cell"].notna().to_numpy(bool)
                    if "hla_dr_mab_per_cell" in data else np.zeros(len(data), bool))
        rule_labels = predictions[reference].labels[labelled]
        with_rule = {name: _label_pairs(p.labels[labelled], rule_labels)[measured]
                     for name, p in predictions.items()}
        rule_self = self_pairs[reference][measured] if reference in self_pairs else None
        subgroups = _subgroups(data)
        subgroups[RULE_DETERMINATE] = predictions[reference].labels[labelled] != INDETERMINATE
    judged_by_outcome = None
    if outcomes is not None:
        try:
            judged_by_outcome = OutcomeScorer(
                frame, outcomes, {name: p.labels for name, p in predictions.items()},
                reference, groups, seed)
        except OutcomeError as error:
            raise EvaluationError(str(error)) from None

    def block_metrics(name: str, weights: np.ndarray) -> dict[str, np.ndarray]:
        weights = weights[:, labelled]
        scorer = scorers[name]
        out = scorer.metrics(weights)
        total = weights.sum(1)
        for metric, per_patient in noise[name].items():
            out[metric] = weights @ per_patient / total if per_patient.ndim == 1 else \
                _divide(weights @ per_patient[0], weights @ per_patient[1])
        for group, mask in subgroups.items():
            for metric, value in scorer.label_metrics(weights, mask).items():
                if metric in SUBGROUP_METRICS:
                    out[f"{metric}|{group}"] = value
        if measured.any():
            kappa = _kappa(weights[:, measured] @ with_rule[name])
            out["kappa_with_rule"] = kappa
            if rule_self is not None:
                own = _kappa(weights[:, measured] @ rule_self)
                if name == reference:
                    out[f"rule_self_kappa_{AGREEMENT_SCENARIO}"] = own
                out[f"kappa_with_rule_minus_rule_self_kappa_{AGREEMENT_SCENARIO}"] = kappa - own
        return out

    ones = np.ones((1, len(frame)))
    point = {name: block_metrics(name, ones) for name in scorers}
    for name, scorer in scorers.items():
        scorer.remember_point(point[name])
    samples: dict[str, dict[str, list[np.ndarray]]] = {name: {} for name in scorers}
    outcome_samples: list[np.ndarray] = []
    warning = None
    if n_groups >= MIN_RESAMPLING_GROUPS:
        for weights in bootstrap_weights(groups, n_boot, seed):
            for name in scorers:
                for metric, values in block_metrics(name, weights).items():
                    samples[name].setdefault(metric, []).append(values)
            if judged_by_outcome is not None:
                outcome_samples.append(judged_by_outcome.values(weights))
    else:
        warning = (f"Only {n_groups} patient{'s' if n_groups != 1 else ''} to resample (fewer "
                   f"than {MIN_RESAMPLING_GROUPS}): no confidence intervals are given and no "
                   "difference can be called significant; the numbers describe these patients "
                   "only.")
    boot = {name: {m: np.concatenate(v) for m, v in by.items()} for name, by in samples.items()}
    thin = {group for group, mask in subgroups.items()
            if len(np.unique(groups[labelled][mask])) < MIN_RESAMPLING_GROUPS}

    rows = []
    for name in scorers:
        for metric, value in point[name].items():
            base, _, subgroup = metric.partition("|")
            low, high = _interval(None if subgroup in thin else boot[name].get(metric))
            rows.append((name, base, subgroup or "all", float(value[0]), low, high))
            if base == "n" or "_minus_" in base or (subgroup and subgroup not in
                                                     PAIRED_SUBGROUPS):
                continue
            for other in (reference, *comparators):
                if other == name or other not in point:
                    continue
                other_value = point[other].get(metric, [np.nan])[0]
                low, high = np.nan, np.nan
                if metric in boot[name] and subgroup not in thin:
                    low, high = _interval(boot[name][metric] - boot[other].get(metric, np.nan))
                rows.append((name, f"{base}_minus_{other}", subgroup or "all",
                             float(value[0] - other_value), low, high))
    meta: dict[str, Any] = {
        "label": label, "reference": reference, "n_patients": len(frame),
        "n_labelled": int(labelled.sum()),
        "n_left_out": int((~labelled).sum()) if label is not None else 0,
        "n_boot": n_boot, "seed": seed, "noise_repeats": noise_repeats,
        "confidence": CONFIDENCE, "assay_noise_cv": dict(assay_noise_cv),
        "near_cutoff_relative": NEAR_CUTOFF_RELATIVE, "n_resampling_groups": n_groups,
        "warning": warning, "synthetic": bool(synthetic)}
    if reading is not None:
        meta["labels"] = reading.as_dict()
        meta["n_left_out"] = reading.n_unlabelled + reading.n_unreadable
        if reference in predictions:
            meta["label_warning"] = rule_derived_warning(reading, predictions[reference].labels)
    if judged_by_outcome is not None:
        resampled = np.concatenate(outcome_samples) if outcome_samples else None
        rows += judged_by_outcome.records(judged_by_outcome.values(ones), resampled, _interval)
        meta["outcome"] = judged_by_outcome.meta
    records = pd.DataFrame(rows, columns=["phenotyper", "metric", "subgroup", "value",
                                          "ci_low", "ci_high"])
    ones_labelled = np.ones((1, len(truth)))
    return Benchmark(
        records=records,
        confusion={name: _confusion_frame(scorers[name].confusion(ones_labelled)[0])
                   for name in scorers},
        treatment={name: _treatment_frame(scorers[name].confusion(ones_labelled)[0])
                   for name in scorers},
        decision_curves=_decision_curves(scorers, truth),
        reliability=_reliability({n: p.subset(labelled) for n, p in predictions.items()}
                                 if scorers else {}, truth),
        meta=meta,
    )


def _confusion_frame(confusion: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(confusion.astype(int), index=pd.Index(PHENOTYPES, name="reference"),
                        columns=pd.Index(PREDICTED_LABELS, name="predicted"))


def _treatment_frame(confusion: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(treatment_table(confusion).astype(int),
                        index=pd.Index(TREATMENTS, name="needed"),
                        columns=pd.Index(TREATMENTS, name="given"))


def _decision_curves(scorers: Mapping[str, _Scorer], truth: np.ndarray) -> pd.DataFrame:
    """Net benefit by threshold for each phenotyper and treatment, with treat-all/none."""
    ones = np.ones((1, len(truth)))
    rows = []
    if not scorers:
        return pd.DataFrame(rows, columns=["phenotyper", "treatment", "threshold", "net_benefit"])
    for treatment, phenotype in TREATED_PHENOTYPE.items():
        prevalence = float(np.mean(truth == PHENOTYPES.index(phenotype)))
        for threshold in DECISION_CURVE_GRID:
            odds = threshold / (1 - threshold)
            rows.append(("treat all", treatment, threshold, prevalence - (1 - prevalence) * odds))
            rows.append(("treat none", treatment, threshold, 0.0))
            for name, scorer in scorers.items():
                rows.append((name, treatment, threshold,
                             float(scorer.net_benefit(ones, treatment, threshold)[0])))
    return pd.DataFrame(rows, columns=["phenotyper", "treatment", "threshold", "net_benefit"])


def _reliability(predictions: Mapping[str, Predictions], truth: np.ndarray,
                 n_bins: int = 10) -> pd.DataFrame:
    """Reliability curves (quantile bins) of the probabilistic phenotypers, per phenotype."""
    rows = []
    for name, prediction in predictions.items():
        if not prediction.probabilistic:
            continue
        for k, phenotype in enumerate(PHENOTYPES):
            observed, predicted = calibration_curve(truth == k, prediction.proba[:, k],
                                                    n_bins=n_bins, strategy="quantile")
            rows += [(name, phenotype, p, o) for p, o in zip(predicted, observed, strict=True)]
    return pd.DataFrame(rows, columns=["phenotyper", "phenotype", "predicted", "observed"])
