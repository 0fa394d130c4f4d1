"""Experiments as files: the spec (TOML in experiments/, validated) and the run that carries it out.

An experiment names a cohort (a file, or a simulator preset), the reference label, the features,
the split (by patient, or by site for internal-external validation), the candidates and their search
spaces, the selection metric and the registered model name. `fit_and_evaluate` is the pure part:
tune every candidate by grouped cross-validation inside the training set, check (and if needed
fix) calibration out of fold, and judge all candidates, the rules and the current champion once
on the held-out patients. `train` wraps it in an MLflow run and applies the promotion gate.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from sklearn.base import clone
from sklearn.model_selection import GroupKFold, GroupShuffleSplit, cross_val_predict

from phenotyper.cohort import read_cohort
from phenotyper.contract import HIGHER_IS_BETTER
from phenotyper.evaluate import (
    AGREEMENT_SCENARIO,
    RULE_DETERMINATE,
    Benchmark,
    benchmark,
    calibration_by_phenotype,
)
from phenotyper.immunosep import RULE_MARKERS
from phenotyper.labels import (
    LabelReading,
    accepted_words,
    missing_phenotypes,
    read_labels,
    rule_agreement,
    rule_derived_warning,
)
from phenotyper.models import CANDIDATES, LogitRecalibrated, build_candidate
from phenotyper.outcomes import OutcomeError, OutcomeSpec, read_outcomes
from phenotyper.panel import PANEL, PATIENT_ID, SITE_ID
from phenotyper.rules import PHENOTYPES, reference_rules
from phenotyper.simulate import is_synthetic, simulate

REFERENCE_RULE = "immunosep"
CHAMPION = "champion"
# CV selection metric -> (scikit-learn scorer, evaluator metric, higher is better)
SELECTION_METRICS: dict[str, tuple[str, str, bool]] = {
    "log_loss": ("neg_log_loss", "log_loss", False),
    "balanced_accuracy": ("balanced_accuracy", "balanced_accuracy", True),
    "accuracy": ("accuracy", "accuracy", True),
    "macro_f1": ("f1_macro", "macro_f1", True),
}
RULE_METRICS = ("balanced_accuracy", "accuracy", "macro_f1", "treatment_agreement")
DEFAULT_GRIDS: dict[str, dict[str, list]] = {
    "logistic": {"C": [0.1, 1.0]},
    "xgboost": {"max_depth": [3], "n_estimators": [300], "learning_rate": [0.05]},
}
# Out-of-fold calibration within this of intercept 0 / slope 1 for every phenotype is kept as is;
# beyond it the candidate's logits are recalibrated (models.LogitRecalibrated) on the same folds.
CALIBRATION_TOLERANCE = 0.15

_TOP_KEYS = {"name", "description", "registered_model", "label", "cohort", "features", "split",
             "candidates", "selection", "benchmark", "outcome"}
_SECTION_KEYS = {
    "cohort": {"path", "mapping", "preset", "n", "seed"},
    "features": {"markers", "exclude", "extra"},
    "split": {"by", "test_size", "seed", "cv_folds"},
    "selection": {"metric", "rule_metric", "champion_tolerance", "gate", "determinate",
                  "agreement_margin", "two_marker"},
    "benchmark": {"bootstrap", "noise_repeats", "seed"},
    "outcome": {"treatment", "outcome", "propensity", "higher_is_better"},
}
# Gate modes: beat the rule (superiority), or reproduce it without HLA-DR (agreement: Cohen's
# kappa with the rule, non-inferior to the rule's own kappa under between-lab re-measurement).
SUPERIORITY, AGREEMENT = "superiority", "agreement"
GATES = (SUPERIORITY, AGREEMENT)
# The learned two-marker reference: the selected learner refitted on the rule's own markers.
TWO_MARKER = "two_marker"


class ExperimentError(ValueError):
    """An experiment file or option that cannot be run; the message names the key."""


@dataclass(frozen=True)
class ExperimentSpec:
    """A validated experiment."""

    name: str
    registered_model: str
    label: str
    cohort_path: str | None = None
    mapping: str | None = None
    preset: str | None = None
    n: int = 20_000
    cohort_seed: int = 0
    markers: tuple[str, ...] | None = None  # None: every panel marker the cohort has
    exclude: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    split_by: str = "patient"
    test_size: float = 0.25
    split_seed: int = 0
    cv_folds: int = 3
    candidates: dict[str, dict[str, list]] = field(default_factory=lambda: dict(DEFAULT_GRIDS))
    selection_metric: str = "log_loss"
    rule_metric: str = "balanced_accuracy"
    champion_tolerance: float = 0.01
    gate: str = SUPERIORITY
    determinate: bool = True  # superiority must also hold on the patients the rule can type
    agreement_margin: float = 0.05
    # "report": the difference from the two-marker reference is shown; "require": the model
    # must also beat it (paired CI above 0), i.e. the markers beyond the rule's must add.
    two_marker: str = "report"
    outcomes: tuple[str, ...] = ()
    treatment: str | None = None
    propensity: str | None = None
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    bootstrap: int = 1000
    noise_repeats: int = 20
    benchmark_seed: int = 0
    description: str = ""
    source: str = ""


def _unknown(where: str, keys: set[str], allowed: set[str]) -> None:
    for key in sorted(keys - allowed):
        near = difflib.get_close_matches(key, sorted(allowed), n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        raise ExperimentError(f"{where}: unknown key '{key}'.{hint} "
                              f"Allowed: {', '.join(sorted(allowed))}.")


def _typed(where: str, key: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ExperimentError(f"{where}: '{key}' must be {names}, not {value!r}.")
    return value


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read and validate an experiment TOML file; errors name the file and the key."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ExperimentError(f"Experiment file {path} does not exist.") from None
    except tomllib.TOMLDecodeError as error:
        raise ExperimentError(f"Experiment file {path} is not valid TOML: {error}.") from None
    where = f"Experiment file {path}"
    _unknown(where, set(document), _TOP_KEYS)
    for required in ("name", "registered_model", "label"):
        if required not in document:
            raise ExperimentError(f"{where}: missing '{required}'.")
    sections = {}
    for section, allowed in _SECTION_KEYS.items():
        table = _typed(where, section, document.get(section, {}), dict)
        _unknown(f"{where} [{section}]", set(table), allowed)
        sections[section] = table
    cohort, features, split = sections["cohort"], sections["features"], sections["split"]
    selection, bench = sections["selection"], sections["benchmark"]
    grids = _typed(where, "candidates", document.get("candidates", DEFAULT_GRIDS), dict)
    markers = features.get("markers", "all")
    spec = ExperimentSpec(
        name=_typed(where, "name", document["name"], str),
        registered_model=_typed(where, "registered_model", document["registered_model"], str),
        label=_typed(where, "label", document["label"], str),
        description=_typed(where, "description", document.get("description", ""), str),
        cohort_path=cohort.get("path"),
        mapping=cohort.get("mapping"),
        preset=cohort.get("preset"),
        n=_typed(where, "cohort.n", cohort.get("n", 20_000), int),
        cohort_seed=_typed(where, "cohort.seed", cohort.get("seed", 0), int),
        markers=None if markers == "all" else tuple(_typed(where, "features.markers", markers,
                                                           list)),
        exclude=tuple(_typed(where, "features.exclude", features.get("exclude", []), list)),
        extra=tuple(_typed(where, "features.extra", features.get("extra", []), list)),
        split_by=_typed(where, "split.by", split.get("by", "patient"), str),
        test_size=_typed(where, "split.test_size", split.get("test_size", 0.25), float),
        split_seed=_typed(where, "split.seed", split.get("seed", 0), int),
        cv_folds=_typed(where, "split.cv_folds", split.get("cv_folds", 3), int),
        candidates={kind: _typed(where, f"candidates.{kind}", grid, dict)
                    for kind, grid in grids.items()},
        selection_metric=_typed(where, "selection.metric", selection.get("metric", "log_loss"),
                                str),
        rule_metric=_typed(where, "selection.rule_metric",
                           selection.get("rule_metric", "balanced_accuracy"), str),
        champion_tolerance=_typed(where, "selection.champion_tolerance",
                                  selection.get("champion_tolerance", 0.01), (float, int)),
        gate=_typed(where, "selection.gate", selection.get("gate", SUPERIORITY), str),
        determinate=_typed(where, "selection.determinate", selection.get("determinate", True),
                           bool),
        agreement_margin=_typed(where, "selection.agreement_margin",
                                selection.get("agreement_margin", 0.05), (float, int)),
        two_marker=_typed(where, "selection.two_marker", selection.get("two_marker", "report"),
                          str),
        **_outcome_fields(where, sections["outcome"]),
        bootstrap=_typed(where, "benchmark.bootstrap", bench.get("bootstrap", 1000), int),
        noise_repeats=_typed(where, "benchmark.noise_repeats", bench.get("noise_repeats", 20),
                             int),
        benchmark_seed=_typed(where, "benchmark.seed", bench.get("seed", 0), int),
        source=str(path),
    )
    check_spec(spec, where)
    return spec


def _outcome_fields(where: str, table: dict[str, Any]) -> dict[str, Any]:
    """The `[outcome]` table: outcome (a column or a list), treatment, propensity and
    higher_is_better (true/false for every outcome, or a table by outcome)."""
    if not table:
        return {}
    outcome = table.get("outcome")
    if outcome is None:
        raise ExperimentError(f"{where} [outcome]: name the outcome column(s), e.g. outcome = "
                              '["sofa_response", "death_28d"].')
    outcomes = tuple(_typed(where, "outcome.outcome", [outcome] if isinstance(outcome, str)
                            else outcome, list))
    direction = table.get("higher_is_better", {})
    if isinstance(direction, bool):  # for the outcomes whose direction phenotyper cannot know
        direction = {name: direction for name in outcomes if name not in HIGHER_IS_BETTER}
    direction = _typed(where, "outcome.higher_is_better", direction, dict)
    treatment = table.get("treatment")
    propensity = table.get("propensity")
    if propensity is not None and treatment is None:
        raise ExperimentError(f"{where} [outcome]: 'propensity' needs 'treatment' (the arm whose "
                              "probability it is).")
    try:
        OutcomeSpec(outcomes, treatment, propensity, direction)
    except OutcomeError as error:
        raise ExperimentError(f"{where} [outcome]: {error}") from None
    return {
        "outcomes": outcomes,
        "treatment": None if treatment is None else _typed(where, "outcome.treatment",
                                                           treatment, str),
        "propensity": None if propensity is None else _typed(where, "outcome.propensity",
                                                             propensity, str),
        "higher_is_better": {str(k): _typed(where, f"outcome.higher_is_better.{k}", v, bool)
                             for k, v in direction.items()},
    }


def outcome_spec(spec: ExperimentSpec) -> OutcomeSpec | None:
    """What the benchmark judges outcomes by, or None without an [outcome] table."""
    if not spec.outcomes:
        return None
    return OutcomeSpec(spec.outcomes, spec.treatment, spec.propensity, spec.higher_is_better)


def default_spec(cohort_path: str | Path, label: str, name: str,
                 mapping: str | Path | None = None) -> ExperimentSpec:
    """The defaults run by `phenotyper train --cohort --label --name` (no TOML needed)."""
    spec = ExperimentSpec(name=f"{name}-defaults", registered_model=name, label=label,
                          cohort_path=str(cohort_path),
                          mapping=None if mapping is None else str(mapping),
                          source=f"defaults for {cohort_path}")
    check_spec(spec, "train")
    return spec


def check_spec(spec: ExperimentSpec, where: str) -> None:
    """Cross-field checks that need no data."""
    if (spec.cohort_path is None) == (spec.preset is None):
        raise ExperimentError(f"{where} [cohort]: give either 'path' or 'preset', not "
                              f"{'both' if spec.cohort_path else 'neither'}.")

    def choose(key: str, value: str, options: tuple[str, ...] | list[str]) -> None:
        if value not in options:
            near = difflib.get_close_matches(value, list(options), n=1)
            hint = f" Did you mean '{near[0]}'?" if near else ""
            raise ExperimentError(f"{where}: {key} '{value}' is not known.{hint} "
                                  f"Choose from {', '.join(options)}.")

    choose("split.by", spec.split_by, ("patient", "site"))
    choose("selection.metric", spec.selection_metric, tuple(SELECTION_METRICS))
    choose("selection.rule_metric", spec.rule_metric, RULE_METRICS)
    choose("selection.gate", spec.gate, GATES)
    choose("selection.two_marker", spec.two_marker, ("report", "require"))
    if not 0 <= spec.agreement_margin < 1:
        raise ExperimentError(f"{where}: selection.agreement_margin must be at least 0 and "
                              "below 1 (a difference in Cohen's kappa).")
    if spec.gate == AGREEMENT and spec.noise_repeats < 1:
        raise ExperimentError(f"{where}: the agreement gate compares with the rule's own kappa "
                              "under re-measurement: set benchmark.noise_repeats to at least 1.")
    for kind in spec.candidates:
        choose("candidate", kind, CANDIDATES)
    for marker in (*(spec.markers or ()), *spec.exclude):
        choose("feature marker", marker, tuple(PANEL))
    if not spec.candidates:
        raise ExperimentError(f"{where}: [candidates] lists no candidate.")
    if not 0 < spec.test_size < 1:
        raise ExperimentError(f"{where}: split.test_size must be between 0 and 1.")
    if spec.cv_folds < 2:
        raise ExperimentError(f"{where}: split.cv_folds must be at least 2.")
    for kind, grid in spec.candidates.items():
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ExperimentError(f"{where}: candidates.{kind}.{key} must be a non-empty "
                                      f"list of values to try, e.g. [{values!r}].")


# --- the run ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CandidateResult:
    """One tuned candidate: its search, its out-of-fold calibration, the refitted model."""

    kind: str
    estimator: Any
    best_params: dict[str, Any]
    cv_score: float  # the selection metric (in its own sense: log loss is lower-better)
    cv_table: pd.DataFrame  # one row per configuration tried
    calibration: dict[str, tuple[float, float]]  # phenotype -> out-of-fold (intercept, slope)
    recalibrated: bool


@dataclass(frozen=True)
class TrainingResult:
    """Everything a run produced; nothing here has touched MLflow."""

    spec: ExperimentSpec
    train: pd.DataFrame
    test: pd.DataFrame
    features: tuple[str, ...]
    candidates: dict[str, CandidateResult]
    selected: str
    benchmark: Benchmark
    cohort_source: str
    # How the label column was read (`labels.LabelReading.as_dict()`) and what was left out,
    # plus: `train_counts`/`test_counts` per phenotype, `rule_agreement` (share) and
    # `rule_agreement_n` with the ImmunoSep rule where it is determinate, and `warning` (None,
    # or why accuracy against this label cannot judge a model).
    labels: dict[str, Any] = field(default_factory=dict)
    # The learned two-marker reference (`TWO_MARKER`), judged beside the rule and the models.
    two_marker: CandidateResult | None = None


class LoadedCohort(NamedTuple):
    """A cohort in panel columns, where it came from, and its mapping's `[labels]` recode."""

    data: pd.DataFrame
    source: str
    label_recode: dict[str, str]


