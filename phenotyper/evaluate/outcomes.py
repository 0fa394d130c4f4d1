"""Judging phenotypers by outcomes: who does badly, who benefits, what treating by them is worth.

Real cohorts have no gold-standard phenotype; phenotypes earn their keep by outcomes (PROVIDE,
Sinha, Seymour). For every phenotyper this module computes, on any cohort with outcome columns:

- **prognostic**: the outcome rate in each predicted phenotype, and odds ratios against
  `unclassified` adjusted for SOFA and age (statsmodels, model-based intervals), among patients
  given no active drug;
- **predictive**: within each predicted phenotype, each drug's risk difference against placebo,
  and the treatment x phenotype interaction (one joint Wald test);
- **policy value**: the expected outcome had patients been treated as the phenotyper says
  (MALS -> anakinra, immunoparalysis -> interferon-gamma, otherwise placebo), with paired
  differences against the rule and against treating nobody. With a known propensity (a trial's
  `treatment_probability`) by inverse probability weighting (IPW, normalised); without one by
  augmented IPW (AIPW) with cross-fitted propensity and outcome models. On simulated cohorts two
  ceilings are added: treating by the true phenotype, and each patient's best arm.

Every estimate is a sum of contrasts of ratios of weighted sums, sum_i w_i num_i / sum_i w_i den_i,
so the point estimate (all weights 1) and the evaluator's patient-bootstrap resamples run through
one vectorised product; no regression is refitted per resample. IPW and rates take percentile
bootstrap intervals; AIPW takes influence-function intervals (clustered by patient) on the
cross-fitted scores, as the doubly robust literature does.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from phenotyper.contract import (
    ARM_OF,
    ARM_WORDS,
    ARMS,
    HIGHER_IS_BETTER,
    PHENOTYPES,
    PLACEBO,
    PREDICTED_LABELS,
    TREATMENT,
    TRUE_PHENOTYPE,
    UNCLASSIFIED,
    potential_outcome_column,
)
from phenotyper.evaluate.bootstrap import CONFIDENCE
from phenotyper.models import PanelFeatures
from phenotyper.panel import AGE_REFERENCE_YEARS, NUMERIC_MARKERS, SOFA_REFERENCE
from phenotyper.rules import immunosep_phenotype
from phenotyper.suggest import did_you_mean

IPW, AIPW = "ipw", "aipw"
# Pseudo-phenotypers judged beside the real ones: treat nobody (placebo for all) and, on
# simulated cohorts, the two ceilings.
NOBODY, BY_TRUE_PHENOTYPE, BEST_ARM = "nobody", "true_phenotype", "best_arm"
DRUGS: tuple[str, ...] = tuple(arm for arm in ARMS if arm != PLACEBO)
PROPENSITY_FLOOR = 0.01  # estimated propensities are clipped here (and the count reported)
# An estimate needing an arm that more than this share of its patients could not have received
# (estimated probability below PROPENSITY_FLOOR) is not given: the data cannot support it.
MAX_UNSUPPORTED_SHARE = 0.01
CROSS_FIT_FOLDS = 5
_Z = float(stats.norm.ppf(0.5 + CONFIDENCE / 2))
_OUTCOME_WORDS = {"1": 1.0, "0": 0.0, "true": 1.0, "false": 0.0, "yes": 1.0, "no": 0.0,
                  "y": 1.0, "n": 0.0, "1.0": 1.0, "0.0": 0.0}
MIN_ARM_PATIENTS = 10  # a treatment effect needs this many patients on each arm compared


class OutcomeError(ValueError):
    """Outcome, treatment or propensity columns the evaluator cannot use; says which and why."""


@dataclass(frozen=True)
class OutcomeSpec:
    """Which columns hold the outcomes, the arm received and its probability.

    `outcomes` are 0/1 columns, the first heading the tables; `treatment` may be None (then only
    the prognostic section is computed). `propensity` names the column with the probability of
    the arm each patient received; without one the policy values are doubly robust (AIPW).
    `higher_is_better` overrides the direction phenotyper knows for `sofa_response` (higher is
    better) and `death_28d` (lower); any other outcome needs it.
    """

    outcomes: tuple[str, ...]
    treatment: str | None = TREATMENT
    propensity: str | None = None
    higher_is_better: Mapping[str, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, higher in self.higher_is_better.items():
            if name not in self.outcomes:
                hint = did_you_mean(name, self.outcomes)
                raise OutcomeError(f"a direction is given for '{name}', which is not one of the "
                                   f"outcomes ({', '.join(self.outcomes)}).{hint}")
            known = HIGHER_IS_BETTER.get(name)
            if known is not None and known != bool(higher):
                raise OutcomeError(f"'{name}': {'higher' if known else 'lower'} is better, as "
                                   "phenotyper knows; do not set its direction")

    def better_high(self, outcome: str) -> bool:
        if outcome in self.higher_is_better:
            return bool(self.higher_is_better[outcome])
        if outcome in HIGHER_IS_BETTER:
            return HIGHER_IS_BETTER[outcome]
        raise OutcomeError(f"outcome '{outcome}': say whether a higher value is better "
                           "(higher_is_better in the experiment's [outcome], or "
                           "--higher-is-better / --lower-is-better)")


@dataclass(frozen=True)
class OutcomeData:
    """Validated outcome columns as arrays, one entry per cohort row."""

    outcomes: dict[str, np.ndarray]  # 0/1 floats, NaN where missing
    arm: np.ndarray | None  # index into ARMS, -1 where no arm was assigned (not randomised)
    propensity: np.ndarray | None  # P(arm received), NaN where no arm
    potential: dict[str, np.ndarray]  # simulated: outcome -> (rows, arms) true probabilities
    true_labels: np.ndarray | None  # simulated: the latent phenotype

    @property
    def method(self) -> str | None:
        if self.arm is None:
            return None
        return IPW if self.propensity is not None else AIPW


def _column(frame: pd.DataFrame, name: str, what: str) -> pd.Series:
    if name not in frame.columns:
        hint = did_you_mean(name, [str(c) for c in frame.columns])
        raise OutcomeError(f"{what} column '{name}' is not in the cohort.{hint} Name it in the "
                           "mapping file's [columns] or with the command's option.")
    return frame[name]


def _bad_cells(column: str, values: pd.Series, bad: np.ndarray, accepted: str) -> OutcomeError:
    rows = np.flatnonzero(bad)
    shown = ", ".join(f"row {r + 1}: '{'' if pd.isna(values.iloc[r]) else values.iloc[r]}'"
                      for r in rows[:5])
    return OutcomeError(f"column '{column}' has {len(rows):,} values phenotyper cannot read "
                        f"({shown}). {accepted}.")


def read_outcomes(frame: pd.DataFrame, spec: OutcomeSpec) -> OutcomeData:
    """The spec's columns, checked: 0/1 outcomes, known arms, probabilities in (0, 1]."""
    if not spec.outcomes:
        raise OutcomeError("no outcome column given")
    outcomes = {}
    for name in spec.outcomes:
        raw = _column(frame, name, "outcome")
        spec.better_high(name)
        if pd.api.types.is_bool_dtype(raw) or pd.api.types.is_numeric_dtype(raw):
            values = pd.to_numeric(raw, errors="coerce").astype(float).to_numpy()
            bad = np.isfinite(values) & ~np.isin(values, (0.0, 1.0))
        else:
            text = raw.astype("string").str.strip().str.lower()
            values = text.map(_OUTCOME_WORDS).astype(float).to_numpy()
            bad = (text.notna() & (text != "")).to_numpy(bool) & np.isnan(values)
        if bad.any():
            raise _bad_cells(name, raw, bad, "Accepted: 0 or 1 (also true/false, yes/no, y/n); "
                             "leave a cell empty if the outcome is unknown")
        if len(np.unique(values[np.isfinite(values)])) < 2:
            raise OutcomeError(f"outcome column '{name}' holds one value only "
                               f"({_plain_number(values)}): it cannot tell phenotypers apart; "
                               "check that the right column is named")
        outcomes[name] = values
    arm = propensity = None
    if spec.treatment is not None:
        raw = _column(frame, spec.treatment, "treatment")
        words = raw.astype("string").str.strip().str.lower().str.replace(" ", "_")
        arm_name = words.map(ARM_WORDS)
        bad = (words.notna() & (words != "") & arm_name.isna()).to_numpy(bool)
        if bad.any():
            raise _bad_cells(spec.treatment, raw, bad,
                             f"Accepted arms: {', '.join(ARMS)} (also e.g. interferon-gamma, "
                             "IFN-g, control); recode local codes with `values` in the mapping "
                             f"file's [columns] {TREATMENT} entry. An empty cell means the "
                             "patient was not randomised (and got no active drug)")
        arm = arm_name.map({a: i for i, a in enumerate(ARMS)}).fillna(-1).astype(int).to_numpy()
        given = {ARMS[a] for a in np.unique(arm[arm >= 0])}
        if PLACEBO not in given or given == {PLACEBO}:
            raise OutcomeError(f"treatment column '{spec.treatment}' has "
                               + (f"only {', '.join(sorted(given))}" if given else "no arm")
                               + ": treatment effects and policy values compare a drug with "
                               f"{PLACEBO}, so both must occur; leave out --treatment to judge "
                               "prognosis only")
        if spec.propensity is not None:
            raw = _column(frame, spec.propensity, "propensity")
            propensity = _probabilities(raw)
            bad = (arm >= 0) & ~((propensity > 0) & (propensity <= 1))
            if bad.any():
                raise _bad_cells(spec.propensity, raw, bad,
                                 "Every patient with a treatment needs the probability (above 0, "
                                 "at most 1) of the arm received; patients without a treatment "
                                 "may leave it empty")
    potential = {}
    for name in spec.outcomes:
        columns = [potential_outcome_column(name, a) for a in ARMS]
        if all(c in frame for c in columns):
            potential[name] = frame[columns].to_numpy(dtype=float)
    true_labels = None
    if TRUE_PHENOTYPE in frame:
        true_labels = frame[TRUE_PHENOTYPE].astype("string").to_numpy(dtype=object)
        if not np.isin(true_labels, PHENOTYPES).all():
            true_labels = None
    return OutcomeData(outcomes, arm, propensity, potential, true_labels)


