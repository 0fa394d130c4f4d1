"""Training without gold-standard labels: latent classes from the markers, named by their
profiles, distilled into the usual candidates.

The mixture (`latent`) is fitted on the training patients; its posterior becomes soft labels:
every training patient appears once per phenotype, weighted by the posterior's probability of
it, so logistic regression and XGBoost (which take sample weights, not soft targets) learn
P(class | markers) and the registered model keeps exact SHAP and the packaged format. The
candidates are judged with the mixture itself and the rules on the held-out patients, against a
reference column never used in fitting (a simulated cohort's truth) and/or outcomes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy.stats.contingency import association
from sklearn.model_selection import GroupKFold, ParameterGrid

from phenotyper.contract import (
    FERRITIN_MALS_NG_ML,
    HLA_DR_IMMUNOPARALYSIS_MAB_PER_CELL,
    INDETERMINATE,
    PHENOTYPES,
    TRUE_PHENOTYPE,
)
from phenotyper.evaluate.benchmark import benchmark
from phenotyper.evaluate.outcomes import OutcomeError, read_outcomes
from phenotyper.labels import read_labels
from phenotyper.latent import (
    LatentError,
    bic_sweep,
    fit_mixture,
    intervals,
    log_posterior,
    named,
    stability,
)
from phenotyper.models import LatentClassifier, build_candidate
from phenotyper.panel import NUMERIC_MARKERS, SITE_ID
from phenotyper.rules import reference_rules
from phenotyper.simulate import is_synthetic
from phenotyper.training.fit import (
    _can_judge,
    _groups,
    load_cohort,
    resolve_features,
    split_cohort,
)
from phenotyper.training.results import CandidateResult, LatentResult, TrainingResult
from phenotyper.training.spec import (
    CHAMPION,
    LATENT_CLASS,
    NOISY_RULE,
    PARTIAL,
    REFERENCE_RULE,
    ExperimentError,
    ExperimentSpec,
    outcome_spec,
)

LATENT = "latent_classes"  # the mixture itself, judged beside its distilled candidates
SITE_WARNING_V = 0.3  # Cramer's V of class by site above this: classes may be sites
MIN_SOFT_WEIGHT = 1e-4  # replicated rows lighter than this are dropped (no information)


def _soft_rows(frame: pd.DataFrame, proba: np.ndarray) -> tuple[pd.DataFrame, np.ndarray,
                                                                  np.ndarray, np.ndarray]:
    """Each patient once per phenotype with the posterior's probability as its weight
    (lighter than MIN_SOFT_WEIGHT left out): rows, labels, weights, source row."""
    source = np.repeat(np.arange(len(frame)), len(PHENOTYPES))
    labels = np.tile(np.array(PHENOTYPES, dtype=object), len(frame))
    weights = proba.ravel()
    keep = weights >= MIN_SOFT_WEIGHT
    return (frame.iloc[source[keep]].reset_index(drop=True), labels[keep], weights[keep],
            source[keep])


def _cross_entropy(target: np.ndarray, predicted: np.ndarray) -> float:
    """Mean over patients of -sum_k target_k log predicted_k: the soft-label log loss."""
    return float(-np.mean(np.sum(target * np.log(np.clip(predicted, 1e-15, 1)), axis=1)))


def distil(spec: ExperimentSpec, kind: str, train: pd.DataFrame, proba: np.ndarray,
           features: tuple[str, ...]) -> CandidateResult:
    """Tune one candidate on the posterior's soft labels by grouped CV (soft-label log loss)
    and refit it on every training patient."""
    groups = _groups(spec, train)
    folds = list(GroupKFold(n_splits=spec.cv_folds).split(train, groups=groups))
    grid = spec.candidates[kind]
    keys = list(grid)
    rows = []
    for params in ParameterGrid(grid):
        scores = []
        for fit_rows, held_rows in folds:
            frame, labels, weights, _ = _soft_rows(train.iloc[fit_rows], proba[fit_rows])
            model = build_candidate(kind, features, params).fit(
                frame, labels, classifier__sample_weight=weights)
            scores.append(_cross_entropy(proba[held_rows],
                                         model.predict_proba(train.iloc[held_rows])))
        rows.append({**{k: _plain(v) for k, v in params.items()},
                     "cv_mean": float(np.mean(scores)), "cv_sd": float(np.std(scores))})
    table = pd.DataFrame(rows)
    best = int(table["cv_mean"].idxmin())
    best_params = {k: _plain(table.loc[best, k]) for k in keys}
    frame, labels, weights, _ = _soft_rows(train, proba)
    estimator = build_candidate(kind, features, best_params).fit(
        frame, labels, classifier__sample_weight=weights)
    return CandidateResult(kind, estimator, best_params, float(table.loc[best, "cv_mean"]),
                           table, {}, False)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _rule_start(frame: pd.DataFrame) -> np.ndarray:
    """Starting responsibilities from the ImmunoSep rule's answers (indeterminate: even)."""
    answers = reference_rules()[REFERENCE_RULE].fit(frame).predict(frame)
    start = np.full((len(frame), len(PHENOTYPES)), 1.0 / len(PHENOTYPES))
    for k, phenotype in enumerate(PHENOTYPES):
        start[answers == phenotype] = np.eye(len(PHENOTYPES))[k]
    return start


