"""The scoring tests' served model: a small champion trained into ./mlflow.db of a fresh folder,
served by `phenotyper serve` on a free loopback port; one server per test module, stopped after
it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from phenotyper.runs.train import train
from phenotyper.serving import running_server
from phenotyper.training.spec import ExperimentSpec

SMALL = {"logistic": {"C": [1.0]}}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Train a small champion into ./mlflow.db, then `phenotyper serve` it; stop afterwards."""
    folder = tmp_path_factory.mktemp("serving")
    here = Path.cwd()
    os.chdir(folder)
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        train(ExperimentSpec(name="serve", registered_model="immunophenotyper",
                             label="phenotype_true", preset="provide", n=2000, cohort_seed=6,
                             candidates=SMALL, bootstrap=30, noise_repeats=0))
        with running_server(cwd=folder) as url:
            yield url
    finally:
        os.chdir(here)
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
