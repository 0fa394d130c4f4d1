"""Fixed-threshold phenotype rules (ImmunoSep and variants) as scikit-learn classifiers.

The rule decides from one marker at a time: ferritin > 4420 ng/mL is MALS (and takes
precedence); otherwise HLA-DR < 5000 antibodies/cell is immunoparalysis; otherwise
unclassified. Both comparisons are strict. A marker the rule needs that is missing makes the
answer `indeterminate`, which is not the same as `unclassified`.

The rules follow the estimator API (`fit` learns nothing and returns self, `predict`,
one-hot `predict_proba`) so the evaluator judges them exactly as it judges learned models.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils import ClassifierTags, Tags

from phenotyper.contract import (
    FERRITIN_MALS_NG_ML,
    HLA_DR_IMMUNOPARALYSIS_MAB_PER_CELL,
    HLA_DR_MODERATE_MAB_PER_CELL,
    IMMUNOPARALYSIS,
    INDETERMINATE,
    MALS,
    PHENOTYPES,
    UNCLASSIFIED,
)
from phenotyper.immunosep import immunosep_phenotype

# The rules' words and cut-offs live in contract.py and the rule function in immunosep.py
# (neither needs scikit-learn); they are importable from here beside the estimators.
__all__ = ["FERRITIN_MALS_NG_ML", "HLA_DR_IMMUNOPARALYSIS_MAB_PER_CELL",
           "HLA_DR_MODERATE_MAB_PER_CELL", "IMMUNOPARALYSIS", "INDETERMINATE", "MALS",
           "PHENOTYPES", "UNCLASSIFIED", "ImmunoSepRule", "immunosep_phenotype",
           "reference_rules"]


@dataclass
class PhenotyperTags(ClassifierTags):
    """scikit-learn's classifier tags, plus whether `predict_proba` is a probability. The
    evaluator reports probability metrics (log loss, calibration) only where it is; a rule's
    one-hot answer is not."""

    probabilistic: bool = True


def is_probabilistic(estimator: object) -> bool:
    """Whether an estimator's probabilities mean something (its `PhenotyperTags`; an
    estimator without tags, such as a registered pyfunc model, is taken at its word)."""
    tags = getattr(estimator, "__sklearn_tags__", None)
    return getattr(tags().classifier_tags, "probabilistic", True) if tags else True


class ImmunoSepRule(ClassifierMixin, BaseEstimator):
    """The ImmunoSep fixed-threshold rule; thresholds are parameters (None drops a criterion).

    `predict` may answer `indeterminate` (not one of `classes_`): the rule abstains, unless
    `indeterminate_as` names the phenotype to answer instead (a fair reading of the rule for
    metrics that count an abstention as wrong: ImmunoSep did not treat such patients).
    `predict_proba` is one-hot over `classes_`, and uniform where the rule abstains.
    """

    def __sklearn_tags__(self) -> Tags:
        tags = super().__sklearn_tags__()
        tags.classifier_tags = PhenotyperTags(probabilistic=False)
        return tags

    def __init__(
        self,
        ferritin_threshold_ng_ml: float | None = FERRITIN_MALS_NG_ML,
        hla_dr_threshold_mab_per_cell: float | None = HLA_DR_IMMUNOPARALYSIS_MAB_PER_CELL,
        indeterminate_as: str | None = None,
    ) -> None:
        self.ferritin_threshold_ng_ml = ferritin_threshold_ng_ml
        self.hla_dr_threshold_mab_per_cell = hla_dr_threshold_mab_per_cell
        self.indeterminate_as = indeterminate_as

    def fit(self, X: pd.DataFrame, y: object = None) -> ImmunoSepRule:
        """Learn nothing: a fixed rule. Sets `classes_` so it looks like any classifier."""
        self._markers(X)
        self.classes_ = np.array(PHENOTYPES, dtype=object)
        return self

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        ferritin, hla_dr = self._markers(X)
        labels = immunosep_phenotype(
            ferritin, hla_dr, self.ferritin_threshold_ng_ml, self.hla_dr_threshold_mab_per_cell
        )
        if self.indeterminate_as is not None:
            labels[labels == INDETERMINATE] = self.indeterminate_as
        return labels

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        labels = self.predict(X)
        proba = (labels[:, None] == np.array(PHENOTYPES, dtype=object)[None, :]).astype(float)
        proba[labels == INDETERMINATE] = 1.0 / len(PHENOTYPES)
        return proba

    @staticmethod
    def _markers(X: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Ferritin and HLA-DR columns (NaN where a column is absent altogether)."""
        if not isinstance(X, pd.DataFrame):
            raise TypeError("fixed rules read markers by name: pass a DataFrame in panel columns")
        n = len(X)

        def column(name: str) -> np.ndarray:
            return X[name].to_numpy(dtype=float) if name in X else np.full(n, np.nan)

        return column("ferritin_ng_ml"), column("hla_dr_mab_per_cell")


def reference_rules() -> dict[str, ImmunoSepRule]:
    """The rules every benchmark compares against, by name (`immunosep` is the reference)."""
    return {
        "immunosep": ImmunoSepRule(),
        "ferritin_only": ImmunoSepRule(hla_dr_threshold_mab_per_cell=None),
        "hla_dr_only": ImmunoSepRule(ferritin_threshold_ng_ml=None),
        "immunosep_hla_dr_8000": ImmunoSepRule(
            hla_dr_threshold_mab_per_cell=HLA_DR_MODERATE_MAB_PER_CELL
        ),
        "immunosep_indeterminate_as_unclassified": ImmunoSepRule(
            indeterminate_as=UNCLASSIFIED
        ),
    }
