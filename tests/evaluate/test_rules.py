"""The fixed-threshold rules: every boundary, missing markers, and the estimator contract."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone

from phenotyper.contract import IMMUNOPARALYSIS, INDETERMINATE, MALS, PHENOTYPES, UNCLASSIFIED
from phenotyper.rules import ImmunoSepRule, reference_rules

NA = np.nan


def _cohort(ferritin: list[float], hla_dr: list[float]) -> pd.DataFrame:
    return pd.DataFrame({"ferritin_ng_ml": ferritin, "hla_dr_mab_per_cell": hla_dr})


@pytest.mark.parametrize(
    ("ferritin", "hla_dr", "expected"),
    [
        (4420.0, 12000.0, UNCLASSIFIED),  # exactly 4420 is not MALS (strict)
        (4420.0001, 12000.0, MALS),
        (4420.0, 4999.0, IMMUNOPARALYSIS),
        (300.0, 5000.0, UNCLASSIFIED),  # exactly 5000 is not immunoparalysis (strict)
        (300.0, 4999.99, IMMUNOPARALYSIS),
        (9000.0, 2000.0, MALS),  # both criteria met: MALS takes precedence
        (9000.0, NA, MALS),  # MALS needs no HLA-DR
        (300.0, NA, INDETERMINATE),  # HLA-DR not measured: the rule cannot decide
        (NA, 2000.0, INDETERMINATE),  # ferritin missing: cannot rule out MALS
        (NA, 12000.0, INDETERMINATE),
        (NA, NA, INDETERMINATE),
    ],
)
def test_immunosep_rule_boundaries(ferritin: float, hla_dr: float, expected: str) -> None:
    X = _cohort([ferritin], [hla_dr])
    assert ImmunoSepRule().fit(X).predict(X)[0] == expected


def test_thresholds_are_parameters() -> None:
    X = _cohort([3000.0, 300.0], [12000.0, 7000.0])
    rule = ImmunoSepRule(ferritin_threshold_ng_ml=2500, hla_dr_threshold_mab_per_cell=8000)
    assert rule.fit(X).predict(X).tolist() == [MALS, IMMUNOPARALYSIS]


def test_variants_drop_a_criterion_and_need_only_their_marker() -> None:
    X = _cohort([9000.0, 300.0, NA, 300.0], [2000.0, 2000.0, 2000.0, NA])
    rules = {name: rule.fit(X) for name, rule in reference_rules().items()}
    assert rules["ferritin_only"].predict(X).tolist() == [
        MALS, UNCLASSIFIED, INDETERMINATE, UNCLASSIFIED]
    assert rules["hla_dr_only"].predict(X).tolist() == [
        IMMUNOPARALYSIS, IMMUNOPARALYSIS, IMMUNOPARALYSIS, INDETERMINATE]
    assert rules["immunosep_hla_dr_8000"].predict(_cohort([300.0], [7000.0]))[0] == (
        IMMUNOPARALYSIS)


def test_a_cohort_without_hla_dr_is_indeterminate_unless_mals() -> None:
    X = pd.DataFrame({"ferritin_ng_ml": [9000.0, 300.0]})
    assert ImmunoSepRule().fit(X).predict(X).tolist() == [MALS, INDETERMINATE]


def test_rule_is_a_scikit_learn_classifier() -> None:
    X = _cohort([9000.0, 300.0, 300.0, 300.0], [2000.0, 2000.0, 12000.0, NA])
    rule = ImmunoSepRule(hla_dr_threshold_mab_per_cell=6000)
    assert rule.fit(X, y=["a"] * 4) is rule
    assert list(rule.classes_) == list(PHENOTYPES)
    copy = clone(rule)
    assert copy.get_params() == rule.get_params() and not hasattr(copy, "classes_")
    proba = rule.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(proba[:3], np.eye(3))
    np.testing.assert_allclose(proba[3], 1 / 3)  # abstains: no phenotype favoured
    assert rule.score(X.iloc[:3], list(PHENOTYPES)) == 1.0


def test_rule_refuses_unnamed_arrays() -> None:
    with pytest.raises(TypeError, match="DataFrame"):
        ImmunoSepRule().fit(np.array([[9000.0, 2000.0]]))
