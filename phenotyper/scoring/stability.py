"""Repeated samples of a patient in a scored cohort: how often the phenotype stays the same
from one sample to the next (model and rule side by side, against the published 88.3% for the
rule), and phenotype counts per patient (first or last sample) rather than per row.

Gathered block by block: per row only a 64-bit hash of the patient id, the sample time and two
one-byte phenotype codes are kept (18 bytes a row), so a cohort of millions still fits."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from phenotyper.cohort import sample_days
from phenotyper.contract import PHENOTYPES
from phenotyper.immunosep import PUBLISHED_RULE_STABILITY

PER_PATIENT_MODES = ("all", "first", "last")  # what the summary counts: rows, or one per patient
_NO_CALL = -1  # not scored, or the rule indeterminate


def _codes(calls: Any) -> np.ndarray:
    return pd.Categorical(np.asarray(calls, dtype=object), categories=PHENOTYPES).codes.astype(
        np.int8)


class StabilityTally:
    """Patient ids and sample times from the input, phenotype calls from the output, both in
    row order; `report` orders each patient's samples by time."""

    def __init__(self) -> None:
        self._ids: list[np.ndarray] = []
        self._days: list[np.ndarray] = []
        self._model: list[np.ndarray] = []
        self._rule: list[np.ndarray] = []

    def add_samples(self, patient_id: pd.Series, sample_time: pd.Series | None) -> None:
        self._ids.append(pd.util.hash_array(patient_id.astype(object).to_numpy()))
        missing = patient_id.isna().to_numpy()
        self._ids[-1][missing] = 0  # no id: never paired (see report)
        self._days.append(np.full(len(patient_id), np.nan) if sample_time is None
                          else sample_days(sample_time))

    def add_calls(self, phenotype: Any, rule_phenotype: Any) -> None:
        self._model.append(_codes(phenotype))
        self._rule.append(_codes(rule_phenotype))

    def report(self, per_patient: str) -> dict[str, Any]:
        ids = np.concatenate(self._ids) if self._ids else np.empty(0, np.uint64)
        days = np.concatenate(self._days) if self._days else np.empty(0)
        model = np.concatenate(self._model) if self._model else np.empty(0, np.int8)
        rule = np.concatenate(self._rule) if self._rule else np.empty(0, np.int8)
        return phenotype_stability(ids, days, model, rule, per_patient)


def phenotype_stability(ids: np.ndarray, days: np.ndarray, model: np.ndarray, rule: np.ndarray,
                        per_patient: str = "all") -> dict[str, Any]:
    """Consecutive samples of a patient (same id, ordered by day; id 0, a NaN day or the same
    day twice never pairs): the share that kept the model's phenotype and the rule's, each over
    the pairs where both samples got a call. `per_patient` first/last: phenotype counts over each
    patient's first or last sample (row order breaks ties and orders samples without a time;
    a row without an id counts on its own)."""
    rows = np.arange(len(ids))
    order = np.lexsort((rows, np.nan_to_num(days, nan=np.inf), ids))
    same = (ids[order][1:] == ids[order][:-1]) & (ids[order][1:] != 0)
    timed = np.isfinite(days[order])
    # two samples at the same time are a duplicate_id issue, not a sequence
    pair = same & timed[1:] & timed[:-1] & (days[order][1:] != days[order][:-1])
    earlier, later = order[:-1][pair], order[1:][pair]

    def kept(codes: np.ndarray) -> dict[str, Any]:
        called = (codes[earlier] != _NO_CALL) & (codes[later] != _NO_CALL)
        n = int(called.sum())
        return {"pairs": n, "kept_share": float((codes[earlier] == codes[later])[called].mean())
                if n else None}

    out: dict[str, Any] = {
        "pairs": int(pair.sum()),
        "patients_with_repeats": len(np.unique(ids[later])),
        "model": kept(model), "rule": kept(rule),
        "published_rule_kept_share": PUBLISHED_RULE_STABILITY,
        "per_patient": per_patient,
    }
    if per_patient != "all":
        starts = np.r_[True, ~same] if len(ids) else np.empty(0, bool)
        ends = np.r_[~same, True] if len(ids) else np.empty(0, bool)
        chosen = order[starts if per_patient == "first" else ends]
        out["patients"] = len(chosen)
        out["phenotype_counts"] = _counts(model[chosen], "not scored")
        out["rule_phenotype_counts"] = _counts(rule[chosen], "indeterminate")
    return out


def _counts(codes: np.ndarray, no_call: str) -> dict[str, int]:
    names = [*PHENOTYPES, no_call]
    tally = np.bincount(np.where(codes == _NO_CALL, len(PHENOTYPES), codes),
                        minlength=len(names))
    return {name: int(count) for name, count in zip(names, tally, strict=True) if count}