def rule_error_rates(frame: pd.DataFrame, proba: np.ndarray) -> pd.DataFrame:
    """P(latent class | the rule's answer), near the cut-offs (ferritin or HLA-DR within a
    factor 1.5 of its cut-off) and away from them: the rule as a noisy annotator."""
    answers = reference_rules()[REFERENCE_RULE].fit(frame).predict(frame)
    ratio = np.column_stack([
        np.abs(np.log(frame["ferritin_ng_ml"].to_numpy(float) / FERRITIN_MALS_NG_ML)),
        np.abs(np.log(frame["hla_dr_mab_per_cell"].to_numpy(float)
                      / HLA_DR_IMMUNOPARALYSIS_MAB_PER_CELL))])
    near = np.nanmin(np.where(np.isfinite(ratio), ratio, np.inf), axis=1) < np.log(1.5)
    rows = []
    for band, mask in (("near cut-off", near), ("away from cut-off", ~near)):
        for answer in (*PHENOTYPES, INDETERMINATE):
            chosen = mask & (answers == answer)
            if chosen.any():
                share = proba[chosen].mean(axis=0)
                rows.append({"band": band, "rule": answer, "patients": int(chosen.sum()),
                             **{f"latent_{p}": float(share[k]) for k, p in enumerate(PHENOTYPES)}})
    return pd.DataFrame(rows)


def _profile(frame: pd.DataFrame, classes: np.ndarray, columns: tuple[str, ...]) -> pd.DataFrame:
    """Median of each marker (panel units) per most-likely class, and the class sizes."""
    table = frame[list(columns)].groupby(pd.Categorical(
        np.asarray(PHENOTYPES, dtype=object)[classes], categories=PHENOTYPES),
        observed=False).median()
    table.insert(0, "patients", np.bincount(classes, minlength=len(PHENOTYPES)))
    table.index.name = "class"
    return table


