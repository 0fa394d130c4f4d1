"""Local recalibration: the joint calibration test, the shrunk matrix-scaling map, and
`phenotyper recalibrate` on a registered model: a hospital whose phenotype mix differs from the
training cohort's (a miscalibrated local sample) gets a recalibrated version that beats its
parent on held-out patients; a hospital like the training cohort is left alone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from scipy.special import softmax
from typer.testing import CliRunner

from phenotyper.calibration import (
    MatrixScaling,
    calibration_test,
    fit_matrix_scaling,
    log_ratios,
)
from phenotyper.cli import app
from phenotyper.cohort import write_table
from phenotyper.contract import PHENOTYPES, SYNTHETIC_MODEL_BANNER
from phenotyper.runs.train import train
from phenotyper.simulate import simulate
from phenotyper.tracking.registry import load_packaged
from phenotyper.training.recalibration import RecalibrationError, compose, recalibrate
from phenotyper.training.spec import ExperimentSpec

runner = CliRunner(env={"COLUMNS": "400"})
CRITICAL_6_DF = 12.59  # chi-square 95th percentile on 6 degrees of freedom


def _draw(logits: np.ndarray, seed: int) -> np.ndarray:
    """Class codes drawn from softmax(logits): labels for which those logits are the truth."""
    proba = softmax(logits, axis=1)
    uniform = np.random.default_rng(seed).random(len(proba))
    return (uniform[:, None] > proba.cumsum(axis=1)).sum(axis=1)


def _logits(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1.5, (n, 3))


def test_true_probabilities_pass_the_joint_test() -> None:
    logits = _logits(3000, seed=1)
    test = calibration_test(_draw(logits, seed=2), softmax(logits, axis=1))
    assert test.df == 6 and not test.miscalibrated and test.p_value > 0.05


def test_overconfident_shifted_probabilities_fail_and_the_fit_recovers_the_inverse() -> None:
    """Probabilities from twice the true log-ratios plus 0.5 on MALS's: the truth is
    A = I / 2 and b = (-0.25, 0); the maximum-likelihood map lands within 0.1 of it at n=5000."""
    logits = _logits(5000, seed=3)
    codes = _draw(logits, seed=4)
    distorted = softmax(2 * logits + [0.5, 0.0, 0.0], axis=1)
    test = calibration_test(codes, distorted)
    assert test.miscalibrated and test.p_value < 1e-6
    np.testing.assert_allclose(test.fitted.slopes, np.eye(2) / 2, atol=0.1)
    np.testing.assert_allclose(test.fitted.intercepts, [-0.25, 0.0], atol=0.1)
    restored = test.fitted.apply(distorted)
    assert not calibration_test(codes, restored).miscalibrated


def test_a_small_sample_moves_the_map_less_than_maximum_likelihood() -> None:
    """Shrinkage toward no change: on 40 patients the ridge map sits between the identity and
    the maximum-likelihood map."""
    logits = _logits(40, seed=5)
    codes = _draw(logits, seed=6)
    distorted = softmax(2 * logits, axis=1)
    ridge, mle = fit_matrix_scaling(codes, distorted), fit_matrix_scaling(codes, distorted, 0.0)
    identity = MatrixScaling.identity(3)

    def distance(a: MatrixScaling, b: MatrixScaling) -> float:
        return float(np.abs(a.slopes - b.slopes).sum() + np.abs(a.intercepts - b.intercepts).sum())

    assert 0 < distance(ridge, identity) < distance(mle, identity)


def test_the_map_on_logits_and_its_composition_equal_applying_it() -> None:
    """The packaged model applies the map to its logits (M @ L + m), after any map it already
    had: the same probabilities as applying the log-ratio map to its probabilities."""
    logits = _logits(50, seed=7)
    mapping = MatrixScaling(np.array([[0.6, 0.1], [-0.2, 0.8]]), np.array([0.3, -0.4]))
    matrix, shift = mapping.on_logits()
    np.testing.assert_allclose(softmax(logits @ matrix.T + shift, axis=1),
                               mapping.apply(softmax(logits, axis=1)), atol=1e-9)
    earlier = {"coef": [[1.5, 0, 0], [0, 0.7, 0.1], [0, 0, 1]], "intercept": [0.2, 0, -0.1]}
    composed = compose(mapping, earlier, 3)
    inner = logits @ np.array(earlier["coef"]).T + earlier["intercept"]
    np.testing.assert_allclose(
        softmax(logits @ np.array(composed["coef"]).T + composed["intercept"], axis=1),
        mapping.apply(softmax(inner, axis=1)), atol=1e-9)
    np.testing.assert_allclose(log_ratios(softmax(logits, axis=1)),
                               logits[:, :2] - logits[:, 2:], atol=1e-9)


def test_a_phenotype_without_patients_cannot_be_recalibrated_on() -> None:
    codes = np.array([0, 0, 1, 1, 1, 2])
    with pytest.raises(RecalibrationError, match="unclassified 1"):
        recalibrate(codes, np.full((6, 3), 1 / 3))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A store whose champion m/1 was trained on PROVIDE-like synthetic patients."""
    folder = tmp_path_factory.mktemp("recalibrate")
    environment = pytest.MonkeyPatch()
    environment.chdir(folder)
    environment.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
    train(ExperimentSpec(name="m", registered_model="m", label="phenotype_true",
                         preset="provide", n=2000, cohort_seed=6,
                         candidates={"logistic": {"C": [1.0]}}, bootstrap=20,
                         noise_repeats=0))
    yield folder
    environment.undo()


