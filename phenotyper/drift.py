"""The training cohort's profile, carried in the packaged model so a new site's input can be
compared with what the model learned from.

Only aggregates of at least a tenth of the measured patients are kept: the inner decile edges,
counts, missingness and phenotype shares. No minimum, maximum or extreme quantile, since those
are single patients' values.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import chi2, kstwobign, norm

from phenotyper.contract import PHENOTYPES
from phenotyper.panel import PANEL

DECILES = np.linspace(0.1, 0.9, 9)


def training_profile(frame: pd.DataFrame, features: Sequence[str], predicted: Sequence[str],
                     cohort_sha256: str, synthetic: bool) -> dict[str, Any]:
    """Per numeric feature: patients, measured count, missing share, the inner decile edges
    and the share of measured training values in each bin they bound; the model's phenotype
    shares on the training patients; where the cohort came from."""
    markers = {}
    for name in features:
        if name not in PANEL or not PANEL[name].is_numeric or name not in frame:
            continue
        values = pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=float)
        measured = values[np.isfinite(values)]
        entry: dict[str, Any] = {"patients": len(values), "measured": len(measured),
                                 "missing_share": 1 - len(measured) / max(len(values), 1)}
        if len(measured) >= 10:  # a decile of fewer than one patient would be a patient
            edges = np.unique(np.quantile(measured, DECILES))
            bins = np.bincount(np.searchsorted(edges, measured, side="right"),
                               minlength=len(edges) + 1)
            entry["decile_edges"] = edges.tolist()
            entry["bin_shares"] = (bins / len(measured)).tolist()
        markers[name] = entry
    predicted = pd.Series(list(predicted), dtype=object)
    return {"patients": len(frame), "cohort_sha256": cohort_sha256, "synthetic": synthetic,
            "phenotype_shares": {p: float((predicted == p).mean()) if len(predicted) else 0.0
                                 for p in PHENOTYPES},
            "markers": markers}


# Thresholds a shift is judged by. At a million rows every difference is "significant", so no
# p-values: PSI above 0.25 is the conventional "major shift" (0.1-0.25 "moderate"); the KS
# distance is read at the training decile edges (a lower bound of the full KS distance).
PSI_THRESHOLD = 0.25
KS_THRESHOLD = 0.1
MISSING_SHIFT_THRESHOLD = 0.1  # absolute change in the share of patients without the marker
# A small site's measures scatter beyond those thresholds by chance alone (PSI on 28 rows
# often exceeds 1): each threshold is raised to what sampling noise of both sides reaches with
# probability 1% (PSI as Pearson chi-square / n, the two-sample KS critical value, a binomial
# share), so a flag means a shift larger than both the threshold and the noise.
NOISE_QUANTILE = 0.99
_SMOOTHING = 0.5  # added to each input bin's count in PSI (Jeffreys): an empty bin is no log 0
_MIN_PER_BIN = 5  # below this many measured values per bin PSI is not judged (chi-square rule)


class DriftTally:
    """Counts of an input's values in the training profile's bins, per site, block by block
    (flat memory whatever the input's size)."""

    def __init__(self, profile: dict[str, Any]) -> None:
        self.profile = profile
        self.markers = {name: np.array(m["decile_edges"]) for name, m in
                        profile.get("markers", {}).items() if "decile_edges" in m}
        self.counts: dict[str, dict[str, np.ndarray]] = {}  # site -> marker -> bins + missing

    def add(self, data: pd.DataFrame, sites: pd.Series | None = None) -> None:
        """Tally one block of panel columns; `sites` labels each row (None: one site)."""
        codes, names = (np.zeros(len(data), dtype=int), ["(no site)"]) if sites is None else (
            pd.factorize(sites.fillna("(no site)").astype(str)))
        for name, edges in self.markers.items():
            width = len(edges) + 2  # the bins, then "missing"
            if name in data:
                values = pd.to_numeric(data[name], errors="coerce").to_numpy(dtype=float)
                where = np.where(np.isfinite(values),
                                 np.searchsorted(edges, values, side="right"), width - 1)
            else:
                where = np.full(len(data), width - 1)
            table = np.bincount(codes * width + where, minlength=len(names) * width
                                ).reshape(len(names), width)
            for site, counts in zip(names, table, strict=True):
                held = self.counts.setdefault(str(site), {})
                held[name] = held.get(name, 0) + counts

    def report(self, predicted_shares: dict[str, float] | None = None) -> dict[str, Any]:
        """Per marker, overall and per site, the markers that moved most first: PSI on the
        training deciles, KS distance at their edges, missingness shift, share outside the
        training deciles' range; and the predicted phenotype shares against training."""
        overall: dict[str, np.ndarray] = {}
        for held in self.counts.values():
            for name, counts in held.items():
                overall[name] = overall.get(name, 0) + counts
        out: dict[str, Any] = {
            "profile_sha256": profile_digest(self.profile),
            "thresholds": {"psi": PSI_THRESHOLD, "ks_at_deciles": KS_THRESHOLD,
                           "missing_shift": MISSING_SHIFT_THRESHOLD},
            "overall": self._markers(overall),
            "by_site": {site: self._markers(held) for site, held in sorted(self.counts.items())}
            if len(self.counts) > 1 else {},
        }
        if predicted_shares is not None:
            out["phenotype_shares"] = {
                p: {"training": share, "input": predicted_shares.get(p, 0.0)}
                for p, share in self.profile.get("phenotype_shares", {}).items()}
        return out

    def _markers(self, held: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        rows = [compare(self.profile["markers"][name], counts) for name, counts in held.items()]
        for row, name in zip(rows, held, strict=True):
            row["marker"] = name
        return sorted(rows, key=lambda row: -(row["psi"] if row["psi"] is not None else -1))


def compare(trained: dict[str, Any], counts: np.ndarray) -> dict[str, Any]:
    """One marker's shift: `counts` are the input's patients per training bin, then missing;
    `trained` the reference's bin shares, missing share and sizes (`measured`, `patients`)."""
    counts = np.asarray(counts)
    measured = counts[:-1].sum()
    rows = counts.sum()
    expected = np.array(trained["bin_shares"])
    missing_share = float(counts[-1] / rows) if rows else None
    result: dict[str, Any] = {
        "patients": int(rows), "bin_counts": counts.astype(int).tolist(),
        "psi": None, "ks_at_deciles": None, "outside_share": None,
        "outside_share_training": float(expected[0] + expected[-1]),
        "missing_share": missing_share, "missing_share_training": trained["missing_share"],
        "missing_shift": None if missing_share is None else
        missing_share - trained["missing_share"]}
    if measured:
        actual = counts[:-1] / measured
        a = (counts[:-1] + _SMOOTHING) / (measured + _SMOOTHING * len(expected))
        e = np.maximum(expected, _SMOOTHING / max(trained.get("measured", 1), 1))
        result.update(
            psi=float(((a - e) * np.log(a / e)).sum()),
            ks_at_deciles=float(np.abs(np.cumsum(actual)[:-1] - np.cumsum(expected)[:-1]).max()),
            outside_share=float(actual[0] + actual[-1]))
    result["limits"] = _limits(trained, len(expected), measured, rows)
    result["beyond_threshold"] = [name for name, value in (
        ("psi", result["psi"]), ("ks_at_deciles", result["ks_at_deciles"]),
        ("missing_shift", None if result["missing_shift"] is None
         else abs(result["missing_shift"])))
        if value is not None and result["limits"][name] is not None
        and value > result["limits"][name]]
    return result


def _limits(trained: dict[str, Any], bins: int, measured: int, rows: int
            ) -> dict[str, float | None]:
    """Each threshold, raised to its sampling-noise level at these sizes (NOISE_QUANTILE);
    None where too few values to judge (PSI below _MIN_PER_BIN values per bin)."""
    def inverse(n: float) -> float:
        return 1 / n if n else np.inf

    both_measured = inverse(measured) + inverse(trained.get("measured", np.inf))
    both_rows = inverse(rows) + inverse(trained.get("patients", np.inf))
    p = trained["missing_share"]
    psi = (None if measured < _MIN_PER_BIN * bins else
           max(PSI_THRESHOLD, float(chi2.ppf(NOISE_QUANTILE, bins - 1) * both_measured)))
    return {
        "psi": psi,
        "ks_at_deciles": max(KS_THRESHOLD,
                             float(kstwobign.ppf(NOISE_QUANTILE) * np.sqrt(both_measured))),
        "missing_shift": max(MISSING_SHIFT_THRESHOLD, float(
            norm.ppf(1 - (1 - NOISE_QUANTILE) / 2) * np.sqrt(p * (1 - p) * both_rows)))}


def flagged(markers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The markers beyond a threshold, in the order given (the most moved first)."""
    return [marker for marker in markers if marker["beyond_threshold"]]


def sites_most_moved(drift: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(site, its flagged markers) for each site with any, the site whose PSI moved most
    first: what the console and the report list."""
    sites = [(site, flagged(markers)) for site, markers in drift["by_site"].items()]
    return sorted(((site, markers) for site, markers in sites if markers),
                  key=lambda item: -max(m["psi"] or 0 for m in item[1]))


def profile_digest(profile: dict[str, Any]) -> str:
    """SHA-256 of a training profile: two runs' bin counts compare only on the same bins."""
    return hashlib.sha256(json.dumps(profile, sort_keys=True).encode()).hexdigest()


class DriftError(ValueError):
    """Two runs' drift that cannot be compared; the message says why."""


def between_runs(earlier: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """The later run's input against the earlier one's (this month against last), per marker,
    overall and per site present in both, from the bin counts both tallied on the same training
    profile's deciles; the same measures and thresholds as against training."""
    if earlier.get("profile_sha256") != later.get("profile_sha256"):
        raise DriftError("the two runs used models with different training profiles, so their "
                         "bins differ; compare runs scored by the same model (or versions "
                         "recalibrated from it, which keep its profile)")

    def scope(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
        reference = {row["marker"]: row for row in old}
        rows = []
        for row in new:
            before = reference.get(row["marker"])
            counts = np.asarray(before["bin_counts"] if before else [0], dtype=float)
            measured = counts[:-1].sum()
            if not measured:  # nothing measured earlier: no bins to compare with
                continue
            as_trained = {"bin_shares": (counts[:-1] / measured).tolist(),
                          "missing_share": float(counts[-1] / counts.sum()),
                          "measured": measured, "patients": counts.sum()}
            shift = compare(as_trained, np.asarray(row["bin_counts"]))
            rows.append({"marker": row["marker"], **{
                key.replace("_training", "_earlier"): value for key, value in shift.items()}})
        return sorted(rows, key=lambda row: -(row["psi"] if row["psi"] is not None else -1))

    sites = sorted(set(earlier["by_site"]) & set(later["by_site"]))
    return {"profile_sha256": later["profile_sha256"], "thresholds": later["thresholds"],
            "overall": scope(earlier["overall"], later["overall"]),
            "by_site": {site: scope(earlier["by_site"][site], later["by_site"][site])
                        for site in sites},
            "sites_only_earlier": sorted(set(earlier["by_site"]) - set(later["by_site"])),
            "sites_only_later": sorted(set(later["by_site"]) - set(earlier["by_site"]))}