def fit_label_free(spec: ExperimentSpec, champion: Any = None) -> TrainingResult:
    """Latent classes on the training patients, distilled into every candidate, all judged
    with the rules (and champion) on the held-out patients."""
    cohort, source, recode, censored = load_cohort(spec)
    outcomes = outcome_spec(spec)
    if outcomes is not None:
        try:
            read_outcomes(cohort, outcomes)
        except OutcomeError as error:
            raise ExperimentError(f"[outcome] of {spec.source}: {error}") from None
    reference = spec.reference or (TRUE_PHENOTYPE if TRUE_PHENOTYPE in cohort else None)
    if reference is not None and reference not in cohort:
        raise ExperimentError(f"supervision.reference '{reference}' is not in the cohort")
    features = resolve_features(spec, cohort)
    columns = tuple(f for f in features if f in NUMERIC_MARKERS)
    train_rows, test_rows = split_cohort(spec, cohort)
    train = cohort.iloc[train_rows].reset_index(drop=True)
    test = cohort.iloc[test_rows].reset_index(drop=True)
    low, high = intervals(train, columns, {c: s[train_rows] for c, s in censored.items()})
    anchors, labels = None, {}
    if spec.supervision == PARTIAL:
        reading = read_labels(train[spec.label], spec.label, recode)
        anchors = np.where(reading.labelled, reading.codes, -1).astype(int)
        labels = {**reading.as_dict(), "anchors": int((anchors >= 0).sum())}
        missing = [p for k, p in enumerate(PHENOTYPES) if not (anchors == k).any()]
        if missing:
            raise ExperimentError(f"partial supervision needs a labelled training patient of "
                                  f"every phenotype; label column '{spec.label}' has none "
                                  f"of {', '.join(missing)} in the training split")
    starts = {3: [_rule_start(train)]} if spec.supervision == NOISY_RULE else {}
    try:
        sweep = bic_sweep(low, high, columns, spec.latent_classes, spec.latent_covariance,
                          spec.latent_restarts, spec.split_seed, starts)
        three = sweep[3]
        if anchors is not None:
            three = fit_mixture(low, high, columns, 3, spec.latent_covariance,
                                spec.latent_restarts, spec.split_seed, anchors=anchors)
        mixture, naming = named(three.mixture)
    except LatentError as error:
        raise ExperimentError(str(error)) from None
    warnings = []
    if anchors is not None:
        # anchored classes are already in PHENOTYPES order; the profiles must agree
        mixture = three.mixture.renamed(PHENOTYPES)
        if naming.order != (0, 1, 2):
            warnings.append("the labelled patients anchor classes whose marker profiles "
                            f"would be named otherwise (profile order {naming.order})")
    proba = np.exp(log_posterior(mixture, low, high))
    classes = proba.argmax(axis=1)
    site_v = None
    if SITE_ID in train and train[SITE_ID].nunique() > 1:
        table = pd.crosstab(train[SITE_ID].astype("string").fillna("?"), classes).to_numpy()
        site_v = float(association(table, method="cramer"))
        if site_v > SITE_WARNING_V:
            warnings.append(f"the classes line up with sites (Cramer's V {site_v:.2f} > "
                            f"{SITE_WARNING_V}): site bias in the assays may have made site "
                            "clusters; check the class profiles per site")
    preferred = min(sweep, key=lambda k: sweep[k].bic)
    if preferred != 3:
        warnings.append(f"BIC prefers {preferred} classes; three were fitted for naming")
    if reference is None and outcomes is None:
        reference = LATENT_CLASS
        test[LATENT_CLASS] = LatentClassifier(mixture).fit(test).predict(test)
        warnings.append("no outcome columns and no reference column: the candidates are judged "
                        "only by how well they reproduce the latent classes, so the model is "
                        "registered and not promoted; add [outcome] columns (death_28d, with "
                        "treatment for who benefits) to judge who the phenotypes pick")
    candidates = {kind: distil(spec, kind, train, proba, features) for kind in spec.candidates}
    ranked = sorted(candidates.values(), key=lambda c: c.cv_score)
    test_proba = np.exp(log_posterior(mixture, *intervals(
        test, columns, {c: s[test_rows] for c, s in censored.items()})))
    distillation = {kind: float(np.mean(np.abs(
        result.estimator.predict_proba(test) - test_proba))) for kind, result in
        candidates.items()}
    latent = LatentResult(
        mode=spec.supervision, mixture=mixture, naming=naming,
        sweep=pd.DataFrame([{"classes": k, "log_likelihood": fit.log_likelihood,
                             "bic": fit.bic, "icl": fit.icl,
                             "entropy": fit.relative_entropy, "iterations": fit.iterations,
                             "converged": fit.converged} for k, fit in sweep.items()]),
        preferred_k=preferred,
        sizes={p: int((classes == k).sum()) for k, p in enumerate(PHENOTYPES)},
        profile=_profile(train, classes, columns),
        stability=stability(low, high, columns, proba, spec.stability_refits,
                            spec.latent_covariance, spec.latent_restarts, spec.split_seed + 7,
                            anchors),
        distillation=distillation, site_association=site_v,
        rule_errors=rule_error_rates(train, proba) if spec.supervision == NOISY_RULE else None,
        warnings=tuple(warnings))
    phenotypers = {name: rule.fit(test) for name, rule in reference_rules().items()}
    phenotypers[LATENT] = LatentClassifier(mixture).fit(test)
    phenotypers.update({kind: result.estimator for kind, result in candidates.items()})
    if champion is not None and _can_judge(champion, test):
        phenotypers[CHAMPION] = champion
    judged = benchmark(phenotypers, test, reference, reference=REFERENCE_RULE,
                       n_boot=spec.bootstrap, seed=spec.benchmark_seed,
                       noise_repeats=spec.noise_repeats,
                       synthetic=spec.preset is not None or is_synthetic(cohort),
                       outcomes=outcomes, comparators=(LATENT,))
    labels.update({"reference": reference, "mode": spec.supervision})
    return TrainingResult(spec, train, test, features, candidates, ranked[0].kind, judged,
                          source, labels, None, latent)

