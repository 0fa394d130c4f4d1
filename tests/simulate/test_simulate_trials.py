"""Simulated trials: who is randomised to what, calibration to ImmunoSep's arms, true outcomes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from phenotyper.contract import (
    ANAKINRA,
    ARMS,
    DEATH_28D,
    IMMUNOPARALYSIS,
    INTERFERON_GAMMA,
    MALS,
    PHENOTYPES,
    PLACEBO,
    SOFA_RESPONSE,
    TREATMENT,
    TREATMENT_PROBABILITY,
    potential_outcome_column,
)
from phenotyper.panel import SITE_ID
from phenotyper.simulate import (
    RULE_COLUMN,
    TRUTH_COLUMN,
    PresetError,
    calibrate_trial,
    load_preset,
    simulate,
)

ARM_TOLERANCE_PP = 2.0  # the target for the randomised arms


@pytest.fixture(scope="module")
def trial() -> pd.DataFrame:
    return simulate("immunosep-trial", 60_000, seed=3)


def _received(frame: pd.DataFrame, outcome: str) -> np.ndarray:
    """Each patient's true probability of `outcome` under the arm received (placebo if none)."""
    arm = frame[TREATMENT].fillna(PLACEBO).map(ARMS.index).to_numpy()
    table = frame[[potential_outcome_column(outcome, a) for a in ARMS]].to_numpy()
    return table[np.arange(len(frame)), arm]


def test_immunosep_randomises_the_rule_positive_to_their_matched_drug_or_placebo(
        trial: pd.DataFrame) -> None:
    randomised = trial[TREATMENT].notna()
    assert (randomised == trial[RULE_COLUMN].isin([MALS, IMMUNOPARALYSIS])).all()
    rule, arm = trial.loc[randomised, RULE_COLUMN], trial.loc[randomised, TREATMENT]
    assert set(arm[rule == MALS]) == {ANAKINRA, PLACEBO}
    assert set(arm[rule == IMMUNOPARALYSIS]) == {INTERFERON_GAMMA, PLACEBO}
    assert (trial.loc[randomised, TREATMENT_PROBABILITY] == 0.5).all()
    assert trial.loc[~randomised, TREATMENT_PROBABILITY].isna().all()
    # a separate permuted-block sequence per site: each site is balanced to within a block
    per_site = trial[randomised].assign(drug=arm != PLACEBO).groupby(SITE_ID)["drug"]
    imbalance = (2 * per_site.sum() - per_site.size()).abs()
    assert imbalance.max() <= 2


def test_immunosep_arms_are_calibrated_to_the_published_rates(trial: pd.DataFrame) -> None:
    """35.1% vs 17.9% SOFA response and 43.5% vs 49.7% death among randomised patients."""
    targets = load_preset("immunosep-trial")["targets"]
    randomised = trial[trial[TREATMENT].notna()]
    treated = (randomised[TREATMENT] != PLACEBO).to_numpy()
    for outcome, target in ((SOFA_RESPONSE, targets["response_by_arm"]),
                            (DEATH_28D, targets["death_by_arm"])):
        expected = _received(randomised, outcome)
        observed = randomised[outcome].to_numpy()
        for arm, rows in (("treated", treated), ("placebo", ~treated)):
            assert abs(expected[rows].mean() - target[arm]) * 100 <= ARM_TOLERANCE_PP, outcome
            assert abs(observed[rows].mean() - target[arm]) * 100 <= ARM_TOLERANCE_PP, outcome


def test_outcomes_are_drawn_from_the_true_probabilities_under_the_arm_received(
        trial: pd.DataFrame) -> None:
    for outcome in (SOFA_RESPONSE, DEATH_28D):
        expected = _received(trial, outcome)
        for low, high in ((0, 0.2), (0.2, 0.4), (0.4, 1.0)):
            rows = (expected >= low) & (expected < high)
            assert trial.loc[rows, outcome].mean() == pytest.approx(expected[rows].mean(),
                                                                   abs=0.01)
    # death counts as SOFA 24: those who die rarely respond (the copula's negative correlation)
    died = trial[DEATH_28D] == 1
    assert trial.loc[died, SOFA_RESPONSE].mean() < trial.loc[~died, SOFA_RESPONSE].mean()


