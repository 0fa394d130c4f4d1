"""SHAP figures of a packaged model, drawn with shap's own plots."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from phenotyper.contract import is_scored
from phenotyper.panel import sex_code

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from phenotyper.packaged import PackagedPhenotyper


SUMMARY_ROWS = 2000


def _values(model: PackagedPhenotyper, cohort: pd.DataFrame) -> np.ndarray:
    """Feature values as the patient has them (not log-transformed), for the plots' labels."""
    return np.column_stack([
        pd.to_numeric(cohort[f], errors="coerce").to_numpy(dtype=float) if f != "sex"
        else sex_code(cohort[f])  # a missing sex stays missing, not female
        for f in model.features]) if len(model.features) else np.empty((len(cohort), 0))


def waterfall_figure(model: PackagedPhenotyper, patient: pd.DataFrame,
                     title: str = "", max_display: int = 12) -> Figure:
    """One patient's explanation of the predicted phenotype (softmax logit scale)."""
    import matplotlib.pyplot as plt
    import shap

    scored = model.predict(patient, explain="all").iloc[0]
    if not is_scored(scored["status"]):
        raise ValueError(f"patient cannot be scored: {scored['status']}")
    label = scored["phenotype"]
    explanation = shap.Explanation(
        values=np.array([scored[f"shap_{label}_{f}"] for f in model.features]),
        base_values=float(scored[f"shap_base_{label}"]),
        data=_values(model, patient)[0], feature_names=list(model.features))
    plt.figure()
    shap.plots.waterfall(explanation, max_display=max_display, show=False)
    figure = plt.gcf()  # shap may draw on a figure of its own
    figure.suptitle(title or f"{scored['patient_id']}: {label} "
                    f"(P = {scored['prob_' + label]:.2f}), contributions to its softmax logit")
    plt.close(figure)  # the caller saves or logs it; pyplot keeps no reference
    return figure


def cohort_figures(model: PackagedPhenotyper, cohort: pd.DataFrame, seed: int = 0
                   ) -> dict[str, Figure]:
    """A beeswarm per phenotype and a bar plot of mean |SHAP| per feature and phenotype."""
    import matplotlib.pyplot as plt
    import shap

    rows = cohort.sample(min(SUMMARY_ROWS, len(cohort)), random_state=seed)
    contributions, base, status = model.contributions(rows)
    keep = np.array([is_scored(s) for s in status])
    contributions, values = contributions[keep], _values(model, rows)[keep]
    pictures = {}
    for k, label in enumerate(model.classes):
        explanation = shap.Explanation(values=contributions[:, k, :],
                                       base_values=np.full(keep.sum(), base[k]), data=values,
                                       feature_names=list(model.features))
        plt.figure()
        shap.plots.beeswarm(explanation, max_display=15, show=False)
        figure = plt.gcf()
        figure.suptitle(f"SHAP values for {label} (softmax logit)")
        plt.close(figure)
        pictures[f"shap_beeswarm_{label}.png"] = figure
    plt.figure()
    shap.summary_plot([contributions[:, k, :] for k in range(len(model.classes))], values,
                      feature_names=list(model.features), plot_type="bar",
                      class_names=list(model.classes), show=False, max_display=15)
    figure = plt.gcf()
    figure.suptitle("Mean |SHAP| (softmax logit) per feature and phenotype")
    plt.close(figure)
    pictures["shap_summary.png"] = figure
    return pictures
