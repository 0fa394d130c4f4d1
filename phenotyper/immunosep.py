"""The ImmunoSep rule as a function of the measured markers, with numpy only: scoring and the
simulator apply it without loading scikit-learn (rules.py wraps it as estimators)."""

from __future__ import annotations

import numpy as np

from phenotyper.contract import (
    FERRITIN_MALS_NG_ML,
    HLA_DR_IMMUNOPARALYSIS_MAB_PER_CELL,
    IMMUNOPARALYSIS,
    INDETERMINATE,
    MALS,
    UNCLASSIFIED,
)

# The markers the rule reads: ferritin decides MALS, HLA-DR immunoparalysis.
RULE_MARKERS = ("ferritin_ng_ml", "hla_dr_mab_per_cell")
# Share of PROVIDE patients whose rule phenotype on day 2 was the day-1 one (ImmunoSep, JAMA
# 2025, citing PROVIDE): what a phenotype's stability between consecutive samples is set against.
PUBLISHED_RULE_STABILITY = 0.883


def immunosep_phenotype(
    ferritin_ng_ml: np.ndarray,
    hla_dr_mab_per_cell: np.ndarray,
    ferritin_threshold_ng_ml: float | None = FERRITIN_MALS_NG_ML,
    hla_dr_threshold_mab_per_cell: float | None = HLA_DR_IMMUNOPARALYSIS_MAB_PER_CELL,
) -> np.ndarray:
    """The ImmunoSep rule on arrays of measured markers (NaN = not measured).

    A threshold of None drops that criterion (ferritin-only or HLA-DR-only rules); a marker
    whose criterion is dropped is not needed, so its absence does not make the answer
    indeterminate.
    """
    ferritin = np.asarray(ferritin_ng_ml, dtype=float)
    hla_dr = np.asarray(hla_dr_mab_per_cell, dtype=float)
    use_ferritin = ferritin_threshold_ng_ml is not None
    use_hla_dr = hla_dr_threshold_mab_per_cell is not None
    with np.errstate(invalid="ignore"):
        mals = ferritin > ferritin_threshold_ng_ml if use_ferritin else np.zeros(len(hla_dr), bool)
        paralysed = (hla_dr < hla_dr_threshold_mab_per_cell) if use_hla_dr else np.zeros_like(mals)
    missing = (np.isnan(ferritin) & use_ferritin) | (np.isnan(hla_dr) & use_hla_dr)
    return np.select(
        [mals, missing, paralysed], [MALS, INDETERMINATE, IMMUNOPARALYSIS], default=UNCLASSIFIED
    ).astype(object)