def test_the_matched_drug_helps_its_own_phenotype_and_the_mismatched_one_does_not(
        trial: pd.DataFrame) -> None:
    truth = trial[TRUTH_COLUMN]
    gain = {arm: trial[potential_outcome_column(SOFA_RESPONSE, arm)]
            - trial[potential_outcome_column(SOFA_RESPONSE, PLACEBO)] for arm in ARMS}
    assert (gain[ANAKINRA][truth == MALS] > 0).all()
    assert (gain[INTERFERON_GAMMA][truth == IMMUNOPARALYSIS] > 0).all()
    assert (gain[INTERFERON_GAMMA][truth == MALS] < 0).all()  # the assumed harm
    assert (gain[PLACEBO] == 0).all()


def test_all_comers_randomises_everyone_one_to_one_to_one() -> None:
    cohort = simulate("all-comers-trial", 30_000, seed=4)
    assert cohort[TREATMENT].notna().all()
    shares = cohort[TREATMENT].value_counts(normalize=True)
    assert set(shares.index) == set(ARMS)
    assert np.allclose(shares.to_numpy(), 1 / 3, atol=0.005)
    assert np.allclose(cohort[TREATMENT_PROBABILITY], 1 / 3)
    # randomised: the arm does not depend on the phenotype
    by_truth = pd.crosstab(cohort[TRUTH_COLUMN], cohort[TREATMENT], normalize="index")
    assert np.allclose(by_truth.to_numpy(), 1 / 3, atol=0.03)
    # it inherits ImmunoSep's calibrated drug effects and the screening population
    assert load_preset("all-comers-trial")["response"] == load_preset("immunosep-trial")["response"]
    assert (load_preset("all-comers-trial")["population"]
            == load_preset("immunosep-screening")["population"])


def test_confounded_treatment_follows_the_rule_and_severity_without_a_propensity() -> None:
    cohort = simulate("confounded-treatment", 30_000, seed=5)
    assert TREATMENT_PROBABILITY not in cohort
    treated = cohort[TREATMENT] != PLACEBO
    rule = cohort[RULE_COLUMN]
    assert (cohort.loc[rule == MALS, TREATMENT] == ANAKINRA).mean() > 0.6
    assert (cohort.loc[rule == IMMUNOPARALYSIS, TREATMENT] == INTERFERON_GAMMA).mean() > 0.6
    sicker = cohort["sofa"] >= 12
    assert treated[sicker].mean() > treated[~sicker].mean() + 0.05
    # naive comparison is confounded: treated patients are sicker and die more often
    assert cohort.loc[treated, DEATH_28D].mean() > cohort.loc[~treated, DEATH_28D].mean()


def test_shipped_trial_calibration_is_up_to_date() -> None:
    preset = load_preset("immunosep-trial")
    refit = calibrate_trial(preset, n=200_000, seed=5)
    for phenotype in PHENOTYPES:
        assert refit["response"]["intercept"][phenotype] == pytest.approx(
            preset["response"]["intercept"][phenotype], abs=0.05)
    assert refit["response"]["matched_log_odds_ratio"] == pytest.approx(
        preset["response"]["matched_log_odds_ratio"], abs=0.08)
    assert refit["outcome"]["matched_log_odds_ratio"] == pytest.approx(
        preset["outcome"]["matched_log_odds_ratio"], abs=0.08)


def test_only_a_rule_positive_trial_is_calibrated_to_immunosep() -> None:
    with pytest.raises(PresetError, match="inherits its effects"):
        calibrate_trial("all-comers-trial", n=1000)


def test_a_preset_that_extends_a_missing_preset_names_it(monkeypatch) -> None:
    from phenotyper import simulate as simulator

    read = simulator._read_toml

    def broken(name: str) -> dict:
        document = read(name)
        return {**document, "extends": "immunosep-screenin"} if name == "provide" else document

    monkeypatch.setattr(simulator, "_read_toml", broken)
    with pytest.raises(PresetError, match="Did you mean 'immunosep-screening'"):
        load_preset("provide")
