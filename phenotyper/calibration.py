"""Calibration of phenotype probabilities, tested and fixed jointly across phenotypes.

One model, one test: multinomial matrix scaling on the K-1 log-ratios against the last
phenotype (`unclassified`), `new log-ratios = b + A @ log-ratios`, has K-1 intercepts and
(K-1)^2 slopes (6 for three phenotypes); the identity map (b = 0, A = I) is "no change". The
likelihood-ratio test of the fitted map against the identity asks whether the probabilities are
off at all, in one p-value instead of six per-phenotype intervals. The refit is a ridge fit
centred on the identity, so a small sample moves the map little. The map is linear in the
model's logits, so a recalibrated model keeps exact explanations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax, softmax
from scipy.stats import chi2

CALIBRATION_ALPHA = 0.05  # the joint test's level: miscalibrated when p < alpha
# Assumption: the prior on the identity map weighs as much as this many patients' worth of
# evidence (ridge precision = patients x the most one patient can tell, see fit_matrix_scaling).
SHRINKAGE_PATIENTS = 10.0
_PROBABILITY_FLOOR = 1e-9  # log-ratios of a probability of exactly 0 would be infinite


def log_ratios(proba: np.ndarray) -> np.ndarray:
    """(n, K) probabilities as (n, K-1) log-ratios against the last class."""
    logs = np.log(np.clip(proba, _PROBABILITY_FLOOR, 1.0))
    return logs[:, :-1] - logs[:, -1:]


@dataclass(frozen=True)
class MatrixScaling:
    """A fitted map of log-ratios: `b + A @ z` (A is (K-1, K-1), b is (K-1,))."""

    slopes: np.ndarray
    intercepts: np.ndarray

    @classmethod
    def identity(cls, n_classes: int) -> MatrixScaling:
        return cls(np.eye(n_classes - 1), np.zeros(n_classes - 1))

    def logits(self, proba: np.ndarray) -> np.ndarray:
        """Recalibrated logits (n, K), the last class's 0."""
        z = log_ratios(proba) @ self.slopes.T + self.intercepts
        return np.column_stack([z, np.zeros(len(z))])

    def apply(self, proba: np.ndarray) -> np.ndarray:
        """Recalibrated probabilities (n, K)."""
        return softmax(self.logits(proba), axis=1)

    def on_logits(self) -> tuple[np.ndarray, np.ndarray]:
        """The same map on any K logits `L` of a model, as `M @ L + m` (M (K, K), m (K,)):
        it reads only their differences from the last class, so a shift of all K is moot."""
        k = len(self.intercepts) + 1
        matrix = np.zeros((k, k))
        matrix[:-1, :-1] = self.slopes
        matrix[:-1, -1] = -self.slopes.sum(axis=1)
        return matrix, np.append(self.intercepts, 0.0)

    def as_dict(self) -> dict[str, list]:
        return {"slopes": self.slopes.tolist(), "intercepts": self.intercepts.tolist()}


def fit_matrix_scaling(codes: np.ndarray, proba: np.ndarray,
                       shrinkage_patients: float = SHRINKAGE_PATIENTS) -> MatrixScaling:
    """The map maximising the log-likelihood of `codes` (0..K-1) minus a ridge penalty
    centred on the identity (`shrinkage_patients` = 0: maximum likelihood)."""
    codes = np.asarray(codes, dtype=np.int64)
    k = proba.shape[1]
    z = log_ratios(proba)
    onehot = np.eye(k)[codes][:, :-1]
    identity = np.concatenate([np.zeros(k - 1), np.eye(k - 1).ravel()])
    # per parameter: an intercept's information per patient is at most 1/4, a slope's that
    # times its log-ratio's mean square, so the prior counts patients on every parameter's scale
    spread = np.tile(np.mean(z**2, axis=0), k - 1)
    precision = max(shrinkage_patients, 1e-6) / 4.0 * np.concatenate([np.ones(k - 1), spread])

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        b, a = theta[: k - 1], theta[k - 1:].reshape(k - 1, k - 1)
        logits = np.column_stack([z @ a.T + b, np.zeros(len(z))])
        log_p = log_softmax(logits, axis=1)
        residual = np.exp(log_p[:, :-1]) - onehot
        shift = theta - identity
        value = -log_p[np.arange(len(codes)), codes].sum() + 0.5 * (precision * shift) @ shift
        gradient = np.concatenate([residual.sum(axis=0), (residual.T @ z).ravel()])
        return value, gradient + precision * shift

    fitted = minimize(objective, identity, jac=True, method="L-BFGS-B",
                      options={"maxiter": 1000})
    return MatrixScaling(fitted.x[k - 1:].reshape(k - 1, k - 1), fitted.x[: k - 1])


def log_likelihood(codes: np.ndarray, proba: np.ndarray) -> float:
    """Sum of log-probabilities of the true classes."""
    codes = np.asarray(codes, dtype=np.int64)
    return float(np.log(np.clip(proba[np.arange(len(codes)), codes], _PROBABILITY_FLOOR, 1)
                        ).sum())


@dataclass(frozen=True)
class CalibrationTest:
    """The likelihood-ratio test of matrix scaling against no change."""

    n: int
    statistic: float  # 2 x (log-likelihood of the fitted map - of the probabilities as given)
    df: int
    p_value: float
    alpha: float
    fitted: MatrixScaling  # the maximum-likelihood map

    @property
    def miscalibrated(self) -> bool:
        return self.p_value < self.alpha

    def as_dict(self) -> dict[str, float | int | bool]:
        return {"n": self.n, "statistic": self.statistic, "df": self.df,
                "p_value": self.p_value, "alpha": self.alpha,
                "miscalibrated": self.miscalibrated}

    def describe(self) -> str:
        verdict = "miscalibrated" if self.miscalibrated else "no evidence of miscalibration"
        return (f"likelihood ratio {self.statistic:.1f} on {self.df} df, p = {self.p_value:.3g} "
                f"(n = {self.n:,}, alpha {self.alpha:g}): {verdict}")


def calibration_test(codes: np.ndarray, proba: np.ndarray,
                     alpha: float = CALIBRATION_ALPHA) -> CalibrationTest:
    """Whether probabilities (n, K) are calibrated for `codes`, all phenotypes in one test."""
    fitted = fit_matrix_scaling(codes, proba, shrinkage_patients=0.0)
    gain = log_likelihood(codes, fitted.apply(proba)) - log_likelihood(codes, proba)
    statistic = max(2.0 * gain, 0.0)
    k = proba.shape[1]
    df = (k - 1) + (k - 1) ** 2
    return CalibrationTest(len(codes), statistic, df, float(chi2.sf(statistic, df)), alpha,
                           fitted)
