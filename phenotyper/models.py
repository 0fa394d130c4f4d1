"""Candidate phenotypers learned from the marker panel, built from an experiment's spec.

Every candidate is a scikit-learn pipeline that takes a cohort DataFrame in panel columns and
answers with `classes_` = the three phenotypes, so the evaluator, the rules and the registry all
see the same interface:

- `logistic`: regularised multinomial logistic regression on log-transformed markers, with
  median imputation plus a missing-indicator per marker and standardisation;
- `xgboost`: gradient-boosted trees with native missing values and balanced class weights (the
  MALS class is rare); its probabilities are prior-corrected for those weights, so weighting
  changes what the trees attend to, not the calibration;
- `gaussian`: class-conditional Gaussians (full covariance per phenotype) on the same scale,
  missing markers marginalised rather than imputed: QDA that tolerates missing data, fitted by
  `latent.fit_mixture` with every row anchored to its label. Its logits are quadratic per
  pattern of measured markers, so its Shapley values have a closed form
  (`latent.quadratic_shapley`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from xgboost import XGBClassifier

from phenotyper.calibration import fit_matrix_scaling
from phenotyper.contract import PHENOTYPES
from phenotyper.latent import Mixture, fit_mixture, log_joint, point_intervals, posterior
from phenotyper.panel import LINEAR_SCALE_MARKERS, NUMERIC_MARKERS, PANEL, sex_code, to_log_scale

CANDIDATES = ("logistic", "xgboost", "gaussian")


class PanelFeatures(TransformerMixin, BaseEstimator):
    """Cohort DataFrame -> float matrix of the chosen features.

    Lab markers are log-transformed (their distributions are log-normal-like and the effects
    multiplicative); SOFA and age stay linear; sex becomes 1 for M, 0 for F; extra numeric
    columns pass unchanged. Missing stays NaN for the next step to handle.
    """

    def __init__(self, features: Sequence[str] = ()) -> None:
        self.features = features

    def fit(self, X: pd.DataFrame, y: object = None) -> PanelFeatures:
        missing = [f for f in self.features if f not in X]
        if missing:
            raise ValueError(f"the cohort lacks feature columns {missing}")
        self.n_features_in_ = len(self.features)
        return self

    def transform(self, X: pd.DataFrame) -> np.ndarray:
        columns = []
        for name in self.features:
            if name == "sex":
                columns.append(sex_code(X[name]))
                continue
            values = pd.to_numeric(X[name], errors="coerce").to_numpy(dtype=float)
            if name in PANEL and name not in LINEAR_SCALE_MARKERS:
                values = to_log_scale(values)
            columns.append(values)
        return np.column_stack(columns) if columns else np.empty((len(X), 0))

    def get_feature_names_out(self, input_features: object = None) -> np.ndarray:
        return np.array([f"log {f}" if f in NUMERIC_MARKERS and f not in LINEAR_SCALE_MARKERS
                         else f for f in self.features], dtype=object)


class WeightedXGBClassifier(ClassifierMixin, BaseEstimator):
    """XGBoost on phenotype labels, with optional balanced class weights, prior-corrected.

    Trained with class weights w_k the booster estimates q_k proportional to w_k p_k; dividing
    by w_k and renormalising recovers p_k, so the output stays a calibrated probability.
    """

    def __init__(self, n_estimators: int = 300, max_depth: int = 4,
                 learning_rate: float = 0.1, min_child_weight: float = 1.0,
                 subsample: float = 0.9, colsample_bytree: float = 0.9,
                 reg_lambda: float = 1.0, class_weight: str | None = "balanced",
                 n_jobs: int = 2, random_state: int = 0) -> None:
        self.n_estimators = n_estimators
        self.max_depth = max_depth
        self.learning_rate = learning_rate
        self.min_child_weight = min_child_weight
        self.subsample = subsample
        self.colsample_bytree = colsample_bytree
        self.reg_lambda = reg_lambda
        self.class_weight = class_weight
        self.n_jobs = n_jobs
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: Sequence[Any],
            sample_weight: np.ndarray | None = None) -> WeightedXGBClassifier:
        """`sample_weight`: per-row weights (a distilled posterior's soft labels); balanced
        class weights then balance the classes' weighted totals."""
        self.classes_, codes = np.unique(np.asarray(y), return_inverse=True)
        rows = np.ones(len(codes)) if sample_weight is None else np.asarray(sample_weight, float)
        totals = np.bincount(codes, weights=rows, minlength=len(self.classes_))
        self.class_weight_ = (totals.sum() / (len(self.classes_) * totals)
                              if self.class_weight else np.ones(len(self.classes_)))
        weight = rows * self.class_weight_[codes]
        self.booster_ = XGBClassifier(
            n_estimators=self.n_estimators, max_depth=self.max_depth,
            learning_rate=self.learning_rate, min_child_weight=self.min_child_weight,
            subsample=self.subsample, colsample_bytree=self.colsample_bytree,
            reg_lambda=self.reg_lambda, n_jobs=self.n_jobs, random_state=self.random_state,
            tree_method="hist", objective="multi:softprob", num_class=len(self.classes_),
            eval_metric="mlogloss",
        ).fit(X, codes, sample_weight=weight)
        self.n_features_in_ = np.asarray(X).shape[1]
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        corrected = self.booster_.predict_proba(X) / self.class_weight_
        return corrected / corrected.sum(axis=1, keepdims=True)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Log of the prior-corrected probabilities up to a per-row constant (softmax logits)."""
        margins = self.booster_.predict(X, output_margin=True)
        return margins - np.log(self.class_weight_)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


class GaussianClassifier(ClassifierMixin, BaseEstimator):
    """Class-conditional Gaussians over the numeric features of a `PanelFeatures` matrix
    (`features` names its columns; sex and other non-Gaussian columns are left out), missing
    values marginalised exactly. `covariance`: one per class ("full", QDA) or shared ("tied",
    LDA)."""

    def __init__(self, features: Sequence[str] = (), covariance: str = "full") -> None:
        self.features = features
        self.covariance = covariance

    def fit(self, X: np.ndarray, y: Sequence[Any],
            sample_weight: np.ndarray | None = None) -> GaussianClassifier:
        """Every row anchored to its label; `sample_weight` counts a row as that many patients
        (a distilled posterior's soft labels)."""
        self.classes_, codes = np.unique(np.asarray(y), return_inverse=True)
        self.columns_ = np.array([j for j, f in enumerate(self.features)
                                  if f in NUMERIC_MARKERS], dtype=int)
        x = np.asarray(X, dtype=float)[:, self.columns_]
        fit = fit_mixture(*point_intervals(x), [self.features[j] for j in self.columns_],
                          len(self.classes_), self.covariance, n_init=0, anchors=codes,
                          sample_weight=sample_weight)
        self.mixture_ = fit.mixture.renamed([str(c) for c in self.classes_])
        self.n_features_in_ = np.asarray(X).shape[1]
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Each class's log joint density of the measured features (softmax logits)."""
        x = np.asarray(X, dtype=float)[:, self.columns_]
        return log_joint(self.mixture_, *point_intervals(x))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return softmax(self.decision_function(X), axis=1)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


class LogitRecalibrated(ClassifierMixin, BaseEstimator):
    """A candidate whose softmax logits are re-mapped by matrix scaling fitted on out-of-fold
    probabilities (`calibration.fit_matrix_scaling`: a ridge fit centred on no change).

    Unlike temperature scaling it can fix per-class slopes and intercepts (a heavily shrunk
    model needs both), and it stays linear in the base model's logits, so its explanations
    remain exact. The base model is refitted on all training patients.
    """

    def __init__(self, base: Any = None, cv: Any = None) -> None:
        self.base = base
        self.cv = cv

    def fit(self, X: pd.DataFrame, y: Sequence[Any]) -> LogitRecalibrated:
        from sklearn.base import clone
        from sklearn.model_selection import cross_val_predict

        y = np.asarray(y)
        proba = cross_val_predict(clone(self.base), X, y, cv=self.cv, method="predict_proba")
        self.base_ = clone(self.base).fit(X, y)
        self.classes_ = self.base_.classes_
        codes = pd.Categorical(y, categories=self.classes_).codes
        self.calibration_matrix_, self.calibration_intercept_ = fit_matrix_scaling(
            codes, proba).on_logits()
        return self

    def decision_function(self, X: pd.DataFrame) -> np.ndarray:
        return (self.base_.decision_function(X) @ self.calibration_matrix_.T
                + self.calibration_intercept_)

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        return softmax(self.decision_function(X), axis=1)

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


class LatentClassifier(ClassifierMixin, BaseEstimator):
    """A fitted latent-class mixture (named, `latent.named`) as a phenotyper: the posterior
    over PHENOTYPES from the markers it models, missing ones marginalised."""

    def __init__(self, mixture: Mixture | None = None) -> None:
        self.mixture = mixture

    def fit(self, X: pd.DataFrame, y: object = None) -> LatentClassifier:
        """Nothing to learn: the mixture was fitted by `latent.fit_mixture`."""
        self.classes_ = np.array(PHENOTYPES, dtype=object)
        return self

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        return posterior(self.mixture, X)

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]


def build_candidate(kind: str, features: Sequence[str],
                    params: Mapping[str, Any] | None = None) -> Pipeline:
    """An unfitted candidate pipeline; `params` are the classifier's own parameters."""
    params = dict(params or {})
    if kind == "logistic":
        steps = [
            ("features", PanelFeatures(tuple(features))),
            ("impute", SimpleImputer(strategy="median", add_indicator=True,
                                     keep_empty_features=True)),
            ("scale", StandardScaler()),
            ("classifier", LogisticRegression(max_iter=2000, **params)),
        ]
    elif kind == "xgboost":
        steps = [
            ("features", PanelFeatures(tuple(features))),
            ("classifier", WeightedXGBClassifier(**params)),
        ]
    elif kind == "gaussian":
        steps = [
            ("features", PanelFeatures(tuple(features))),
            ("classifier", GaussianClassifier(tuple(features), **params)),
        ]
    else:
        raise ValueError(f"unknown candidate '{kind}'; choose from {', '.join(CANDIDATES)}")
    return Pipeline(steps)
