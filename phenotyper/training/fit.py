"""The pure part of a training: data in, results out. Read the label, split by patient (or
site), tune every candidate by grouped cross-validation inside the training set, check (and
if needed fix) calibration out of fold, and judge all candidates, the rules and the current
champion once on the held-out patients."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from sklearn.base import clone
from sklearn.model_selection import (
    GridSearchCV,
    GroupKFold,
    GroupShuffleSplit,
    cross_val_predict,
)

from phenotyper.calibration import calibration_test
from phenotyper.cohort import censored_cells, read_cohort, sample_days
from phenotyper.contract import PHENOTYPES
from phenotyper.evaluate.benchmark import benchmark
from phenotyper.evaluate.metrics import calibration_by_phenotype
from phenotyper.evaluate.outcomes import OutcomeError, read_outcomes
from phenotyper.immunosep import RULE_MARKERS
from phenotyper.labels import (
    LabelReading,
    accepted_words,
    missing_phenotypes,
    read_labels,
    rule_agreement,
    rule_derived_warning,
)
from phenotyper.models import LogitRecalibrated, build_candidate
from phenotyper.panel import PANEL, PATIENT_ID, SAMPLE_TIME, SITE_ID
from phenotyper.rules import reference_rules
from phenotyper.simulate import is_synthetic, simulate
from phenotyper.suggest import did_you_mean
from phenotyper.training.results import CandidateResult, TrainingResult
from phenotyper.training.spec import (
    CHAMPION,
    REFERENCE_RULE,
    SELECTION_METRICS,
    TWO_MARKER,
    ExperimentError,
    ExperimentSpec,
    outcome_spec,
)


class LoadedCohort(NamedTuple):
    """A cohort in panel columns, where it came from, its mapping's `[labels]` recode, and its
    censored cells (`cohort.censored_cells`)."""

    data: pd.DataFrame
    source: str
    label_recode: dict[str, str]
    censored: dict[str, np.ndarray]


def load_cohort(spec: ExperimentSpec) -> LoadedCohort:
    """The experiment's cohort in panel columns, a description of where it came from, and the
    `[labels]` recode of its mapping file (empty without one)."""
    if spec.preset is not None:
        return LoadedCohort(simulate(spec.preset, spec.n, spec.cohort_seed),
                            f"simulated: preset {spec.preset}, n={spec.n}, "
                            f"seed={spec.cohort_seed}", {}, {})
    cohort = read_cohort(spec.cohort_path, spec.mapping)
    return LoadedCohort(cohort.data, str(spec.cohort_path), dict(cohort.label_recode),
                        censored_cells(cohort))


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
        hint = did_you_mean(spec.label, [str(c) for c in cohort.columns])
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
    """Train/test row positions; no patient (or, by site, no site) is on both sides. By time,
    the patients whose first sample is latest are the test set (`test_size` of the patients)."""
    key = SITE_ID if spec.split_by == "site" else PATIENT_ID
    if key not in cohort or cohort[key].isna().all():
        raise ExperimentError(f"split by {spec.split_by} needs a '{key}' column in the cohort")
    groups = _groups(spec, cohort)
    if len(np.unique(groups)) < 2:
        raise ExperimentError(f"split by {spec.split_by} needs at least two distinct {key}s")
    if spec.split_by == "time":
        return _split_by_time(spec, cohort, groups)
    splitter = GroupShuffleSplit(n_splits=1, test_size=spec.test_size,
                                 random_state=spec.split_seed)
    train, test = next(splitter.split(cohort, groups=groups))
    return train, test


def _split_by_time(spec: ExperimentSpec, cohort: pd.DataFrame, groups: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Patients ordered by their first sample time (ties by patient id); the latest
    `test_size` of them, every sample of theirs, are the test set."""
    if SAMPLE_TIME not in cohort:
        raise ExperimentError(f"split by time needs a '{SAMPLE_TIME}' column in the cohort "
                              "(a timestamp or a day number per row)")
    days = sample_days(cohort[SAMPLE_TIME])
    if np.isnan(days).any():
        rows = np.flatnonzero(np.isnan(days))[:5] + 1
        raise ExperimentError(
            f"split by time: {int(np.isnan(days).sum()):,} rows have no readable "
            f"{SAMPLE_TIME} (first data rows {', '.join(map(str, rows))}, values "
            f"{', '.join(repr(v) for v in cohort[SAMPLE_TIME].iloc[rows - 1])}); give a "
            "timestamp or a day number, or split by patient")
    first = pd.Series(days).groupby(groups).min()  # by patient id, so ties go by id
    order = first.sort_values(kind="stable").index.to_numpy()
    n_test = int(np.ceil(spec.test_size * len(order))) if spec.test_size < 1 else \
        int(spec.test_size)
    test = np.isin(groups, order[len(order) - n_test:])
    return np.flatnonzero(~test), np.flatnonzero(test)


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
    # scikit-learn's search on the same folds, no refit (the calibration check decides what is
    # refitted); it runs in parallel under `joblib.parallel_config(n_jobs=...)`.
    search = GridSearchCV(build_candidate(kind, features),
                          {f"classifier__{key}": values for key, values in grid.items()},
                          scoring=scorer, cv=folds, refit=False, error_score="raise")
    search.fit(train, y)
    results = search.cv_results_
    sign = -1.0 if scorer.startswith("neg_") else 1.0  # log loss positive, lower is better
    table = pd.DataFrame({
        **{key: [_plain(value) for value in results[f"param_classifier__{key}"]]
           for key in grid},
        "cv_mean": sign * results["mean_test_score"], "cv_sd": results["std_test_score"]})
    best = table["cv_mean"].idxmax() if higher_better else table["cv_mean"].idxmin()
    best_params = {key: _plain(table.loc[best, key]) for key in grid}
    base = build_candidate(kind, features, best_params)
    out_of_fold = cross_val_predict(base, train, y, cv=folds, method="predict_proba")
    codes = pd.Categorical(y, categories=PHENOTYPES).codes
    # one joint test of the out-of-fold probabilities decides, not six separate tolerances
    joint = calibration_test(codes, out_of_fold)
    estimator = LogitRecalibrated(clone(base), cv=folds) if joint.miscalibrated else base
    estimator.fit(train, y)
    return CandidateResult(kind, estimator, best_params, float(table.loc[best, "cv_mean"]),
                           table, calibration_by_phenotype(codes, out_of_fold),
                           joint.miscalibrated, joint.as_dict())


def _plain(value: Any) -> Any:
    """numpy scalars from a DataFrame cell back to plain Python (for params and JSON)."""
    return value.item() if hasattr(value, "item") else value


def fit_and_evaluate(spec: ExperimentSpec, champion: Any = None) -> TrainingResult:
    """Split, tune every candidate, and judge them with the rules (and champion) on the test set."""
    cohort, source, recode, _ = load_cohort(spec)
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
