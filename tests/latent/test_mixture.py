"""The latent-class EM against mixtures whose parameters the test knows: missing markers
marginalised, censored values as intervals, labels as anchors, names from profiles."""

import numpy as np
import pandas as pd
import pytest
from scipy.stats import multivariate_normal, truncnorm

from phenotyper import latent
from phenotyper.contract import PHENOTYPES

COLUMNS = ("ferritin_ng_ml", "hla_dr_mab_per_cell", "lymphocytes_10e9_l", "crp_mg_l")
# A known 3-class law on the model scale (log markers), classes in PHENOTYPES order: MALS has
# high ferritin, immunoparalysis low HLA-DR and lymphocytes. One shared covariance with a
# common factor (every marker correlated), as the simulator's law has.
WEIGHTS = np.array([0.15, 0.35, 0.5])
MEANS = np.array([[9.0, 8.8, -0.4, 5.3],
                  [6.6, 7.9, -0.6, 5.0],
                  [6.2, 9.5, 0.0, 4.9]])
LOADING = np.array([0.5, -0.4, -0.3, 0.4])
COVARIANCE = np.outer(LOADING, LOADING) + np.diag([0.3, 0.15, 0.2, 0.15])


def draw(n: int, seed: int, missing: float = 0.0, covariances: np.ndarray | None = None
         ) -> tuple[np.ndarray, np.ndarray]:
    """(model-scale values with NaN where missing at random, true class)."""
    rng = np.random.default_rng(seed)
    truth = rng.choice(3, size=n, p=WEIGHTS)
    covariances = np.stack([COVARIANCE] * 3) if covariances is None else covariances
    x = np.empty((n, len(COLUMNS)))
    for k in range(3):
        rows = truth == k
        x[rows] = rng.multivariate_normal(MEANS[k], covariances[k], rows.sum())
    x[rng.random(x.shape) < missing] = np.nan
    return x, truth


def fit(x: np.ndarray, covariance: str = "tied", **kwargs) -> latent.Mixture:
    low, high = latent.point_intervals(x)
    result = latent.fit_mixture(low, high, COLUMNS, 3, covariance, n_init=3, seed=1, **kwargs)
    return latent.named(result.mixture)[0]


@pytest.mark.parametrize("covariance", latent.COVARIANCES)
def test_em_recovers_a_known_mixture_with_30_percent_of_markers_missing(covariance):
    x, _ = draw(8000, seed=0, missing=0.3)
    mixture = fit(x, covariance)
    # tolerances: a few standard errors at n = 8000 with 30% missing (the smallest class has
    # about 1200 patients; SD of a mean about 0.8 / sqrt(840) = 0.03)
    np.testing.assert_allclose(mixture.weights, WEIGHTS, atol=0.03)
    np.testing.assert_allclose(mixture.means, MEANS, atol=0.12)
    np.testing.assert_allclose(mixture.covariances[2], COVARIANCE, atol=0.06)


def test_the_likelihood_marginalises_missing_markers_exactly():
    x, _ = draw(400, seed=3, missing=0.4)
    mixture = latent.Mixture(COLUMNS, PHENOTYPES, WEIGHTS, MEANS, np.stack([COVARIANCE] * 3))
    low, high = latent.point_intervals(x)
    log_post = latent.log_posterior(mixture, low, high)
    for row in range(0, 400, 37):
        seen = ~np.isnan(x[row])
        joint = [np.log(WEIGHTS[k]) + (multivariate_normal(
            MEANS[k][seen], COVARIANCE[np.ix_(seen, seen)]).logpdf(x[row, seen])
            if seen.any() else 0.0) for k in range(3)]
        expected = np.array(joint) - np.logaddexp.reduce(joint)
        np.testing.assert_allclose(log_post[row], expected, atol=1e-9)


