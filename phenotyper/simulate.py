"""Synthetic sepsis cohorts drawn from a calibrated, documented law.

No real trial data is public, so phenotyper develops and demonstrates on cohorts simulated from
the presets in `phenotyper/presets/`. Each patient has a latent immune phenotype (the reference
standard, `phenotype_true`); it shifts every marker's distribution, three shared latent factors
make markers co-vary, and measurement adds site-level platform bias, within-assay noise and
realistic missingness. The ImmunoSep rule is then applied to the *measured* markers
(`phenotype_rule`), exactly as a hospital would. Every number in a preset carries its source or
an explicit assumption; `calibrate` refits the few parameters that are tuned to published tables.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import brentq
from scipy.special import ndtr

from phenotyper.contract import (
    ANAKINRA,
    ARM_OF,
    ARMS,
    DEATH_28D,
    IMMUNOPARALYSIS,
    INDETERMINATE,
    INTERFERON_GAMMA,
    MALS,
    PHENOTYPES,
    PLACEBO,
    SOFA_RESPONSE,
    TREATMENT,
    TREATMENT_PROBABILITY,
    TRUE_PHENOTYPE,
    potential_outcome_column,
)
from phenotyper.panel import (
    AGE_REFERENCE_YEARS,
    LINEAR_SCALE_MARKERS,
    PANEL,
    PATIENT_ID,
    SAMPLE_TIME,
    SEX_VALUES,
    SITE_ID,
    SOFA_REFERENCE,
)
from phenotyper.presets import available_presets
from phenotyper.rules import immunosep_phenotype
from phenotyper.suggest import did_you_mean

FACTORS: tuple[str, ...] = ("inflammation", "immunosuppression", "organ_dysfunction")
NOTE_KEYS: tuple[str, ...] = ("source", "assumption", "calibrated")
LAB_MARKERS = tuple(column for column in PANEL if column != "sex")
CYTOKINES = ("il6_pg_ml", "il10_pg_ml")
AGE_MAX_YEARS = 100

TRUTH_COLUMN = TRUE_PHENOTYPE
RULE_COLUMN = "phenotype_rule"
DEATH_COLUMN = DEATH_28D
SYNTHETIC_COLUMN = "synthetic"  # True on every simulated row: results on it are not evidence
SECTIONS = ("targets", "population", "measurement", "outcome", "trial", "response", "repeat")
# Trial designs a preset's [trial] may declare (see `_run_trial`).
RULE_POSITIVE, ALL_COMERS, OBSERVATIONAL = "rule-positive", "all-comers", "observational"
TRIAL_DESIGNS = (RULE_POSITIVE, ALL_COMERS, OBSERVATIONAL)


class PresetError(ValueError):
    """A preset that does not exist or does not follow the documented format."""


@dataclass(frozen=True)
class Preset:
    """A simulator preset: parameter values, with their notes kept for the record."""

    name: str
    description: str
    values: dict[str, dict[str, Any]]
    notes: dict[str, dict[str, str]]

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.values[section]


def _read_toml(name: str) -> dict[str, Any]:
    return tomllib.loads(resources.files("phenotyper.presets").joinpath(f"{name}.toml").read_text())


def _split_parameters(section_name: str, section: dict[str, Any]) -> tuple[dict, dict]:
    """Separate `{value, source|assumption|calibrated}` tables into values and notes."""
    values, notes = {}, {}
    for key, parameter in section.items():
        where = f"[{section_name}] {key}"
        if not isinstance(parameter, dict) or "value" not in parameter:
            raise PresetError(f"{where}: write it as {{ value = ..., source = \"...\" }}")
        note_keys = [k for k in parameter if k in NOTE_KEYS]
        unknown = set(parameter) - {"value", *NOTE_KEYS}
        if len(note_keys) != 1 or unknown or not str(parameter[note_keys[0]]).strip():
            raise PresetError(
                f"{where}: needs exactly one non-empty note out of {', '.join(NOTE_KEYS)}"
                + (f"; unknown keys {sorted(unknown)}" if unknown else "")
            )
        values[key] = parameter["value"]
        notes[key] = {note_keys[0]: parameter[note_keys[0]]}
    return values, notes


def _check_name(name: str, names: list[str], what: str) -> None:
    if name not in names:
        hint = did_you_mean(name, names)
        raise PresetError(f"Unknown {what} '{name}'.{hint} Available: {', '.join(names)}.")


def _document(name: str, chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """A preset's TOML with the presets it `extends` merged under it, parameter by parameter."""
    if name in chain:
        raise PresetError(f"Preset '{name}' extends itself: {' -> '.join((*chain, name))}")
    document = _read_toml(name)
    parent = document.pop("extends", None)
    if parent is None:
        return document
    _check_name(str(parent), available_presets(), f"preset to extend (in {name}.toml)")
    merged = _document(str(parent), (*chain, name))
    for key, value in document.items():
        if isinstance(value, dict):
            merged[key] = {**merged.get(key, {}), **value}
        else:
            merged[key] = value
    return merged


