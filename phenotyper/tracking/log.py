"""Run logging into MLflow: the parent run, its parameters, datasets and metrics, the
packaged model and the gate's decision on the registered version."""

from __future__ import annotations

import hashlib
import json
import subprocess
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

import phenotyper
from phenotyper.contract import SKIP_ROW
from phenotyper.packaged import PackagedPhenotyper
from phenotyper.packaged.format import ARTIFACT, PYFUNC_ENTRY
from phenotyper.panel import PANEL, PATIENT_ID
from phenotyper.tracking.registry import CHALLENGER_ALIAS, CHAMPION_ALIAS

if TYPE_CHECKING:
    from phenotyper.training.results import GateDecision, LatentResult, TrainingResult

MODEL_ARTIFACT = "model"


def content_sha256(frame: pd.DataFrame) -> str:
    """SHA-256 of a table's full content (MLflow's own dataset digest reads only the head)."""
    return hashlib.sha256(frame.to_csv(index=False).encode()).hexdigest()


def git_commit() -> str:
    """The commit of the phenotyper checkout that ran, or 'unknown' outside git."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(phenotyper.__file__).parent,
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextmanager
def experiment_run(experiment_name: str, run_name: str) -> Iterator[Any]:
    """The parent run of one experiment; it ends FAILED if the block raises."""
    mlflow.set_experiment(experiment_name)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tags({"phenotyper.version": phenotyper.__version__,
                         "git.commit": git_commit()})
        yield run


def _flat_params(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    return {f"{prefix}{key}": json.dumps(value) if isinstance(value, list | dict | tuple)
            else str(value) for key, value in values.items()}


def _test_metrics(records: pd.DataFrame, phenotyper_name: str) -> dict[str, float]:
    """Held-out metrics of one phenotyper with their interval ends, as MLflow metrics."""
    rows = records[(records.phenotyper == phenotyper_name) & (records.subgroup == "all")]
    metrics = {}
    for row in rows.itertuples():
        for suffix, value in (("", row.value), ("_ci_low", row.ci_low),
                              ("_ci_high", row.ci_high)):
            if pd.notna(value):
                metrics[f"test_{row.metric}{suffix}"] = float(value)
    return metrics


def _dataset_source(result: TrainingResult) -> Any:
    """Where the cohort came from, as an MLflow dataset source: the file, or the simulator."""
    from mlflow.data.code_dataset_source import CodeDatasetSource

    if result.spec.cohort_path is not None:
        return str(Path(result.spec.cohort_path).resolve())  # MLflow resolves a local file
    return CodeDatasetSource({"phenotyper.simulate": result.cohort_source, "synthetic": "true"})


def log_training(result: TrainingResult) -> None:
    """Log a finished training's numbers into the active parent run: its parameters, the
    label reading, the training and test datasets (with their full-content SHA-256), and one
    nested run per candidate with its search and held-out metrics."""
    spec = result.spec
    records = result.benchmark.records
    mlflow.log_params(_flat_params({
        "label": spec.label, "cohort": result.cohort_source, "features": list(result.features),
        "split_by": spec.split_by, "test_size": spec.test_size, "split_seed": spec.split_seed,
        "cv_folds": spec.cv_folds, "selection_metric": spec.selection_metric,
        "rule_metric": spec.rule_metric, "champion_tolerance": spec.champion_tolerance,
        "bootstrap": spec.bootstrap, "noise_repeats": spec.noise_repeats,
        "selected": result.selected, "n_train": len(result.train), "n_test": len(result.test),
        "gate": spec.gate, "outcomes": list(spec.outcomes), "treatment": spec.treatment,
        "propensity": spec.propensity,
    }))
    mlflow.log_dict(result.labels, "labels.json")  # how the label was read, what was left out
    source = _dataset_source(result)
    for frame, context in ((result.train, "training"), (result.test, "testing")):
        with warnings.catch_warnings():  # "source can be interpreted in multiple ways"
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(frame, source=source, targets=spec.label,
                                              name=f"{spec.name}-{context}")
        mlflow.log_input(dataset, context=context,
                         tags={"sha256": content_sha256(frame), "rows": str(len(frame))})
    for kind, candidate in result.candidates.items():
        with mlflow.start_run(run_name=kind, nested=True):
            mlflow.log_params(_flat_params(candidate.best_params, "best."))
            mlflow.log_params(_flat_params(spec.candidates[kind], "grid."))
            mlflow.log_metric("cv_soft_label_log_loss" if result.latent is not None
                              else f"cv_{spec.selection_metric}", candidate.cv_score)
            for phenotype, (intercept, slope) in candidate.calibration.items():
                mlflow.log_metric(f"cv_calibration_intercept_{phenotype}", intercept)
                mlflow.log_metric(f"cv_calibration_slope_{phenotype}", slope)
            if candidate.calibration_test is not None:
                mlflow.log_metrics({
                    "cv_calibration_lr_statistic": candidate.calibration_test["statistic"],
                    "cv_calibration_p_value": candidate.calibration_test["p_value"]})
            mlflow.set_tags({"candidate": kind, "recalibrated": str(candidate.recalibrated),
                             "selected": str(kind == result.selected)})
            mlflow.log_metrics(_test_metrics(records, kind))
            mlflow.log_text(candidate.cv_table.to_csv(index=False), "cv_results.csv")
    mlflow.log_metrics(_test_metrics(records, result.selected))
    if result.latent is not None:
        log_latent(result.latent)


def log_latent(latent: LatentResult) -> None:
    """Into the active run: the latent classes' BIC over K, sizes, profiles, naming,
    stability, distillation error and (noisy-rule) the rule's estimated error rates."""
    mlflow.log_params({"supervision": latent.mode, "latent_preferred_k": latent.preferred_k,
                       "latent_covariance": latent.mixture.covariance})
    three = latent.sweep.set_index("classes").loc[3]
    mlflow.log_metrics({
        "latent_bic_k3": float(three.bic), "latent_icl_k3": float(three.icl),
        "latent_entropy_k3": float(three.entropy),
        **{f"latent_size_{p}": float(n) for p, n in latent.sizes.items()},
        **{f"latent_stability_{k}": float(v) for k, v in latent.stability.items()},
        **{f"distillation_mean_abs_error_{k}": v for k, v in latent.distillation.items()},
        **({} if latent.site_association is None
           else {"latent_site_cramers_v": latent.site_association})})
    mlflow.log_table(latent.sweep, "latent/bic_by_classes.json")
    mlflow.log_table(latent.profile.reset_index(), "latent/class_profiles.json")
    mlflow.log_dict({"order": list(latent.naming.order), "scores": latent.naming.scores,
                     "markers_used": {p: list(m) for p, m in latent.naming.used.items()},
                     "warnings": list(latent.warnings)}, "latent/naming.json")
    mlflow.log_dict(latent.mixture.as_dict(), "latent/mixture.json")
    if latent.rule_errors is not None:
        mlflow.log_table(latent.rule_errors, "latent/rule_error_rates.json")


