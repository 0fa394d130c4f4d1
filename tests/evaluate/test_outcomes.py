"""Judging phenotypers by outcomes, checked against the truth the simulator knows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from phenotyper.contract import (
    ANAKINRA,
    ARMS,
    DEATH_28D,
    INTERFERON_GAMMA,
    MALS,
    PHENOTYPES,
    PLACEBO,
    SOFA_RESPONSE,
    TREATMENT,
    TREATMENT_PROBABILITY,
    potential_outcome_column,
)
from phenotyper.evaluate.benchmark import EvaluationError, benchmark
from phenotyper.evaluate.outcomes import (
    BEST_ARM,
    BY_TRUE_PHENOTYPE,
    NOBODY,
    OutcomeError,
    OutcomeSpec,
    policy_arms,
    read_outcomes,
)
from phenotyper.rules import ImmunoSepRule
from phenotyper.simulate import RULE_COLUMN, TRUTH_COLUMN, simulate

TRIAL_SPEC = OutcomeSpec((SOFA_RESPONSE, DEATH_28D), propensity=TREATMENT_PROBABILITY)
OBSERVATIONAL_SPEC = OutcomeSpec((SOFA_RESPONSE,))
# The short coverage study (the full one, 200 draws of 5,000, is benchmarks/policy_coverage.py).
DRAWS, PATIENTS, RESAMPLES, MIN_COVERAGE, MAX_BIAS = 40, 2000, 200, 0.85, 0.01


class TruthPhenotyper(ImmunoSepRule):
    """Answers the simulated latent phenotype: what a perfect phenotyper would say."""

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        return X[TRUTH_COLUMN].to_numpy(dtype=object)


def _records(result) -> pd.DataFrame:
    return result.records.set_index(["phenotyper", "metric", "subgroup"])


def _true_value(preset: str, policy_of, outcome: str = SOFA_RESPONSE) -> float:
    """A policy's value in the population: its patients' mean true probability, 200k drawn."""
    big = simulate(preset, 200_000, seed=99)
    truth = big[[potential_outcome_column(outcome, a) for a in ARMS]].to_numpy()
    return float(truth[np.arange(len(big)), policy_arms(policy_of(big))].mean())


def _coverage_study(preset: str, spec: OutcomeSpec) -> tuple[float, float]:
    """Coverage of the rule policy's 95% interval, and the mean error, over DRAWS cohorts."""
    target = _true_value(preset, lambda frame: frame[RULE_COLUMN].to_numpy(dtype=object))
    hits, errors = [], []
    for draw in range(DRAWS):
        cohort = simulate(preset, PATIENTS, seed=1000 + draw)
        result = benchmark({"immunosep": ImmunoSepRule().fit(cohort)}, cohort, n_boot=RESAMPLES,
                           seed=draw, noise_repeats=0, outcomes=spec)
        row = _records(result).loc[("immunosep", f"policy_value_{SOFA_RESPONSE}", "all")]
        hits.append(row.ci_low <= target <= row.ci_high)
        errors.append(row.value - target)
    return float(np.mean(hits)), float(np.mean(errors))


def test_ipw_policy_value_interval_covers_the_truth_on_an_all_comers_trial() -> None:
    coverage, bias = _coverage_study("all-comers-trial", TRIAL_SPEC)
    assert coverage >= MIN_COVERAGE
    assert abs(bias) <= MAX_BIAS


def test_aipw_policy_value_interval_covers_the_truth_under_confounding() -> None:
    coverage, bias = _coverage_study("confounded-treatment", OBSERVATIONAL_SPEC)
    assert coverage >= MIN_COVERAGE
    assert abs(bias) <= MAX_BIAS


def test_a_naive_comparison_is_confounded_where_aipw_is_not() -> None:
    """Sicker patients are treated more often: the raw death rate of the treated misleads."""
    cohort = simulate("confounded-treatment", 10_000, seed=4)
    spec = OutcomeSpec((DEATH_28D,))
    result = _records(benchmark({"immunosep": ImmunoSepRule().fit(cohort)}, cohort,
                                n_boot=50, noise_repeats=0, outcomes=spec))
    truth = cohort[[potential_outcome_column(DEATH_28D, a) for a in ARMS]].to_numpy()
    true_nobody = truth[:, ARMS.index(PLACEBO)].mean()
    naive_nobody = cohort.loc[cohort[TREATMENT] == PLACEBO, DEATH_28D].mean()
    estimate = result.loc[(NOBODY, f"policy_value_{DEATH_28D}", "all")]
    assert abs(naive_nobody - true_nobody) > 0.05  # the confounding is real
    assert estimate.ci_low <= true_nobody <= estimate.ci_high


