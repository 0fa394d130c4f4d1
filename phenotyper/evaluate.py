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

import difflib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse
from sklearn.calibration import calibration_curve

from phenotyper.contract import ANAKINRA, ARM_OF, ARMS, INTERFERON_GAMMA, PLACEBO
from phenotyper.labels import LabelReading, read_labels, rule_derived_warning
from phenotyper.outcomes import OutcomeError, OutcomeScorer, OutcomeSpec
from phenotyper.panel import LINEAR_SCALE_MARKERS, NUMERIC_MARKERS, PATIENT_ID, SITE_ID
from phenotyper.rules import (
    FERRITIN_MALS_NG_ML,
    HLA_DR_IMMUNOPARALYSIS_MAB_PER_CELL,
    IMMUNOPARALYSIS,
    INDETERMINATE,
    MALS,
    PHENOTYPES,
)

PREDICTED_LABELS: tuple[str, ...] = (*PHENOTYPES, INDETERMINATE)
K = len(PHENOTYPES)

# What a clinician does with each phenotype: ImmunoSep's treatments (contract.ARM_OF); placebo
# stands for "no immunotherapy" in the label-based treatment table.
TREATMENTS, TREATMENT_OF = ARMS, ARM_OF
# Phenotype each treatment is for (decision curves: "treat if P(phenotype) >= threshold").
TREATED_PHENOTYPE = {ANAKINRA: MALS, INTERFERON_GAMMA: IMMUNOPARALYSIS}
NET_BENEFIT_THRESHOLDS = (0.1, 0.25, 0.5)
DECISION_CURVE_GRID = np.round(np.arange(0.02, 0.91, 0.02), 2)

# Re-measurement scenarios: coefficient of variation per marker (REFERENCE.md).
ASSAY_NOISE_CV: dict[str, dict[str, float]] = {
    # The same sample run again in the same laboratory.
    "within_lab": {
        "ferritin_ng_ml": 0.089,  # between-run CV 8.9% (Garcia-Casal 2018)
        "hla_dr_mab_per_cell": 0.032,  # intra-assay CV 1.9-3.2% (Demaret 2013)
        "other": 0.05,  # assumption: typical analytical CV of routine assays
    },
    # The same patient measured in another laboratory, on another platform.
    "between_labs": {
        "ferritin_ng_ml": 0.229,  # between-platform median CV 22.9% (Braga 2022)
        "hla_dr_mab_per_cell": 0.20,  # inter-laboratory CV 15-25% (Docke 2005)
        "other": 0.10,  # assumption: between-platform CV of routine assays
    },
}
# The agreement gate compares a model's kappa with the rule to the rule's kappa with itself
# when the same patients are measured in another laboratory.
AGREEMENT_SCENARIO = "between_labs"
NEAR_CUTOFF_RELATIVE = 0.25  # "near the cut-off": within 25% of 4420 ng/mL or 5000 /cell
AGE_BANDS = ((0, 50, "<50"), (50, 65, "50-64"), (65, 80, "65-79"), (80, 200, ">=80"))
SUBGROUP_METRICS = ("n", "accuracy", "balanced_accuracy", "macro_f1", "coverage")
# The patients the reference rule can type: headline metrics and paired differences are also
# given here, so a phenotyper cannot beat the rule by answering where the rule abstains alone.
RULE_DETERMINATE = "rule=determinate"
PAIRED_SUBGROUPS = (RULE_DETERMINATE,)
CONFIDENCE = 0.95
# Fewer patients (resampling groups) than this: no intervals, and a warning in `meta`.
MIN_RESAMPLING_GROUPS = 10
# A metric undefined in more than this share of resamples gets no interval.
MAX_UNDEFINED_SHARE = 0.05
_LOGIT_CLIP = 1e-6
# Calibration fits: Newton steps at most, convergence on the Newton step, the longest step
# taken unchecked, and the smallest weighted variance of the logit that identifies a slope.
_NEWTON_MAX_STEPS = 50
_NEWTON_TOLERANCE = 1e-9
_NEWTON_TRUSTED_STEP = 0.5  # longer steps (on the logit scale) are checked and halved if need be
_MIN_LOGIT_VARIANCE = 1e-8

class EvaluationError(ValueError):
    """Input the evaluator cannot judge (labels outside the phenotypes, no patients...)."""


