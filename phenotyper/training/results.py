"""What a training produces, as plain data: each tuned candidate, the whole result and the
gate's decision. Reports and tracking read these; nothing here touches MLflow."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from phenotyper.evaluate.benchmark import Benchmark
from phenotyper.latent import Mixture, Naming
from phenotyper.training.spec import ExperimentSpec


@dataclass(frozen=True)
class CandidateResult:
    """One tuned candidate: its search, its out-of-fold calibration, the refitted model."""

    kind: str
    estimator: Any
    best_params: dict[str, Any]
    cv_score: float  # the selection metric (in its own sense: log loss is lower-better)
    cv_table: pd.DataFrame  # one row per configuration tried
    calibration: dict[str, tuple[float, float]]  # phenotype -> out-of-fold (intercept, slope)
    recalibrated: bool
    calibration_test: dict[str, Any] | None = None  # calibration.CalibrationTest.as_dict()


@dataclass(frozen=True)
class LatentResult:
    """What a label-free (or partly labelled) training learned about its latent classes."""

    mode: str  # training.spec.SUPERVISION_MODES
    mixture: Mixture  # three classes, named, in PHENOTYPES order
    naming: Naming  # how the classes were matched to phenotypes (profiles alone)
    sweep: pd.DataFrame  # per class count K: log_likelihood, bic, icl, entropy, iterations
    preferred_k: int  # the K with the lowest BIC
    sizes: dict[str, int]  # training patients by most likely class
    profile: pd.DataFrame  # median of each marker (panel units) per class, training patients
    stability: dict[str, Any]  # bootstrap refits: share of patients keeping their class
    distillation: dict[str, float]  # candidate -> mean |p_candidate - posterior| on test
    site_association: float | None  # Cramer's V of class by site (None: one site)
    rule_errors: pd.DataFrame | None = None  # noisy-rule: P(latent class | rule answer)
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainingResult:
    """Everything a run produced; nothing here has touched MLflow."""

    spec: ExperimentSpec
    train: pd.DataFrame
    test: pd.DataFrame
    features: tuple[str, ...]
    candidates: dict[str, CandidateResult]
    selected: str
    benchmark: Benchmark
    cohort_source: str
    # How the label column was read (`labels.LabelReading.as_dict()`) and what was left out,
    # plus: `train_counts`/`test_counts` per phenotype, `rule_agreement` (share) and
    # `rule_agreement_n` with the ImmunoSep rule where it is determinate, and `warning` (None,
    # or why accuracy against this label cannot judge a model).
    labels: dict[str, Any] = field(default_factory=dict)
    # The learned two-marker reference (`TWO_MARKER`), judged beside the rule and the models.
    two_marker: CandidateResult | None = None
    # A training without (or with few) labels: its latent classes (None when supervised).
    latent: LatentResult | None = None


@dataclass(frozen=True)
class GateDecision:
    """Whether the new version becomes champion, why, and the numbers behind it."""

    promote: bool
    reason: str
    numbers: dict[str, float | str]
