"""Latent classes without labels: agreement with the simulator's truth and its Bayes posterior,
baselines, stability, outcome validation, and fit time. Writes benchmarks/results/latent.json.

On a simulated screening cohort the latent phenotype is known, so the label-free fit (BIC sweep
K=2..5 with restarts, three classes named by their profiles) is judged against it on the same
patients as the rule and the exact Bayes posterior, with the same paired bootstrap. Every
patient is used for fitting and for judging (latent-class analysis sees no labels, so there is
nothing to hold out); the partial mode's 200 anchor patients are judged with the rest.

    .venv/bin/python benchmarks/latent.py [--n 20000] [--large 200000] [--refits 5]

Baselines (the `bench` dependency group): StepMix's Gaussian mixture with diagonal covariance
and missing values marginalised (`gaussian_diag_nan`), and scikit-learn's GaussianMixture on
the complete cases of the well-measured markers (it takes no missing values).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import pandas as pd
from results_file import code_version, write_results  # benchmarks/ is on sys.path when run
from sklearn.metrics import accuracy_score, adjusted_rand_score, log_loss
from sklearn.mixture import GaussianMixture

from phenotyper.contract import PHENOTYPES, TRUE_PHENOTYPE
from phenotyper.evaluate.benchmark import benchmark
from phenotyper.evaluate.outcomes import OutcomeSpec
from phenotyper.latent import (
    K_RANGE,
    Mixture,
    bic_sweep,
    fit_mixture,
    intervals,
    log_posterior,
    mixture_columns,
    name_classes,
    named,
    stability,
)
from phenotyper.models import LatentClassifier, build_candidate
from phenotyper.panel import NUMERIC_MARKERS
from phenotyper.rules import reference_rules
from phenotyper.simulate import bayes_posterior, mortality_by_rule, simulate

PRESET = "immunosep-screening"
TRIAL_PRESET = "all-comers-trial"
RESTARTS = 3
WELL_MEASURED_MISSING = 0.15  # complete-case baseline: markers missing for fewer patients


class Fixed:
    """Given probabilities as a phenotyper (the Bayes posterior, a baseline's posterior)."""

    def __init__(self, proba: np.ndarray) -> None:
        self.proba = proba
        self.classes_ = np.array(PHENOTYPES, dtype=object)

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        return self.proba

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        return self.classes_[self.proba.argmax(axis=1)]


def more_missing(frame: pd.DataFrame, columns: tuple[str, ...], share: float,
                 seed: int) -> pd.DataFrame:
    """The cohort with measured lab cells of `columns` removed at random (MCAR, an
    assumption) until `share` of all its cells are missing; SOFA and age stay charted."""
    frame = frame.copy()
    labs = [c for c in columns if c not in ("sofa", "age_years")]
    missing = frame[list(columns)].isna().to_numpy().sum()
    present = frame[labs].notna().to_numpy().sum()
    extra = max(0.0, (share * len(frame) * len(columns) - missing) / present)
    rng = np.random.default_rng(seed)
    for column in labs:
        frame.loc[rng.random(len(frame)) < extra, column] = np.nan
    return frame


def timed_sweep(frame: pd.DataFrame, columns: tuple[str, ...], seed: int) -> dict[str, Any]:
    low, high = intervals(frame, columns)
    start = time.perf_counter()
    sweep = bic_sweep(low, high, columns, K_RANGE, "tied", RESTARTS, seed)
    seconds = time.perf_counter() - start
    return {"patients": len(frame),
            "missing_share": round(float(1 - np.isfinite(low).mean()), 3),
            "sweep_s": round(seconds, 1),
            "bic_preferred_k": min(sweep, key=lambda k: sweep[k].bic),
            "iterations": {k: fit.iterations for k, fit in sweep.items()},
            "converged": all(fit.converged for fit in sweep.values())}


def agreement(truth: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    labels = np.asarray(PHENOTYPES, dtype=object)[proba.argmax(axis=1)]
    return {"accuracy": round(accuracy_score(truth, labels), 4),
            "adjusted_rand": round(adjusted_rand_score(truth, labels), 4),
            "log_loss": round(log_loss(truth, np.clip(proba, 1e-15, 1), labels=list(PHENOTYPES)),
                              4)}


def diagonal_baseline(low: np.ndarray, columns: tuple[str, ...], seed: int) -> np.ndarray:
    """StepMix's diagonal Gaussian mixture with missing values (its `gaussian_diag_nan`),
    classes named by the same profile rule."""
    from stepmix.stepmix import StepMix

    model = StepMix(n_components=3, measurement="gaussian_diag_nan", n_init=RESTARTS,
                    random_state=seed, progress_bar=0, verbose=0, max_iter=500)
    points = np.where(np.isfinite(low), low, np.nan)  # no censored cells in a simulation
    model.fit(points)
    parameters = model.get_parameters()
    means = np.asarray(parameters["measurement"]["means"])
    variances = np.asarray(parameters["measurement"]["covariances"])
    mixture = Mixture(columns, ("a", "b", "c"), np.asarray(parameters["weights"]), means,
                      np.stack([np.diag(v) for v in variances]), "full")
    return model.predict_proba(points)[:, list(name_classes(mixture).order)]


def complete_case_baseline(low: np.ndarray, columns: tuple[str, ...], seed: int
                           ) -> tuple[np.ndarray, np.ndarray, int]:
    """scikit-learn's GaussianMixture (full covariance) on the patients with every
    well-measured marker; returns the rows used, their named posterior, the marker count."""
    measured = np.isfinite(low)
    keep = 1 - measured.mean(axis=0) < WELL_MEASURED_MISSING
    rows = np.flatnonzero(measured[:, keep].all(axis=1))
    gm = GaussianMixture(3, covariance_type="full", n_init=RESTARTS, random_state=seed)
    gm.fit(low[np.ix_(rows, keep)])
    kept = tuple(c for c, k in zip(columns, keep, strict=True) if k)
    mixture = Mixture(kept, ("a", "b", "c"), gm.weights_, gm.means_, gm.covariances_, "full")
    proba = gm.predict_proba(low[np.ix_(rows, keep)])[:, list(name_classes(mixture).order)]
    return rows, proba, int(keep.sum())


def balanced_accuracy_table(frame: pd.DataFrame, phenotypers: dict[str, Any],
                            seed: int) -> dict[str, Any]:
    """Balanced accuracy of each phenotyper and its paired difference from the rule, with the
    evaluator's bootstrap (1000 resamples by patient)."""
    judged = benchmark(phenotypers, frame, TRUE_PHENOTYPE, n_boot=1000, seed=seed,
                       noise_repeats=0, synthetic=True)
    records = judged.records
    rows = records[(records.subgroup == "all") & records.metric.isin(
        ["balanced_accuracy", "balanced_accuracy_minus_immunosep", "log_loss"])]
    return {f"{r.phenotyper}/{r.metric}": [round(r.value, 4), round(r.ci_low, 4),
                                           round(r.ci_high, 4)]
            for r in rows.itertuples()}


def outcome_validation(frame: pd.DataFrame, proba: np.ndarray, n_trial: int,
                       seed: int) -> dict[str, Any]:
    """28-day mortality by latent class and by the rule's answer on the screening cohort; then,
    on a simulated all-comers trial (every patient randomised: an assumption), each drug's
    effect on death within each latent class and rule phenotype, and the policy value of
    treating by the label-free classes against treating by the rule (paired bootstrap)."""
    latent = pd.Series(np.asarray(PHENOTYPES, dtype=object)[proba.argmax(axis=1)])
    by_class = frame.groupby(latent.to_numpy())["death_28d"].agg(["mean", "size"])
    results: dict[str, Any] = {
        "mortality_by_latent_class": {k: [round(float(r["mean"]), 3), int(r["size"])]
                                      for k, r in by_class.iterrows()},
        "mortality_by_rule": {k: round(v, 3) for k, v in mortality_by_rule(frame).items()}}
    trial = simulate(TRIAL_PRESET, n_trial, seed)
    columns = mixture_columns(trial)
    low, high = intervals(trial, columns)
    mixture, _ = named(fit_mixture(low, high, columns, 3, "tied", RESTARTS, seed).mixture)
    judged = benchmark({"immunosep": reference_rules()["immunosep"].fit(trial),
                        "latent_classes": LatentClassifier(mixture).fit(trial)}, trial,
                       TRUE_PHENOTYPE, n_boot=1000, seed=seed, noise_repeats=0, synthetic=True,
                       outcomes=OutcomeSpec(("death_28d",), "treatment",
                                            "treatment_probability"))
    records = judged.records
    wanted = records.metric.str.startswith(("treatment_effect_", "policy_value_",
                                            "true_policy_value_"))
    results[TRIAL_PRESET] = {
        "patients": n_trial,
        **{f"{r.phenotyper}/{r.metric}/{r.subgroup}": [round(r.value, 4), round(r.ci_low, 4),
                                                       round(r.ci_high, 4)]
           for r in records[wanted].itertuples()}}
    return results


def generative_candidate(n: int, seed: int) -> dict[str, Any]:
    """Supervised candidates on a law with class-specific covariances (the
    class-specific-covariance preset) and on the screening law: held-out log loss and
    accuracy beside the Bayes posterior."""
    results: dict[str, Any] = {}
    features = [*NUMERIC_MARKERS, "sex"]
    grids = {"logistic": {"C": 1.0}, "xgboost": {"n_estimators": 300, "max_depth": 3,
                                                 "learning_rate": 0.05}, "gaussian": {}}
    for preset in ("class-specific-covariance", PRESET):
        train, test = simulate(preset, n, seed), simulate(preset, n, seed + 1)
        truth = test[TRUE_PHENOTYPE].to_numpy()
        row = {"bayes": agreement(truth, bayes_posterior(preset, test))}
        for kind, params in grids.items():
            start = time.perf_counter()
            model = build_candidate(kind, features, params).fit(train, train[TRUE_PHENOTYPE])
            row[kind] = {"fit_s": round(time.perf_counter() - start, 1),
                         **agreement(truth, model.predict_proba(test))}
            row[kind]["log_loss_above_bayes"] = round(
                row[kind]["log_loss"] - row["bayes"]["log_loss"], 4)
        results[preset] = row
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--large", type=int, default=200_000, help="0: skip the large fit")
    parser.add_argument("--refits", type=int, default=5, help="bootstrap refits for stability")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()

    frame = simulate(PRESET, args.n, args.seed)
    columns = mixture_columns(frame)
    truth = frame[TRUE_PHENOTYPE].to_numpy()
    low, high = intervals(frame, columns)
    bayes = bayes_posterior(PRESET, frame)
    results: dict[str, Any] = {"preset": PRESET, "patients": args.n, "seed": args.seed,
                               "markers": list(columns), "code": code_version()}

    start = time.perf_counter()
    sweep = bic_sweep(low, high, columns, K_RANGE, "tied", RESTARTS, args.seed)
    sweep_s = time.perf_counter() - start
    mixture, naming = named(sweep[3].mixture)
    proba = np.exp(log_posterior(mixture, low, high))
    results["none"] = {
        "sweep_s": round(sweep_s, 1),
        "bic": {k: round(fit.bic, 1) for k, fit in sweep.items()},
        "icl": {k: round(fit.icl, 1) for k, fit in sweep.items()},
        "entropy": {k: round(fit.relative_entropy, 3) for k, fit in sweep.items()},
        "bic_preferred_k": min(sweep, key=lambda k: sweep[k].bic),
        "naming_scores": naming.scores,
        "sizes": dict(zip(PHENOTYPES, np.bincount(proba.argmax(1), minlength=3).tolist(),
                          strict=True)),
        **agreement(truth, proba)}
    results["bayes"] = agreement(truth, bayes)
    results["none"]["accuracy_share_of_bayes"] = round(
        results["none"]["accuracy"] / results["bayes"]["accuracy"], 4)
    results["none"]["log_loss_above_bayes"] = round(
        results["none"]["log_loss"] - results["bayes"]["log_loss"], 4)
    results["none"]["agreement_with_bayes_classes"] = round(float(np.mean(
        proba.argmax(1) == bayes.argmax(1))), 4)
    results["none"]["mean_abs_posterior_gap_to_bayes"] = round(float(np.mean(
        np.abs(proba - bayes))), 4)
    print("none:", results["none"], "bayes:", results["bayes"], flush=True)

    # partial: 200 adjudicated patients anchor the classes
    rng = np.random.default_rng(args.seed)
    anchors = np.full(len(frame), -1)
    chosen = rng.choice(len(frame), 200, replace=False)
    anchors[chosen] = [PHENOTYPES.index(t) for t in truth[chosen]]
    start = time.perf_counter()
    anchored = fit_mixture(low, high, columns, 3, "tied", RESTARTS, args.seed, anchors=anchors)
    partial_s = time.perf_counter() - start
    partial_mixture = anchored.mixture.renamed(PHENOTYPES)
    partial = np.exp(log_posterior(partial_mixture, low, high))
    results["partial_200"] = {"fit_s": round(partial_s, 1), **agreement(truth, partial)}
    results["partial_200"]["accuracy_share_of_bayes"] = round(
        results["partial_200"]["accuracy"] / results["bayes"]["accuracy"], 4)
    print("partial:", results["partial_200"], flush=True)

    # baselines
    start = time.perf_counter()
    diagonal = diagonal_baseline(low, columns, args.seed)
    results["stepmix_diagonal"] = {"fit_s": round(time.perf_counter() - start, 1),
                                   **agreement(truth, diagonal)}
    rows, complete, n_markers = complete_case_baseline(low, columns, args.seed)
    results["sklearn_complete_cases"] = {
        "patients": len(rows), "markers": n_markers, **agreement(truth[rows], complete),
        "latent_on_same_patients": agreement(truth[rows], proba[rows]),
        "bayes_on_same_patients": agreement(truth[rows], bayes[rows])}
    print("baselines:", results["stepmix_diagonal"], results["sklearn_complete_cases"],
          flush=True)

    phenotypers = {"immunosep": reference_rules()["immunosep"].fit(frame),
                   "latent_classes": LatentClassifier(mixture).fit(frame),
                   "latent_partial_200": LatentClassifier(partial_mixture).fit(frame),
                   "stepmix_diagonal": Fixed(diagonal), "bayes": Fixed(bayes)}
    results["paired_bootstrap"] = balanced_accuracy_table(frame, phenotypers, args.seed)
    results["outcome_validation"] = outcome_validation(frame, proba, args.n, args.seed)

    start = time.perf_counter()
    results["stability"] = {**stability(low, high, columns, proba, args.refits, "tied",
                                        RESTARTS, args.seed),
                            "seconds": round(time.perf_counter() - start, 1)}
    print("stability:", results["stability"], flush=True)
    results["generative_candidate"] = generative_candidate(10_000, args.seed)
    print("generative:", results["generative_candidate"], flush=True)

    results["timing"] = {"screening": timed_sweep(frame, columns, args.seed),
                         "missing_30": timed_sweep(more_missing(frame, columns, 0.30, args.seed),
                                                   columns, args.seed)}
    if args.large:
        results["timing"]["large"] = timed_sweep(simulate(PRESET, args.large, args.seed + 1),
                                                 columns, args.seed)
    print("timing:", results["timing"], flush=True)
    print(write_results("latent", results))


if __name__ == "__main__":
    main()
