"""Suite-wide settings: property-based tests draw the same examples on every run (fixed
seed), so CI cannot pass one day and fail the next on a newly drawn input."""

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("phenotyper", derandomize=True, print_blob=True)
settings.load_profile("phenotyper")


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder with a SQLite store (set as MLFLOW_TRACKING_URI) holding two small registered
    models for the scoring tests: logistic models:/batchmodel/1 and XGBoost
    models:/batchtrees/1."""
    from phenotyper.runs.train import train
    from phenotyper.training.spec import ExperimentSpec

    folder = tmp_path_factory.mktemp("scoring")
    environment = pytest.MonkeyPatch()
    environment.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
    train(ExperimentSpec(name="batch", registered_model="batchmodel", label="phenotype_true",
                         preset="provide", n=2000, cohort_seed=6,
                         candidates={"logistic": {"C": [1.0]}}, bootstrap=30, noise_repeats=0))
    train(ExperimentSpec(name="batchtrees", registered_model="batchtrees",
                         label="phenotype_true", preset="provide", n=2000, cohort_seed=6,
                         candidates={"xgboost": {"n_estimators": [60], "max_depth": [4]}},
                         bootstrap=30, noise_repeats=0))
    yield folder
    environment.undo()