@dataclass(frozen=True)
class Predictions:
    """What one phenotyper said: labels (may be `indeterminate`) and P(phenotype) columns."""

    labels: np.ndarray
    proba: np.ndarray  # (n, K) in PHENOTYPES order
    probabilistic: bool

    def subset(self, rows: np.ndarray) -> Predictions:
        return Predictions(self.labels[rows], self.proba[rows], self.probabilistic)


def predict(estimator: Any, X: pd.DataFrame) -> Predictions:
    """Predictions of any fitted classifier, probabilities aligned to PHENOTYPES."""
    labels = np.asarray(estimator.predict(X), dtype=object)
    raw = np.asarray(estimator.predict_proba(X), dtype=float)
    classes = [str(c) for c in estimator.classes_]
    proba = np.column_stack(
        [raw[:, classes.index(p)] if p in classes else np.zeros(len(X)) for p in PHENOTYPES]
    )
    unknown = set(np.unique(labels)) - set(PREDICTED_LABELS)
    if unknown:
        raise EvaluationError(f"phenotyper predicted labels outside {PREDICTED_LABELS}: {unknown}")
    return Predictions(labels, proba, not getattr(estimator, "hard_decision", False))


# --- bootstrap --------------------------------------------------------------------------------


def resampling_groups(groups: Any) -> tuple[np.ndarray, int]:
    """Group code per row and the number of groups; a row without an id is its own group.

    A missing (or blank) patient id says nothing about which rows belong together, so such a
    row is resampled alone rather than with every other row that lacks an id.
    """
    ids = pd.Series(np.asarray(groups, dtype=object))
    blank = ids.map(lambda value: isinstance(value, str) and not value.strip())
    codes, uniques = pd.factorize(ids.mask(blank))  # missing -> -1
    codes = np.asarray(codes, dtype=np.int64)
    missing = codes < 0
    codes[missing] = len(uniques) + np.arange(int(missing.sum()))
    return codes, len(uniques) + int(missing.sum())


def bootstrap_weights(
    groups: np.ndarray, n_boot: int, seed: int, max_cells: int = 4_000_000
) -> Iterator[np.ndarray]:
    """Blocks of resampling weights, (resamples x patients), resampling whole groups.

    Each resample draws as many groups as there are, with replacement; a row's weight is the
    number of times its group was drawn. A row whose group is missing (NaN, None, blank) is a
    group of its own. Blocks keep memory at `max_cells` floats.
    """
    codes, n_groups = resampling_groups(groups)
    rng = np.random.default_rng(seed)
    block = max(1, max_cells // max(len(codes), 1))
    for start in range(0, n_boot, block):
        size = min(block, n_boot - start)
        draws = rng.integers(0, n_groups, size=(size, n_groups))
        offsets = np.arange(size)[:, None] * n_groups  # one bincount for the whole block
        counts = np.bincount((draws + offsets).ravel(), minlength=size * n_groups)
        yield counts.reshape(size, n_groups)[:, codes].astype(float)


# --- metrics as functions of weights ----------------------------------------------------------


def _one_hot(codes: np.ndarray, width: int) -> sparse.csr_matrix:
    n = len(codes)
    return sparse.csr_matrix((np.ones(n), (np.arange(n), codes)), shape=(n, width))


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1),
                        np.nan)


def _present(truth: np.ndarray) -> np.ndarray:
    """Which phenotypes (bool, K) occur in the reference labels: what macro averages run over."""
    return np.isin(np.arange(K), truth)


