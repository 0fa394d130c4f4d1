"""Weighted metrics: every metric as a function of a matrix of bootstrap weights (one row per
resample, one column per patient), so the point estimate (all weights 1) and thousands of
resamples run through the same vectorised code; tests check the point estimates against
scikit-learn."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from phenotyper.contract import (
    ANAKINRA,
    ARM_OF,
    ARMS,
    IMMUNOPARALYSIS,
    INTERFERON_GAMMA,
    MALS,
    PHENOTYPES,
    PLACEBO,
    PREDICTED_LABELS,
)
from phenotyper.rules import is_probabilistic

K = len(PHENOTYPES)

# What a clinician does with each phenotype: ImmunoSep's treatments (contract.ARM_OF); placebo
# stands for "no immunotherapy" in the label-based treatment table.
TREATMENTS, TREATMENT_OF = ARMS, ARM_OF
# Phenotype each treatment is for (decision curves: "treat if P(phenotype) >= threshold").
TREATED_PHENOTYPE = {ANAKINRA: MALS, INTERFERON_GAMMA: IMMUNOPARALYSIS}
_LOGIT_CLIP = 1e-6
# Calibration fits: Newton steps at most, convergence on the Newton step, the longest step
# taken unchecked, and the smallest weighted variance of the logit that identifies a slope.
_NEWTON_MAX_STEPS = 50
_NEWTON_TOLERANCE = 1e-9
_NEWTON_TRUSTED_STEP = 0.5  # longer steps (on the logit scale) are checked and halved if need be
_MIN_LOGIT_VARIANCE = 1e-8


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


NET_BENEFIT_THRESHOLDS = (0.1, 0.25, 0.5)


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
    return Predictions(labels, proba, is_probabilistic(estimator))


class EvaluationError(ValueError):
    """Input the evaluator cannot judge (labels outside the phenotypes, no patients...)."""