def _plain_number(values: np.ndarray) -> str:
    finite = values[np.isfinite(values)]
    return f"{finite[0]:g}" if len(finite) else "none at all"


def _probabilities(raw: pd.Series) -> np.ndarray:
    """Numbers from a probability column; a decimal comma is read as a point (a probability
    has no thousands)."""
    if pd.api.types.is_numeric_dtype(raw):
        return pd.to_numeric(raw, errors="coerce").astype(float).to_numpy()
    text = raw.astype("string").str.strip().str.replace(r"^(\d*),(\d+)$", r"\1.\2", regex=True)
    return pd.to_numeric(text, errors="coerce").astype(float).to_numpy()


def policy_arms(labels: np.ndarray) -> np.ndarray:
    """The arm (index into ARMS) each predicted phenotype is treated with."""
    arm_of = {label: ARMS.index(ARM_OF[label]) for label in PREDICTED_LABELS}
    return np.array([arm_of[label] for label in labels], dtype=int)


# --- nuisance models (AIPW) -------------------------------------------------------------------


@dataclass(frozen=True)
class Nuisance:
    """Cross-fitted propensity and outcome predictions, (rows, arms); rows without an arm NaN.

    `support` is the propensity before clipping: what the positivity check reads;
    `n_clipped` counts the patients whose arm received was clipped.
    """

    propensity: np.ndarray
    outcome: dict[str, np.ndarray]
    support: np.ndarray
    n_clipped: int


