"""Latent classes from the marker panel: a Gaussian mixture fitted by EM on the models' scale.

Real cohorts rarely have adjudicated phenotypes, and the phenotypes users compare against were
learned without them. Each patient's markers (log scale; SOFA and age linear, `panel`) are a
draw from one of K multivariate Gaussians. Three things make it fit hospital data:

- **Missing markers are marginalised, never imputed.** Rows are grouped by which markers they
  measured; each group's likelihood uses the Gaussian's marginal over its measured markers, and
  the M-step uses the conditional moments of the rest (the exact EM for data missing at random).
- **Censored results are intervals.** A "<0.5" is the event that the value lies below 0.5: the
  likelihood has the conditional Gaussian's probability of that interval and the M-step its
  truncated moments. Exact for one censored marker per patient; with several, their intervals
  are treated as independent given the measured markers (an approximation, rarely needed).
- **The covariance carries the markers' shared factors**: `tied` (one full covariance for all
  classes, the simulator's law) or `full` (one per class: QDA with missing data when labels fix
  the classes).

Labelled rows anchor their class (semi-supervised EM): their responsibilities are fixed to the
label. Names come from the class profiles alone (`name_classes`), never from labels.

Pure numpy/scipy: the packaged model computes posteriors with the same code it was fitted with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.special import log_ndtr, logsumexp

from phenotyper.contract import IMMUNOPARALYSIS, MALS, PHENOTYPES, UNCLASSIFIED
from phenotyper.panel import LINEAR_SCALE_MARKERS, NUMERIC_MARKERS, to_log_scale

COVARIANCES = ("tied", "full")
K_RANGE = (2, 5)  # the BIC sweep's default class counts
REG_COVAR = 1e-4  # added to covariance diagonals (model-scale units squared): keeps EM off
# singular covariances when a class collapses onto few patients
_LOG_2PI = float(np.log(2 * np.pi))

# How each phenotype shows in a class profile (ImmunoSep's definitions, REFERENCE.md): MALS is
# the class with the highest ferritin; immunoparalysis the lowest monocyte HLA-DR, lymphocytes
# standing in where HLA-DR was not measured; unclassified is neither. Each entry: marker ->
# direction; a phenotype's score is the mean of direction * standardised class mean.
PROFILE_DEFINITIONS: dict[str, dict[str, float]] = {
    MALS: {"ferritin_ng_ml": 1.0},
    IMMUNOPARALYSIS: {"hla_dr_mab_per_cell": -1.0, "lymphocytes_10e9_l": -1.0},
}


class LatentError(ValueError):
    """A cohort the mixture cannot be fitted to; the message says what to change."""


# --- data on the model scale ---------------------------------------------------------------


def to_model_scale(column: str, values: np.ndarray) -> np.ndarray:
    """A marker's values on the mixture's scale: log for lab markers, linear for SOFA and age."""
    values = np.asarray(values, dtype=float)
    return values if column in LINEAR_SCALE_MARKERS else to_log_scale(values)


def intervals(frame: Any, columns: Sequence[str],
              censored: Mapping[str, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each cell as an interval on the model scale: (low, high), each (rows, columns).

    A measured value is the point low == high; a missing one (-inf, inf). `censored` maps a
    column to a per-row sign: -1 where the value is an upper bound ("<0.5": the true value is
    at most it), +1 a lower bound (">100000"), 0 a plain value (the reader's censored_low /
    censored_high issues, `cohort.censored_cells`).
    """
    censored = censored or {}
    low = np.empty((len(frame), len(columns)))
    high = np.empty_like(low)
    for j, column in enumerate(columns):
        value = to_model_scale(column, np.asarray(frame[column], dtype=float))
        sign = np.asarray(censored.get(column, np.zeros(len(frame))))
        measured = np.isfinite(value)
        low[:, j] = np.where(measured & (sign >= 0), value, -np.inf)
        high[:, j] = np.where(measured & (sign <= 0), value, np.inf)
    return low, high