def test_all_comers_policy_table_has_the_ceilings_and_paired_differences() -> None:
    cohort = simulate("all-comers-trial", 8000, seed=7)
    phenotypers = {"immunosep": ImmunoSepRule().fit(cohort),
                   "oracle": TruthPhenotyper().fit(cohort)}
    records = _records(benchmark(phenotypers, cohort, n_boot=200, noise_repeats=0,
                                 outcomes=TRIAL_SPEC))
    metric = f"policy_value_{SOFA_RESPONSE}"
    for name in ("immunosep", "oracle", NOBODY, BY_TRUE_PHENOTYPE, BEST_ARM):
        row = records.loc[(name, metric, "all")]
        assert row.ci_low < row.value < row.ci_high
        true = records.loc[(name, f"true_{metric}", "all")].value
        assert abs(row.value - true) < 4 * (row.ci_high - row.ci_low) / 3.92 + 1e-9
    # a phenotyper answering the truth is the true-phenotype policy, estimate and all
    assert records.loc[("oracle", metric, "all")].value == pytest.approx(
        records.loc[(BY_TRUE_PHENOTYPE, metric, "all")].value)
    # the paired difference is the difference of the two values
    difference = records.loc[(BY_TRUE_PHENOTYPE, f"{metric}_minus_immunosep", "all")]
    assert difference.value == pytest.approx(
        records.loc[(BY_TRUE_PHENOTYPE, metric, "all")].value
        - records.loc[("immunosep", metric, "all")].value)
    # treating by the rule beats treating nobody; paired intervals are narrower than unpaired
    beats_nobody = records.loc[("immunosep", f"{metric}_minus_{NOBODY}", "all")]
    assert beats_nobody.ci_low > 0
    rule = records.loc[("immunosep", metric, "all")]
    assert difference.ci_high - difference.ci_low < rule.ci_high - rule.ci_low
    # death follows the response in the table, with lower better
    assert ("immunosep", f"policy_value_{DEATH_28D}", "all") in records.index


def test_treatment_effects_within_the_true_phenotype_match_the_truth() -> None:
    cohort = simulate("all-comers-trial", 20_000, seed=8)
    records = _records(benchmark({"immunosep": ImmunoSepRule().fit(cohort),
                                  "oracle": TruthPhenotyper().fit(cohort)}, cohort,
                                 n_boot=200, noise_repeats=0, outcomes=TRIAL_SPEC))
    for phenotype in PHENOTYPES:
        rows = cohort[TRUTH_COLUMN] == phenotype
        for drug in (ANAKINRA, INTERFERON_GAMMA):
            true = (cohort.loc[rows, potential_outcome_column(SOFA_RESPONSE, drug)]
                    - cohort.loc[rows, potential_outcome_column(SOFA_RESPONSE, PLACEBO)]).mean()
            row = records.loc[("oracle", f"treatment_effect_{drug}_{SOFA_RESPONSE}",
                               f"predicted={phenotype}")]
            assert row.ci_low - 0.01 <= true <= row.ci_high + 0.01, (phenotype, drug)
    # anakinra helps the true MALS patients; the interaction is plain at this size
    assert records.loc[("oracle", f"treatment_effect_{ANAKINRA}_{SOFA_RESPONSE}",
                        f"predicted={MALS}")].ci_low > 0
    assert records.loc[("oracle", f"interaction_p_{SOFA_RESPONSE}", "all")].value < 0.001