def _versions(store: Path) -> list[str]:
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    return sorted(v.version for v in client.search_model_versions("name='m'"))


def test_a_hospital_like_the_training_cohort_is_left_alone(store: Path) -> None:
    path = write_table(simulate("provide", 800, seed=11), store / "alike.parquet")
    before = _versions(store)
    result = runner.invoke(app, ["recalibrate", "--model", "models:/m@champion", "--cohort",
                                 str(path), "--label", "phenotype_true"])
    assert result.exit_code == 0, result.output
    assert "no evidence of miscalibration" in result.stdout
    assert "kept as it is; nothing registered" in result.stdout
    assert _versions(store) == before


def test_a_hospital_with_another_phenotype_mix_gets_a_recalibrated_champion(
        store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ImmunoSep screening has a third of PROVIDE's MALS share: the model's probabilities are
    off there (the joint test rejects); the recalibrated version beats its parent on held-out
    local patients, is tagged with it, becomes champion, and loads without pickle."""
    local = simulate("immunosep-screening", 800, seed=3)
    path = write_table(local, store / "other_mix.parquet")
    result = runner.invoke(app, ["recalibrate", "--model", "models:/m@champion", "--cohort",
                                 str(path), "--label", "phenotype_true"])
    assert result.exit_code == 0, result.output
    assert "miscalibrated" in result.stdout and "promoted to champion" in result.stdout
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("m", "champion")
    assert champion.version != "1" and champion.tags["parent_version"] == "1"
    assert float(champion.tags["gate.log_loss_after"]) < float(
        champion.tags["gate.log_loss_before"])
    assert float(champion.tags["gate.statistic_after"]) < CRITICAL_6_DF < float(
        champion.tags["gate.statistic_before"])
    card = champion.description
    assert card.startswith(f"**{SYNTHETIC_MODEL_BANNER}**")
    assert "## Local recalibration of version 1" in card and "## Model" in card
    again = runner.invoke(app, ["recalibrate", "--model", "models:/m/1", "--cohort", str(path),
                                "--label", "phenotype_true"])
    assert again.exit_code == 2 and f"version {champion.version} is already version 1 " \
        "recalibrated on this cohort" in again.stderr

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    model = mlflow.pyfunc.load_model(f"models:/m/{champion.version}")
    parent = mlflow.pyfunc.load_model("models:/m/1")
    fresh = simulate("immunosep-screening", 3000, seed=4)  # patients neither map saw
    inputs = fresh[[c for c in fresh if c in model.metadata.get_input_schema().input_names()]]
    codes = pd.Categorical(fresh["phenotype_true"], categories=PHENOTYPES).codes
    columns = [f"prob_{p}" for p in PHENOTYPES]
    new = model.predict(inputs, params={"explain": "predicted"})
    old = parent.predict(inputs, params={"explain": "none"})
    assert calibration_test(codes, old[columns].to_numpy()).miscalibrated
    assert (calibration_test(codes, new[columns].to_numpy()).statistic
            < calibration_test(codes, old[columns].to_numpy()).statistic / 3)
    # the recalibrated logits stay exactly explained: base + contributions give the logits
    packaged = load_packaged(f"models:/m/{champion.version}")
    contributions, base, _ = packaged.contributions(inputs)
    np.testing.assert_allclose(softmax(contributions.sum(axis=2) + base, axis=1),
                               new[columns].to_numpy(), rtol=1e-6)


def test_labels_that_are_the_rule_are_warned_about_and_never_promoted(store: Path) -> None:
    path = write_table(simulate("immunosep-screening", 600, seed=8), store / "rule.parquet")
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("m", "champion").version
    result = runner.invoke(app, ["recalibrate", "--model", "models:/m@champion", "--cohort",
                                 str(path), "--label", "phenotype_rule"])
    assert result.exit_code == 0, result.output
    assert "looks like the rule's own answer" in result.stderr
    assert "not promoted: the local labels look like the ImmunoSep rule's own answer" in (
        result.stdout)
    assert client.get_model_version_by_alias("m", "champion").version == champion


@pytest.mark.parametrize(("arguments", "message"), [
    (["--label", "phenotype"], "label column 'phenotype' is not in"),
    (["--label", "phenotype_true", "--model", "models:/m/1"],
     "needs at least 10 labelled patients of every phenotype"),
    (["--label", "phenotype_true", "--model", "runs:/abc/model"], "give a registered model"),
    (["--label", "phenotype_true", "--model", "models:/nosuch@champion"], "Cannot load model"),
])
def test_a_wrong_request_is_one_clear_error(store: Path, arguments: list[str],
                                            message: str) -> None:
    path = write_table(simulate("provide", 30, seed=9), store / "small.parquet")
    result = runner.invoke(app, ["recalibrate", "--cohort", str(path), *arguments])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
