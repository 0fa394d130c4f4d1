"""Fair comparisons with the rule: what the extra markers add, abstentions, rule-derived labels."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from phenotyper.contract import INDETERMINATE, PHENOTYPES, UNCLASSIFIED
from phenotyper.evaluate.benchmark import RULE_DETERMINATE
from phenotyper.rules import reference_rules
from phenotyper.simulate import bayes_posterior, load_preset, simulate
from phenotyper.training.fit import fit_and_evaluate
from phenotyper.training.gate import promotion_decision
from phenotyper.training.spec import (
    AGREEMENT,
    TWO_MARKER,
    ExperimentError,
    ExperimentSpec,
    check_spec,
)

EQUIVALENCE_MARGIN = 0.01  # the issue's: full model within +/-0.01 of the two-marker reference


def _records(result):
    return result.benchmark.records.set_index(["phenotyper", "metric", "subgroup"])


@pytest.fixture(scope="module")
def null_markers_run():
    """The default logistic candidate on the null-markers law at n = 20,000."""
    spec = ExperimentSpec(name="null", registered_model="null", label="phenotype_true",
                          preset="null-markers", n=20_000, cohort_seed=21,
                          candidates={"logistic": {"C": [1.0]}}, bootstrap=300, noise_repeats=0)
    return fit_and_evaluate(spec)


def test_on_null_markers_the_bayes_optimum_gains_nothing_from_the_other_markers() -> None:
    cohort = simulate("null-markers", 10_000, seed=3)
    truth = cohort["phenotype_true"].to_numpy()
    labels = np.asarray(PHENOTYPES, dtype=object)
    full = labels[bayes_posterior("null-markers", cohort).argmax(axis=1)]
    rule_markers_only = cohort.copy()
    others = [c for c in load_preset("null-markers").values
              if c in cohort and c not in ("ferritin_ng_ml", "hla_dr_mab_per_cell", "age_years")]
    rule_markers_only[others] = np.nan
    two = labels[bayes_posterior("null-markers", rule_markers_only).argmax(axis=1)]
    assert abs(balanced_accuracy_score(truth, full) - balanced_accuracy_score(truth, two)) < 0.003
    # on the screening law the other markers do carry information
    screening = simulate("immunosep-screening", 10_000, seed=3)
    blank = screening.copy()
    blank[others] = np.nan
    truth = screening["phenotype_true"].to_numpy()
    gain = (balanced_accuracy_score(truth, labels[bayes_posterior(
        "immunosep-screening", screening).argmax(axis=1)])
        - balanced_accuracy_score(truth, labels[bayes_posterior(
            "immunosep-screening", blank).argmax(axis=1)]))
    assert gain > 0.02


def test_on_null_markers_the_full_model_is_equivalent_to_the_two_marker_reference(
        null_markers_run) -> None:
    records = _records(null_markers_run)
    selected = null_markers_run.selected
    difference = records.loc[(selected, f"balanced_accuracy_minus_{TWO_MARKER}", "all")]
    assert abs(difference.value) <= EQUIVALENCE_MARGIN
    assert difference.ci_low <= 0 <= difference.ci_high
    # both beat the rule overall: the headroom is better cut-offs and fewer abstentions
    assert records.loc[(TWO_MARKER, "balanced_accuracy_minus_immunosep", "all")].ci_low > 0


def test_the_gate_reports_the_two_marker_and_determinate_differences(null_markers_run) -> None:
    decision = promotion_decision(null_markers_run, champion_version=None)
    for key in ("rule_difference", "determinate_difference", "two_marker_difference"):
        assert key in decision.numbers
    records = _records(null_markers_run)
    determinate = records.loc[(null_markers_run.selected, "balanced_accuracy_minus_immunosep",
                               RULE_DETERMINATE)]
    assert decision.numbers["determinate_difference"] == pytest.approx(determinate.value)
    if decision.promote:
        assert determinate.ci_low > 0
    else:
        assert "where the rule can type" in decision.reason or "does not beat" in decision.reason


def test_requiring_the_two_marker_reference_stops_a_model_whose_extra_markers_add_nothing(
        null_markers_run) -> None:
    import dataclasses

    strict = dataclasses.replace(null_markers_run, spec=dataclasses.replace(
        null_markers_run.spec, two_marker="require"))
    decision = promotion_decision(strict, champion_version=None)
    assert not decision.promote
    assert "add nothing measurable" in decision.reason


def test_determinate_metrics_are_the_metrics_on_the_rules_typed_patients(
        null_markers_run) -> None:
    test = null_markers_run.test
    rule = reference_rules()["immunosep"].fit(test).predict(test)
    typed = rule != INDETERMINATE
    expected = balanced_accuracy_score(test.loc[typed, "phenotype_true"], rule[typed])
    row = _records(null_markers_run).loc[("immunosep", "balanced_accuracy", RULE_DETERMINATE)]
    assert row.value == pytest.approx(expected)
    # reading indeterminate as unclassified changes nothing where the rule can type
    variant = _records(null_markers_run).loc[
        ("immunosep_indeterminate_as_unclassified", "balanced_accuracy", "all")]
    relabelled = np.where(typed, rule, UNCLASSIFIED)
    assert variant.value == pytest.approx(balanced_accuracy_score(test["phenotype_true"],
                                                                  relabelled))


def test_hla_dr_measured_and_not_are_subgroups(null_markers_run) -> None:
    records = _records(null_markers_run)
    measured = null_markers_run.test["hla_dr_mab_per_cell"].notna()
    assert records.loc[("immunosep", "n", "hla_dr=measured")].value == measured.sum()
    assert records.loc[("immunosep", "n", "hla_dr=not measured")].value == (~measured).sum()


def test_a_rule_derived_label_cannot_pass_the_superiority_gate_and_says_why() -> None:
    spec = ExperimentSpec(name="rule", registered_model="rule", label="phenotype_rule",
                          preset="provide", n=3000, cohort_seed=2,
                          candidates={"logistic": {"C": [1.0]}}, bootstrap=50, noise_repeats=0)
    decision = promotion_decision(fit_and_evaluate(spec), champion_version=None)
    assert not decision.promote
    assert "rule's own answer" in decision.reason and "agreement" in decision.reason


@pytest.mark.parametrize(("exclude", "passes"), [((), True), (("hla_dr_mab_per_cell",), False)])
def test_the_agreement_gate_passes_a_model_that_reproduces_the_rule(exclude, passes) -> None:
    """Trained on the rule's answers: with HLA-DR a model reproduces the rule at least as well
    as the rule reproduces itself between laboratories; without HLA-DR it cannot."""
    spec = ExperimentSpec(name="agree", registered_model="agree", label="phenotype_rule",
                          preset="immunosep-screening", n=4000, cohort_seed=4, exclude=exclude,
                          candidates={"xgboost": {"n_estimators": [80], "max_depth": [3],
                                                  "learning_rate": [0.2]}},
                          gate=AGREEMENT, bootstrap=100, noise_repeats=3)
    decision = promotion_decision(fit_and_evaluate(spec), champion_version=None)
    assert decision.promote is passes, decision.reason
    assert "kappa_with_rule" in decision.numbers


def test_the_agreement_gate_needs_re_measurements() -> None:
    with pytest.raises(ExperimentError, match="noise_repeats"):
        check_spec(ExperimentSpec(name="a", registered_model="a", label="phenotype_rule",
                                  preset="provide", gate=AGREEMENT, noise_repeats=0), "spec")


def test_informative_missingness_orders_hla_dr_by_suspicion() -> None:
    cohort = simulate("informative-missingness", 20_000, seed=6)
    missing = cohort["hla_dr_mab_per_cell"].isna().groupby(cohort["phenotype_true"]).mean()
    order = load_preset("informative-missingness")["population"]["hla_dr_order_share"]
    late = load_preset("informative-missingness")["population"]["late_sample_share"]
    for phenotype, share in order.items():
        assert missing[phenotype] == pytest.approx(1 - (1 - late) * share, abs=0.03)
