"""The simulator: determinism, calibration to the published tables, and a realistic law."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from phenotyper.contract import IMMUNOPARALYSIS, INDETERMINATE, MALS, PHENOTYPES, UNCLASSIFIED
from phenotyper.panel import NUMERIC_MARKERS, PANEL, PATIENT_ID, SITE_ID
from phenotyper.simulate import (
    DEATH_COLUMN,
    RULE_COLUMN,
    SYNTHETIC_COLUMN,
    TRUTH_COLUMN,
    PresetError,
    _split_parameters,
    available_presets,
    calibrate,
    is_synthetic,
    load_preset,
    mortality_by_rule,
    rule_shares,
    simulate,
)

CALIBRATION_N = 20_000
CALIBRATION_TOLERANCE_PP = 2.0  # the target: within 2 percentage points at n = 20000


@pytest.fixture(scope="module")
def screening() -> pd.DataFrame:
    return simulate("immunosep-screening", 50_000, seed=11)


def test_presets_shipped() -> None:
    assert {"immunosep-screening", "provide"} <= set(available_presets())


def test_same_seed_same_cohort_and_new_seed_new_cohort() -> None:
    first = simulate("provide", 3000, seed=5)
    pd.testing.assert_frame_equal(first, simulate("provide", 3000, seed=5))
    other = simulate("provide", 3000, seed=6)
    assert not first["ferritin_ng_ml"].equals(other["ferritin_ng_ml"])


def test_columns_are_the_panel_plus_ids_truth_rule_and_outcome(screening: pd.DataFrame) -> None:
    expected = {PATIENT_ID, SITE_ID, *PANEL, TRUTH_COLUMN, RULE_COLUMN, DEATH_COLUMN,
                SYNTHETIC_COLUMN}
    assert set(screening.columns) == expected
    assert is_synthetic(screening)
    assert screening[PATIENT_ID].is_unique
    assert set(screening[TRUTH_COLUMN]) == set(PHENOTYPES)
    assert set(screening["sex"]) == {"F", "M"}
    assert set(screening[DEATH_COLUMN]) == {0, 1}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", ["immunosep-screening", "provide"])
def test_preset_reproduces_its_published_table(name: str, seed: int) -> None:
    targets = load_preset(name)["targets"]
    cohort = simulate(name, CALIBRATION_N, seed)
    shares, mortality = rule_shares(cohort), mortality_by_rule(cohort)
    for phenotype, target in targets["rule_share"].items():
        assert abs(shares[phenotype] - target) * 100 <= CALIBRATION_TOLERANCE_PP, phenotype
    for phenotype, target in targets["mortality_by_rule"].items():
        # A small rule group (screening MALS: ~1400 patients) has a sampling SE above 1 point,
        # so the tolerance is 2 points or 3 binomial standard errors, whichever is larger.
        group_size = shares[phenotype] * CALIBRATION_N
        standard_error_pp = 100 * np.sqrt(target * (1 - target) / group_size)
        tolerance_pp = max(CALIBRATION_TOLERANCE_PP, 3 * standard_error_pp)
        assert abs(mortality[phenotype] - target) * 100 <= tolerance_pp, phenotype


@pytest.mark.parametrize("name", ["immunosep-screening", "provide"])
def test_shipped_calibration_is_up_to_date(name: str) -> None:
    """Someone who edits the marker law must recalibrate: the shipped fit must still be a fit."""
    preset = load_preset(name)
    refit = calibrate(preset, n=300_000, seed=3)
    for phenotype in PHENOTYPES:
        shipped = preset["population"]["prevalence"][phenotype]
        assert refit["prevalence"][phenotype] == pytest.approx(shipped, abs=0.01)
        shipped = preset["outcome"]["intercept"][phenotype]
        assert refit["intercept"][phenotype] == pytest.approx(shipped, abs=0.1)


def test_every_value_is_plausible_for_a_lab_to_report(screening: pd.DataFrame) -> None:
    for column in NUMERIC_MARKERS:
        values = screening[column].dropna()
        assert values.between(PANEL[column].low, PANEL[column].high).all(), column
        decimals = PANEL[column].decimals
        assert np.allclose(values, values.round(decimals)), column
    assert screening["sofa"].between(0, 24).all()


def _median_by_truth(cohort: pd.DataFrame, column: str) -> pd.Series:
    return cohort.groupby(TRUTH_COLUMN)[column].median()


@pytest.mark.parametrize(
    ("column", "higher", "lower"),
    [
        # Hyperinflammation (MALS, HLH-like) pushes these up ...
        *[(c, MALS, UNCLASSIFIED) for c in (
            "ferritin_ng_ml", "il6_pg_ml", "triglycerides_mg_dl", "ast_u_l", "alt_u_l",
            "bilirubin_mg_dl", "d_dimer_mg_l")],
        # ... and consumes platelets and fibrinogen.
        ("platelets_10e9_l", UNCLASSIFIED, MALS),
        ("fibrinogen_g_l", UNCLASSIFIED, MALS),
        # Immunoparalysis: HLA-DR and lymphocytes down, IL-10 up.
        ("hla_dr_mab_per_cell", UNCLASSIFIED, IMMUNOPARALYSIS),
        ("lymphocytes_10e9_l", UNCLASSIFIED, IMMUNOPARALYSIS),
        ("il10_pg_ml", IMMUNOPARALYSIS, UNCLASSIFIED),
    ],
)
def test_latent_phenotype_drives_markers(
    screening: pd.DataFrame, column: str, higher: str, lower: str
) -> None:
    medians = _median_by_truth(screening, column)
    assert medians[higher] > 1.3 * medians[lower]


def test_markers_skewed_and_correlated_within_a_phenotype(screening: pd.DataFrame) -> None:
    within = screening[screening[TRUTH_COLUMN] == UNCLASSIFIED]
    ferritin = within["ferritin_ng_ml"]
    assert ferritin.mean() > 1.2 * ferritin.median()  # right-skewed, as lab values are
    log = np.log(within[["ast_u_l", "alt_u_l", "hla_dr_mab_per_cell", "lymphocytes_10e9_l",
                         "sofa"]].clip(lower=0.5))
    correlation = log.corr()
    assert correlation.loc["ast_u_l", "alt_u_l"] > 0.15
    assert correlation.loc["hla_dr_mab_per_cell", "lymphocytes_10e9_l"] > 0.15


def test_ferritin_platform_bias_between_sites_has_the_published_size(
    screening: pd.DataFrame,
) -> None:
    """Site medians of log ferritin scatter by about the platform CV (22.9%), not by zero."""
    within = screening[screening[TRUTH_COLUMN] == UNCLASSIFIED]
    site_medians = np.log(within.groupby(SITE_ID)["ferritin_ng_ml"].median())
    expected_sd = float(np.sqrt(np.log1p(0.229**2)))
    assert 0.5 * expected_sd < site_medians.std() < 1.6 * expected_sd


def test_rule_is_applied_to_measured_markers_and_disagrees_near_the_cut_off(
    screening: pd.DataFrame,
) -> None:
    measured_mals = screening["ferritin_ng_ml"] > 4420
    assert (screening.loc[measured_mals, RULE_COLUMN] == MALS).all()
    missing_hla_dr = screening["hla_dr_mab_per_cell"].isna() & ~measured_mals
    assert (screening.loc[missing_hla_dr, RULE_COLUMN] == INDETERMINATE).all()
    agreement = (screening[RULE_COLUMN] == screening[TRUTH_COLUMN]).mean()
    assert 0.6 < agreement < 0.97  # a noisy, single-marker reading of the latent state


def test_hla_dr_missing_for_whole_sites_without_flow_cytometry() -> None:
    preset = load_preset("immunosep-screening")
    population = {**preset["population"], "flow_cytometry_site_share": 0.5}
    half = dataclasses.replace(preset, values={**preset.values, "population": population})
    cohort = simulate(half, 20_000, seed=2)
    missing_by_site = cohort["hla_dr_mab_per_cell"].isna().groupby(cohort[SITE_ID]).mean()
    without_flow = missing_by_site[missing_by_site == 1.0]
    assert len(without_flow) in (16, 17)
    late_share = preset["population"]["late_sample_share"]
    with_flow = missing_by_site[missing_by_site < 1.0]
    assert with_flow.mean() == pytest.approx(late_share, abs=0.02)


def test_mortality_follows_phenotype_and_severity(screening: pd.DataFrame) -> None:
    mortality = screening.groupby(TRUTH_COLUMN)[DEATH_COLUMN].mean()
    assert mortality[MALS] > mortality[IMMUNOPARALYSIS] > mortality[UNCLASSIFIED]
    sicker = screening["sofa"] >= 12
    assert screening.loc[sicker, DEATH_COLUMN].mean() > screening.loc[~sicker, DEATH_COLUMN].mean()


def test_unknown_preset_suggests_the_near_name() -> None:
    with pytest.raises(PresetError, match="Did you mean 'immunosep-screening'"):
        load_preset("immunosep_screening")


@pytest.mark.parametrize(
    "parameter",
    [0.5, {"value": 0.5}, {"value": 0.5, "source": ""},
     {"value": 0.5, "source": "x", "assumption": "y"}, {"value": 0.5, "sauce": "x"}],
)
def test_every_preset_parameter_needs_a_source_or_an_assumption(parameter: object) -> None:
    with pytest.raises(PresetError, match="share"):
        _split_parameters("population", {"share": parameter})


def test_shipped_presets_document_every_parameter() -> None:
    for name in available_presets():
        preset = load_preset(name)  # load validates the format
        for section, values in preset.values.items():
            assert set(values) == set(preset.notes[section])


def test_rejects_an_empty_cohort() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        simulate("provide", 0, seed=1)