def covariates(frame: pd.DataFrame) -> np.ndarray:
    """What the nuisance models condition on: the panel (log scale, NaN kept), sex, and the
    ImmunoSep rule's answer as indicators (clinicians treat by it; its cut-offs are steps a
    linear model cannot draw)."""
    features = [c for c in (*NUMERIC_MARKERS, "sex") if c in frame and frame[c].notna().any()]
    panel = PanelFeatures(features).fit(frame).transform(frame)
    indicators = _rule_answers(frame)[:, None] == np.array(PHENOTYPES, dtype=object)[None, :]
    return np.column_stack([panel, indicators.astype(float)])


def _rule_answers(frame: pd.DataFrame) -> np.ndarray:
    """The ImmunoSep rule's answer per row (NaN markers where a column is absent)."""
    def column(name: str) -> np.ndarray:
        return (frame[name].to_numpy(dtype=float) if name in frame
                else np.full(len(frame), np.nan))

    return immunosep_phenotype(column("ferritin_ng_ml"), column("hla_dr_mab_per_cell"))


def _model() -> Any:
    return make_pipeline(SimpleImputer(strategy="median", add_indicator=True,
                                       keep_empty_features=True),
                         StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))


def _predict_arms(model: Any, X: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    out = np.zeros((len(X), len(ARMS)))
    out[:, list(classes)] = model.predict_proba(X)
    return out


def cross_fit(frame: pd.DataFrame, data: OutcomeData, groups: np.ndarray, seed: int = 0
              ) -> Nuisance:
    """Propensity (multinomial logistic) and per-arm outcome models (logistic), each row
    predicted by models fitted on the other folds (grouped by patient)."""
    X = covariates(frame)
    arm = data.arm
    rows = np.flatnonzero(arm >= 0)
    propensity = np.full((len(frame), len(ARMS)), np.nan)
    outcome = {name: np.full((len(frame), len(ARMS)), np.nan) for name in data.outcomes}
    folds = GroupKFold(n_splits=min(CROSS_FIT_FOLDS, len(np.unique(groups[rows]))),
                       shuffle=True, random_state=seed)
    for fit_at, predict_at in folds.split(rows, groups=groups[rows]):
        fit_rows, predict_rows = rows[fit_at], rows[predict_at]
        classes = np.unique(arm[fit_rows])
        if len(classes) > 1:
            model = _model().fit(X[fit_rows], arm[fit_rows])
            propensity[predict_rows] = _predict_arms(model, X[predict_rows], model.classes_)
        else:
            propensity[predict_rows, classes[0]] = 1.0
        for name, y in data.outcomes.items():
            for a in range(len(ARMS)):
                train = fit_rows[(arm[fit_rows] == a) & np.isfinite(y[fit_rows])]
                if not len(train):
                    continue
                if len(np.unique(y[train])) < 2:
                    outcome[name][predict_rows, a] = y[train][0]
                    continue
                model = _model().fit(X[train], y[train])
                outcome[name][predict_rows, a] = model.predict_proba(X[predict_rows])[:, 1]
    support = propensity.copy()
    n_clipped = int((propensity[rows, arm[rows]] < PROPENSITY_FLOOR).sum())
    propensity[rows] = np.maximum(propensity[rows], PROPENSITY_FLOOR)
    return Nuisance(propensity, outcome, support, n_clipped)


def stratum_support(frame: pd.DataFrame, data: OutcomeData) -> np.ndarray:
    """P(arm | the rule's stratum) as observed among the treated, for the positivity check of a
    trial: its recorded probability covers only the arm each patient received, and trials
    randomise within strata such as ImmunoSep's (no model is fitted, so small trials are not
    judged by a noisy one)."""
    strata = _rule_answers(frame)
    support = np.full((len(frame), len(ARMS)), np.nan)
    treated = data.arm >= 0
    for stratum in np.unique(strata[treated]):
        rows = treated & (strata == stratum)
        shares = np.bincount(data.arm[rows], minlength=len(ARMS)) / rows.sum()
        support[rows] = shares
    return support


# --- estimands as ratios of weighted sums -----------------------------------------------------


@dataclass
class _Plan:
    """Columns of numerators and denominators, and contrasts (signed sums of their ratios)."""

    numerators: list[np.ndarray] = field(default_factory=list)
    denominators: list[np.ndarray] = field(default_factory=list)
    contrasts: list[list[tuple[float, int]]] = field(default_factory=list)
    keys: list[tuple[str, str, str, str]] = field(default_factory=list)  # name, metric, group, ci

    def ratio(self, numerator: np.ndarray, denominator: np.ndarray) -> int:
        self.numerators.append(np.asarray(numerator, dtype=float))
        self.denominators.append(np.asarray(denominator, dtype=float))
        return len(self.numerators) - 1

    def add(self, key: tuple[str, str, str, str], terms: list[tuple[float, int]]) -> None:
        self.keys.append(key)
        self.contrasts.append(terms)


class OutcomeScorer:
    """Everything the outcome section needs for one cohort and a set of phenotypers.

    `values(weights)` returns every contrast for a block of bootstrap weights (resamples x
    rows); `records(point, samples)` turns the point estimate and the resamples into the
    evaluator's records. Regressions (adjusted odds ratios, the interaction) and the nuisance
    models are fitted once, here.
    """

    def __init__(self, frame: pd.DataFrame, spec: OutcomeSpec, labels: Mapping[str, np.ndarray],
                 reference: str, groups: np.ndarray, seed: int = 0) -> None:
        self.spec = spec
        self.data = read_outcomes(frame, spec)
        self.columns = set(frame.columns)
        self.groups = groups
        self.reference = reference
        self.method = self.data.method
        self.nuisance = (cross_fit(frame, self.data, groups, seed)
                         if self.method == AIPW else None)
        self.support = (None if self.method is None else self.nuisance.support
                        if self.nuisance is not None else stratum_support(frame, self.data))
        self.unsupported: dict[tuple[str, str, str], str] = {}  # what was withheld, and why
        self.estimable: set[tuple[str, str, str, str]] = set()  # (name, outcome, drug, label)
        self.arm_patients: dict[tuple[str, str, str], list[int]] = {}  # effect -> (drug, placebo)
        self.not_fitted: list[dict[str, str]] = []  # regressions that could not be fitted
        self.sofa = (frame["sofa"].to_numpy(dtype=float) if "sofa" in frame
                     else np.full(len(frame), np.nan))
        self.age = (frame["age_years"].to_numpy(dtype=float) if "age_years" in frame
                    else np.full(len(frame), np.nan))
        self.labels = {name: np.asarray(values, dtype=object) for name, values in labels.items()}
        self.policies = self._policies()
        self.plan = _Plan()
        self._build()
        self._numerators = np.column_stack(self.plan.numerators)
        self._denominators = np.column_stack(self.plan.denominators)
        self.regression_rows = self._regressions()

    # what each phenotyper would give
    def _policies(self) -> dict[str, np.ndarray]:
        policies = {name: policy_arms(values) for name, values in self.labels.items()}
        n = len(next(iter(self.labels.values())))
        policies[NOBODY] = np.full(n, ARMS.index(PLACEBO))
        if self.data.true_labels is not None:
            policies[BY_TRUE_PHENOTYPE] = policy_arms(self.data.true_labels)
        return policies

    def _best_arm(self, outcome: str) -> np.ndarray | None:
        truth = self.data.potential.get(outcome)
        if truth is None:
            return None
        better = truth if self.spec.better_high(outcome) else -truth
        return better.argmax(axis=1)

    def _arm_mean(self, outcome: str, arm: int, rows: np.ndarray) -> int:
        """Estimated mean outcome had `rows` all received `arm` (a boolean mask)."""
        y, received = self.data.outcomes[outcome], self.data.arm
        valid = rows & (received >= 0) & np.isfinite(y)
        if self.method == IPW:
            hit = valid & (received == arm)
            inverse = np.where(hit, 1.0 / np.where(hit, self.data.propensity, 1.0), 0.0)
            return self.plan.ratio(inverse * np.nan_to_num(y), inverse)
        return self.plan.ratio(self._aipw_scores(outcome, np.full(len(y), arm)) * valid, valid)

    def _policy_mean(self, outcome: str, policy: np.ndarray) -> int:
        y, received = self.data.outcomes[outcome], self.data.arm
        valid = (received >= 0) & np.isfinite(y)
        if self.method == IPW:
            hit = valid & (received == policy)
            inverse = np.where(hit, 1.0 / np.where(hit, self.data.propensity, 1.0), 0.0)
            return self.plan.ratio(inverse * np.nan_to_num(y), inverse)
        return self.plan.ratio(self._aipw_scores(outcome, policy) * valid, valid)

    def _aipw_scores(self, outcome: str, policy: np.ndarray) -> np.ndarray:
        """psi_i = mu(x_i, pi_i) + 1{a_i = pi_i} / e(pi_i | x_i) (y_i - mu(x_i, a_i))."""
        y, received = self.data.outcomes[outcome], self.data.arm
        mu = self.nuisance.outcome[outcome]
        rows = np.arange(len(y))
        safe_arm = np.maximum(received, 0)
        predicted = mu[rows, policy]
        residual = np.nan_to_num(y - mu[rows, safe_arm])
        hit = (received == policy)
        with np.errstate(divide="ignore", invalid="ignore"):
            weight = np.where(hit, 1.0 / self.nuisance.propensity[rows, policy], 0.0)
        return np.nan_to_num(predicted + np.nan_to_num(weight) * residual)

    def _unsupported_share(self, rows: np.ndarray, arm: np.ndarray) -> float:
        """Share of `rows` whose estimated probability of getting `arm` is below
        PROPENSITY_FLOOR: an estimate that leans on them is not identified (positivity)."""
        rows = rows & (self.data.arm >= 0)
        if not rows.any():
            return 1.0
        chance = self.support[np.flatnonzero(rows), arm[rows]]
        return float(np.mean(~(chance >= PROPENSITY_FLOOR)))

    def _supported(self, key: tuple[str, str, str], rows: np.ndarray, arm: np.ndarray) -> bool:
        share = self._unsupported_share(rows, arm)
        if share > MAX_UNSUPPORTED_SHARE:
            self.unsupported[key] = (f"{share:.0%} of its patients had an estimated probability "
                                     f"below {PROPENSITY_FLOOR} of the arm needed")
            return False
        return True

    def _build(self) -> None:
        plan, data = self.plan, self.data
        interval = "bootstrap" if self.method != AIPW else "influence"
        n = len(self.groups)
        for outcome, y in data.outcomes.items():
            observed = self._untreated_rows(y)
            for name, labels in self.labels.items():
                for label in PREDICTED_LABELS:
                    mask = (labels == label) & observed
                    if mask.any():
                        plan.add((name, f"outcome_rate_{outcome}", f"predicted={label}",
                                  "bootstrap"),
                                 [(1.0, plan.ratio(np.nan_to_num(y) * mask, mask))])
            if data.arm is None:
                continue
            # predictive: each drug against placebo within each predicted phenotype
            placebo = ARMS.index(PLACEBO)
            for name, labels in self.labels.items():
                for label in PREDICTED_LABELS:
                    mask = (labels == label) & np.isfinite(y)
                    for drug in DRUGS:
                        a = ARMS.index(drug)
                        key = (name, f"treatment_effect_{drug}_{outcome}", f"predicted={label}")
                        counts = [int(((data.arm == arm) & mask).sum()) for arm in (a, placebo)]
                        if not counts[0]:
                            continue
                        self.arm_patients[key] = counts
                        if min(counts) < MIN_ARM_PATIENTS:
                            self.unsupported[key] = (f"{counts[0]} on {drug} and {counts[1]} on "
                                                     f"placebo: fewer than {MIN_ARM_PATIENTS} "
                                                     "on an arm")
                            continue
                        if not (self._supported(key, mask, np.full(n, a))
                                and self._supported(key, mask, np.full(n, placebo))):
                            continue
                        self.estimable.add((name, outcome, drug, label))
                        plan.add((*key, interval),
                                 [(1.0, self._arm_mean(outcome, a, mask)),
                                  (-1.0, self._arm_mean(outcome, placebo, mask))])
            # policy values, and paired differences against the rule and treating nobody
            policies = self._outcome_policies(outcome)
            metric = f"policy_value_{outcome}"
            valid = np.isfinite(y)
            means = {name: self._policy_mean(outcome, policy)
                     for name, policy in policies.items()
                     if self._supported((name, metric, "all"), valid, policy)}
            for name in means:
                plan.add((name, metric, "all", interval), [(1.0, means[name])])
                for other in (self.reference, NOBODY):
                    if other != name and other in means:
                        plan.add((name, f"{metric}_minus_{other}", "all", interval),
                                 [(1.0, means[name]), (-1.0, means[other])])

    def _outcome_policies(self, outcome: str) -> dict[str, np.ndarray]:
        policies = dict(self.policies)
        best = self._best_arm(outcome)
        if best is not None:
            policies[BEST_ARM] = best
        return policies

    # evaluation
    def values(self, weights: np.ndarray) -> np.ndarray:
        """Every contrast for each row of `weights` (resamples x rows): (resamples, contrasts)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            ratios = (weights @ self._numerators) / (weights @ self._denominators)
        out = np.zeros((len(weights), len(self.plan.contrasts)))
        for c, terms in enumerate(self.plan.contrasts):
            for sign, index in terms:
                out[:, c] += sign * ratios[:, index]
        return out

    def _influence_interval(self, c: int, value: float) -> tuple[float, float]:
        """Normal interval from the influence function of a contrast of ratios, summed within
        patients (a patient's rows move together)."""
        n = len(self.groups)
        influence = np.zeros(n)
        for sign, index in self.plan.contrasts[c]:
            num, den = self.plan.numerators[index], self.plan.denominators[index]
            mean_den = den.mean()
            if mean_den <= 0:
                return np.nan, np.nan
            ratio = num.sum() / den.sum()
            influence += sign * (num - ratio * den) / mean_den
        per_patient = np.bincount(self.groups, weights=influence)
        se = np.sqrt((per_patient**2).sum()) / n
        return value - _Z * se, value + _Z * se

    def records(self, point: np.ndarray, samples: np.ndarray | None,
                interval: Any) -> list[tuple[str, str, str, float, float, float]]:
        """Rows of (phenotyper, metric, subgroup, value, ci_low, ci_high); `interval` turns
        bootstrap samples into (low, high)."""
        rows = []
        for c, (name, metric, group, kind) in enumerate(self.plan.keys):
            value = float(point[0, c])
            if kind == "influence":
                low, high = self._influence_interval(c, value)
            else:
                low, high = interval(None if samples is None else samples[:, c])
            if metric.startswith("treatment_effect_") and not abs(value) <= 1:
                # a risk difference beyond 100 points: the weights rest on too few patients
                self.unsupported[(name, metric, group)] = (
                    f"the estimate ({value:+.2f}) lies outside -1 to 1: too few comparable "
                    "patients")
                continue
            rows.append((name, metric, group, value, low, high))
        rows += self.regression_rows
        rows += self._truth_rows()
        rows += self._overlap_rows()
        return rows

    def _truth_rows(self) -> list[tuple]:
        """On simulated cohorts: each policy's true value in the patients the estimate averages
        over (randomised, outcome known): the mean of their true probabilities under the arm the
        policy gives, to set the estimates against."""
        rows = []
        for outcome, truth in self.data.potential.items():
            valid = np.isfinite(self.data.outcomes[outcome])
            if self.data.arm is not None:
                valid &= self.data.arm >= 0  # the patients the estimates average over
            for name, policy in self._outcome_policies(outcome).items():
                value = float(truth[np.flatnonzero(valid), policy[valid]].mean())
                rows.append((name, f"true_policy_value_{outcome}", "all", value, np.nan,
                             np.nan))
        return rows

    def _overlap_rows(self) -> list[tuple]:
        """Effective sample size of each policy's weights: (sum w)^2 / sum w^2."""
        rows = []
        if self.data.arm is None:
            return rows
        e = (self.data.propensity if self.method == IPW else
             self.nuisance.propensity[np.arange(len(self.data.arm)), np.maximum(self.data.arm, 0)])
        for outcome, y in self.data.outcomes.items():
            valid = (self.data.arm >= 0) & np.isfinite(y)
            for name, policy in self._outcome_policies(outcome).items():
                hit = valid & (self.data.arm == policy)
                w = np.where(hit, 1.0 / np.where(hit, e, 1.0), 0.0)
                ess = float(w.sum() ** 2 / (w**2).sum()) if w.any() else 0.0
                rows.append((name, f"policy_ess_{outcome}", "all", ess, np.nan, np.nan))
        return rows

    # regressions, fitted once
    def _regressions(self) -> list[tuple]:
        rows = []
        for outcome, y in self.data.outcomes.items():
            for name, labels in self.labels.items():
                rows += _adjusted_odds_ratios(name, outcome, y, labels, self.sofa, self.age,
                                              self._untreated_rows(y))
                if self.data.arm is not None:
                    rows += self._interaction(name, outcome, y, labels)
        return rows

    def _untreated_rows(self, y: np.ndarray) -> np.ndarray:
        observed = np.isfinite(y)
        if self.data.arm is None:
            return observed
        return observed & ((self.data.arm < 0) | (self.data.arm == ARMS.index(PLACEBO)))

    def _interaction(self, name: str, outcome: str, y: np.ndarray, labels: np.ndarray
                     ) -> list[tuple]:
        """Treatment x predicted phenotype on the log-odds scale, weighted by the inverse
        propensity (robust errors): ratios of odds ratios against the reference phenotype, and
        one joint Wald test that each drug's effect is the same in every predicted phenotype.
        A drug given in one phenotype only (ImmunoSep's design) has no interaction to test."""
        rows = (self.data.arm >= 0) & np.isfinite(y) & np.isfinite(self.sofa) & np.isfinite(
            self.age)
        with np.errstate(divide="ignore"):  # untreated rows may carry a propensity of 0
            weight = (1.0 / self.data.propensity if self.method == IPW else
                      1.0 / self.nuisance.propensity[np.arange(len(y)),
                                                     np.maximum(self.data.arm, 0)])
        arm = self.data.arm[rows]
        design = _Design(labels[rows], self.sofa[rows], self.age[rows])
        for drug in DRUGS:
            design.add(f"arm={drug}", arm == ARMS.index(drug))
        interaction = [design.add(f"{drug}x{label}",
                                  (arm == ARMS.index(drug)) & (labels[rows] == label))
                       for drug in DRUGS for label in design.levels
                       if (name, outcome, drug, label) in self.estimable
                       and (name, outcome, drug, design.reference) in self.estimable]
        interaction = [index for index in interaction if index is not None]
        if not interaction:
            self.not_fitted.append({"phenotyper": name, "outcome": outcome,
                                    "what": "treatment x phenotype interaction",
                                    "why": "no drug's effect is estimable both in a phenotype "
                                           "and in the reference phenotype"})
            return []
        fit = _logistic(y[rows], design.matrix(), weight[rows], robust=True)
        if fit is None:
            self.not_fitted.append({"phenotyper": name, "outcome": outcome,
                                    "what": "treatment x phenotype interaction",
                                    "why": "the regression has no finite answer (separation "
                                           "or too few events in a cell)"})
            return []
        intervals = fit.conf_int(alpha=1 - CONFIDENCE)
        out = []
        for index in interaction:
            drug, label = design.names[index].split("x", 1)
            out.append((name, f"interaction_odds_ratio_{drug}_{outcome}", f"predicted={label}",
                        *_odds_ratio(fit.params[index], intervals[index])))
        restriction = np.zeros((len(interaction), len(fit.params)))
        restriction[np.arange(len(interaction)), interaction] = 1.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            test = fit.wald_test(restriction, scalar=True)
        out.append((name, f"interaction_p_{outcome}", "all", float(test.pvalue), np.nan, np.nan))
        return out

    @property
    def meta(self) -> dict[str, Any]:
        """What was estimated how, on whom, and what was withheld and why (read after
        `records`, which may withhold more)."""
        data = self.data
        meta: dict[str, Any] = {
            "outcomes": list(data.outcomes),
            "higher_is_better": {o: self.spec.better_high(o) for o in data.outcomes},
            "treatment": self.spec.treatment, "propensity": self.spec.propensity,
            "method": self.method,
            "n_outcome_missing": {o: int(np.isnan(y).sum()) for o, y in data.outcomes.items()},
            "simulated_truth": sorted(data.potential),
            "treatment_column_seen": self.spec.treatment is None and TREATMENT in self.columns,
            "not_supported": [{"phenotyper": k[0], "metric": k[1], "subgroup": k[2],
                               "why": v} for k, v in self.unsupported.items()],
            "not_fitted": self.not_fitted,
            "arm_patients": [{"phenotyper": k[0], "metric": k[1], "subgroup": k[2],
                              "drug": v[0], "placebo": v[1]}
                             for k, v in self.arm_patients.items()],
        }
        if data.arm is not None:
            meta["n_not_randomised"] = int((data.arm < 0).sum())
            meta["arm_counts"] = {a: int((data.arm == i).sum()) for i, a in enumerate(ARMS)}
            received = data.arm >= 0
            if self.method == IPW:
                e = data.propensity[received]
                meta["propensity_range"] = [float(e.min()), float(e.max())] if len(e) else []
            else:
                e = self.nuisance.support[np.flatnonzero(received), data.arm[received]]
                meta["propensity_range"] = [float(np.nanmin(e)), float(np.nanmax(e))]
                meta["propensity_clipped"] = self.nuisance.n_clipped
                meta["propensity_floor"] = PROPENSITY_FLOOR
                meta["cross_fit_folds"] = CROSS_FIT_FOLDS
        return meta


def _logistic(y: np.ndarray, X: np.ndarray, weight: np.ndarray | None = None,
              robust: bool = False) -> Any:
    """A statsmodels binomial GLM, or None when it cannot be fitted (separation, one outcome,
    a singular design)."""
    import statsmodels.api as sm
    from statsmodels.tools.sm_exceptions import PerfectSeparationError

    if len(y) < X.shape[1] + 2 or len(np.unique(y)) < 2 or np.linalg.matrix_rank(X) < X.shape[1]:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = sm.GLM(y, X, family=sm.families.Binomial(), var_weights=weight).fit(
                cov_type="HC0" if robust else "nonrobust")
    except (PerfectSeparationError, np.linalg.LinAlgError, ValueError):
        return None
    if not np.all(np.isfinite(fit.bse)) or np.any(np.abs(fit.params) > 20):
        return None
    return fit


class _Design:
    """A regression design built column by column: intercept, one indicator per predicted
    phenotype but the reference (`unclassified` where present, else the largest), then terms
    added by the caller, SOFA and age last. A column that adds no rank is left out."""

    def __init__(self, labels: np.ndarray, sofa: np.ndarray, age: np.ndarray) -> None:
        present = [label for label in PREDICTED_LABELS if (labels == label).any()]
        counts = {label: int((labels == label).sum()) for label in present}
        self.reference = (UNCLASSIFIED if UNCLASSIFIED in counts
                          else max(counts, key=counts.get) if counts else None)
        self.columns: list[np.ndarray] = [np.ones(len(labels))]
        self.names = ["intercept"]
        self.levels: list[str] = []
        for label in present:
            if label != self.reference and self.add(f"phenotype={label}", labels == label):
                self.levels.append(label)
        self._tail = [sofa - SOFA_REFERENCE, (age - AGE_REFERENCE_YEARS) / 10]

    def add(self, name: str, column: np.ndarray) -> int | None:
        candidate = np.column_stack([*self.columns, column.astype(float)])
        if np.linalg.matrix_rank(candidate) < candidate.shape[1]:
            return None
        self.columns.append(column.astype(float))
        self.names.append(name)
        return len(self.names) - 1

    def matrix(self) -> np.ndarray:
        return np.column_stack([*self.columns, *self._tail])


def _odds_ratio(log_odds: float, interval: np.ndarray) -> tuple[float, float, float]:
    """exp of a log odds ratio and its interval (an interval end past exp's range is inf)."""
    with np.errstate(over="ignore"):
        return float(np.exp(log_odds)), float(np.exp(interval[0])), float(np.exp(interval[1]))


def _adjusted_odds_ratios(name: str, outcome: str, y: np.ndarray, labels: np.ndarray,
                          sofa: np.ndarray, age: np.ndarray, rows: np.ndarray) -> list[tuple]:
    """Odds of the outcome in each predicted phenotype against the reference phenotype
    (`unclassified`), adjusted for SOFA and age, among patients given no active drug (their
    natural course)."""
    rows = rows & np.isfinite(sofa) & np.isfinite(age)
    design = _Design(labels[rows], sofa[rows], age[rows])
    if design.reference != UNCLASSIFIED or not design.levels:
        return []
    fit = _logistic(y[rows], design.matrix())
    if fit is None:
        return []
    intervals = fit.conf_int(alpha=1 - CONFIDENCE)
    return [(name, f"adjusted_odds_ratio_{outcome}", f"predicted={label}",
             *_odds_ratio(fit.params[1 + i], intervals[1 + i]))
            for i, label in enumerate(design.levels)]