def load_preset(name: str) -> Preset:
    """Load a preset by name: its parents (`extends`) and the shared marker law merged in.

    A preset may override any parameter of the preset it extends, and any parameter of a
    marker in `_markers.toml` (a `[ferritin_ng_ml]` table in the preset, say).
    """
    _check_name(name, available_presets(), "preset")
    document = _document(name)
    unknown = set(document) - {"name", "description", *SECTIONS, *LAB_MARKERS}
    if unknown:
        raise PresetError(f"Preset '{name}': unknown tables {sorted(unknown)}; a preset has "
                          f"{', '.join(SECTIONS)} and marker tables")
    values: dict[str, dict[str, Any]] = {}
    notes: dict[str, dict[str, str]] = {}
    for section in SECTIONS:
        values[section], notes[section] = _split_parameters(section, document.get(section, {}))
    for column, section in _read_toml("_markers").items():
        values[column], notes[column] = _split_parameters(
            column, {**section, **document.get(column, {})})
    missing_markers = set(LAB_MARKERS) - set(values)
    if missing_markers:
        raise PresetError(f"_markers.toml lacks {sorted(missing_markers)}")
    design = values["trial"].get("design")
    if design is not None and design not in TRIAL_DESIGNS:
        raise PresetError(f"Preset '{name}': [trial] design '{design}' is not one of "
                          f"{', '.join(TRIAL_DESIGNS)}")
    return Preset(name, document.get("description", ""), values, notes)


def _cv_to_log_sd(cv: float) -> float:
    """Log-scale SD of a multiplicative error with coefficient of variation `cv`."""
    return float(np.sqrt(np.log1p(cv**2)))


def _per_phenotype(mapping: dict[str, float]) -> np.ndarray:
    return np.array([mapping[p] for p in PHENOTYPES], dtype=float)


@dataclass(frozen=True)
class _Draw:
    """One simulated cohort before it becomes a table, with what calibration needs."""

    frame: pd.DataFrame
    phenotype_code: np.ndarray
    death_log_odds_without_intercept: np.ndarray


def _some_sites(rng: np.random.Generator, n_sites: int, share: float) -> np.ndarray:
    """A random set of round(share * n_sites) sites, as a boolean mask."""
    mask = np.zeros(n_sites, bool)
    mask[rng.permutation(n_sites)[: round(share * n_sites)]] = True
    return mask


def _draw(preset: Preset, phenotype_code: np.ndarray, rng: np.random.Generator) -> _Draw:
    """Draw markers, measurement and outcome for patients whose latent phenotype is given."""
    n = len(phenotype_code)
    population, measurement = preset["population"], preset["measurement"]

    n_sites = int(population["n_sites"])
    site_weight = np.exp(rng.normal(0.0, population["site_size_log_sd"], n_sites))
    site_share = site_weight / site_weight.sum()
    site = rng.choice(n_sites, size=n, p=site_share)
    has_flow = _some_sites(rng, n_sites, population["flow_cytometry_site_share"])
    has_cytokines = _some_sites(rng, n_sites, population["cytokine_site_share"])
    site_log_bias = {}
    for column, cv_key in (("ferritin_ng_ml", "ferritin_platform_cv"),
                           ("hla_dr_mab_per_cell", "hla_dr_lab_cv")):
        bias = rng.normal(0.0, _cv_to_log_sd(measurement[cv_key]), n_sites)
        # Platforms scatter around the reference method: the cohort as a whole is unbiased.
        site_log_bias[column] = bias - site_share @ bias

    iced_sample = rng.random(n) < population["iced_sample_share"]
    factors = rng.standard_normal((n, len(FACTORS)))
    if "factor_sd" in population:  # the shared factors spread differently by phenotype
        factors *= _per_phenotype(population["factor_sd"])[phenotype_code][:, None]
    columns: dict[str, np.ndarray] = {}
    for column in LAB_MARKERS:
        law = preset[column]
        loadings = np.array([law["loadings"].get(f, 0.0) for f in FACTORS])
        unique_sd = np.sqrt(1.0 - loadings @ loadings)
        z = factors @ loadings + unique_sd * rng.standard_normal(n)
        if column in LINEAR_SCALE_MARKERS:
            value = _per_phenotype(law["mean"])[phenotype_code] + law["sd"] * z
        else:
            log_value = np.log(_per_phenotype(law["median"]))[phenotype_code] + law["log_sd"] * z
            log_value += _cv_to_log_sd(law["assay_cv"]) * rng.standard_normal(n)
            if column in site_log_bias:
                log_value += site_log_bias[column][site]
            if column == "hla_dr_mab_per_cell":
                log_value += np.log1p(measurement["iced_hla_dr_bias"]) * iced_sample
            value = np.exp(log_value)
        marker = PANEL[column]
        value = np.round(np.clip(value, marker.low, marker.high), marker.decimals)
        value[rng.random(n) < law["missing"]] = np.nan
        columns[column] = value

    columns["sofa"] = np.clip(columns["sofa"], 0, 24)
    columns["age_years"] = np.clip(columns["age_years"], population["age_min_years"], AGE_MAX_YEARS)
    late_sample = rng.random(n) < population["late_sample_share"]
    columns["hla_dr_mab_per_cell"][~has_flow[site] | late_sample] = np.nan
    if "hla_dr_order_share" in population:  # informative missingness: ordered on suspicion
        ordered = rng.random(n) < _per_phenotype(population["hla_dr_order_share"])[phenotype_code]
        columns["hla_dr_mab_per_cell"][~ordered] = np.nan
    for column in CYTOKINES:
        columns[column][~has_cytokines[site]] = np.nan
    sex = np.where(rng.random(n) < population["male_share"], SEX_VALUES[1], SEX_VALUES[0])

    outcome = preset["outcome"]
    log_odds_rest = (
        outcome["sofa_log_odds_per_point"] * (columns["sofa"] - SOFA_REFERENCE)
        + outcome["age_log_odds_per_decade"] * (columns["age_years"] - AGE_REFERENCE_YEARS) / 10
    )
    log_odds = _per_phenotype(outcome["intercept"])[phenotype_code] + log_odds_rest
    death = rng.random(n) < 1.0 / (1.0 + np.exp(-log_odds))

    frame = pd.DataFrame(
        {
            PATIENT_ID: np.char.add("P", np.char.zfill(np.arange(1, n + 1).astype(str), 7)),
            SITE_ID: np.char.add("S", np.char.zfill((site + 1).astype(str), 2)),
            **{c: columns[c] for c in LAB_MARKERS if PANEL[c].is_numeric and c != "age_years"},
            "age_years": columns["age_years"],
            "sex": sex,
            TRUTH_COLUMN: np.asarray(PHENOTYPES, dtype=object)[phenotype_code],
            RULE_COLUMN: immunosep_phenotype(
                columns["ferritin_ng_ml"], columns["hla_dr_mab_per_cell"]),
            DEATH_COLUMN: death.astype(np.int8),
            SYNTHETIC_COLUMN: np.ones(n, dtype=bool),
        }
    )
    return _Draw(frame, phenotype_code, log_odds_rest)


