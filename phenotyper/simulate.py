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

import difflib
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from phenotyper.panel import PANEL, PATIENT_ID, SEX_VALUES, SITE_ID
from phenotyper.rules import INDETERMINATE, PHENOTYPES, immunosep_phenotype

FACTORS: tuple[str, ...] = ("inflammation", "immunosuppression", "organ_dysfunction")
NOTE_KEYS: tuple[str, ...] = ("source", "assumption", "calibrated")
LINEAR_SCALE = ("sofa", "age_years")
LAB_MARKERS = tuple(column for column in PANEL if column != "sex")
CYTOKINES = ("il6_pg_ml", "il10_pg_ml")
AGE_MAX_YEARS = 100
SOFA_REFERENCE, AGE_REFERENCE_YEARS = 9.0, 70.0

TRUTH_COLUMN = "phenotype_true"
RULE_COLUMN = "phenotype_rule"
DEATH_COLUMN = "death_28d"
SYNTHETIC_COLUMN = "synthetic"  # True on every simulated row: results on it are not evidence


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


def available_presets() -> list[str]:
    """Names of the shipped presets (files in phenotyper/presets not starting with '_')."""
    folder = resources.files("phenotyper.presets")
    return sorted(
        entry.name.removesuffix(".toml")
        for entry in folder.iterdir()
        if entry.name.endswith(".toml") and not entry.name.startswith("_")
    )


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


def load_preset(name: str) -> Preset:
    """Load a preset by name, with the shared marker law from `_markers.toml` merged in."""
    names = available_presets()
    if name not in names:
        near = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        raise PresetError(f"Unknown preset '{name}'.{hint} Available: {', '.join(names)}.")
    document = _read_toml(name)
    values: dict[str, dict[str, Any]] = {}
    notes: dict[str, dict[str, str]] = {}
    for section in ("targets", "population", "measurement", "outcome"):
        values[section], notes[section] = _split_parameters(section, document.get(section, {}))
    for column, section in _read_toml("_markers").items():
        values[column], notes[column] = _split_parameters(column, section)
    missing_markers = set(LAB_MARKERS) - set(values)
    if missing_markers:
        raise PresetError(f"_markers.toml lacks {sorted(missing_markers)}")
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
    columns: dict[str, np.ndarray] = {}
    for column in LAB_MARKERS:
        law = preset[column]
        loadings = np.array([law["loadings"].get(f, 0.0) for f in FACTORS])
        unique_sd = np.sqrt(1.0 - loadings @ loadings)
        z = factors @ loadings + unique_sd * rng.standard_normal(n)
        if column in LINEAR_SCALE:
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


