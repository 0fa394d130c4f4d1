"""The training run: fit and judge (training), log and register (tracking), apply the gate,
write the benchmark report, figures and model card (report, plots). The only place these meet,
and the only place a training sets MLflow's store (`tracking.registry.using_store`)."""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

from phenotyper.drift import training_profile
from phenotyper.files import file_sha256
from phenotyper.packaged import PackagedPhenotyper
from phenotyper.packaged.format import ARTIFACT
from phenotyper.plots import SAVE_KWARGS
from phenotyper.plots.latent import profile_figure
from phenotyper.plots.shap import cohort_figures, waterfall_figure
from phenotyper.report.benchmark import write_benchmark
from phenotyper.report.card import model_card
from phenotyper.simulate import is_synthetic
from phenotyper.tracking.log import (
    experiment_run,
    log_packaged_model,
    log_training,
    record_decision,
)
from phenotyper.tracking.registry import (
    CHAMPION_ALIAS,
    champion_version,
    load_model,
    store_uri,
    using_store,
)
from phenotyper.training.export import export
from phenotyper.training.fit import fit_and_evaluate
from phenotyper.training.gate import promotion_decision
from phenotyper.training.label_free import fit_label_free
from phenotyper.training.results import GateDecision, TrainingResult
from phenotyper.training.spec import SUPERVISED, ExperimentSpec


@dataclass(frozen=True)
class TrainingOutcome:
    """What `train` did: the run, the registered version and the gate's decision."""

    run_id: str
    experiment_id: str
    model_name: str
    version: str
    decision: GateDecision
    result: TrainingResult
    tracking_uri: str
    card: str


def train(spec: ExperimentSpec, tracking_uri: str | None = None) -> TrainingOutcome:
    """Run one experiment under MLflow: train, judge, register, and apply the promotion gate.

    `tracking_uri`: the store ($MLFLOW_TRACKING_URI or ./mlflow.db when not given). The current
    champion (if any) is judged on the same held-out patients. Aliases move only after
    everything else succeeded, so a failed run leaves them where they were.
    """
    uri = tracking_uri or store_uri()
    with using_store(uri) as client:
        current = champion_version(client, spec.registered_model)
        champion = None
        if current is not None:
            champion = load_model(f"models:/{spec.registered_model}@{CHAMPION_ALIAS}")
        with experiment_run(spec.name, run_name=spec.name) as run:
            fit = fit_and_evaluate if spec.supervision == SUPERVISED else fit_label_free
            result = fit(spec, champion)
            log_training(result)
            version = _log_reports_and_model(result)
            decision = promotion_decision(result, current)
            card = model_card(result, version, decision)
            record_decision(client, spec.registered_model, version, decision, card)
    return TrainingOutcome(run.info.run_id, run.info.experiment_id, spec.registered_model,
                           version, decision, result, uri, card)


def _log_reports_and_model(result: TrainingResult) -> str:
    """Into the active run: the benchmark report, the SHAP figures of the selected model on the
    test patients, and the packaged model, registered; returns the new version."""
    with tempfile.TemporaryDirectory() as folder:
        write_benchmark(result.benchmark, Path(folder), source=result.cohort_source)
        mlflow.log_artifacts(folder, "benchmark")
    selected = result.candidates[result.selected].estimator
    with tempfile.TemporaryDirectory() as folder:
        exported = Path(folder) / ARTIFACT
        export(selected, exported, None if result.latent is None else result.latent.mixture,
               _profile(result, selected))
        packaged = PackagedPhenotyper(exported)
        figures = {**cohort_figures(packaged, result.test),
                   "waterfall_first_test_patient.png":
                       waterfall_figure(packaged, result.test.head(1))}
        for name, figure in figures.items():
            mlflow.log_figure(figure, f"shap/{name}", save_kwargs=SAVE_KWARGS)
        if result.latent is not None:
            mlflow.log_figure(profile_figure(result.latent.profile),
                              "latent/class_profiles.png", save_kwargs=SAVE_KWARGS)
        return log_packaged_model(exported, result.test, result.features,
                                  result.spec.registered_model)


def _profile(result: TrainingResult, selected: Any) -> dict[str, Any]:
    """The training patients' profile for the package: the cohort file's SHA-256 (a simulated
    cohort has no file: the hash of its rows), and whether it is synthetic."""
    spec = result.spec
    digest = (file_sha256(spec.cohort_path) if spec.cohort_path is not None else
              hashlib.sha256(pd.util.hash_pandas_object(result.train, index=False)
                             .to_numpy().tobytes()).hexdigest())
    return training_profile(result.train, result.features, selected.predict(result.train),
                            digest, spec.preset is not None or is_synthetic(result.train))