def simulate(preset: str | Preset, n: int, seed: int, samples: int = 1) -> pd.DataFrame:
    """A synthetic cohort of `n` patients; the same (preset, n, seed) always gives the same rows.

    A preset with a `[trial]` also assigns treatment and draws the outcomes under it (see
    `_run_trial`); `n` then counts the patients screened, randomised or not. `samples` = 2
    adds each patient's day-2 sample (`second_sample`), rows ordered by patient then
    `sample_time` (day 1, day 2); the first samples are the same rows as with `samples` = 1.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if samples not in (1, 2):
        raise ValueError(f"samples must be 1 or 2, got {samples}")
    law = load_preset(preset) if isinstance(preset, str) else preset
    rng = np.random.default_rng(seed)
    prevalence = _per_phenotype(law["population"]["prevalence"])
    phenotype_code = rng.choice(len(PHENOTYPES), size=n, p=prevalence / prevalence.sum())
    draw = _draw(law, phenotype_code, rng)
    frame = draw.frame if "design" not in law["trial"] else _run_trial(law, draw, rng)
    if samples == 1:
        return frame
    day2 = second_sample(law, frame, np.random.default_rng([seed, 2]))
    both = pd.concat([frame.assign(**{SAMPLE_TIME: 1}), day2.assign(**{SAMPLE_TIME: 2})])
    order = np.argsort(np.r_[np.arange(n), np.arange(n)], kind="stable")
    return both.iloc[order].reset_index(drop=True)


def second_sample(law: Preset, first: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """Each patient's next-day sample: the latent phenotype changes for a share of patients
    (`[repeat] transition_share`, to another phenotype drawn by prevalence), every lab marker
    moves by the change of its phenotype median, day-to-day biological variation and a fresh
    assay error, SOFA by the change of its phenotype mean and its own day-to-day spread. The
    patient, site, missingness pattern, age, sex, treatment and outcome stay those of day 1.
    All three are assumptions, labelled in the preset."""
    repeat = law["repeat"]
    if not repeat:
        raise PresetError(f"Preset '{law.name}' has no [repeat] table: a second sample needs "
                          "transition_share, day_to_day_cv and sofa_day_to_day_sd")
    old = pd.Categorical(first[TRUTH_COLUMN], categories=PHENOTYPES).codes.astype(np.int64)
    n, k = len(old), len(PHENOTYPES)
    weights = np.tile(_per_phenotype(law["population"]["prevalence"]), (n, 1))
    weights[np.arange(n), old] = 0.0
    other = (rng.random(n)[:, None] > (weights / weights.sum(axis=1, keepdims=True)
                                       ).cumsum(axis=1)).sum(axis=1).clip(max=k - 1)
    new = np.where(rng.random(n) < repeat["transition_share"], other, old)
    day2 = first.copy()
    for column in LAB_MARKERS:
        marker, marker_law = PANEL[column], law[column]
        if not marker.is_numeric or column == "age_years":
            continue
        value = first[column].to_numpy(dtype=float)
        if column in LINEAR_SCALE_MARKERS:
            mean = _per_phenotype(marker_law["mean"])
            moved = value + mean[new] - mean[old] + repeat["sofa_day_to_day_sd"] * \
                rng.standard_normal(n)
        else:
            log_median = np.log(_per_phenotype(marker_law["median"]))
            spread = np.hypot(_cv_to_log_sd(repeat["day_to_day_cv"]),
                              _cv_to_log_sd(marker_law["assay_cv"]))
            moved = np.exp(np.log(np.maximum(value, 1e-3)) + log_median[new] - log_median[old]
                           + spread * rng.standard_normal(n))
        day2[column] = np.round(np.clip(moved, marker.low, marker.high), marker.decimals)
    day2[TRUTH_COLUMN] = np.asarray(PHENOTYPES, dtype=object)[new]
    day2[RULE_COLUMN] = immunosep_phenotype(day2["ferritin_ng_ml"].to_numpy(),
                                            day2["hla_dr_mab_per_cell"].to_numpy())
    return day2


# --- trials: treatment and outcomes ---------------------------------------------------------


def _effects(section: dict[str, Any], matched: float) -> np.ndarray:
    """Log-odds ratios, arms x true phenotypes: `matched` for a drug in its own phenotype, the
    preset's `mismatched_log_odds_ratio` elsewhere, 0 for placebo."""
    table = np.zeros((len(ARMS), len(PHENOTYPES)))
    for a, arm in enumerate(ARMS):
        for k, phenotype in enumerate(PHENOTYPES):
            if arm == ARM_OF[phenotype] and arm != PLACEBO:
                table[a, k] = matched
            elif arm != PLACEBO:
                table[a, k] = section["mismatched_log_odds_ratio"][arm][phenotype]
    return table