def point_intervals(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Model-scale points with NaN where not measured, as the mixture's (low, high)."""
    x = np.asarray(x, dtype=float)
    missing = np.isnan(x)
    return np.where(missing, -np.inf, x), np.where(missing, np.inf, x)


def mixture_columns(frame: Any, candidates: Sequence[str] = NUMERIC_MARKERS) -> tuple[str, ...]:
    """The numeric panel markers a cohort measured at least once (sex is not Gaussian)."""
    return tuple(c for c in candidates if c in frame and np.isfinite(
        np.asarray(frame[c], dtype=float)).any())


def n_parameters(n_classes: int, n_columns: int, covariance: str) -> int:
    """Free parameters of a mixture: weights, means, covariance(s) (BIC's penalty)."""
    per_covariance = n_columns * (n_columns + 1) // 2
    return (n_classes - 1) + n_classes * n_columns + per_covariance * (
        1 if covariance == "tied" else n_classes)


# --- the mixture ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Mixture:
    """Fitted mixture parameters (plain arrays, JSON-able with `as_dict`).

    `classes` names each component (a phenotype once named, else "class 1", ...); `means` is
    (K, D) and `covariances` (K, D, D) on the model scale of `columns`.
    """

    columns: tuple[str, ...]
    classes: tuple[str, ...]
    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    covariance: str = "tied"

    @property
    def n_classes(self) -> int:
        return len(self.weights)

    def n_parameters(self) -> int:
        return n_parameters(*self.means.shape, self.covariance)

    def renamed(self, classes: Sequence[str], order: Sequence[int] | None = None) -> Mixture:
        """The same mixture with its components reordered (`order`) and named."""
        order = np.arange(self.n_classes) if order is None else np.asarray(order)
        return Mixture(self.columns, tuple(classes), self.weights[order], self.means[order],
                       self.covariances[order], self.covariance)

    def as_dict(self) -> dict[str, Any]:
        return {"columns": list(self.columns), "classes": list(self.classes),
                "covariance": self.covariance, "weights": self.weights.tolist(),
                "means": self.means.tolist(), "covariances": self.covariances.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Mixture:
        return cls(tuple(data["columns"]), tuple(data["classes"]),
                   np.asarray(data["weights"], float), np.asarray(data["means"], float),
                   np.asarray(data["covariances"], float), str(data["covariance"]))


@dataclass
class _Stats:
    """EM sufficient statistics, summed over patients with their responsibilities."""

    counts: np.ndarray
    sums: np.ndarray
    squares: np.ndarray
    log_likelihood: float = 0.0
    entropy: float = 0.0


def _truncated(mean: np.ndarray, sd: np.ndarray, low: np.ndarray, high: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """log P(low <= x <= high), mean and variance of N(mean, sd^2) truncated to the interval."""
    a, b = (low - mean) / sd, (high - mean) / sd
    # log(Phi(b) - Phi(a)) computed on the side of the tail where it is accurate
    flip = a > 0
    a, b = np.where(flip, -b, a), np.where(flip, -a, b)
    log_b, log_a = log_ndtr(b), log_ndtr(a)
    log_mass = log_b + np.log1p(-np.exp(np.minimum(log_a - log_b, -1e-300)))
    mass = np.exp(log_mass)
    pdf_a, pdf_b = np.exp(-0.5 * (a**2 + _LOG_2PI)), np.exp(-0.5 * (b**2 + _LOG_2PI))
    a_pdf = np.where(np.isfinite(a), a, 0.0) * pdf_a
    b_pdf = np.where(np.isfinite(b), b, 0.0) * pdf_b
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = (pdf_a - pdf_b) / mass
        ratio = (a_pdf - b_pdf) / mass
    shift = np.where(np.isfinite(shift), shift, 0.0)
    ratio = np.where(np.isfinite(ratio), ratio, 0.0)
    variance = np.maximum(sd**2 * (1 + ratio - shift**2), 1e-12 * sd**2)
    truncated_mean = np.where(flip, mean - sd * shift, mean + sd * shift)
    # a point far out in a tail: the interval's near end is the best estimate
    truncated_mean = np.clip(truncated_mean, low, high)
    return log_mass, truncated_mean, variance


_CHUNK_ROWS = 8192  # rows per batched step: bounds the (rows, D, D) gathers' memory


class _Layout:
    """The cells' kinds, computed once per fit: which are points, which censored intervals,
    and each row's pattern of measured markers (censored and missing cells are both hidden
    from the Gaussian's marginal; censored ones add their interval's probability)."""

    def __init__(self, low: np.ndarray, high: np.ndarray,
                 weight: np.ndarray | None = None) -> None:
        self.low, self.high = low, high
        self.weight = None if weight is None else np.asarray(weight, dtype=float)
        self.point = low == high
        self.x = np.where(self.point, low, 0.0)
        self.o_count = self.point.sum(axis=1)
        patterns, inverse = np.unique(self.point, axis=0, return_inverse=True)
        self.patterns, self.pattern_of_row = patterns, inverse.ravel()
        interval = ~self.point & (np.isfinite(low) | np.isfinite(high))
        censored_rows = np.flatnonzero(interval.any(axis=1))
        kinds, which = np.unique(interval[censored_rows], axis=0, return_inverse=True)
        self.censored = [(np.flatnonzero(kind), censored_rows[which.ravel() == g])
                         for g, kind in enumerate(kinds)]


def _marginal_inverses(covariance: np.ndarray, patterns: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per pattern of measured markers O (hidden H): log det S_OO, S_OO^-1 embedded in a
    D x D zero matrix, and the covariance of H given O (zero on O's rows and columns).

    All three come from the full precision P = S^-1 and the small hidden block P_HH: the
    covariance of H given O is P_HH^-1, S_OO^-1 = P_OO - P_OH P_HH^-1 P_HO (zero on H's rows
    by construction), and log det S_OO = log det S + log det P_HH. Patterns are batched by
    how many markers they hide, so the work per pattern is an h x h inverse, not D x D."""
    d = covariance.shape[0]
    precision = np.linalg.inv(covariance)
    precision = 0.5 * (precision + precision.T)
    log_det_full = 2 * np.log(np.diagonal(np.linalg.cholesky(covariance))).sum()
    count = len(patterns)
    log_det = np.full(count, log_det_full)
    inverse = np.empty((count, d, d))
    conditional = np.zeros((count, d, d))
    hidden_count = (~patterns).sum(axis=1)
    for h in np.unique(hidden_count):
        if h == 0:
            inverse[hidden_count == 0] = precision
            continue
        group = np.flatnonzero(hidden_count == h)
        # each pattern's hidden markers in order: (G, h)
        hidden = np.nonzero(~patterns[group])[1].reshape(len(group), h)
        block = precision[hidden[:, :, None], hidden[:, None, :]]  # P_HH: (G, h, h)
        chol = np.linalg.cholesky(block)
        log_det[group] += 2 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1)
        block_inverse = np.linalg.inv(block)
        block_inverse = 0.5 * (block_inverse + block_inverse.transpose(0, 2, 1))
        across = precision[:, hidden].transpose(1, 0, 2)  # P_.H: (G, D, h)
        inverse[group] = precision - np.einsum("gdh,ghk,gek->gde", across, block_inverse,
                                               across, optimize=True)
        conditional[group[:, None, None], hidden[:, :, None], hidden[:, None, :]] = block_inverse
    return log_det, inverse, conditional


def _pattern_pass(layout: _Layout, mixture: Mixture, anchors: np.ndarray | None,
                  want_stats: bool) -> tuple[np.ndarray, _Stats | None]:
    """One E-step: log P(class, row) for every row, and (if asked) the M-step's statistics.

    Every class's Gaussian is conditioned on each row's measured markers O, batched over
    rows: with A = S_OO^-1 embedded in D x D, the marginal's quadratic form is d'Ad and the
    filled-in row mu + S A d is the value where measured and the conditional mean elsewhere.
    Censored cells then add their interval's probability and truncated moments.
    """
    n, d = layout.low.shape
    k_count = mixture.n_classes
    tied = mixture.covariance == "tied"
    inverses = [_marginal_inverses(mixture.covariances[k], layout.patterns)
                for k in range(1 if tied else k_count)]
    log_joint = np.empty((n, k_count))
    filled = np.empty((n, k_count, d))
    log_weights = np.log(np.maximum(mixture.weights, 1e-300))
    pattern = layout.pattern_of_row
    for g, (log_det, inverse, _) in enumerate(inverses):
        classes = range(k_count) if tied else (g,)
        # A (mu_k on O) and mu_k' A mu_k depend on the pattern only
        a_mean = {k: np.einsum("pde,pe->pd", inverse, mixture.means[k] * layout.patterns)
                  for k in classes}
        for begin in range(0, n, _CHUNK_ROWS):
            rows = slice(begin, min(begin + _CHUNK_ROWS, n))
            x, p_rows = layout.x[rows], pattern[rows]
            a_x = np.einsum("rde,re->rd", inverse[p_rows], x)
            x_a_x = np.einsum("rd,rd->r", x, a_x)
            constant = layout.o_count[rows] * _LOG_2PI + log_det[p_rows]
            for k in classes:
                a_mu = a_mean[k][p_rows]
                quadratic = (x_a_x - 2 * np.einsum("rd,rd->r", x, a_mu)
                             + a_mu @ mixture.means[k])
                log_joint[rows, k] = log_weights[k] - 0.5 * (constant + quadratic)
                filled[rows, k] = mixture.means[k] + (a_x - a_mu) @ mixture.covariances[k]
    corrections = []  # (rows, class, per-row covariance change) of censored rows
    for censored, rows in layout.censored:
        for k in range(k_count):
            conditional = inverses[0 if tied else k][2][pattern[rows]]
            cc = conditional[:, censored][:, :, censored]
            sd = np.sqrt(np.diagonal(cc, axis1=1, axis2=2))
            mean_c = filled[rows, k][:, censored]
            log_mass, t_mean, t_var = _truncated(mean_c, sd, layout.low[np.ix_(rows, censored)],
                                                 layout.high[np.ix_(rows, censored)])
            log_joint[rows, k] += log_mass.sum(axis=1)
            # everything hidden follows the censored markers linearly given the measured ones
            gain = np.linalg.solve(cc, conditional[:, censored, :]).transpose(0, 2, 1)
            filled[rows, k] += np.einsum("rdc,rc->rd", gain, t_mean - mean_c)
            shrink = cc - t_var[:, :, None] * np.eye(len(censored))
            corrections.append((rows, k, -np.einsum("rdc,rce,rfe->rdf", gain, shrink, gain)))
    if not want_stats:
        return log_joint, None
    row_total = logsumexp(log_joint, axis=1)
    resp = np.exp(log_joint - row_total[:, None])
    if anchors is not None and (anchors >= 0).any():
        anchored = np.flatnonzero(anchors >= 0)
        resp[anchored] = np.eye(k_count)[anchors[anchored]]
        row_total[anchored] = log_joint[anchored, anchors[anchored]]
    entropy_terms = resp * np.log(np.maximum(resp, 1e-300))
    if layout.weight is not None:  # a row of weight w counts as w patients
        resp = resp * layout.weight[:, None]
        row_total = row_total * layout.weight
        entropy_terms = entropy_terms * layout.weight[:, None]
    stats = _Stats(resp.sum(axis=0), np.einsum("rk,rkd->kd", resp, filled),
                   np.stack([(filled[:, k] * resp[:, k, None]).T @ filled[:, k]
                             for k in range(k_count)]),
                   float(row_total.sum()),
                   -float(entropy_terms.sum()))
    per_pattern = np.zeros((len(layout.patterns), k_count))
    np.add.at(per_pattern, pattern, resp)
    for k in range(k_count):
        stats.squares[k] += np.einsum("p,pde->de", per_pattern[:, k],
                                      inverses[0 if tied else k][2])
    for rows, k, change in corrections:
        stats.squares[k] += np.einsum("r,rde->de", resp[rows, k], change)
    return log_joint, stats


def _m_step(stats: _Stats, covariance: str, reg: float) -> tuple[np.ndarray, ...]:
    counts = np.maximum(stats.counts, 1e-10)
    means = stats.sums / counts[:, None]
    scatter = stats.squares - counts[:, None, None] * np.einsum("kd,ke->kde", means, means)
    d = means.shape[1]
    if covariance == "tied":
        pooled = scatter.sum(axis=0) / counts.sum()
        covariances = np.broadcast_to(pooled, scatter.shape).copy()
    else:
        covariances = scatter / counts[:, None, None]
    covariances = 0.5 * (covariances + covariances.transpose(0, 2, 1)) + reg * np.eye(d)
    return counts / counts.sum(), means, covariances


def log_joint(mixture: Mixture, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """log P(class, a row's intervals) for every row: (rows, K), the classes' softmax logits."""
    return _pattern_pass(_Layout(low, high), mixture, None, want_stats=False)[0]


def log_posterior(mixture: Mixture, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """log P(class | a row's intervals) for every row: (rows, K)."""
    joint = log_joint(mixture, low, high)
    return joint - logsumexp(joint, axis=1, keepdims=True)


def _pattern_log_joint(mixture: Mixture, k: int, seen: np.ndarray, x: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Class k's log joint density of rows `x` measured on `seen` only, and the precision
    of that marginal: the pattern's quadratic logit and its matrix."""
    covariance = mixture.covariances[k][np.ix_(seen, seen)]
    precision = np.linalg.inv(covariance)
    centred = x - mixture.means[k, seen]
    log_det = np.linalg.slogdet(covariance)[1]
    quadratic = np.einsum("rd,de,re->r", centred, precision, centred)
    return (np.log(max(mixture.weights[k], 1e-300))
            - 0.5 * (len(seen) * _LOG_2PI + log_det + quadratic)), precision


def quadratic_shapley(mixture: Mixture, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact interventional Shapley values of every class's log joint density (its softmax
    logit) per marker against one baseline patient, the mixture's mean z: (rows, K, D), and
    the base, each class's logit at z with every marker measured: (K,).

    For the rows measured on O, class k's logit is quadratic, l(v) = c + b'v + v'Av with
    A = -P/2, b = P mu (P the precision of the marginal on O), and the game v(S) = l(x_S, z_rest)
    has the closed form phi_i = (x_i - z_i) (b + A (x + z))_i = (x_i - z_i) (P (mu - (x + z)/2))_i.
    What measuring only O changes at the baseline, l_O(z_O) - l_full(z), is shared equally by
    the unmeasured markers (they are not in l_O's game: a convention, stated). The values add up
    to each row's logit exactly: `x` holds model-scale points with NaN where not measured.
    """
    x = np.asarray(x, dtype=float)
    n, d = x.shape
    baseline = mixture.weights @ mixture.means
    everything = np.arange(d)
    base = np.array([_pattern_log_joint(mixture, k, everything, baseline[None])[0][0]
                     for k in range(mixture.n_classes)])
    values = np.zeros((n, mixture.n_classes, d))
    measured = np.isfinite(x)
    patterns, inverse = np.unique(measured, axis=0, return_inverse=True)
    for g, pattern in enumerate(patterns):
        rows = np.flatnonzero(inverse.ravel() == g)
        seen, hidden = np.flatnonzero(pattern), np.flatnonzero(~pattern)
        xs, zs = x[np.ix_(rows, seen)], baseline[seen]
        for k in range(mixture.n_classes):
            if len(seen):
                at_baseline, precision = _pattern_log_joint(mixture, k, seen, zs[None])
                gradient = (mixture.means[k, seen] - 0.5 * (xs + zs)) @ precision
                values[np.ix_(rows, [k], seen)] = ((xs - zs) * gradient)[:, None, :]
                at_baseline = at_baseline[0]
            else:
                at_baseline = np.log(max(mixture.weights[k], 1e-300))
            if len(hidden):
                values[np.ix_(rows, [k], hidden)] = (at_baseline - base[k]) / len(hidden)
    return values, base


def posterior(mixture: Mixture, frame: Any,
              censored: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """P(class | markers) for every row of a cohort, in `mixture.classes` order."""
    low, high = intervals(frame, mixture.columns, censored)
    return np.exp(log_posterior(mixture, low, high))


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Each row's posterior entropy in nats (0: certain; log K: no idea)."""
    p = np.clip(probabilities, 1e-300, 1.0)
    return -(probabilities * np.log(p)).sum(axis=1)


# --- fitting --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitResult:
    """One EM fit: the mixture and how well it fits (BIC, ICL: lower is better)."""

    mixture: Mixture
    log_likelihood: float
    n_rows: float  # patients (the weights' sum when rows are weighted)
    iterations: int
    converged: bool
    entropy_sum: float

    @property
    def bic(self) -> float:
        return -2 * self.log_likelihood + self.mixture.n_parameters() * np.log(self.n_rows)

    @property
    def icl(self) -> float:
        """BIC plus twice the classification entropy: penalises classes that overlap."""
        return self.bic + 2 * self.entropy_sum

    @property
    def relative_entropy(self) -> float:
        """1 - entropy / (n log K): 1 when every patient's class is certain (the latent-class
        literature's 'entropy')."""
        k = self.mixture.n_classes
        return 1.0 - self.entropy_sum / (self.n_rows * np.log(k)) if k > 1 else 1.0


def _start(low: np.ndarray, high: np.ndarray, resp: np.ndarray, columns: tuple[str, ...],
           covariance: str, reg: float) -> Mixture:
    """A mixture from starting responsibilities: weighted means and variances of what was
    measured (a censored cell at its bound), correlations left to EM."""
    point = np.where(np.isfinite(low), low, high)
    measured = np.isfinite(point)
    values = np.where(measured, point, 0.0)
    counts = resp.T @ measured
    means = (resp.T @ values) / np.maximum(counts, 1e-10)
    overall = values.sum(axis=0) / np.maximum(measured.sum(axis=0), 1)
    means = np.where(counts > 0, means, overall)
    spread = np.where(measured, (values - overall) ** 2, 0.0).sum(axis=0) / np.maximum(
        measured.sum(axis=0) - 1, 1)
    k_count = resp.shape[1]
    covariances = np.broadcast_to(np.diag(spread + reg), (k_count, len(columns),
                                                          len(columns))).copy()
    weights = resp.sum(axis=0) / resp.sum()
    return Mixture(columns, tuple(f"class {i + 1}" for i in range(k_count)), weights, means,
                   covariances, covariance)


def _kmeans_resp(low: np.ndarray, high: np.ndarray, k_count: int,
                 rng: np.random.Generator) -> np.ndarray:
    """Hard starting classes from k-means++ on standardised values (missing at the mean)."""
    from scipy.cluster.vq import kmeans2

    point = np.where(np.isfinite(low), low, high)
    centre = np.nanmean(np.where(np.isfinite(point), point, np.nan), axis=0)
    scale = np.nanstd(np.where(np.isfinite(point), point, np.nan), axis=0)
    z = np.where(np.isfinite(point), (point - centre) / np.where(scale > 0, scale, 1.0), 0.0)
    _, label = kmeans2(z, k_count, minit="++", seed=rng, iter=20)
    return np.eye(k_count)[label]


def _em(layout: _Layout, mixture: Mixture, anchors: np.ndarray | None, max_iter: int,
        tol: float, reg: float) -> tuple[Mixture, int, bool, float]:
    """EM steps from `mixture` until the mean log-likelihood per row improves by less than
    `tol` (or `max_iter` steps); also returns the log-likelihood of the last E-step (of the
    step before the returned mixture: EM never lowers it, so it ranks starts)."""
    previous = -np.inf
    for iteration in range(1, max_iter + 1):
        _, stats = _pattern_pass(layout, mixture, anchors, want_stats=True)
        weights, means, covariances = _m_step(stats, mixture.covariance, reg)
        mixture = Mixture(mixture.columns, mixture.classes, weights, means, covariances,
                          mixture.covariance)
        per_row = stats.log_likelihood / stats.counts.sum()
        if per_row - previous < tol:
            return mixture, iteration, True, stats.log_likelihood
        previous = per_row
    return mixture, max_iter, False, stats.log_likelihood


def fit_mixture(low: np.ndarray, high: np.ndarray, columns: Sequence[str], n_classes: int,
                covariance: str = "tied", n_init: int = 3, seed: int = 0,
                starts: Sequence[np.ndarray] = (), anchors: np.ndarray | None = None,
                max_iter: int = 500, tol: float = 1e-5, short_iter: int = 10,
                reg: float = REG_COVAR, sample_weight: np.ndarray | None = None) -> FitResult:
    """EM from several starts: `n_init` k-means++ classings and any given starting
    responsibilities (rows, K). Each start runs `short_iter` steps; the one with the highest
    likelihood then runs to convergence (the short-runs strategy of Biernacki et al. 2003).
    `anchors`: per row a class index fixed by a label, or -1; `sample_weight`: a row of weight
    w counts as w patients (soft labels as weighted anchored copies of each patient)."""
    columns = tuple(columns)
    check_fittable(low, high, columns, n_classes, covariance)
    rng = np.random.default_rng(seed)
    layout = _Layout(low, high, sample_weight)
    weight = np.ones(len(low)) if sample_weight is None else np.asarray(sample_weight, float)
    tries = [*starts, *(_kmeans_resp(low, high, n_classes, rng) for _ in range(n_init))]
    if anchors is not None and (anchors >= 0).any():
        # labelled rows start (and stay) in their class: one start from them alone, and the
        # other starts' classes permuted to agree with them best
        labelled = anchors >= 0
        one_hot = np.eye(n_classes)[np.maximum(anchors, 0)] * labelled[:, None]
        tries = [one_hot, *(np.where(labelled[:, None], one_hot,
                                     start[:, align(one_hot[labelled], start[labelled])])
                            for start in tries)]
    short = [_em(layout, _start(low, high, start * weight[:, None], columns, covariance, reg),
                 anchors, short_iter, tol, reg) for start in tries]
    best = max(short, key=lambda run: run[3])[0]
    mixture, iterations, converged, _ = _em(layout, best, anchors, max_iter, tol, reg)
    _, stats = _pattern_pass(layout, mixture, anchors, want_stats=True)
    return FitResult(mixture, stats.log_likelihood, float(weight.sum()), short_iter + iterations,
                     converged, stats.entropy)


def check_fittable(low: np.ndarray, high: np.ndarray, columns: Sequence[str], n_classes: int,
                   covariance: str) -> None:
    """Stop with one clear message when a cohort cannot identify the mixture."""
    if covariance not in COVARIANCES:
        raise LatentError(f"covariance '{covariance}' is not one of {', '.join(COVARIANCES)}")
    measured = np.isfinite(low) | np.isfinite(high)
    never = [c for c, seen in zip(columns, measured.any(axis=0), strict=True) if not seen]
    if never:
        raise LatentError(f"marker(s) {', '.join(never)} never measured in the cohort: leave "
                          "them out with [features] exclude, or add patients who have them")
    parameters = n_parameters(n_classes, len(columns), covariance)
    if len(low) < parameters:
        raise LatentError(
            f"{len(low)} patients are fewer than the {parameters} parameters of a "
            f"{n_classes}-class {covariance} mixture over {len(columns)} markers: add "
            "patients or choose fewer markers ([features] markers)"
            + ("" if covariance == "tied" else ", or share one covariance (tied)"))


def bic_sweep(low: np.ndarray, high: np.ndarray, columns: Sequence[str],
              k_range: tuple[int, int] = K_RANGE, covariance: str = "tied", n_init: int = 3,
              seed: int = 0, starts: Mapping[int, Sequence[np.ndarray]] | None = None,
              ) -> dict[int, FitResult]:
    """The best fit for each class count in `k_range` (inclusive)."""
    starts = starts or {}
    return {k: fit_mixture(low, high, columns, k, covariance, n_init, seed + k,
                           starts.get(k, ()))
            for k in range(k_range[0], k_range[1] + 1)}


# --- naming ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Naming:
    """Which class is which phenotype, and the profile scores that decided it."""

    order: tuple[int, ...]  # component index for each of PHENOTYPES
    scores: dict[str, dict[str, float]] = field(default_factory=dict)  # class -> phenotype -> score
    used: dict[str, tuple[str, ...]] = field(default_factory=dict)  # phenotype -> markers used


def name_classes(mixture: Mixture) -> Naming:
    """Match a 3-class mixture's components to the phenotypes from their profiles alone.

    Each class mean is standardised by the marker's spread across the whole mixture; a
    phenotype's score for a class is the mean of direction * standardised mean over the markers
    of its definition (`PROFILE_DEFINITIONS`) the mixture has; unclassified scores minus the
    other two (the least abnormal). The one-to-one assignment maximising the total score wins.
    """
    if mixture.n_classes != len(PHENOTYPES):
        raise LatentError(f"naming needs {len(PHENOTYPES)} classes, got {mixture.n_classes}")
    weights = mixture.weights
    centre = weights @ mixture.means
    within = np.einsum("k,kdd->d", weights, mixture.covariances)
    between = weights @ (mixture.means - centre) ** 2
    z = (mixture.means - centre) / np.sqrt(within + between)
    score = np.zeros((mixture.n_classes, len(PHENOTYPES)))
    used: dict[str, tuple[str, ...]] = {}
    for p, phenotype in enumerate(PHENOTYPES):
        definition = PROFILE_DEFINITIONS.get(phenotype)
        if definition is None:
            continue
        markers = tuple(m for m in definition if m in mixture.columns)
        if not markers:
            raise LatentError(
                f"naming {phenotype} needs one of {', '.join(definition)} among the mixture's "
                "markers: add it to [features] markers")
        used[phenotype] = markers
        score[:, p] = np.mean([definition[m] * z[:, mixture.columns.index(m)]
                               for m in markers], axis=0)
    score[:, PHENOTYPES.index(UNCLASSIFIED)] = -score.sum(axis=1)
    rows, cols = linear_sum_assignment(-score)
    order = tuple(int(rows[np.argsort(cols)][p]) for p in range(len(PHENOTYPES)))
    scores = {f"class {k + 1}": {p: round(float(score[k, j]), 3)
                                 for j, p in enumerate(PHENOTYPES)}
              for k in range(mixture.n_classes)}
    return Naming(order, scores, used)


def named(mixture: Mixture) -> tuple[Mixture, Naming]:
    """The mixture reordered to PHENOTYPES and named by `name_classes`."""
    naming = name_classes(mixture)
    return mixture.renamed(PHENOTYPES, naming.order), naming


def align(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """The permutation of `other`'s classes that best matches `reference`'s (both (rows, K)
    posteriors on the same patients): used to compare bootstrap refits."""
    overlap = reference.T @ other
    _, cols = linear_sum_assignment(-overlap)
    return cols



def stability(low: np.ndarray, high: np.ndarray, columns: Sequence[str], proba: np.ndarray,
              n_refits: int, covariance: str = "tied", n_init: int = 3, seed: int = 0,
              anchors: np.ndarray | None = None) -> dict[str, Any]:
    """Refit on `n_refits` bootstrap resamples by the same procedure (as many restarts, the
    same anchors), align each refit's classes to `proba`'s (the fit's posterior), and count the
    patients who keep their class."""
    rng = np.random.default_rng(seed)
    assigned = proba.argmax(axis=1)
    kept = []
    for _ in range(n_refits):
        rows = rng.integers(0, len(low), len(low))
        refit = fit_mixture(low[rows], high[rows], columns, proba.shape[1], covariance,
                            n_init=n_init, seed=int(rng.integers(1 << 31)),
                            anchors=None if anchors is None else anchors[rows])
        again = np.exp(log_posterior(refit.mixture, low, high))
        again = again[:, align(proba, again)]
        kept.append(float(np.mean(again.argmax(axis=1) == assigned)))
    if not kept:
        return {"refits": 0}
    return {"refits": len(kept), "kept_mean": float(np.mean(kept)),
            "kept_min": float(np.min(kept))}
