"""Models in the MLflow registry, as scoring and serving need them: where the store is, which
version an alias names, and the packaged model inside a version. Nothing of training (no
scikit-learn, no reports), so a scoring job loads only MLflow, XGBoost and the model."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from phenotyper import pyfunc_model
from phenotyper.packaged import PackagedPhenotyper

DEFAULT_STORE = "mlflow.db"  # MLflow's embedded SQLite store, in the working directory
CHAMPION_ALIAS, CHALLENGER_ALIAS = "champion", "challenger"


def configure() -> str:
    """Point MLflow at $MLFLOW_TRACKING_URI, or at ./mlflow.db; return the URI in use."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_STORE}"
    mlflow.set_tracking_uri(uri)
    return uri


def champion_version(name: str) -> str | None:
    """The registered version that holds the champion alias, if any."""
    try:
        return str(MlflowClient().get_model_version_by_alias(name, CHAMPION_ALIAS).version)
    except MlflowException:
        return None


def load_packaged(uri: str, threads: int = 1) -> PackagedPhenotyper:
    """The packaged phenotyper inside a registered pyfunc model (plots, explanations, batch
    scoring in this process)."""
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    return PackagedPhenotyper(local / "artifacts" / pyfunc_model.ARTIFACT, threads=threads)


def describe_model(uri: str) -> dict[str, str | None]:
    """The registered name, version and run id behind a model URI, and the URI pinned to that
    version (`resolved_uri`), so a long run loads the same version throughout."""
    info: dict[str, str | None] = {"uri": uri, "resolved_uri": uri, "name": None,
                                   "version": None, "run_id": None}
    client = MlflowClient()
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
                    name=version.name, version=str(version.version), run_id=version.run_id)
    elif uri.startswith("runs:/"):
        info["run_id"] = uri.removeprefix("runs:/").split("/", 1)[0]
    return info