def _logistic(log_odds: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-log_odds))


def _response_log_odds(law: Preset, frame: pd.DataFrame, code: np.ndarray) -> np.ndarray:
    """Log-odds of the SOFA response on placebo, per patient (before any drug effect)."""
    response = law["response"]
    return (_per_phenotype(response["intercept"])[code]
            + response["sofa_log_odds_per_point"] * (frame["sofa"].to_numpy() - SOFA_REFERENCE)
            + response["age_log_odds_per_decade"]
            * (frame["age_years"].to_numpy() - AGE_REFERENCE_YEARS) / 10)


def potential_outcomes(law: Preset, draw: _Draw) -> dict[str, np.ndarray]:
    """Each patient's true probability of each outcome under every arm: (patients, arms)."""
    code = draw.phenotype_code
    death = _per_phenotype(law["outcome"]["intercept"])[code] + \
        draw.death_log_odds_without_intercept
    response = _response_log_odds(law, draw.frame, code)
    death_effect = _effects(law["outcome"], law["outcome"]["matched_log_odds_ratio"])
    response_effect = _effects(law["response"], law["response"]["matched_log_odds_ratio"])
    return {
        SOFA_RESPONSE: _logistic(response[:, None] + response_effect[:, code].T),
        DEATH_28D: _logistic(death[:, None] + death_effect[:, code].T),
    }


