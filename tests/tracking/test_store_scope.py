"""MLflow's store is set only inside a run and restored after it: two stores work in one
process, and nothing a run does leaks into the caller's MLflow settings."""

from __future__ import annotations

import os

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from phenotyper.runs.train import train
from phenotyper.tracking.registry import store_uri, using_store
from phenotyper.training.spec import ExperimentSpec

pytestmark = pytest.mark.slow

SPEC = ExperimentSpec(name="scope", registered_model="scoped", label="phenotype_true",
                      preset="provide", n=1200, cohort_seed=3,
                      candidates={"logistic": {"C": [1.0]}}, bootstrap=20, noise_repeats=0)


def test_two_stores_in_one_process_and_nothing_leaks(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = mlflow.get_tracking_uri()
    first = f"sqlite:///{tmp_path / 'first.db'}"
    second = f"sqlite:///{tmp_path / 'second.db'}"
    train(SPEC, tracking_uri=first)
    train(SPEC, tracking_uri=first)
    train(SPEC, tracking_uri=second)
    assert mlflow.get_tracking_uri() == before
    assert "MLFLOW_TRACKING_URI" not in os.environ
    versions = {uri: len(MlflowClient(uri).search_model_versions("name = 'scoped'"))
                for uri in (first, second)}
    assert versions == {first: 2, second: 1}
    assert not (tmp_path / "mlflow.db").exists()  # the default store was never touched


def test_the_users_own_setting_is_restored(tmp_path, monkeypatch) -> None:
    theirs = f"sqlite:///{tmp_path / 'theirs.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", theirs)
    assert store_uri() == theirs
    with using_store(f"sqlite:///{tmp_path / 'ours.db'}") as client:
        assert mlflow.get_tracking_uri().endswith("ours.db")
        assert client.tracking_uri.endswith("ours.db")
    assert os.environ["MLFLOW_TRACKING_URI"] == theirs
    assert mlflow.get_tracking_uri() == theirs
