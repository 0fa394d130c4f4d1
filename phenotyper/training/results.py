"""What a training produces, as plain data: each tuned candidate, the whole result and the
gate's decision. Reports and tracking read these; nothing here touches MLflow."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from phenotyper.evaluate.benchmark import Benchmark
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


@dataclass(frozen=True)
class GateDecision:
    """Whether the new version becomes champion, why, and the numbers behind it."""

    promote: bool
    reason: str
    numbers: dict[str, float | str]