def test_adjusted_odds_ratios_match_an_independent_statsmodels_fit() -> None:
    import statsmodels.formula.api as smf

    cohort = simulate("all-comers-trial", 20_000, seed=9)
    records = _records(benchmark({"immunosep": ImmunoSepRule().fit(cohort)}, cohort,
                                 n_boot=20, noise_repeats=0, outcomes=TRIAL_SPEC))
    untreated = cohort[cohort[TREATMENT] == PLACEBO].assign(
        rule=lambda f: pd.Categorical(f[RULE_COLUMN], categories=[
            "unclassified", "MALS", "immunoparalysis", "indeterminate"]),
        sofa_c=lambda f: f["sofa"] - 9, age_c=lambda f: (f["age_years"] - 70) / 10)
    fit = smf.logit(f"{DEATH_28D} ~ rule + sofa_c + age_c", data=untreated).fit(disp=0)
    for label in ("MALS", "immunoparalysis", "indeterminate"):
        row = records.loc[("immunosep", f"adjusted_odds_ratio_{DEATH_28D}", f"predicted={label}")]
        assert row.value == pytest.approx(np.exp(fit.params[f"rule[T.{label}]"]), rel=1e-4)
        low, high = np.exp(fit.conf_int().loc[f"rule[T.{label}]"])
        assert (row.ci_low, row.ci_high) == pytest.approx((low, high), rel=1e-3)
    # MALS does worse than unclassified even at the same SOFA and age (the simulated law)
    assert records.loc[("immunosep", f"adjusted_odds_ratio_{DEATH_28D}",
                        f"predicted={MALS}")].ci_low > 1


def test_the_immunosep_design_supports_per_stratum_effects_not_policies() -> None:
    """Only the rule's strata were randomised, each to one drug: a model's policy would need
    arms those patients could not get, so its value is withheld and the reason recorded."""
    cohort = simulate("immunosep-trial", 20_000, seed=10)
    result = benchmark({"immunosep": ImmunoSepRule().fit(cohort),
                        "oracle": TruthPhenotyper().fit(cohort)}, cohort, n_boot=100,
                       noise_repeats=0, outcomes=TRIAL_SPEC)
    records = _records(result)
    assert ("oracle", f"policy_value_{SOFA_RESPONSE}", "all") not in records.index
    withheld = {(row["phenotyper"], row["metric"])
                for row in result.meta["outcome"]["not_supported"]}
    assert ("oracle", f"policy_value_{SOFA_RESPONSE}") in withheld
    assert result.meta["outcome"]["n_not_randomised"] == int(cohort[TREATMENT].isna().sum())
    # the rule's own stratum effect is what the trial measured
    randomised = cohort[cohort[TREATMENT].notna() & (cohort[RULE_COLUMN] == MALS)]
    true = (randomised[potential_outcome_column(SOFA_RESPONSE, ANAKINRA)]
            - randomised[potential_outcome_column(SOFA_RESPONSE, PLACEBO)]).mean()
    row = records.loc[("immunosep", f"treatment_effect_{ANAKINRA}_{SOFA_RESPONSE}",
                       f"predicted={MALS}")]
    assert row.ci_low <= true <= row.ci_high


def test_benchmark_by_outcomes_alone_needs_no_label() -> None:
    cohort = simulate("all-comers-trial", 1500, seed=11).drop(columns=[TRUTH_COLUMN])
    result = benchmark({"immunosep": ImmunoSepRule().fit(cohort)}, cohort, n_boot=30,
                       noise_repeats=0, outcomes=TRIAL_SPEC)
    metrics = set(result.records.metric)
    assert f"policy_value_{SOFA_RESPONSE}" in metrics
    assert "balanced_accuracy" not in metrics
    assert BY_TRUE_PHENOTYPE not in set(result.records.phenotyper)  # no truth, no ceiling
    with pytest.raises(EvaluationError, match="nothing to judge against"):
        benchmark({"immunosep": ImmunoSepRule().fit(cohort)}, cohort)


@pytest.mark.parametrize(("column", "value", "message"), [
    (SOFA_RESPONSE, "2", r"column 'sofa_response' has 1 values .*row 4: '2'.*0 or 1"),
    (SOFA_RESPONSE, "maybe", r"row 4: 'maybe'"),
    (TREATMENT, "aspirin", r"column 'treatment' .*row 4: 'aspirin'.*anakinra, interferon_gamma"),
    (TREATMENT_PROBABILITY, "1.5", r"column 'treatment_probability' .*row 4: '1.5'"),
])
def test_unreadable_outcome_cells_are_named_with_row_and_value(column: str, value: str,
                                                               message: str) -> None:
    cohort = simulate("all-comers-trial", 50, seed=12).astype({column: object})
    cohort.loc[3, column] = value
    with pytest.raises(OutcomeError, match=message):
        read_outcomes(cohort, TRIAL_SPEC)


