"""Bootstrap by patient: resampling weights and percentile intervals, given only where they
mean something (enough patients; the metric defined in nearly every resample)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd

CONFIDENCE = 0.95
# Fewer patients (resampling groups) than this: no intervals, and a warning in `meta`.
MIN_RESAMPLING_GROUPS = 10
# A metric undefined in more than this share of resamples gets no interval.
MAX_UNDEFINED_SHARE = 0.05


# --- bootstrap --------------------------------------------------------------------------------


def resampling_groups(groups: Any) -> tuple[np.ndarray, int]:
    """Group code per row and the number of groups; a row without an id is its own group.

    A missing (or blank) patient id says nothing about which rows belong together, so such a
    row is resampled alone rather than with every other row that lacks an id.
    """
    ids = pd.Series(np.asarray(groups, dtype=object))
    blank = ids.map(lambda value: isinstance(value, str) and not value.strip())
    codes, uniques = pd.factorize(ids.mask(blank))  # missing -> -1
    codes = np.asarray(codes, dtype=np.int64)
    missing = codes < 0
    codes[missing] = len(uniques) + np.arange(int(missing.sum()))
    return codes, len(uniques) + int(missing.sum())


def bootstrap_weights(
    groups: np.ndarray, n_boot: int, seed: int, max_cells: int = 4_000_000
) -> Iterator[np.ndarray]:
    """Blocks of resampling weights, (resamples x patients), resampling whole groups.

    Each resample draws as many groups as there are, with replacement; a row's weight is the
    number of times its group was drawn. A row whose group is missing (NaN, None, blank) is a
    group of its own. Blocks keep memory at `max_cells` floats.
    """
    codes, n_groups = resampling_groups(groups)
    rng = np.random.default_rng(seed)
    block = max(1, max_cells // max(len(codes), 1))
    for start in range(0, n_boot, block):
        size = min(block, n_boot - start)
        draws = rng.integers(0, n_groups, size=(size, n_groups))
        offsets = np.arange(size)[:, None] * n_groups  # one bincount for the whole block
        counts = np.bincount((draws + offsets).ravel(), minlength=size * n_groups)
        yield counts.reshape(size, n_groups)[:, codes].astype(float)


def _interval(samples: np.ndarray | None) -> tuple[float, float]:
    """Percentile interval; NaN when there are no resamples or the metric is undefined
    (NaN) in more than `MAX_UNDEFINED_SHARE` of them: dropping those resamples would bias the
    interval, which could then miss its own point estimate."""
    if samples is None:
        return np.nan, np.nan
    samples = np.atleast_1d(samples)
    finite = np.isfinite(samples)
    if not len(samples) or 1 - finite.mean() > MAX_UNDEFINED_SHARE:
        return np.nan, np.nan
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(samples[finite], [tail, 100 - tail])
    return float(low), float(high)