class _Scorer:
    """Precomputed pieces for one phenotyper on one set of patients.

    Macro averages (balanced accuracy, macro F1, macro AUROC) run over the phenotypes present
    in `truth`, fixed here from the point estimate: the same set for every phenotyper given the
    same patients and for every resample (a resample without one of them leaves the average
    undefined), like scikit-learn's `labels=`.
    """

    def __init__(self, truth: np.ndarray, predictions: Predictions) -> None:
        self.truth = truth  # codes 0..K-1
        self.present = _present(truth)
        self.pred = pd.Categorical(predictions.labels, categories=PREDICTED_LABELS).codes
        self.probabilistic = predictions.probabilistic
        self.proba = predictions.proba
        self.cells = _one_hot(self.truth * (K + 1) + self.pred, K * (K + 1))
        self.truth_hot = np.eye(K)[self.truth]
        p_true = np.clip(self.proba[np.arange(len(truth)), truth], np.finfo(float).eps, 1.0)
        self.log_loss = -np.log(p_true)
        self.brier = ((self.proba - self.truth_hot) ** 2).sum(axis=1)
        self.ranks = [self._rank_index(self.proba[:, k]) for k in range(K)]
        self.logit = np.log(np.clip(self.proba, _LOGIT_CLIP, 1 - _LOGIT_CLIP)) - np.log(
            np.clip(1 - self.proba, _LOGIT_CLIP, 1 - _LOGIT_CLIP)
        )
        self.calibration_start: dict[int, np.ndarray] = {}

    @staticmethod
    def _rank_index(scores: np.ndarray) -> sparse.csr_matrix:
        """Patients x distinct scores (ascending) one-hot: weights summed per distinct score."""
        _, inverse = np.unique(scores, return_inverse=True)
        return _one_hot(inverse, int(inverse.max()) + 1)

    def confusion(self, weights: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        """Weighted confusion counts, (resamples, K true, K+1 predicted)."""
        cells = self.cells if mask is None else self.cells[mask]
        w = weights if mask is None else weights[:, mask]
        return np.asarray((sparse.csr_matrix(w) @ cells).todense()).reshape(-1, K, K + 1)

    def label_metrics(self, weights: np.ndarray, mask: np.ndarray | None = None) -> dict:
        """Label metrics; within a subgroup (`mask`), averaged over the subgroup's phenotypes."""
        present = self.present if mask is None else _present(self.truth[mask])
        return _label_metrics(self.confusion(weights, mask), present)

    def auroc_ap(self, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Weighted one-vs-rest AUROC (Mann-Whitney, ties half) and average precision."""
        positive = self.truth == k
        by_score = self.ranks[k]
        pos = np.asarray((weights * positive) @ by_score)
        neg = np.asarray((weights * ~positive) @ by_score)
        total_pos, total_neg = pos.sum(axis=1), neg.sum(axis=1)
        below = np.cumsum(neg, axis=1) - neg
        auroc = _divide((pos * (below + 0.5 * neg)).sum(axis=1), total_pos * total_neg)
        tp = np.cumsum(pos[:, ::-1], axis=1)
        fp = np.cumsum(neg[:, ::-1], axis=1)
        precision = _divide(tp, tp + fp)
        ap = _divide((pos[:, ::-1] * np.nan_to_num(precision)).sum(axis=1), total_pos)
        return auroc, ap

    def calibration(self, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Calibration intercept (offset model) and slope of class k, by damped weighted Newton.

        NaN where the fit has no answer: the weighted rows hold only one outcome (both),
        their logits barely vary (slope), or Newton did not converge (separation: the maximum
        likelihood estimate is infinite).
        """
        x, y = self.logit[:, k], (self.truth == k).astype(float)
        start = self.calibration_start.get(k, np.zeros(3))
        total = weights.sum(1)
        positives = np.einsum("ij,j->i", weights, y)
        both = (positives > 0) & (positives < total)
        mean = _divide(np.einsum("ij,j->i", weights, x), total)
        variance = _divide(np.einsum("ij,j->i", weights, x * x), total) - mean**2
        spread = both & (variance > _MIN_LOGIT_VARIANCE)
        intercept = _logistic_fit(weights, x, y, start[:1], both, slope=False)[:, 0]
        slope = _logistic_fit(weights, x, y, start[1:], spread, slope=True)[:, 1]
        return intercept, slope

    def net_benefit(self, weights: np.ndarray, treatment: str, threshold: float) -> np.ndarray:
        k = PHENOTYPES.index(TREATED_PHENOTYPE[treatment])
        treat = self._treated(k, threshold)
        y = self.truth == k
        odds = threshold / (1 - threshold)
        return ((weights * (treat & y)).sum(1) - odds * (weights * (treat & ~y)).sum(1)) / \
            weights.sum(1)

    def _treated(self, k: int, threshold: float) -> np.ndarray:
        """Who gets the treatment for phenotype k at a risk threshold."""
        if self.probabilistic:
            return self.proba[:, k] >= threshold
        return self.pred == k  # a rule treats whom it labels, whatever the threshold

    def metrics(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Every whole-cohort metric for a block of weights."""
        confusion = self.confusion(weights)
        out = _label_metrics(confusion, self.present)
        out.update(_treatment_metrics(confusion))
        aurocs = []
        for k, phenotype in enumerate(PHENOTYPES):
            auroc, ap = self.auroc_ap(weights, k)
            out[f"auroc_{phenotype}"], out[f"average_precision_{phenotype}"] = auroc, ap
            aurocs.append(auroc)
        out["auroc_macro"] = np.column_stack(aurocs)[:, self.present].mean(axis=1)
        for treatment in TREATED_PHENOTYPE:
            for threshold in NET_BENEFIT_THRESHOLDS:
                out[f"net_benefit_{treatment}_at_{threshold:g}"] = self.net_benefit(
                    weights, treatment, threshold)
        if self.probabilistic:
            total = weights.sum(1)
            out["log_loss"] = weights @ self.log_loss / total
            out["brier"] = weights @ self.brier / total
            for k, phenotype in enumerate(PHENOTYPES):
                intercept, slope = self.calibration(weights, k)
                out[f"calibration_intercept_{phenotype}"] = intercept
                out[f"calibration_slope_{phenotype}"] = slope
        return out

    def remember_point(self, point: dict[str, np.ndarray]) -> None:
        """Start bootstrap Newton iterations from the point estimate (fewer steps)."""
        for k, phenotype in enumerate(PHENOTYPES):
            if f"calibration_slope_{phenotype}" in point:
                slope = point[f"calibration_slope_{phenotype}"][0]
                intercept = point[f"calibration_intercept_{phenotype}"][0]
                # an undefined point estimate is no starting point: start from 0 (and 0)
                self.calibration_start[k] = np.nan_to_num(np.array([intercept, 0.0, slope]))


def _logistic_fit(weights: np.ndarray, x: np.ndarray, y: np.ndarray, start: np.ndarray,
                  defined: np.ndarray, slope: bool) -> np.ndarray:
    """Weighted logistic fits, one per row of `weights`, by damped Newton.

    Without `slope`: logit P(y) = a + x (x an offset), coefficients (a,). With `slope`:
    logit P(y) = a + b x, coefficients (a, b). A Newton step that could move some patient's
    linear predictor by more than `_NEWTON_TRUSTED_STEP` is halved until the log-likelihood
    does not fall (near the optimum, the usual case from a warm start, a full step is safe and
    the likelihood is not evaluated). Rows not `defined`, whose Hessian is singular, or that
    have not converged after `_NEWTON_MAX_STEPS` steps (separation: the estimate runs off to
    infinity) are NaN. Rows leave the loop as they converge.
    """
    coef = np.full((len(weights), len(start)), np.nan)
    converged = np.zeros(len(weights), bool)
    active = np.flatnonzero(defined)
    if not len(active):
        return coef
    coef[active] = start
    outcome = y > 0
    w = weights if len(active) == len(weights) else weights[active]
    positives, positive_x = np.einsum("ij,j->i", w, y), np.einsum("ij,j->i", w, x * y)
    squares, reach = x * x, float(np.max(np.abs(x), initial=0.0))

    def probability(c: np.ndarray) -> np.ndarray:
        return _sigmoid(c[:, :1] + (c[:, 1:] * x if slope else x))

    def log_likelihood(mu: np.ndarray, w: np.ndarray) -> np.ndarray:
        likely = np.maximum(np.where(outcome, mu, 1 - mu), 1e-300)
        return np.einsum("ij,ij->i", w, np.log(likely))

    mu = probability(coef[active])
    for _ in range(_NEWTON_MAX_STEPS):
        c = coef[active]
        weighted = w * mu
        v = weighted * (1 - mu)
        g0, h00 = positives - weighted.sum(1), v.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            if slope:
                # numpy's own loops: a BLAS matrix-vector product here spins up threads that
                # cost more than they save on these short rows
                g1 = positive_x - np.einsum("ij,j->i", weighted, x)
                h01, h11 = np.einsum("ij,j->i", v, x), np.einsum("ij,j->i", v, squares)
                det = h00 * h11 - h01**2
                singular = ~(det > 1e-12 * h00 * h11)
                step = np.column_stack([(h11 * g0 - h01 * g1) / det,
                                        (h00 * g1 - h01 * g0) / det])
            else:
                singular = ~(h00 > 0)
                step = (g0 / h00)[:, None]
        singular |= ~np.isfinite(step).all(axis=1)
        step[singular] = 0.0
        trial = c + step
        mu_trial = probability(trial)
        moves = np.abs(step[:, 0]) + (np.abs(step[:, 1]) * reach if slope else 0.0)
        rows = np.flatnonzero(moves > _NEWTON_TRUSTED_STEP)
        if len(rows):  # step halving: never accept a long step that lowers the likelihood
            current = log_likelihood(mu[rows], w[rows])
            tolerance = 1e-12 * (1 + np.abs(current))
            scale = np.ones(len(rows))
            worse = log_likelihood(mu_trial[rows], w[rows]) < current - tolerance
            for _ in range(40):
                if not worse.any():
                    break
                scale[worse] *= 0.5
                redo = rows[worse]
                trial[redo] = c[redo] + scale[worse, None] * step[redo]
                mu_trial[redo] = probability(trial[redo])
                worse[worse] = log_likelihood(mu_trial[redo], w[redo]) < (current - tolerance)[
                    worse]
            stay = rows[worse]  # no ascent even after halving: stay put, run out of steps
            trial[stay], mu_trial[stay] = c[stay], mu[stay]
        coef[active], mu = trial, mu_trial
        done = np.abs(step).max(axis=1) < _NEWTON_TOLERANCE
        converged[active[done & ~singular]] = True
        keep = ~(done | singular)
        if not keep.all():
            active, w, mu = active[keep], w[keep], mu[keep]
            positives, positive_x = positives[keep], positive_x[keep]
            if not len(active):
                break
    coef[~converged] = np.nan
    return coef


def calibration_by_phenotype(truth: np.ndarray, proba: np.ndarray
                             ) -> dict[str, tuple[float, float]]:
    """Calibration (intercept, slope) per phenotype, one-vs-rest, of probabilities (n, K)."""
    labels = np.asarray(PHENOTYPES, dtype=object)[proba.argmax(axis=1)]
    scorer = _Scorer(np.asarray(truth), Predictions(labels, proba, True))
    ones = np.ones((1, len(truth)))
    return {p: tuple(float(v[0]) for v in scorer.calibration(ones, k))
            for k, p in enumerate(PHENOTYPES)}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _label_metrics(confusion: np.ndarray, present: np.ndarray) -> dict[str, np.ndarray]:
    """Label metrics from confusion counts (resamples, K true, K+1 predicted).

    `indeterminate` is never right: it lowers accuracy, sensitivity (so balanced accuracy) and
    F1. Specificity and NPV read "negative" as "not called this phenotype": an abstention is no
    false positive, so for the phenotypes a patient does not have it counts as a true negative.
    Balanced accuracy and macro F1 average over the `present` phenotypes (bool, K), NaN in a
    resample that lacks one of them (its sensitivity is undefined).
    """
    total = confusion.sum(axis=(1, 2))
    tp = np.diagonal(confusion[:, :, :K], axis1=1, axis2=2)
    actual = confusion.sum(axis=2)
    called = confusion[:, :, :K].sum(axis=1)
    tn = total[:, None] - actual - called + tp
    out = {
        "n": total,
        "coverage": 1 - _divide(confusion[:, :, K].sum(axis=1), total),
        "accuracy": _divide(tp.sum(axis=1), total),
    }
    sensitivity = _divide(tp, actual)
    f1 = _divide(2 * tp, actual + called)
    if present.any():
        out["balanced_accuracy"] = sensitivity[:, present].mean(axis=1)
        out["macro_f1"] = f1[:, present].mean(axis=1)
    else:
        out["balanced_accuracy"] = out["macro_f1"] = np.full(len(confusion), np.nan)
    for k, phenotype in enumerate(PHENOTYPES):
        out[f"sensitivity_{phenotype}"] = sensitivity[:, k]
        out[f"specificity_{phenotype}"] = _divide(tn[:, k], total - actual[:, k])
        out[f"ppv_{phenotype}"] = _divide(tp[:, k], called[:, k])
        out[f"npv_{phenotype}"] = _divide(tn[:, k], total - called[:, k])
    return out


def _treatment_codes() -> tuple[np.ndarray, np.ndarray]:
    truth = np.array([TREATMENTS.index(TREATMENT_OF[p]) for p in PHENOTYPES])
    given = np.array([TREATMENTS.index(TREATMENT_OF[p]) for p in PREDICTED_LABELS])
    return truth, given


def treatment_table(confusion: np.ndarray) -> np.ndarray:
    """Phenotype confusion (.., K, K+1) -> treatment needed x treatment given (.., 3, 3)."""
    truth, given = _treatment_codes()
    to_truth = np.eye(len(TREATMENTS))[truth]  # K x 3
    to_given = np.eye(len(TREATMENTS))[given]  # K+1 x 3
    return np.einsum("ta,...tp,pb->...ab", to_truth, confusion, to_given)


def _treatment_metrics(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Rates per patient: agreement with the reference treatment, and the harmful errors."""
    table = treatment_table(confusion)
    total = table.sum(axis=(1, 2))
    a, g, none = (TREATMENTS.index(t) for t in (ANAKINRA, INTERFERON_GAMMA, PLACEBO))
    return {
        "treatment_agreement": _divide(np.trace(table, axis1=1, axis2=2), total),
        # an immunostimulant given to a hyperinflamed patient
        "harm_interferon_gamma_to_MALS": _divide(table[:, a, g], total),
        # an immunosuppressant given to an immunoparalysed patient
        "harm_anakinra_to_immunoparalysis": _divide(table[:, g, a], total),
        "missed_immunotherapy": _divide(table[:, a, none] + table[:, g, none], total),
        "unneeded_immunotherapy": _divide(table[:, none, a] + table[:, none, g], total),
    }


# --- the benchmark ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Benchmark:
    """Everything the report needs; `records` is the table of numbers with intervals."""

    records: pd.DataFrame  # phenotyper, metric, subgroup, value, ci_low, ci_high
    confusion: dict[str, pd.DataFrame]
    treatment: dict[str, pd.DataFrame]
    decision_curves: pd.DataFrame  # phenotyper, treatment, threshold, net_benefit
    reliability: pd.DataFrame  # phenotyper, phenotype, predicted, observed
    meta: dict[str, Any] = field(default_factory=dict)


def reference_labels(frame: pd.DataFrame, label: str,
                     recode: Mapping[str, str] | None = None) -> LabelReading:
    """The reference phenotype read through the one label vocabulary (`labels.read_labels`):
    any case, `intermediate` = unclassified, a mapping's `[labels]` recode; unreadable values
    are counted and left out, not an error."""
    if label not in frame.columns:
        near = difflib.get_close_matches(label, [str(c) for c in frame.columns], n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        raise EvaluationError(f"label column '{label}' is not in the cohort.{hint} Give the "
                              "column that holds the reference phenotype with --label.")
    return read_labels(frame[label], label, recode)


def remeasure(X: pd.DataFrame, cv_by_marker: Mapping[str, float], rng: np.random.Generator
              ) -> pd.DataFrame:
    """The same patients measured again: each marker times log-normal noise of the given CV."""
    out = X.copy()
    for column in NUMERIC_MARKERS:
        if column in out and column not in LINEAR_SCALE_MARKERS:
            cv = cv_by_marker.get(column, cv_by_marker["other"])
            sd = np.sqrt(np.log1p(cv**2))
            out[column] = out[column].to_numpy(dtype=float) * np.exp(rng.normal(0, sd, len(out)))
    return out


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


def _interval(samples: np.ndarray | None) -> tuple[float, float]:
    """Percentile interval; NaN when there are no resamples or the metric is undefined
    (NaN) in more than `MAX_UNDEFINED_SHARE` of them: dropping those resamples would bias the
    interval, which could then miss its own point estimate."""
    if samples is None:
        return np.nan, np.nan
    samples = np.atleast_1d(samples)
    finite = np.isfinite(samples)
    if not len(samples) or 1 - finite.mean() > MAX_UNDEFINED_SHARE:
        return np.nan, np.nan
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(samples[finite], [tail, 100 - tail])
    return float(low), float(high)


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


def _label_pairs(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """One-hot (patients, labels x labels) of each patient's pair of predicted labels."""
    codes = pd.Categorical(first, categories=PREDICTED_LABELS).codes * len(PREDICTED_LABELS) + \
        pd.Categorical(second, categories=PREDICTED_LABELS).codes
    return np.eye(len(PREDICTED_LABELS) ** 2)[codes]


def _kappa(pairs: np.ndarray) -> np.ndarray:
    """Cohen's kappa from weighted pair counts (resamples, labels x labels)."""
    L = len(PREDICTED_LABELS)
    table = pairs.reshape(-1, L, L)
    total = table.sum(axis=(1, 2))
    observed = _divide(np.trace(table, axis1=1, axis2=2), total)
    expected = _divide((table.sum(axis=2) * table.sum(axis=1)).sum(axis=1), total**2)
    return _divide(observed - expected, 1 - expected)


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