def simulate(preset: str | Preset, n: int, seed: int) -> pd.DataFrame:
    """A synthetic cohort of `n` patients; the same (preset, n, seed) always gives the same rows."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    law = load_preset(preset) if isinstance(preset, str) else preset
    rng = np.random.default_rng(seed)
    prevalence = _per_phenotype(law["population"]["prevalence"])
    phenotype_code = rng.choice(len(PHENOTYPES), size=n, p=prevalence / prevalence.sum())
    return _draw(law, phenotype_code, rng).frame


def is_synthetic(frame: pd.DataFrame) -> bool:
    """Whether a cohort is marked as simulated (every row's `synthetic` column true)."""
    if SYNTHETIC_COLUMN not in frame or frame.empty:
        return False
    return bool(frame[SYNTHETIC_COLUMN].astype("string").str.lower().isin(["true", "1"]).all())


def rule_shares(frame: pd.DataFrame) -> dict[str, float]:
    """Share of all patients the rule puts in each phenotype (indeterminate included)."""
    shares = frame[RULE_COLUMN].value_counts(normalize=True)
    return {label: float(shares.get(label, 0.0)) for label in (*PHENOTYPES, INDETERMINATE)}


def mortality_by_rule(frame: pd.DataFrame) -> dict[str, float]:
    """28-day mortality within each rule phenotype."""
    return {str(k): float(v) for k, v in frame.groupby(RULE_COLUMN)[DEATH_COLUMN].mean().items()}


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


def write_calibration(name: str) -> dict[str, dict[str, float]]:
    """Recalibrate a shipped preset and rewrite its calibrated values in place (maintainers).

    Run after changing the marker law: `python -c "from phenotyper.simulate import
    write_calibration as w; w('provide')"`. Only the `value = {...}` of the calibrated
    parameters changes; notes and layout stay as written.
    """
    fit = calibrate(name)
    path = Path(str(resources.files("phenotyper.presets").joinpath(f"{name}.toml")))
    text = path.read_text()
    for key, values in fit.items():
        inner = ", ".join(f"{phenotype} = {value}" for phenotype, value in values.items())
        text, count = re.subn(
            rf"^{key} = \{{ value = \{{[^}}]*\}}", f"{key} = {{ value = {{ {inner} }}",
            text, flags=re.MULTILINE,
        )
        if count != 1:
            raise PresetError(f"{path}: expected one '{key} = {{ value = ... }}' line")
    path.write_text(text)
    return fit


def bayes_posterior(preset: str | Preset, frame: pd.DataFrame) -> np.ndarray:
    """P(latent phenotype | measured markers) under the preset's own law: the Bayes optimum.

    The simulator's law is Gaussian in log-marker space with a covariance shared by the
    phenotypes (factor loadings, unique variance, assay noise and site bias added as variance),
    SOFA is a rounded Gaussian (an interval given the other markers), and HLA-DR is a two-part
    mixture (iced or not). Missing markers are marginalised out: missingness does not depend on
    the phenotype. Age and sex carry no phenotype information. Clipping to the plausible range
    and rounding of reported values are ignored (they touch a negligible share of values).
    Returns an (n, 3) array in PHENOTYPES order; a learned model can at best match it.
    """
    from scipy.special import log_ndtr, logsumexp
    from scipy.stats import multivariate_normal

    law = load_preset(preset) if isinstance(preset, str) else preset
    markers = [c for c in LAB_MARKERS if c not in LINEAR_SCALE]
    dims = [*markers, "sofa"]
    loadings = np.array([[law[c]["loadings"].get(f, 0.0) for f in FACTORS] for c in dims])
    correlation = loadings @ loadings.T + np.diag(1.0 - (loadings**2).sum(axis=1))
    spread = np.array([law[c]["log_sd"] for c in markers] + [law["sofa"]["sd"]])
    noise = np.array([_cv_to_log_sd(law[c]["assay_cv"]) ** 2 for c in markers] + [0.0])
    measurement = law["measurement"]
    noise[dims.index("ferritin_ng_ml")] += _cv_to_log_sd(measurement["ferritin_platform_cv"]) ** 2
    noise[dims.index("hla_dr_mab_per_cell")] += _cv_to_log_sd(measurement["hla_dr_lab_cv"]) ** 2
    covariance = spread[:, None] * correlation * spread[None, :] + np.diag(noise)
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
        cov_seen = covariance[np.ix_(seen, seen)]
        to_sofa = np.linalg.solve(cov_seen, covariance[seen, sofa])
        sofa_sd = np.sqrt(covariance[sofa, sofa] - covariance[sofa, seen] @ to_sofa)
        sofa_value = values[rows, sofa]
        has_sofa = np.isfinite(sofa_value)
        upper = np.where(sofa_value >= 24, np.inf, sofa_value + 0.5)
        lower = np.where(sofa_value <= 0, -np.inf, sofa_value - 0.5)
        components = [(0.0, 1.0)]
        if pattern[hla]:
            components = [(0.0, 1.0 - iced_share), (iced_shift, iced_share)]
        for k in range(len(PHENOTYPES)):
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
    return np.exp(log_joint - logsumexp(log_joint, axis=1, keepdims=True))
