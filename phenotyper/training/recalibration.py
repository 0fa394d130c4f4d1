"""Local recalibration of a registered model, the pure part: on a hospital's small labelled
sample, test calibration jointly (`calibration.calibration_test`), refit the logit map only
when the test rejects (shrunk toward no change), and judge the refit on patients it did not
see (cross-fitting), so the decision to promote rests on held-out numbers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedKFold

from phenotyper.calibration import (
    CALIBRATION_ALPHA,
    SHRINKAGE_PATIENTS,
    CalibrationTest,
    MatrixScaling,
    calibration_test,
    fit_matrix_scaling,
    log_likelihood,
)
from phenotyper.contract import PHENOTYPES

CROSS_FIT_FOLDS = 5
# Fewer labelled patients of a phenotype than this and neither the test nor a held-out judgement
# of a refit means much (each fold would hold one or two of them): refused, not guessed at.
MIN_PATIENTS_PER_PHENOTYPE = 10


class RecalibrationError(ValueError):
    """A local sample that cannot be recalibrated on; the message says what it lacks."""


@dataclass(frozen=True)
class LocalRecalibration:
    """What recalibrating on a local sample found and, if the test rejected, the new map."""

    counts: dict[str, int]  # labelled, scored patients by phenotype
    before: CalibrationTest  # the model as it is, on every local patient
    mapping: MatrixScaling | None  # fitted on every local patient; None when not refitted
    held_out: dict[str, float] | None  # cross-fitted: log loss and test statistic, before/after

    @property
    def refit(self) -> bool:
        return self.mapping is not None

    @property
    def improves(self) -> bool:
        """Held-out log loss and calibration statistic both better than before."""
        return bool(self.held_out and
                    self.held_out["log_loss_after"] < self.held_out["log_loss_before"] and
                    self.held_out["statistic_after"] < self.held_out["statistic_before"])

    def as_dict(self) -> dict:
        return {"counts": self.counts, "test_before": self.before.as_dict(),
                "refit": self.refit, "improves": self.improves,
                "map": None if self.mapping is None else self.mapping.as_dict(),
                "held_out": self.held_out, "shrinkage_patients": SHRINKAGE_PATIENTS}


def recalibrate(codes: np.ndarray, proba: np.ndarray, seed: int = 0,
                alpha: float = CALIBRATION_ALPHA) -> LocalRecalibration:
    """Test a model's probabilities (n, K) against local labels (codes 0..K-1, PHENOTYPES
    order) and, when miscalibrated, fit the shrunk map and its cross-fitted judgement."""
    codes = np.asarray(codes, dtype=np.int64)
    counts = {p: int((codes == k).sum()) for k, p in enumerate(PHENOTYPES)}
    fewest = min(counts.values())
    if fewest < MIN_PATIENTS_PER_PHENOTYPE:
        lacking = ", ".join(f"{p} {n}" for p, n in counts.items()
                            if n < MIN_PATIENTS_PER_PHENOTYPE)
        raise RecalibrationError(
            f"recalibration needs at least {MIN_PATIENTS_PER_PHENOTYPE} labelled patients of "
            f"every phenotype the model scored ({lacking}): fewer cannot show whether the "
            "model is off, nor judge a fix on held-out patients. Add labelled patients, or "
            "recode the label with [labels] in a mapping file")
    before = calibration_test(codes, proba, alpha)
    if not before.miscalibrated:
        return LocalRecalibration(counts, before, None, None)
    folds = StratifiedKFold(n_splits=CROSS_FIT_FOLDS, shuffle=True, random_state=seed)
    after = np.empty_like(proba)
    for fit_rows, held_rows in folds.split(proba, codes):
        after[held_rows] = fit_matrix_scaling(codes[fit_rows], proba[fit_rows]).apply(
            proba[held_rows])
    n = len(codes)
    held_out = {"folds": folds.get_n_splits(),
                "log_loss_before": -log_likelihood(codes, proba) / n,
                "log_loss_after": -log_likelihood(codes, after) / n,
                "statistic_before": before.statistic,
                "statistic_after": calibration_test(codes, after, alpha).statistic}
    return LocalRecalibration(counts, before, fit_matrix_scaling(codes, proba), held_out)


def compose(mapping: MatrixScaling, calibration: dict | None, n_classes: int) -> dict:
    """The package's calibration map (`{"coef", "intercept"}` on its base logits, or None for
    none) followed by `mapping`: one linear map, so explanations stay exact."""
    outer, shift = mapping.on_logits()
    inner = (np.eye(n_classes), np.zeros(n_classes)) if calibration is None else (
        np.asarray(calibration["coef"]), np.asarray(calibration["intercept"]))
    return {"coef": (outer @ inner[0]).tolist(), "intercept": (outer @ inner[1] + shift).tolist()}