def _blocked_arms(rng: np.random.Generator, site: np.ndarray, eligible: np.ndarray,
                  arms: np.ndarray) -> np.ndarray:
    """Arm index per eligible patient: permuted blocks within each site (one sequence per site).

    `arms` is (patients, arms per block) of candidate arm indices, one block cycles through
    each patient's own arms once, so every site stays balanced as ImmunoSep's did.
    """
    width = arms.shape[1]
    chosen = np.full(len(site), -1)
    for s in np.unique(site[eligible]):
        rows = rng.permutation(np.flatnonzero(eligible & (site == s)))
        blocks = -(-len(rows) // (2 * width))
        slots = np.concatenate([rng.permutation(np.repeat(np.arange(width), 2))
                                for _ in range(blocks)])[: len(rows)]
        chosen[rows] = arms[rows, slots]
    return chosen


def _run_trial(law: Preset, draw: _Draw, rng: np.random.Generator) -> pd.DataFrame:
    """Assign treatment by the preset's design and draw the outcomes under the arm received.

    - `rule-positive` (ImmunoSep): the rule's MALS and immunoparalysis patients are randomised
      1:1 within each site to their matched drug or placebo; the rest are not randomised
      (empty `treatment`) and their outcomes are drawn under standard care (placebo).
    - `all-comers`: every screened patient is randomised 1:1:1 among the three arms.
    - `observational`: clinicians mostly treat by the rule, sicker patients more often; the
      propensity is not recorded (no `treatment_probability` column).

    The two outcomes are drawn together through a Gaussian copula (`[response]
    death_correlation`), so their probabilities stay exactly those in the potential-outcome
    columns.
    """
    frame = draw.frame.copy()
    n = len(frame)
    trial, design = law["trial"], law["trial"]["design"]
    rule = frame[RULE_COLUMN].to_numpy()
    site = pd.factorize(frame[SITE_ID])[0]
    placebo = ARMS.index(PLACEBO)
    probability = np.full(n, np.nan)
    if design == RULE_POSITIVE:
        eligible = np.isin(rule, (MALS, IMMUNOPARALYSIS))
        drug = np.where(rule == MALS, ARMS.index(ANAKINRA), ARMS.index(INTERFERON_GAMMA))
        arm = _blocked_arms(rng, site, eligible, np.column_stack([drug, np.full(n, placebo)]))
        probability[eligible] = 0.5
    elif design == ALL_COMERS:
        eligible = np.ones(n, bool)
        arm = _blocked_arms(rng, site, eligible, np.tile(np.arange(len(ARMS)), (n, 1)))
        probability[:] = 1.0 / len(ARMS)
    else:
        eligible = np.ones(n, bool)
        score = np.zeros((n, len(ARMS)))
        severity = trial["sofa_log_odds_per_point"] * (frame["sofa"].to_numpy() - SOFA_REFERENCE)
        for a, treated_phenotype in ((ARMS.index(ANAKINRA), MALS),
                                     (ARMS.index(INTERFERON_GAMMA), IMMUNOPARALYSIS)):
            score[:, a] = np.where(rule == treated_phenotype, trial["by_rule_log_odds"],
                                   trial["off_rule_log_odds"]) + severity
        propensity = np.exp(score - score.max(axis=1, keepdims=True))
        propensity /= propensity.sum(axis=1, keepdims=True)
        cumulative = propensity.cumsum(axis=1)
        arm = np.minimum((rng.random(n)[:, None] > cumulative).sum(axis=1), len(ARMS) - 1)
    received = np.where(eligible, arm, placebo)

    truth = potential_outcomes(law, draw)
    rows = np.arange(n)
    rho = law["response"]["death_correlation"]
    z = rng.standard_normal((n, 2))
    z[:, 1] = rho * z[:, 0] + np.sqrt(1 - rho**2) * z[:, 1]
    uniform = ndtr(z)
    frame[DEATH_28D] = (uniform[:, 0] < truth[DEATH_28D][rows, received]).astype(np.int8)
    frame[SOFA_RESPONSE] = (uniform[:, 1] < truth[SOFA_RESPONSE][rows, received]).astype(np.int8)
    frame[TREATMENT] = pd.Series(np.asarray(ARMS, dtype=object)[received], dtype="str").where(
        eligible, None)
    if design != OBSERVATIONAL:
        frame[TREATMENT_PROBABILITY] = probability
    for outcome in (SOFA_RESPONSE, DEATH_28D):
        for a, arm_name in enumerate(ARMS):
            frame[potential_outcome_column(outcome, arm_name)] = truth[outcome][:, a]
    ordered = [c for c in frame.columns if c != SYNTHETIC_COLUMN] + [SYNTHETIC_COLUMN]
    return frame[ordered]


def is_synthetic(frame: pd.DataFrame) -> bool:
    """Whether a cohort is marked as simulated (every row's `synthetic` column true)."""
    if SYNTHETIC_COLUMN not in frame or frame.empty:
        return False
    return bool(frame[SYNTHETIC_COLUMN].astype("string").str.lower().isin(["true", "1"]).all())


def rule_shares(frame: pd.DataFrame) -> dict[str, float]:
    """Share of all patients the rule puts in each phenotype (indeterminate included)."""
    shares = frame[RULE_COLUMN].value_counts(normalize=True)
    return {label: float(shares.get(label, 0.0)) for label in (*PHENOTYPES, INDETERMINATE)}


def mortality_by_rule(frame: pd.DataFrame, column: str = DEATH_COLUMN) -> dict[str, float]:
    """28-day mortality within each rule phenotype.

    In a trial cohort pass `potential_outcome_column(DEATH_28D, PLACEBO)`: the expected
    mortality under standard care, which the screening targets describe (treated patients die
    less often than the screening table's).
    """
    return {str(k): float(v) for k, v in frame.groupby(RULE_COLUMN)[column].mean().items()}


TREATED = "treated"  # any drug: the arm ImmunoSep's published rates pool


def arm_rates(frame: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Patients, SOFA response and 28-day death by arm received, among patients with an arm.

    The arms present, then `treated` (any drug), the pooled arm of ImmunoSep's primary result
    and the key of a trial preset's `response_by_arm` / `death_by_arm` targets.
    """
    received = frame[TREATMENT].dropna()
    groups = {arm: received.index[received == arm] for arm in ARMS if (received == arm).any()}
    groups[TREATED] = received.index[received != PLACEBO]
    return {
        name: {"patients": float(len(rows)),
               SOFA_RESPONSE: float(frame.loc[rows, SOFA_RESPONSE].mean()),
               DEATH_28D: float(frame.loc[rows, DEATH_28D].mean())}
        for name, rows in groups.items() if len(rows)
    }


@dataclass(frozen=True)
class CalibrationCheck:
    """One simulated quantity beside the preset's target for it (None: no target applies)."""

    quantity: str  # a [targets] key: rule_share, mortality_by_rule, response_by_arm, ...
    group: str  # a rule phenotype or an arm
    simulated: float
    target: float | None
    patients: int


def calibration_checks(preset: Preset, frame: pd.DataFrame) -> list[CalibrationCheck]:
    """What a cohort drawn from `preset` shows of each quantity its targets describe.

    The rule's shares and its mortality by phenotype; in a trial, mortality under standard care
    (the expected placebo death, what the screening targets describe) and each arm's observed
    SOFA response and death. A target a preset sets to `{}` does not apply to it (its note says
    why), so those rows carry `target=None`.
    """
    targets = preset["targets"]
    trial = bool(preset["trial"])
    counts = frame[RULE_COLUMN].value_counts()
    death = potential_outcome_column(DEATH_28D, PLACEBO) if trial else DEATH_COLUMN
    checks = [CalibrationCheck("rule_share", label, share, targets["rule_share"].get(label),
                               int(counts.get(label, 0)))
              for label, share in rule_shares(frame).items()]
    checks += [CalibrationCheck("mortality_by_rule", label, rate,
                                targets["mortality_by_rule"].get(label), int(counts[label]))
               for label, rate in mortality_by_rule(frame, death).items()]
    if trial:
        for quantity, outcome in (("response_by_arm", SOFA_RESPONSE), ("death_by_arm", DEATH_28D)):
            checks += [CalibrationCheck(quantity, arm, rates[outcome],
                                        targets.get(quantity, {}).get(arm), int(rates["patients"]))
                       for arm, rates in arm_rates(frame).items()]
    return checks


def calibrate(
    preset: str | Preset, n: int = 600_000, seed: int = 0, site_draws: int = 60
) -> dict[str, dict[str, float]]:
    """Refit the calibrated parameters (latent prevalence, death intercepts) to the targets.

    One reference cohort with equal latent shares is drawn in `site_draws` chunks, each with its
    own sites, so site-level effects average out. The rule's shares are linear in the latent
    shares through P(rule | latent), solved by least squares with the shares summing to one.
    Mortality by rule phenotype is then matched by Newton's method on expected risk, with the
    reference cohort reweighted to the fitted prevalence. Paste the result into the preset.
    """
    law = load_preset(preset) if isinstance(preset, str) else preset
    targets = law["targets"]
    rng = np.random.default_rng(seed)
    draws = [
        _draw(law, rng.integers(0, len(PHENOTYPES), n // site_draws), rng)
        for _ in range(site_draws)
    ]
    code = np.concatenate([d.phenotype_code for d in draws])
    rest = np.concatenate([d.death_log_odds_without_intercept for d in draws])
    rule = np.concatenate([d.frame[RULE_COLUMN].to_numpy() for d in draws])

    share_labels = list(targets["rule_share"])
    rule_given_latent = np.array(
        [[np.mean(rule[code == k] == label) for k in range(len(PHENOTYPES))]
         for label in share_labels]
    )
    system = np.vstack([rule_given_latent, np.ones(len(PHENOTYPES))])
    rhs = np.array([*(targets["rule_share"][p] for p in share_labels), 1.0])
    prevalence = np.clip(np.linalg.lstsq(system, rhs, rcond=None)[0], 1e-6, None)
    prevalence /= prevalence.sum()
    weight = (prevalence / np.bincount(code, minlength=len(PHENOTYPES)))[code]

    labels = list(targets["mortality_by_rule"])
    goal = np.array([targets["mortality_by_rule"][p] for p in labels])
    masks = [rule == p for p in labels]

    def mortality_gap(intercept: np.ndarray) -> np.ndarray:
        risk = weight / (1.0 + np.exp(-(intercept[code] + rest)))
        return np.array([risk[m].sum() / weight[m].sum() for m in masks]) - goal

    intercept = _per_phenotype(law["outcome"]["intercept"])
    free = [PHENOTYPES.index(p) for p in labels]
    step = 1e-4
    for _ in range(25):
        gap = mortality_gap(intercept)
        if np.max(np.abs(gap)) < 1e-6:
            break
        jacobian = np.column_stack(
            [(mortality_gap(intercept + step * np.eye(len(PHENOTYPES))[k]) - gap) / step
             for k in free]
        )
        intercept[free] -= np.linalg.lstsq(jacobian, gap, rcond=None)[0]
    return {
        "prevalence": dict(zip(PHENOTYPES, np.round(prevalence, 4).tolist(), strict=True)),
        "intercept": dict(zip(PHENOTYPES, np.round(intercept, 3).tolist(), strict=True)),
    }


def calibrate_trial(
    preset: str | Preset, n: int = 400_000, seed: int = 0, site_draws: int = 40
) -> dict[str, dict[str, Any]]:
    """Refit a rule-positive trial's effects so its randomised arms hit the published rates.

    Among randomised patients (the rule's MALS and immunoparalysis), the expected SOFA response
    on placebo is matched by one shift of `[response] intercept` (the differences between
    phenotypes stay as assumed), then the treated arm's by `[response] matched_log_odds_ratio`,
    common to both strata; 28-day death on treatment by `[outcome] matched_log_odds_ratio`.
    Expected rates, not drawn outcomes: 1:1 randomisation makes each arm's expected rate the
    mean over the randomised patients of their probability under that arm.
    """
    law = load_preset(preset) if isinstance(preset, str) else preset
    if law["trial"].get("design") != RULE_POSITIVE:
        raise PresetError(f"Preset '{law.name}': only a {RULE_POSITIVE} trial is calibrated "
                          "to ImmunoSep's arms; a preset extending it inherits its effects")
    targets = law["targets"]
    rng = np.random.default_rng(seed)
    prevalence = _per_phenotype(law["population"]["prevalence"])
    draws = [_draw(law, rng.choice(len(PHENOTYPES), size=n // site_draws,
                                   p=prevalence / prevalence.sum()), rng)
             for _ in range(site_draws)]
    code = np.concatenate([d.phenotype_code for d in draws])
    frame = pd.concat([d.frame for d in draws], ignore_index=True)
    rule = frame[RULE_COLUMN].to_numpy()
    randomised = np.isin(rule, (MALS, IMMUNOPARALYSIS))
    code, frame, rule = code[randomised], frame[randomised], rule[randomised]
    drug = np.where(rule == MALS, ARMS.index(ANAKINRA), ARMS.index(INTERFERON_GAMMA))
    base = _response_log_odds(law, frame, code)
    death = (_per_phenotype(law["outcome"]["intercept"])[code]
             + np.concatenate([d.death_log_odds_without_intercept for d in draws])[randomised])

    def treated_log_odds(section: str, matched: float) -> np.ndarray:
        return _effects(law[section], matched)[drug, code]

    shift = brentq(lambda c: _logistic(base + c).mean() - targets["response_by_arm"]["placebo"],
                   -10, 10)
    response_odds_ratio = brentq(
        lambda b: _logistic(base + shift + treated_log_odds("response", b)).mean()
        - targets["response_by_arm"]["treated"], -10, 10)
    death_odds_ratio = brentq(
        lambda b: _logistic(death + treated_log_odds("outcome", b)).mean()
        - targets["death_by_arm"]["treated"], -10, 10)
    intercept = _per_phenotype(law["response"]["intercept"]) + shift
    return {
        "response": {
            "intercept": dict(zip(PHENOTYPES, np.round(intercept, 3).tolist(), strict=True)),
            "matched_log_odds_ratio": round(float(response_odds_ratio), 3),
        },
        "outcome": {"matched_log_odds_ratio": round(float(death_odds_ratio), 3)},
        "placebo_death_randomised": {"expected": round(float(_logistic(death).mean()), 4)},
    }


def write_calibration(name: str) -> dict[str, dict[str, Any]]:
    """Recalibrate a shipped preset and rewrite its calibrated values in place (maintainers).

    Run after changing the marker law: `python -c "from phenotyper.simulate import
    write_calibration as w; w('provide')"`. Only the `value = ...` of the calibrated
    parameters changes; notes and layout stay as written. A trial preset (`[trial] design =
    "rule-positive"`) gets its trial effects refitted (`calibrate_trial`).
    """
    preset = load_preset(name)
    if preset["trial"].get("design") == RULE_POSITIVE:
        fit = calibrate_trial(preset)
        fit.pop("placebo_death_randomised")
    else:
        fit = {"population": {"prevalence": None}, "outcome": {"intercept": None}}
        fit["population"]["prevalence"], fit["outcome"]["intercept"] = calibrate(preset).values()
    path = Path(str(resources.files("phenotyper.presets").joinpath(f"{name}.toml")))
    text = path.read_text()
    for section, parameters in fit.items():
        for key, value in parameters.items():
            text = _replace_value(path, text, section, key, value)
    path.write_text(text)
    return fit


def _replace_value(path: Path, text: str, section: str, key: str, value: Any) -> str:
    """`text` with the value of `key` in `[section]` replaced, everything else untouched."""
    if isinstance(value, dict):
        written = "{ " + ", ".join(f"{k} = {v}" for k, v in value.items()) + " }"
    else:
        written = repr(value)
    header = re.search(rf"^\[{re.escape(section)}\]\s*$", text, flags=re.MULTILINE)
    if header is None:
        raise PresetError(f"{path}: no [{section}] table to write the calibrated {key} into")
    end = re.search(r"^\[", text[header.end():], flags=re.MULTILINE)
    body_end = header.end() + (end.start() if end else len(text) - header.end())
    body, count = re.subn(rf"^{key} = \{{ value = (\{{[^}}]*\}}|[^,]+),",
                          f"{key} = {{ value = {written},", text[header.end():body_end],
                          flags=re.MULTILINE)
    if count != 1:
        raise PresetError(f"{path}: expected one '{key} = {{ value = ... }}' line in [{section}]")
    return text[: header.end()] + body + text[body_end:]


def bayes_posterior(preset: str | Preset, frame: pd.DataFrame) -> np.ndarray:
    """P(latent phenotype | measured markers) under the preset's own law: the Bayes optimum.

    The simulator's law is Gaussian in log-marker space with a covariance from the factor
    loadings (scaled per phenotype by `factor_sd` where a preset sets it), unique variance,
    assay noise and site bias added as variance,
    SOFA is a rounded Gaussian (an interval given the other markers), and HLA-DR is a two-part
    mixture (iced or not). Missing markers are marginalised out: missingness does not depend on
    the phenotype, except HLA-DR's where a preset orders it by suspicion
    (`hla_dr_order_share`): whether it was measured then enters the likelihood (marginal over
    sites, exact where every site has flow cytometry). Age and sex carry no phenotype
    information. Clipping to the plausible range and rounding of reported values are ignored
    (they touch a negligible share of values).
    Returns an (n, 3) array in PHENOTYPES order; a learned model can at best match it.
    """
    from scipy.special import log_ndtr, logsumexp
    from scipy.stats import multivariate_normal

    law = load_preset(preset) if isinstance(preset, str) else preset
    markers = [c for c in LAB_MARKERS if c not in LINEAR_SCALE_MARKERS]
    dims = [*markers, "sofa"]
    loadings = np.array([[law[c]["loadings"].get(f, 0.0) for f in FACTORS] for c in dims])
    unique = np.diag(1.0 - (loadings**2).sum(axis=1))
    factor_sd = _per_phenotype(law["population"].get(
        "factor_sd", dict.fromkeys(PHENOTYPES, 1.0)))
    spread = np.array([law[c]["log_sd"] for c in markers] + [law["sofa"]["sd"]])
    noise = np.array([_cv_to_log_sd(law[c]["assay_cv"]) ** 2 for c in markers] + [0.0])
    measurement = law["measurement"]
    noise[dims.index("ferritin_ng_ml")] += _cv_to_log_sd(measurement["ferritin_platform_cv"]) ** 2
    noise[dims.index("hla_dr_mab_per_cell")] += _cv_to_log_sd(measurement["hla_dr_lab_cv"]) ** 2
    covariances = [spread[:, None] * (s**2 * loadings @ loadings.T + unique) * spread[None, :]
                   + np.diag(noise) for s in factor_sd]
    means = np.array([[np.log(law[c]["median"][p]) for c in markers] + [law["sofa"]["mean"][p]]
                      for p in PHENOTYPES])
    hla = dims.index("hla_dr_mab_per_cell")
    iced_share = law["population"]["iced_sample_share"]
    iced_shift = np.log1p(measurement["iced_hla_dr_bias"])
    prior = _per_phenotype(law["population"]["prevalence"])

    values = np.column_stack(
        [np.log(np.maximum(frame[c].to_numpy(dtype=float), 0.5 * 10.0 ** -PANEL[c].decimals))
         for c in markers] + [frame["sofa"].to_numpy(dtype=float)])
    observed = np.isfinite(values)
    log_joint = np.zeros((len(frame), len(PHENOTYPES)))
    patterns, pattern_of_row = np.unique(observed[:, : len(markers)], axis=0, return_inverse=True)
    sofa = len(markers)
    for p_index, pattern in enumerate(patterns):
        rows = np.flatnonzero(pattern_of_row.ravel() == p_index)
        seen = np.flatnonzero(pattern)
        x = values[np.ix_(rows, seen)]
        sofa_value = values[rows, sofa]
        has_sofa = np.isfinite(sofa_value)
        upper = np.where(sofa_value >= 24, np.inf, sofa_value + 0.5)
        lower = np.where(sofa_value <= 0, -np.inf, sofa_value - 0.5)
        components = [(0.0, 1.0)]
        if pattern[hla]:
            components = [(0.0, 1.0 - iced_share), (iced_shift, iced_share)]
        for k, covariance in enumerate(covariances):
            cov_seen = covariance[np.ix_(seen, seen)]
            to_sofa = np.linalg.solve(cov_seen, covariance[seen, sofa])
            sofa_sd = np.sqrt(covariance[sofa, sofa] - covariance[sofa, seen] @ to_sofa)
            parts = []
            for shift, weight in components:
                mean = means[k].copy()
                mean[hla] += shift
                density = multivariate_normal(mean[seen], cov_seen, allow_singular=True).logpdf(x)
                density = np.atleast_1d(density)
                centre = mean[sofa] + (x - mean[seen]) @ to_sofa
                with np.errstate(invalid="ignore"):
                    high = log_ndtr((upper - centre) / sofa_sd)
                    low = log_ndtr((lower - centre) / sofa_sd)
                    interval = high + np.log1p(-np.exp(np.minimum(low - high, 0.0)))
                parts.append(np.log(weight) + density + np.where(has_sofa, interval, 0.0))
            log_joint[rows, k] = logsumexp(parts, axis=0) + np.log(prior[k])
            if "hla_dr_order_share" in law["population"]:
                population = law["population"]
                measured = (population["flow_cytometry_site_share"]
                            * (1 - population["late_sample_share"])
                            * population["hla_dr_order_share"][PHENOTYPES[k]])
                log_joint[rows, k] += np.log(measured if pattern[hla] else 1 - measured)
    return np.exp(log_joint - logsumexp(log_joint, axis=1, keepdims=True))