def load_cohort(spec: ExperimentSpec) -> LoadedCohort:
    """The experiment's cohort in panel columns, a description of where it came from, and the
    `[labels]` recode of its mapping file (empty without one)."""
    if spec.preset is not None:
        return LoadedCohort(simulate(spec.preset, spec.n, spec.cohort_seed),
                            f"simulated: preset {spec.preset}, n={spec.n}, "
                            f"seed={spec.cohort_seed}", {})
    cohort = read_cohort(spec.cohort_path, spec.mapping)
    return LoadedCohort(cohort.data, str(spec.cohort_path), dict(cohort.label_recode))


def _missing_message(missing: tuple[str, ...], where: str, also: str = "") -> str:
    """Why a cohort (or part of it) that lacks a phenotype cannot be learned from, and what to
    do about it."""
    names = " or ".join(f"'{phenotype}'" for phenotype in missing)
    return (f"{where} has no {names} patient; phenotyper learns all three phenotypes "
            f"({', '.join(PHENOTYPES)}): add such patients{also}, or recode the label's values "
            f"with [labels] in a mapping file (labels read: {accepted_words()}).")


def read_label_column(spec: ExperimentSpec, cohort: pd.DataFrame,
                      recode: dict[str, str] | None = None) -> tuple[LabelReading, dict]:
    """Read the experiment's label column (through the mapping's recode) and check it can be
    learned from; returns the reading and the plain record `TrainingResult.labels` starts from.

    Stops with an ExperimentError when no row has a label or a phenotype has no patient.
    """
    if spec.label not in cohort:
        near = difflib.get_close_matches(spec.label, [str(c) for c in cohort.columns], n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        raise ExperimentError(f"label column '{spec.label}' is not in the cohort.{hint}")
    reading = read_labels(cohort[spec.label], spec.label, recode)
    if not reading.n_labelled:
        raise ExperimentError(f"no row of label column '{spec.label}' holds a phenotype. "
                              f"{reading.summary()}")
    missing = missing_phenotypes(reading)
    if missing:
        raise ExperimentError(_missing_message(missing, f"label column '{spec.label}'"))
    rule = reference_rules()[REFERENCE_RULE].fit(cohort).predict(cohort)
    share, compared = rule_agreement(reading, rule)
    record = {**reading.as_dict(), "rule_agreement": share, "rule_agreement_n": compared,
              "warning": rule_derived_warning(reading, rule)}
    return reading, record


def resolve_features(spec: ExperimentSpec, cohort: pd.DataFrame) -> tuple[str, ...]:
    """Named markers (or every panel marker the cohort measured), minus exclusions, plus extras."""
    chosen = spec.markers or tuple(
        c for c in PANEL if c in cohort and cohort[c].notna().any())
    features = tuple(c for c in chosen if c not in spec.exclude)
    for extra in spec.extra:
        if extra not in cohort:
            raise ExperimentError(f"extra feature '{extra}' is not a column of the cohort")
        if not pd.api.types.is_numeric_dtype(cohort[extra]):
            raise ExperimentError(f"extra feature '{extra}' is not numeric")
    if not features:
        raise ExperimentError("no feature left: the cohort measured none of the chosen markers")
    return (*features, *spec.extra)


def split_cohort(spec: ExperimentSpec, cohort: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Train/test row positions; no patient (or, by site, no site) is on both sides."""
    key = SITE_ID if spec.split_by == "site" else PATIENT_ID
    if key not in cohort or cohort[key].isna().all():
        raise ExperimentError(f"split by {spec.split_by} needs a '{key}' column in the cohort")
    groups = cohort[key].astype("string").fillna("<missing>").to_numpy()
    if len(np.unique(groups)) < 2:
        raise ExperimentError(f"split by {spec.split_by} needs at least two distinct {key}s")
    splitter = GroupShuffleSplit(n_splits=1, test_size=spec.test_size,
                                 random_state=spec.split_seed)
    train, test = next(splitter.split(cohort, groups=groups))
    return train, test


def _groups(spec: ExperimentSpec, frame: pd.DataFrame) -> np.ndarray:
    key = SITE_ID if spec.split_by == "site" else PATIENT_ID
    return frame[key].astype("string").fillna("<missing>").to_numpy()


def tune(spec: ExperimentSpec, kind: str, train: pd.DataFrame, y: np.ndarray,
         features: tuple[str, ...]) -> CandidateResult:
    """Grouped-CV grid search inside the training set, then an out-of-fold calibration check."""
    scorer, _, higher_better = SELECTION_METRICS[spec.selection_metric]
    groups = _groups(spec, train)
    folds = list(GroupKFold(n_splits=spec.cv_folds).split(train, y, groups))
    for number, (fit_rows, _) in enumerate(folds, start=1):
        missing = tuple(p for p in PHENOTYPES if not (y[fit_rows] == p).any())
        if missing:
            have = ", ".join(f"{p} {int((y == p).sum())}" for p in missing)
            raise ExperimentError(_missing_message(
                missing, f"the training part of cross-validation fold {number} of "
                f"{spec.cv_folds} (the training split has {have})",
                also=", lower split.cv_folds"))
    grid = spec.candidates[kind]
    rows = []
    for values in itertools.product(*grid.values()):
        params = dict(zip(grid, values, strict=True))
        scores = []
        for fit_rows, score_rows in folds:
            model = build_candidate(kind, features, params)
            model.fit(train.iloc[fit_rows], y[fit_rows])
            scores.append(_score(model, train.iloc[score_rows], y[score_rows], scorer))
        rows.append({**params, "cv_mean": float(np.mean(scores)), "cv_sd": float(np.std(scores))})
    table = pd.DataFrame(rows)
    best = table["cv_mean"].idxmax() if higher_better else table["cv_mean"].idxmin()
    best_params = {key: _plain(table.loc[best, key]) for key in grid}
    base = build_candidate(kind, features, best_params)
    out_of_fold = cross_val_predict(base, train, y, cv=folds, method="predict_proba")
    codes = pd.Categorical(y, categories=PHENOTYPES).codes
    calibration = calibration_by_phenotype(codes, out_of_fold)
    off = any(abs(intercept) > CALIBRATION_TOLERANCE or abs(slope - 1) > CALIBRATION_TOLERANCE
              for intercept, slope in calibration.values())
    estimator = LogitRecalibrated(clone(base), cv=folds) if off else base
    estimator.fit(train, y)
    return CandidateResult(kind, estimator, best_params, float(table.loc[best, "cv_mean"]),
                           table, calibration, off)


def _score(model: Any, X: pd.DataFrame, y: np.ndarray, scorer: str) -> float:
    """The selection metric in its natural sign (log loss positive, lower is better)."""
    from sklearn.metrics import get_scorer

    value = get_scorer(scorer)(model, X, y)
    return -value if scorer.startswith("neg_") else value


def _plain(value: Any) -> Any:
    """numpy scalars from a DataFrame cell back to plain Python (for params and JSON)."""
    return value.item() if hasattr(value, "item") else value


def fit_and_evaluate(spec: ExperimentSpec, champion: Any = None) -> TrainingResult:
    """Split, tune every candidate, and judge them with the rules (and champion) on the test set."""
    cohort, source, recode = load_cohort(spec)
    if outcome_spec(spec) is not None:  # a wrong column stops before any training
        try:
            read_outcomes(cohort, outcome_spec(spec))
        except OutcomeError as error:
            raise ExperimentError(f"[outcome] of {spec.source}: {error}") from None
    reading, labels = read_label_column(spec, cohort, recode)
    # rows with a label, the label in canonical words (`Mals`, ` intermediate `, recoded codes)
    labelled = cohort.loc[reading.labelled].reset_index(drop=True)
    labelled[spec.label] = pd.Series(reading.phenotypes[reading.labelled], dtype=object)
    features = resolve_features(spec, labelled)
    train_rows, test_rows = split_cohort(spec, labelled)
    train = labelled.iloc[train_rows].reset_index(drop=True)
    test = labelled.iloc[test_rows].reset_index(drop=True)
    y = train[spec.label].to_numpy(dtype=object)
    missing = tuple(p for p in PHENOTYPES if not (y == p).any())
    if missing:
        have = ", ".join(f"{p} {labels['counts'][p]}" for p in missing)
        raise ExperimentError(_missing_message(
            missing, f"the training split of label column '{spec.label}' (split by "
            f"{spec.split_by}, seed {spec.split_seed}; the cohort has {have})",
            also=", or change split.seed or split.test_size"))
    labels["train_counts"] = {p: int((y == p).sum()) for p in PHENOTYPES}
    labels["test_counts"] = {p: int((test[spec.label] == p).sum()) for p in PHENOTYPES}
    candidates = {kind: tune(spec, kind, train, y, features) for kind in spec.candidates}
    _, _, higher_better = SELECTION_METRICS[spec.selection_metric]
    ranked = sorted(candidates.values(), key=lambda c: c.cv_score, reverse=higher_better)
    two_marker = _two_marker_reference(spec, ranked[0], train, y, features)
    phenotypers = {name: rule.fit(test) for name, rule in reference_rules().items()}
    phenotypers.update({kind: result.estimator for kind, result in candidates.items()})
    if two_marker is not None:
        phenotypers[TWO_MARKER] = two_marker.estimator
    if champion is not None and _can_judge(champion, test):
        phenotypers[CHAMPION] = champion
    judged = benchmark(phenotypers, test, spec.label, reference=REFERENCE_RULE,
                       n_boot=spec.bootstrap, seed=spec.benchmark_seed,
                       noise_repeats=spec.noise_repeats,
                       synthetic=spec.preset is not None or is_synthetic(cohort),
                       outcomes=outcome_spec(spec),
                       comparators=(TWO_MARKER,) if two_marker is not None else ())
    return TrainingResult(spec, train, test, features, candidates, ranked[0].kind, judged,
                          source, labels, two_marker)


def _two_marker_reference(spec: ExperimentSpec, selected: CandidateResult, train: pd.DataFrame,
                          y: np.ndarray, features: tuple[str, ...]) -> CandidateResult | None:
    """The selected learner, with its tuned settings, refitted on the rule's own markers that
    the experiment allows (ferritin and HLA-DR; ferritin alone where HLA-DR is excluded): what
    better cut-offs and abstaining less on the rule's markers alone would reach. None when the
    experiment allows neither, or nothing else."""
    markers = tuple(m for m in RULE_MARKERS if m in features)
    if not markers or set(markers) == set(features):
        return None
    settings = {key: [value] for key, value in selected.best_params.items()}
    refit = dataclasses.replace(spec, candidates={selected.kind: settings})
    return tune(refit, selected.kind, train, y, markers)


def _can_judge(model: Any, frame: pd.DataFrame) -> bool:
    """Whether a (champion) model can score these patients (it may need absent features)."""
    try:
        model.predict_proba(frame.head(5))
    except (KeyError, ValueError):
        return False
    return True


# --- the promotion gate -------------------------------------------------------------------


@dataclass(frozen=True)
class GateDecision:
    """Whether the new version becomes champion, why, and the numbers behind it."""

    promote: bool
    reason: str
    numbers: dict[str, float | str]


def promotion_decision(result: TrainingResult, champion_version: str | None) -> GateDecision:
    """Whether the selected model may become champion, on the held-out patients.

    `superiority` (default): the paired 95% CI of the rule metric's difference from the
    ImmunoSep rule is above zero, overall and (`selection.determinate`) on the patients the rule
    can type, so abstentions alone cannot pass; the difference from the learned two-marker
    reference is reported beside it. `agreement`: the model's Cohen's kappa with the rule (on
    patients with HLA-DR measured) is non-inferior, by `agreement_margin`, to the rule's kappa
    with itself when the same patients are measured in another laboratory. Either way the model
    may be at most `champion_tolerance` worse than the current champion on the selection metric.
    """
    spec, records = result.spec, result.benchmark.records
    table = records.set_index(["phenotyper", "metric", "subgroup"])
    selected = result.selected
    _, metric, higher_better = SELECTION_METRICS[spec.selection_metric]
    challenger = float(table.loc[(selected, metric, "all"), "value"])
    numbers: dict[str, float | str] = {"gate": spec.gate, "selection_metric": spec.selection_metric,
                                       "challenger_value": challenger,
                                       "tolerance": spec.champion_tolerance}

    def difference(name: str, other: str, subgroup: str = "all",
                   metric_name: str = spec.rule_metric) -> Any:
        key = (name, f"{metric_name}_minus_{other}", subgroup)
        return table.loc[key] if key in table.index else None

    if spec.gate == AGREEMENT:
        stem = f"kappa_with_rule_minus_rule_self_kappa_{AGREEMENT_SCENARIO}"
        key = (selected, stem, "all")
        if key not in table.index:
            return GateDecision(False, "the agreement gate needs patients with HLA-DR measured "
                                "and re-measurements (benchmark.noise_repeats)", numbers)
        row = table.loc[key]
        kappa = float(table.loc[(selected, "kappa_with_rule", "all"), "value"])
        numbers.update({"kappa_with_rule": kappa, "kappa_difference": float(row.value),
                        "kappa_difference_ci_low": float(row.ci_low),
                        "kappa_difference_ci_high": float(row.ci_high),
                        "agreement_margin": spec.agreement_margin})
        if not row.ci_low > -spec.agreement_margin:
            return GateDecision(False, f"{selected} agrees with the ImmunoSep rule less than the "
                                f"rule agrees with itself between laboratories, beyond the margin "
                                f"{spec.agreement_margin} (kappa difference {row.value:+.3f}, 95% "
                                f"CI {row.ci_low:+.3f} to {row.ci_high:+.3f})", numbers)
        passed = (f"agrees with the ImmunoSep rule (kappa {kappa:.3f}) within "
                  f"{spec.agreement_margin} of the rule's own between-lab kappa "
                  f"(difference {row.value:+.3f}, CI low {row.ci_low:+.3f})")
    else:
        overall = difference(selected, REFERENCE_RULE)
        numbers["rule_metric"] = spec.rule_metric
        determinate = difference(selected, REFERENCE_RULE, RULE_DETERMINATE)
        two = difference(selected, TWO_MARKER)
        for prefix, row in (("rule", overall), ("determinate", determinate),
                            ("two_marker", two)):
            if row is not None:
                numbers.update({f"{prefix}_difference": float(row.value),
                                f"{prefix}_difference_ci_low": float(row.ci_low),
                                f"{prefix}_difference_ci_high": float(row.ci_high)})
        if result.labels.get("warning"):
            return GateDecision(False, "the label is the ImmunoSep rule's own answer, so no "
                                "model can beat the rule against it; judge a model that "
                                "reproduces the rule with selection.gate = 'agreement'",
                                numbers)
        if not overall.ci_low > 0:
            return GateDecision(False, f"{selected} does not beat the ImmunoSep rule on "
                                f"{spec.rule_metric} (paired 95% CI {overall.ci_low:+.4f} to "
                                f"{overall.ci_high:+.4f} includes or is below 0)", numbers)
        if spec.determinate and determinate is not None and not determinate.ci_low > 0:
            return GateDecision(False, f"{selected} beats the ImmunoSep rule overall but not on "
                                f"the patients the rule can type ({spec.rule_metric} "
                                f"{determinate.value:+.4f}, paired 95% CI "
                                f"{determinate.ci_low:+.4f} to {determinate.ci_high:+.4f}): its "
                                "lead is the rule's abstentions", numbers)
        if spec.two_marker == "require" and two is not None and not two.ci_low > 0:
            return GateDecision(False, f"{selected} does not beat the two-marker reference on "
                                f"{spec.rule_metric} ({two.value:+.4f}, paired 95% CI "
                                f"{two.ci_low:+.4f} to {two.ci_high:+.4f}): the markers beyond "
                                "ferritin and HLA-DR add nothing measurable", numbers)
        passed = (f"beats the ImmunoSep rule on {spec.rule_metric} ({overall.value:+.4f}"
                  + (f"; {determinate.value:+.4f} where the rule can type"
                     if determinate is not None else "")
                  + (f"; {two.value:+.4f} against the two-marker reference" if two is not None
                     else "") + ")")
    if champion_version is None:
        return GateDecision(True, f"{passed}; no champion yet", numbers)
    numbers["champion_version"] = champion_version
    if (CHAMPION, metric, "all") not in table.index:
        return GateDecision(False, f"the current champion (version {champion_version}) could "
                            "not be judged on this test set; promote by hand if intended",
                            numbers)
    current = float(table.loc[(CHAMPION, metric, "all"), "value"])
    numbers["champion_value"] = current
    margin = (current - challenger) if higher_better else (challenger - current)
    if margin > spec.champion_tolerance:
        return GateDecision(False, f"worse than champion version {champion_version} on "
                            f"{metric} ({challenger:.4f} vs {current:.4f}, tolerance "
                            f"{spec.champion_tolerance})", numbers)
    return GateDecision(True, f"{passed}, and is within {spec.champion_tolerance} of champion "
                        f"version {champion_version} on {metric} ({challenger:.4f} vs "
                        f"{current:.4f})", numbers)


@dataclass(frozen=True)
class TrainingOutcome:
    """What `train` did: the run, the registered version and the gate's decision."""

    run_id: str
    experiment_id: str
    model_name: str
    version: str
    decision: GateDecision
    result: TrainingResult
    tracking_uri: str
    card: str


def train(spec: ExperimentSpec) -> TrainingOutcome:
    """Run one experiment under MLflow: train, judge, register, and apply the promotion gate.

    The current champion (if any) is judged on the same held-out patients. Aliases move only
    after everything else succeeded, so a failed run leaves them where they were.
    """
    from phenotyper import registry, report, tracking

    uri = registry.configure()
    current = registry.champion_version(spec.registered_model)
    champion = None
    if current is not None:
        champion = tracking.load_model(
            f"models:/{spec.registered_model}@{registry.CHAMPION_ALIAS}")
    with tracking.experiment_run(spec.name, run_name=spec.name) as run:
        result = fit_and_evaluate(spec, champion)
        version = tracking.log_result(result)
        decision = promotion_decision(result, current)
        card = report.model_card(result, version, decision)
        tracking.record_decision(spec.registered_model, version, decision, card)
    return TrainingOutcome(run.info.run_id, run.info.experiment_id, spec.registered_model,
                           version, decision, result, uri, card)
