"""Models in the MLflow registry, as scoring and serving need them: where the store is, which
version an alias names, and the packaged model inside a version. Nothing of training (no
scikit-learn, no reports), so a scoring job loads only MLflow, XGBoost and the model."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from phenotyper.contract import PHENOTYPES
from phenotyper.packaged import PackagedPhenotyper
from phenotyper.packaged.format import ARTIFACT, SPEC_FILE

DEFAULT_STORE = "mlflow.db"  # MLflow's embedded SQLite store, in the working directory
CHAMPION_ALIAS, CHALLENGER_ALIAS = "champion", "challenger"
_URI_VARIABLE = "MLFLOW_TRACKING_URI"


def store_uri() -> str:
    """The tracking store commands use: $MLFLOW_TRACKING_URI, or ./mlflow.db."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_STORE}"


@contextmanager
def using_store(uri: str) -> Iterator[MlflowClient]:
    """A client on `uri`, with MLflow's process-wide tracking URI pointing there for the block
    and restored after it.

    MLflow's fluent calls (start_run, log_model, loading models:/ URIs, spark_udf) read only
    that global; this is the one place phenotyper sets it, at the edge of a run, so two stores
    work in one process and nothing leaks out of a run. MLflow mirrors the URI into the
    environment (for subprocesses); that is restored too.
    """
    from mlflow.tracking._tracking_service import utils  # where MLflow keeps the URI set

    saved_uri, saved_env = utils._tracking_uri, os.environ.get(_URI_VARIABLE)
    mlflow.set_tracking_uri(uri)
    try:
        yield MlflowClient(tracking_uri=uri, registry_uri=uri)
    finally:
        mlflow.set_tracking_uri(saved_uri)
        if saved_env is None:
            os.environ.pop(_URI_VARIABLE, None)
        else:
            os.environ[_URI_VARIABLE] = saved_env


def champion_version(client: MlflowClient, name: str) -> str | None:
    """The registered version that holds the champion alias, if any."""
    try:
        return str(client.get_model_version_by_alias(name, CHAMPION_ALIAS).version)
    except MlflowException:
        return None


def promote(client: MlflowClient, name: str, version: str) -> str | None:
    """Move the champion alias by hand; returns the version that held it before."""
    client.get_model_version(name, version)  # raises if the version does not exist
    previous = champion_version(client, name)
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    client.set_model_version_tag(name, version, "gate.decision", "promoted by hand")
    client.set_model_version_tag(name, version, "gate.previous_champion", str(previous))
    return previous


def model_card_text(client: MlflowClient, name: str, alias: str = CHAMPION_ALIAS) -> str:
    """The model card stored with the version that holds `alias`."""
    return client.get_model_version_by_alias(name, alias).description or ""


def packaged_folder(uri: str, tracking_uri: str | None = None) -> Path:
    """A local copy of the packaged phenotyper's folder inside a registered pyfunc model."""
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=uri, tracking_uri=tracking_uri, registry_uri=tracking_uri))
    return local / "artifacts" / ARTIFACT


def package_spec(uri: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """The packaged phenotyper's plain-data spec (features, calibration, training profile)
    without loading the model: what a command needs to describe it."""
    return json.loads((packaged_folder(uri, tracking_uri) / SPEC_FILE).read_text())


def load_packaged(uri: str, threads: int = 1, tracking_uri: str | None = None
                  ) -> PackagedPhenotyper:
    """The packaged phenotyper inside a registered pyfunc model (plots, explanations, batch
    scoring in this process), from `tracking_uri`'s store (MLflow's own when not given)."""
    return PackagedPhenotyper(packaged_folder(uri, tracking_uri), threads=threads)


def describe_model(client: MlflowClient, uri: str) -> dict[str, str | None]:
    """The registered name, version, run id and registration time (UTC, ISO 8601) behind a
    model URI, and the URI pinned to that version (`resolved_uri`), so a long run loads the
    same version throughout."""
    info: dict[str, str | None] = {"uri": uri, "resolved_uri": uri, "name": None,
                                   "version": None, "run_id": None, "registered_at": None}
    if uri.startswith("models:/"):
        reference = uri.removeprefix("models:/").rstrip("/")
        if "@" in reference:
            name, alias = reference.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        elif "/" in reference:
            name, number = reference.rsplit("/", 1)
            version = client.get_model_version(name, number)
        else:
            raise MlflowException(f"give a version or an alias: models:/{reference}/VERSION or "
                                  f"models:/{reference}@champion")
        info.update(resolved_uri=f"models:/{version.name}/{version.version}",
                    name=version.name, version=str(version.version), run_id=version.run_id,
                    registered_at=datetime.fromtimestamp(
                        version.creation_timestamp / 1000, UTC).isoformat(timespec="seconds"))
    elif uri.startswith("runs:/"):
        info["run_id"] = uri.removeprefix("runs:/").split("/", 1)[0]
    return info


def load_model(uri: str) -> PyfuncPhenotyper:
    """A registered phenotyper from an MLflow model URI (models:/NAME@ALIAS, runs:/ID/model)."""
    return PyfuncPhenotyper(mlflow.pyfunc.load_model(uri))


class PyfuncPhenotyper:
    """A registered packaged model seen as a classifier, so the evaluator can judge it."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.classes_ = np.array(PHENOTYPES, dtype=object)

    def _scores(self, X: pd.DataFrame) -> pd.DataFrame:
        columns = [c for c in X.columns if c in self.model.metadata.get_input_schema()
                   .input_names()]
        return self.model.predict(X[columns], params={"explain": "none"})

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        return self._scores(X)[[f"prob_{p}" for p in PHENOTYPES]].to_numpy(dtype=float)

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        return self._scores(X)["phenotype"].to_numpy(dtype=object)
