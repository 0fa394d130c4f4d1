"""Fixed-threshold phenotype rules (ImmunoSep and variants).

The rule decides from one marker at a time: ferritin > 4420 ng/mL is MALS (and takes
precedence); otherwise HLA-DR < 5000 antibodies/cell is immunoparalysis; otherwise
unclassified. Both comparisons are strict. A marker the rule needs that is missing makes the
answer `indeterminate`, which is not the same as `unclassified`.
"""

from __future__ import annotations

import numpy as np

MALS = "MALS"
IMMUNOPARALYSIS = "immunoparalysis"
UNCLASSIFIED = "unclassified"
INDETERMINATE = "indeterminate"
PHENOTYPES: tuple[str, ...] = (MALS, IMMUNOPARALYSIS, UNCLASSIFIED)

FERRITIN_MALS_NG_ML = 4420.0
HLA_DR_IMMUNOPARALYSIS_MAB_PER_CELL = 5000.0


def immunosep_phenotype(
    ferritin_ng_ml: np.ndarray,
    hla_dr_mab_per_cell: np.ndarray,
    ferritin_threshold_ng_ml: float = FERRITIN_MALS_NG_ML,
    hla_dr_threshold_mab_per_cell: float = HLA_DR_IMMUNOPARALYSIS_MAB_PER_CELL,
) -> np.ndarray:
    """The ImmunoSep rule on arrays of measured markers (NaN = not measured)."""
    ferritin = np.asarray(ferritin_ng_ml, dtype=float)
    hla_dr = np.asarray(hla_dr_mab_per_cell, dtype=float)
    return np.select(
        [
            ferritin > ferritin_threshold_ng_ml,
            np.isnan(ferritin) | np.isnan(hla_dr),
            hla_dr < hla_dr_threshold_mab_per_cell,
        ],
        [MALS, INDETERMINATE, IMMUNOPARALYSIS],
        default=UNCLASSIFIED,
    ).astype(object)