def test_outcome_words_and_arm_spellings_are_read() -> None:
    cohort = simulate("all-comers-trial", 40, seed=13)
    cohort[SOFA_RESPONSE] = np.where(cohort[SOFA_RESPONSE] == 1, "Yes", "no")
    cohort[TREATMENT] = cohort[TREATMENT].replace({INTERFERON_GAMMA: "IFN-gamma",
                                                   ANAKINRA: " Anakinra "})
    data = read_outcomes(cohort, TRIAL_SPEC)
    assert set(np.unique(data.outcomes[SOFA_RESPONSE])) <= {0.0, 1.0}
    assert (data.arm >= 0).all()


def test_a_missing_column_or_direction_is_a_clear_error() -> None:
    cohort = simulate("all-comers-trial", 40, seed=14)
    with pytest.raises(OutcomeError, match="Did you mean 'sofa_response'"):
        read_outcomes(cohort, OutcomeSpec(("sofa_responce",)))
    with pytest.raises(OutcomeError, match="higher value is better"):
        read_outcomes(cohort.assign(icu_days=1), OutcomeSpec(("icu_days",)))


def test_what_a_design_cannot_support_is_withheld_with_the_reason() -> None:
    """Small cells and unsupported arms get no number, and the report says why."""
    cohort = simulate("all-comers-trial", 600, seed=15)
    result = benchmark({"immunosep": ImmunoSepRule().fit(cohort)}, cohort, n_boot=30,
                       noise_repeats=0, outcomes=TRIAL_SPEC)
    withheld = result.meta["outcome"]["not_supported"]
    assert withheld and all(item["why"] for item in withheld)
    records = _records(result)
    for item in withheld:
        assert (item["phenotyper"], item["metric"], item["subgroup"]) not in records.index
    # a randomised trial's policies are supported even when small: judged by the design's
    # strata, not by a fitted model
    assert ("immunosep", f"policy_value_{SOFA_RESPONSE}", "all") in records.index
    assert (BEST_ARM, f"policy_value_{SOFA_RESPONSE}", "all") in records.index
    effects = records[records.index.get_level_values("metric").str.startswith(
        "treatment_effect_")]
    assert effects["value"].abs().le(1).all()


@pytest.mark.parametrize(("arms", "message"), [
    ({ANAKINRA}, "only anakinra"), ({PLACEBO}, "only placebo"), (set(), "no arm")])
def test_a_treatment_column_without_placebo_and_a_drug_is_a_clear_error(arms, message) -> None:
    cohort = simulate("all-comers-trial", 60, seed=16)
    keep = cohort[TREATMENT].isin(arms)
    cohort.loc[~keep, TREATMENT] = None
    with pytest.raises(OutcomeError, match=message):
        read_outcomes(cohort, TRIAL_SPEC)


def test_directions_must_name_an_outcome_and_agree_with_what_phenotyper_knows() -> None:
    with pytest.raises(OutcomeError, match="Did you mean 'icu_free'"):
        OutcomeSpec(("icu_free",), higher_is_better={"icu_fre": True})
    with pytest.raises(OutcomeError, match="lower is better, as phenotyper knows"):
        OutcomeSpec((DEATH_28D,), higher_is_better={DEATH_28D: True})


def test_a_constant_outcome_and_a_decimal_comma_propensity() -> None:
    cohort = simulate("all-comers-trial", 60, seed=17)
    with pytest.raises(OutcomeError, match="one value only"):
        read_outcomes(cohort.assign(sofa_response=0), TRIAL_SPEC)
    comma = cohort.assign(treatment_probability=cohort[TREATMENT_PROBABILITY].map(
        lambda p: f"{p:.4f}".replace(".", ",")))
    assert np.allclose(read_outcomes(comma, TRIAL_SPEC).propensity, 1 / 3, atol=1e-4)
