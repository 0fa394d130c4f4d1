"""The `gaussian` candidate (class-conditional Gaussians, missing markers marginalised): its
closed-form Shapley values against shap's exact enumeration, the class-conditional laws it
recovers, sample weights, and where it beats a linear model (a law with class-specific
covariances)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import shap
from sklearn.metrics import log_loss

from phenotyper.contract import PHENOTYPES
from phenotyper.latent import Mixture, log_joint, point_intervals, quadratic_shapley
from phenotyper.models import GaussianClassifier, build_candidate
from phenotyper.packaged.model import PackagedPhenotyper
from phenotyper.panel import NUMERIC_MARKERS
from phenotyper.simulate import bayes_posterior, simulate
from phenotyper.training.export import export

SHAPLEY_TOLERANCE = 1e-8  # closed form vs enumeration: floating point only


def _mixture(dims: int = 5, seed: int = 0) -> Mixture:
    rng = np.random.default_rng(seed)
    covariances = []
    for _ in range(3):
        a = rng.normal(size=(dims, dims))
        covariances.append(a @ a.T / dims + 0.5 * np.eye(dims))
    return Mixture(tuple(f"m{j}" for j in range(dims)), tuple(PHENOTYPES),
                   np.array([0.2, 0.3, 0.5]), rng.normal(size=(3, dims)),
                   np.stack(covariances), "full")


def _logit(mixture: Mixture, k: int, seen: np.ndarray):
    """Class k's logit as a function of the `seen` markers only (shap's model)."""
    def f(v: np.ndarray) -> np.ndarray:
        x = np.full((len(v), len(mixture.columns)), np.nan)
        x[:, seen] = v
        return log_joint(mixture, *point_intervals(x))[:, k]
    return f


def test_closed_form_equals_exact_enumeration_for_complete_rows() -> None:
    mixture = _mixture()
    rows = np.random.default_rng(1).normal(size=(20, 5)) * 1.5
    values, base = quadratic_shapley(mixture, rows)
    baseline = (mixture.weights @ mixture.means)[None]
    for k in range(3):
        explainer = shap.explainers.Exact(_logit(mixture, k, np.arange(5)),
                                          shap.maskers.Independent(baseline, max_samples=1))
        exact = explainer(rows)
        np.testing.assert_allclose(values[:, k], exact.values, atol=SHAPLEY_TOLERANCE)
        np.testing.assert_allclose(base[k], exact.base_values, atol=SHAPLEY_TOLERANCE)


def test_rows_with_missing_markers_are_exact_on_their_pattern_and_add_up() -> None:
    mixture = _mixture()
    rng = np.random.default_rng(2)
    rows = rng.normal(size=(300, 5))
    rows[rng.random(rows.shape) < 0.35] = np.nan
    values, base = quadratic_shapley(mixture, rows)
    low, high = point_intervals(rows)
    # additivity on every row and class
    np.testing.assert_allclose(values.sum(axis=2) + base, log_joint(mixture, low, high),
                               atol=1e-10)
    # one pattern: the measured markers' values are the exact Shapley values of that
    # pattern's logit against the baseline on those markers
    pattern = np.array([True, False, True, True, False])
    chosen = np.flatnonzero((~np.isnan(rows) == pattern).all(axis=1))
    assert len(chosen) >= 3
    seen = np.flatnonzero(pattern)
    baseline = (mixture.weights @ mixture.means)[seen][None]
    for k in range(3):
        exact = shap.explainers.Exact(_logit(mixture, k, seen), shap.maskers.Independent(
            baseline, max_samples=1))(rows[np.ix_(chosen, seen)])
        np.testing.assert_allclose(values[np.ix_(chosen, [k], seen)][:, 0], exact.values,
                                   atol=SHAPLEY_TOLERANCE)
        # the unmeasured markers share what not measuring them changes, equally
        hidden = values[np.ix_(chosen, [k], np.flatnonzero(~pattern))][:, 0]
        np.testing.assert_allclose(hidden, hidden[:, :1].repeat(2, axis=1))


def test_the_candidate_recovers_class_conditional_gaussians_with_missing_markers() -> None:
    truth = _mixture(dims=4, seed=3)
    rng = np.random.default_rng(4)
    n = 6000
    codes = rng.choice(3, n, p=truth.weights)
    x = np.stack([rng.multivariate_normal(truth.means[k], truth.covariances[k]) for k in codes])
    x[rng.random(x.shape) < 0.3] = np.nan
    features = ("crp_mg_l", "pct_ng_ml", "il6_pg_ml", "sofa")  # numeric: all Gaussian
    labels = np.asarray(PHENOTYPES, dtype=object)[codes]
    model = GaussianClassifier(features).fit(x, labels)
    assert list(model.classes_) == list(PHENOTYPES)
    # in units of the true SDs, about 4 standard errors at the smallest class's ~840 measured
    # values per marker: 0.15 for means (SE 0.035), 0.2 for covariances (SE of a variance 0.05)
    sd = np.sqrt(np.diagonal(truth.covariances, axis1=1, axis2=2))
    assert np.abs((model.mixture_.means - truth.means) / sd).max() < 0.15
    scale = sd[:, :, None] * sd[:, None, :]
    assert np.abs((model.mixture_.covariances - truth.covariances) / scale).max() < 0.2
    low, high = point_intervals(x)
    true_posterior = np.exp(log_joint(truth, low, high))
    true_posterior /= true_posterior.sum(axis=1, keepdims=True)
    assert np.abs(model.predict_proba(x) - true_posterior).mean() < 0.02


def test_a_row_of_weight_two_counts_as_two_patients() -> None:
    truth = _mixture(dims=3, seed=5)
    rng = np.random.default_rng(6)
    codes = rng.choice(3, 900, p=truth.weights)
    x = np.stack([rng.multivariate_normal(truth.means[k], truth.covariances[k]) for k in codes])
    x[rng.random(x.shape) < 0.2] = np.nan
    labels = np.asarray(PHENOTYPES, dtype=object)[codes]
    features = ("crp_mg_l", "pct_ng_ml", "sofa")
    twice = rng.random(900) < 0.3
    weighted = GaussianClassifier(features).fit(x, labels, sample_weight=1.0 + twice)
    copied = GaussianClassifier(features).fit(np.vstack([x, x[twice]]),
                                              np.concatenate([labels, labels[twice]]))
    np.testing.assert_allclose(weighted.mixture_.means, copied.mixture_.means, atol=1e-4)
    np.testing.assert_allclose(weighted.mixture_.covariances, copied.mixture_.covariances,
                               atol=1e-4)


@pytest.mark.slow
def test_on_class_specific_covariances_it_nears_bayes_where_a_linear_model_cannot(
        tmp_path: Path) -> None:
    preset = "class-specific-covariance"
    train, test = simulate(preset, 6000, seed=1), simulate(preset, 6000, seed=2)
    features = [*NUMERIC_MARKERS, "sex"]
    bayes = log_loss(test["phenotype_true"], bayes_posterior(preset, test),
                     labels=list(PHENOTYPES))
    losses = {}
    for kind, params in (("gaussian", {}), ("logistic", {"C": 1.0})):
        model = build_candidate(kind, features, params).fit(train, train["phenotype_true"])
        losses[kind] = log_loss(test["phenotype_true"], model.predict_proba(test),
                                labels=list(model.classes_))
    # measured (seeds 1/2): gaussian about 0.005 above Bayes, logistic about 0.05
    assert losses["gaussian"] - bayes < 0.015
    assert losses["logistic"] - bayes > 0.03
    # packaged: the same probabilities, and explanations that add up on every row
    export(model := build_candidate("gaussian", features, {}).fit(
        train, train["phenotype_true"]), tmp_path)
    packaged = PackagedPhenotyper(tmp_path)
    out = packaged.predict(test.head(500), explain="all")
    np.testing.assert_allclose(out[[f"prob_{c}" for c in packaged.classes]].to_numpy(),
                               model.predict_proba(test.head(500)), atol=1e-6)
    for k, label in enumerate(packaged.classes):
        logit = out[f"shap_base_{label}"] + out[[f"shap_{label}_{f}" for f in features]].sum(axis=1)
        expected = model[-1].decision_function(model[0].transform(test.head(500)))[:, k]
        np.testing.assert_allclose(logit, expected, atol=1e-6)
    assert (out[[f"shap_{f}" for f in features if f == "sex"]].to_numpy() == 0).all()
    assert "Shapley" in packaged.describe_explainer()["method"]


@pytest.mark.slow
def test_an_experiment_selects_it_on_class_specific_covariances_and_can_distil_into_it():
    from phenotyper.training.fit import fit_and_evaluate
    from phenotyper.training.label_free import fit_label_free
    from phenotyper.training.spec import ExperimentSpec

    fast = {"bootstrap": 100, "noise_repeats": 0, "cv_folds": 3}
    supervised = fit_and_evaluate(ExperimentSpec(
        name="g", registered_model="g", preset="class-specific-covariance", n=4000,
        cohort_seed=3, label="phenotype_true",
        candidates={"logistic": {"C": [1.0]}, "gaussian": {"covariance": ["tied", "full"]}},
        **fast))
    assert supervised.selected == "gaussian"
    assert supervised.candidates["gaussian"].best_params == {"covariance": "full"}
    # distilled from a label-free posterior through weighted rows: it reproduces that posterior
    label_free = fit_label_free(ExperimentSpec(
        name="lf", registered_model="lf", preset="immunosep-screening", n=3000, cohort_seed=4,
        supervision="none", candidates={"gaussian": {}}, latent_classes=(3, 3),
        latent_restarts=2, stability_refits=0, **fast))
    assert label_free.latent.distillation["gaussian"] < 0.03