def test_missing_markers_are_not_imputed():
    """A patient whose HLA-DR is missing keeps a posterior from the markers measured; filling
    the gap with any one value would change it."""
    mixture = latent.Mixture(COLUMNS, PHENOTYPES, WEIGHTS, MEANS, np.stack([COVARIANCE] * 3))
    measured = np.array([[6.5, np.nan, -0.6, 5.0]])
    guessed = measured.copy()
    guessed[0, 1] = np.nanmedian(MEANS[:, 1])
    p_missing = np.exp(latent.log_posterior(mixture, *latent.point_intervals(measured)))
    p_guessed = np.exp(latent.log_posterior(mixture, *latent.point_intervals(guessed)))
    assert np.abs(p_missing - p_guessed).max() > 0.05


def test_truncated_moments_match_scipy():
    mean, sd = np.array([1.0, -2.0, 0.5]), np.array([0.7, 1.5, 0.2])
    low, high = np.array([1.4, -np.inf, -1.0]), np.array([np.inf, -3.5, 0.45])
    log_mass, t_mean, t_var = latent._truncated(mean, sd, low, high)
    a, b = (low - mean) / sd, (high - mean) / sd
    reference = truncnorm(a, b, loc=mean, scale=sd)
    np.testing.assert_allclose(t_mean, reference.mean(), rtol=1e-7)
    np.testing.assert_allclose(t_var, reference.var(), rtol=1e-6)
    np.testing.assert_allclose(np.exp(log_mass), truncnorm(-np.inf, np.inf).cdf(b)
                               - truncnorm(-np.inf, np.inf).cdf(a), rtol=1e-7)


def test_censored_values_enter_as_intervals_not_points():
    """CRP above a reporting limit is written '>limit'. Read as intervals the fit recovers the
    true mean; kept at the bound (what a point reading does) it is biased low."""
    x, _ = draw(6000, seed=5)
    limit = np.quantile(x[:, 3], 0.7)  # the top 30% of CRP censored
    over = x[:, 3] > limit
    x[over, 3] = limit
    low, high = latent.point_intervals(x)
    high[over, 3] = np.inf
    as_interval = latent.named(latent.fit_mixture(low, high, COLUMNS, 3, n_init=2,
                                                  seed=1).mixture)[0]
    as_point = fit(x)
    true_mean = WEIGHTS @ MEANS[:, 3]
    assert abs(as_interval.weights @ as_interval.means[:, 3] - true_mean) < 0.03
    assert true_mean - as_point.weights @ as_point.means[:, 3] > 0.08


def test_a_censored_cell_likelihood_is_the_probability_of_its_interval():
    mixture = latent.Mixture(COLUMNS, PHENOTYPES, WEIGHTS, MEANS, np.stack([COVARIANCE] * 3))
    low = np.array([[7.0, -np.inf, -0.3, -np.inf]])
    high = np.array([[7.0, np.log(5000.0), -0.3, np.inf]])  # HLA-DR "<5000"
    log_post = latent.log_posterior(mixture, low, high)[0]
    joint = []
    for k in range(3):
        seen = [0, 2]
        marginal = multivariate_normal(MEANS[k][seen], COVARIANCE[np.ix_(seen, seen)])
        gain = COVARIANCE[1, seen] @ np.linalg.inv(COVARIANCE[np.ix_(seen, seen)])
        centre = MEANS[k][1] + gain @ (low[0, seen] - MEANS[k][seen])
        sd = np.sqrt(COVARIANCE[1, 1] - gain @ COVARIANCE[seen, 1])
        below = truncnorm(-np.inf, np.inf).cdf((np.log(5000.0) - centre) / sd)
        joint.append(np.log(WEIGHTS[k]) + marginal.logpdf(low[0, seen]) + np.log(below))
    np.testing.assert_allclose(log_post, np.array(joint) - np.logaddexp.reduce(joint),
                               atol=1e-9)


def test_classes_are_named_from_profiles_whatever_order_em_finds_them_in():
    mixture = latent.Mixture(COLUMNS, ("a", "b", "c"), WEIGHTS[[2, 0, 1]], MEANS[[2, 0, 1]],
                             np.stack([COVARIANCE] * 3))
    renamed, naming = latent.named(mixture)
    assert naming.order == (1, 2, 0)
    np.testing.assert_array_equal(renamed.means, MEANS)
    assert renamed.classes == PHENOTYPES
    assert naming.used["immunoparalysis"] == ("hla_dr_mab_per_cell", "lymphocytes_10e9_l")


