"""One adapter per model kind in the package: how its logits and exact contributions are
computed from the feature matrix, and how its explanations are described. The packaged model
adds what every kind shares (feature reading, the calibration map, the output contract)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from phenotyper.latent import Mixture, log_joint, point_intervals, quadratic_shapley
from phenotyper.treeshap import tree_explainer

ADDITIVITY_TOLERANCE = 1e-6  # |sum of contributions + base - logit|, relative to 1 + |logit|


class LinearAdapter:
    """Multinomial logistic regression on imputed, missing-indicated, standardised features."""

    def __init__(self, spec: dict[str, Any], folder: Path, threads: int) -> None:
        self.impute_median = np.array(spec["impute_median"])
        self.indicator_of = list(spec["indicator_of"])
        self.scale_mean, self.scale_sd = np.array(spec["scale_mean"]), np.array(spec["scale_sd"])
        self.coef, self.intercept = np.array(spec["coef"]), np.array(spec["intercept"])

    def _standardised(self, X: np.ndarray) -> np.ndarray:
        """The model's columns: imputed features, then missing indicators, scaled."""
        missing = np.isnan(X)
        imputed = np.where(missing, self.impute_median, X)
        columns = np.hstack([imputed, missing[:, self.indicator_of].astype(float)])
        return (columns - self.scale_mean) / self.scale_sd

    def logits(self, X: np.ndarray) -> np.ndarray:
        return self._standardised(X) @ self.coef.T + self.intercept

    def contributions(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """coef x standardised value per model column, folded back onto panel features
        (a marker's missing-indicator column counts towards that marker)."""
        standard = self._standardised(X)
        width = X.shape[1]
        contributions = standard[:, None, :width] * self.coef[None, :, :width]
        for position, feature in enumerate(self.indicator_of):  # (n, K) at a time
            column = width + position
            contributions[:, :, feature] += standard[:, None, column] * self.coef[None, :, column]
        return contributions, self.intercept

    def describe(self) -> dict[str, Any]:
        return {"method": "exact linear contributions (coefficient x standardised value)"}


class XGBoostAdapter:
    """A boosted-tree booster in XGBoost's own format, with exact TreeSHAP tables compiled at
    load; `logit_offset` undoes the class weights training used."""

    def __init__(self, spec: dict[str, Any], folder: Path, threads: int) -> None:
        import xgboost

        self.n_classes = len(spec["classes"])
        self.logit_offset = np.array(spec["logit_offset"])
        self.booster = xgboost.Booster()
        self.booster.load_model(str(folder / spec["booster"]))
        self.booster.set_param({"nthread": threads})
        self.explainer = tree_explainer(self.booster, threads)  # compiled at load

    def logits(self, X: np.ndarray) -> np.ndarray:
        """The booster's margin: no TreeSHAP, orders of magnitude cheaper."""
        import xgboost

        margin = self.booster.predict(xgboost.DMatrix(X, missing=np.nan), output_margin=True)
        return np.asarray(margin).reshape(len(X), self.n_classes) + self.logit_offset

    def contributions(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raw = self.explainer.shap_values(X)  # (n, K, F + 1), bias last
        return raw[:, :, :-1], raw[0, :, -1] + self.logit_offset

    def describe(self) -> dict[str, Any]:
        return self.explainer.describe()


class GaussianAdapter:
    """Class-conditional Gaussians (the `gaussian` candidate): logits are log joint densities
    of the measured markers; contributions are their exact interventional Shapley values
    against the mixture's mean patient, checked to add up on every row."""

    def __init__(self, spec: dict[str, Any], folder: Path, threads: int) -> None:
        self.mixture = Mixture.from_dict(spec["gaussian"])
        self.n_features = len(spec["features"])
        self.columns = [spec["features"].index(c) for c in self.mixture.columns]

    def logits(self, X: np.ndarray) -> np.ndarray:
        return log_joint(self.mixture, *point_intervals(X[:, self.columns]))

    def contributions(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        values, base = quadratic_shapley(self.mixture, X[:, self.columns])
        logits = self.logits(X)
        gap = np.abs(values.sum(axis=2) + base - logits)
        if not np.all(gap <= ADDITIVITY_TOLERANCE * (1 + np.abs(logits))):
            raise RuntimeError(f"Shapley values miss the logit by up to {gap.max():.3g}: "
                               "the gaussian explanations are broken (please report)")
        contributions = np.zeros((len(X), self.mixture.n_classes, self.n_features))
        contributions[:, :, self.columns] = values
        return contributions, base

    def describe(self) -> dict[str, Any]:
        return {"method": "exact interventional Shapley values of each missingness pattern's "
                          "quadratic logit against the mixture's mean patient (closed form; "
                          "what leaving markers unmeasured changes is shared by those markers)"}


ADAPTERS: dict[str, type[LinearAdapter] | type[XGBoostAdapter] | type[GaussianAdapter]] = {
    "linear": LinearAdapter, "xgboost": XGBoostAdapter, "gaussian": GaussianAdapter}
