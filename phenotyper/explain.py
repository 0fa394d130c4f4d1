"""SHAP plots people look at, drawn with the shap library from the packaged model's exact
contributions (see packaged.py): a patient's waterfall, and cohort beeswarm and bar plots."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import shap

from phenotyper.packaged import PackagedPhenotyper

SUMMARY_ROWS = 2000
DPI = 110


def _png() -> bytes:
    """The current pyplot figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    figure = plt.gcf()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _values(model: PackagedPhenotyper, cohort: pd.DataFrame) -> np.ndarray:
    """Feature values as the patient has them (not log-transformed), for the plots' labels."""
    return np.column_stack([
        pd.to_numeric(cohort[f], errors="coerce").to_numpy(dtype=float) if f != "sex"
        else (cohort[f].astype("string") == "M").astype(float).to_numpy()
        for f in model.features]) if len(model.features) else np.empty((len(cohort), 0))


def waterfall_png(model: PackagedPhenotyper, patient: pd.DataFrame,
                  title: str = "", max_display: int = 12) -> bytes:
    """One patient's explanation of the predicted phenotype (softmax logit scale)."""
    import matplotlib.pyplot as plt

    scored = model.predict(patient, explain="all").iloc[0]
    if scored["status"] != "ok":
        raise ValueError(f"patient cannot be scored: {scored['status']}")
    label = scored["phenotype"]
    explanation = shap.Explanation(
        values=np.array([scored[f"shap_{label}_{f}"] for f in model.features]),
        base_values=float(scored[f"shap_base_{label}"]),
        data=_values(model, patient)[0], feature_names=list(model.features))
    plt.figure()
    shap.plots.waterfall(explanation, max_display=max_display, show=False)
    plt.gcf().suptitle(title or f"{scored['patient_id']}: {label} "
                       f"(P = {scored['prob_' + label]:.2f}), contributions to its softmax logit")
    return _png()


def cohort_pngs(model: PackagedPhenotyper, cohort: pd.DataFrame, seed: int = 0
                ) -> dict[str, bytes]:
    """A beeswarm per phenotype and a bar plot of mean |SHAP| per feature and phenotype."""
    import matplotlib.pyplot as plt

    rows = cohort.sample(min(SUMMARY_ROWS, len(cohort)), random_state=seed)
    contributions, base, status = model.contributions(rows)
    keep = np.array([s == "ok" for s in status])
    contributions, values = contributions[keep], _values(model, rows)[keep]
    pictures = {}
    for k, label in enumerate(model.classes):
        explanation = shap.Explanation(values=contributions[:, k, :],
                                       base_values=np.full(keep.sum(), base[k]), data=values,
                                       feature_names=list(model.features))
        plt.figure()
        shap.plots.beeswarm(explanation, max_display=15, show=False)
        plt.gcf().suptitle(f"SHAP values for {label} (softmax logit)")
        pictures[f"shap_beeswarm_{label}.png"] = _png()
    plt.figure()
    shap.summary_plot([contributions[:, k, :] for k in range(len(model.classes))], values,
                      feature_names=list(model.features), plot_type="bar",
                      class_names=list(model.classes), show=False, max_display=15)
    plt.gcf().suptitle("Mean |SHAP| (softmax logit) per feature and phenotype")
    pictures["shap_summary.png"] = _png()
    return pictures