def test_naming_without_hla_dr_uses_lymphocytes_and_without_ferritin_says_what_to_add():
    keep = [0, 2, 3]
    mixture = latent.Mixture(tuple(COLUMNS[i] for i in keep), ("a", "b", "c"), WEIGHTS,
                             MEANS[:, keep], np.stack([COVARIANCE[np.ix_(keep, keep)]] * 3))
    assert latent.name_classes(mixture).order == (0, 1, 2)
    keep = [1, 2, 3]
    mixture = latent.Mixture(tuple(COLUMNS[i] for i in keep), ("a", "b", "c"), WEIGHTS,
                             MEANS[:, keep], np.stack([COVARIANCE[np.ix_(keep, keep)]] * 3))
    with pytest.raises(latent.LatentError, match="naming MALS needs one of ferritin_ng_ml"):
        latent.name_classes(mixture)


def test_labelled_rows_anchor_their_class():
    """Semi-supervised: 60 labelled patients fix which component is which, and the rest are
    classified as well as with the known law."""
    x, truth = draw(4000, seed=7, missing=0.2)
    anchors = np.full(len(x), -1)
    labelled = np.random.default_rng(0).choice(len(x), 60, replace=False)
    anchors[labelled] = truth[labelled]
    low, high = latent.point_intervals(x)
    result = latent.fit_mixture(low, high, COLUMNS, 3, anchors=anchors, n_init=1, seed=2)
    assert latent.name_classes(result.mixture).order == (0, 1, 2)  # anchored, so in order
    known = latent.Mixture(COLUMNS, PHENOTYPES, WEIGHTS, MEANS, np.stack([COVARIANCE] * 3))
    best = (latent.log_posterior(known, low, high).argmax(axis=1) == truth).mean()
    learned = (latent.log_posterior(result.mixture, low, high).argmax(axis=1) == truth).mean()
    assert learned > best - 0.01


def test_bic_prefers_the_true_number_of_classes():
    x, _ = draw(6000, seed=11, missing=0.1)
    low, high = latent.point_intervals(x)
    sweep = latent.bic_sweep(low, high, COLUMNS, (2, 4), n_init=2, seed=0)
    assert min(sweep, key=lambda k: sweep[k].bic) == 3
    assert all(0 <= fit.relative_entropy <= 1 for fit in sweep.values())
    assert all(fit.icl >= fit.bic for fit in sweep.values())


def test_posterior_of_a_cohort_frame_reads_markers_on_the_model_scale():
    x, _ = draw(50, seed=2, missing=0.2)
    frame = pd.DataFrame(np.exp(x), columns=COLUMNS)  # lab units; the mixture logs them
    mixture = latent.Mixture(COLUMNS, PHENOTYPES, WEIGHTS, MEANS, np.stack([COVARIANCE] * 3))
    points = latent.point_intervals(np.log(np.exp(x) + 1e-3))
    direct = np.exp(latent.log_posterior(mixture, *points))
    np.testing.assert_allclose(latent.posterior(mixture, frame), direct, atol=1e-12)
    again = latent.Mixture.from_dict(mixture.as_dict())
    np.testing.assert_allclose(latent.posterior(again, frame), direct, atol=1e-12)


@pytest.mark.parametrize(("n", "columns", "message"), [
    (20, COLUMNS, "20 patients are fewer than the 24 parameters"),
    (500, (*COLUMNS, "pct_ng_ml"), "pct_ng_ml never measured"),
])
def test_a_cohort_too_small_or_sparse_gets_one_clear_message(n, columns, message):
    x, _ = draw(n, seed=1)
    x = np.column_stack([x, np.full(n, np.nan)])[:, : len(columns)]
    low, high = latent.point_intervals(x)
    with pytest.raises(latent.LatentError, match=message):
        latent.fit_mixture(low, high, columns, 3)
