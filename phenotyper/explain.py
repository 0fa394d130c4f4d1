"""SHAP explanations of the learned phenotypers, and the plots people look at."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pandas as pd
import shap
from sklearn.pipeline import Pipeline

from phenotyper.models import LogitRecalibrated, WeightedXGBClassifier
from phenotyper.rules import PHENOTYPES

SUMMARY_ROWS = 2000


def _pipeline(model: Any) -> Pipeline:
    """The fitted candidate pipeline inside an optional recalibration wrapper."""
    return model.base_ if isinstance(model, LogitRecalibrated) else model


def shap_values(model: Any, cohort: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Per-patient, per-feature, per-phenotype SHAP values (log-odds scale) and the features.

    Exact for both candidates: tree SHAP for XGBoost, and for the logistic model the linear
    explanation coefficient x (x - mean) in the standardised, imputed feature space.
    """
    pipeline = _pipeline(model)
    features, classifier = pipeline[:-1], pipeline[-1]
    X = np.asarray(features.transform(cohort), dtype=float)
    names = list(features.get_feature_names_out())
    if isinstance(classifier, WeightedXGBClassifier):
        explainer = shap.TreeExplainer(classifier.booster_)
        values = np.asarray(explainer.shap_values(X))
    else:
        explainer = shap.LinearExplainer(classifier, shap.maskers.Independent(X, X.shape[0]))
        values = np.asarray(explainer.shap_values(X))
    if values.ndim == 3 and values.shape[0] == len(PHENOTYPES) and values.shape[2] != len(
            PHENOTYPES):
        values = np.moveaxis(values, 0, -1)
    return values, X, names


def shap_summary_png(model: Any, cohort: pd.DataFrame, seed: int = 0) -> bytes | None:
    """Mean |SHAP| per feature and phenotype as a bar chart (shap's summary plot)."""
    import matplotlib.pyplot as plt

    rows = cohort.sample(min(SUMMARY_ROWS, len(cohort)), random_state=seed)
    values, X, names = shap_values(model, rows)
    per_class = [values[:, :, k] for k in range(values.shape[2])]
    plt.figure()
    shap.summary_plot(per_class, X, feature_names=names, plot_type="bar",
                      class_names=list(PHENOTYPES), show=False, max_display=15)
    figure = plt.gcf()
    figure.suptitle("Mean |SHAP| (log-odds) per feature and phenotype")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()