def log_packaged_model(exported: Path, example_cohort: pd.DataFrame, features: Sequence[str],
                       registered_name: str) -> str:
    """Log an exported phenotyper as the packaged pyfunc (models-from-code, plain-data
    artifacts, phenotyper's code in `code_paths`) with an all-optional input signature;
    register it; return the new version."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import AnyType

    # Every panel column is accepted (the rule reads ferritin and HLA-DR even when the model
    # does not use them), each optional, plus the model's extra features. Types are left open:
    # MLflow refuses int64 -> float64 ("6100" in JSON would be a 400), and the model itself
    # checks every value and answers a bad one with that row's status.
    columns = [*PANEL, *(f for f in features if f not in PANEL)]
    inputs = Schema([ColSpec(AnyType(), name, required=False)
                     for name in (PATIENT_ID, *columns)])
    # The example's integer columns (SOFA, age) go in as doubles, as MLflow advises: the model
    # takes either, and an integer example makes MLflow warn on every log.
    example = example_cohort[[PATIENT_ID, *(c for c in columns if c in example_cohort)]].head(3)
    example = example.astype({c: "float64" for c in example.select_dtypes("integer").columns})
    output = PackagedPhenotyper(exported).predict(example)
    signature = ModelSignature(
        inputs=inputs, outputs=infer_signature(example, output).outputs,
        params=ParamSchema([ParamSpec("explain", "string", "predicted"),
                            ParamSpec("rejected_values", "string", SKIP_ROW)]))
    info = mlflow.pyfunc.log_model(
        name=MODEL_ARTIFACT, python_model=str(PYFUNC_ENTRY),
        artifacts={ARTIFACT: str(exported)},
        code_paths=[str(Path(phenotyper.__file__).parent)],
        signature=signature, input_example=example,
        pip_requirements=_requirements(), registered_model_name=registered_name)
    return str(info.registered_model_version)  # MLflow answers int or str by store


def _requirements() -> list[str]:
    """What the packaged model needs to load and score, pinned to what trained it (phenotyper's
    own code travels in code_paths; MLflow's inference would import it in a slow subprocess)."""
    from importlib.metadata import version

    return [f"{package}=={version(package)}" for package in
            ("mlflow", "scikit-learn", "xgboost", "numpy", "pandas", "numba")]


def record_decision(client: MlflowClient, name: str, version: str, decision: GateDecision,
                    card: str) -> None:
    """Log the model card, write the gate's decision as version tags, alias the new version
    challenger, and move champion to it only when the gate says so. Called last, after
    everything else succeeded, inside the parent run."""
    mlflow.log_text(card, "model_card.md")
    mlflow.set_tags({"gate.decision": "promoted" if decision.promote else "not promoted",
                     "registered_version": version})
    client.update_model_version(name, version, description=card)
    for key, value in decision.numbers.items():
        client.set_model_version_tag(name, version, f"gate.{key}", str(value))
    client.set_model_version_tag(name, version, "gate.decision",
                                 "promoted" if decision.promote else "not promoted")
    client.set_model_version_tag(name, version, "gate.reason", decision.reason)
    client.set_registered_model_alias(name, CHALLENGER_ALIAS, version)
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
