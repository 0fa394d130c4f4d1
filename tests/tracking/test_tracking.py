"""Training end to end against real MLflow stores: SQLite, and a live `mlflow server`."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from phenotyper.cli import app
from phenotyper.cohort import write_table
from phenotyper.runs.train import train
from phenotyper.serving import free_port, running_service
from phenotyper.simulate import simulate
from phenotyper.tracking.log import content_sha256
from phenotyper.training.spec import ExperimentError, ExperimentSpec

SMALL = {"logistic": {"C": [1.0]}, "xgboost": {"max_depth": [2], "n_estimators": [60]}}
runner = CliRunner(env={"COLUMNS": "200"})


def _spec(**changes) -> ExperimentSpec:
    spec = ExperimentSpec(name="tiny", registered_model="pheno", label="phenotype_true",
                          preset="provide", n=1200, cohort_seed=3, candidates=SMALL,
                          bootstrap=60, noise_repeats=2)
    return dataclasses.replace(spec, **changes)


@pytest.fixture
def sqlite_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh working directory; no MLFLOW_TRACKING_URI, so the default ./mlflow.db is used."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in
            client.get_registered_model(name).aliases.items()}


def test_training_logs_runs_datasets_artifacts_and_registers(sqlite_store: str) -> None:
    outcome = train(_spec())
    assert outcome.tracking_uri == sqlite_store and Path("mlflow.db").is_file()
    client = MlflowClient(sqlite_store)
    parent = client.get_run(outcome.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["phenotyper.version"] and parent.data.tags["git.commit"]
    assert parent.data.params["selected"] in SMALL
    assert "test_accuracy_ci_low" in parent.data.metrics

    children = client.search_runs([outcome.experiment_id],
                                  f"tags.mlflow.parentRunId = '{outcome.run_id}'")
    assert {run.data.tags["candidate"] for run in children} == set(SMALL)
    for child in children:
        assert "cv_log_loss" in child.data.metrics and "test_balanced_accuracy" in (
            child.data.metrics)
        assert any(key.startswith("best.") for key in child.data.params)

    inputs = {d.dataset.name: d for d in parent.inputs.dataset_inputs}
    contexts = {d.tags[0].value if d.tags else None for d in inputs.values()}
    assert len(inputs) == 2 and contexts
    digests = {tag.key: tag.value for d in inputs.values() for tag in d.tags
               if tag.key == "sha256"}
    assert digests  # the full-content hash is recorded
    expected = {content_sha256(outcome.result.train), content_sha256(outcome.result.test)}
    recorded = {tag.value for d in inputs.values() for tag in d.tags if tag.key == "sha256"}
    assert recorded == expected

    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"benchmark", "model_card.md", "shap"} <= artifacts
    plots = {a.path for a in client.list_artifacts(outcome.run_id, "shap")}
    assert {"shap/shap_summary.png", "shap/shap_beeswarm_MALS.png",
            "shap/waterfall_first_test_patient.png"} <= plots
    report = {a.path for a in client.list_artifacts(outcome.run_id, "benchmark")}
    assert {"benchmark/benchmark.json", "benchmark/benchmark.md"} <= report

    version = client.get_model_version("pheno", outcome.version)
    assert version.tags["gate.decision"] == "promoted"
    assert "Synthetic" in version.description  # the model card travels with the version
    assert _aliases(client, "pheno") == {"challenger": "1", "champion": "1"}
    scored = mlflow.pyfunc.load_model("models:/pheno@champion").predict(outcome.result.test)
    assert len(scored) == len(outcome.result.test)
    assert scored["patient_id"].tolist() == outcome.result.test["patient_id"].tolist()
    assert {"phenotype", "prob_MALS", "rule_phenotype", "status", "shap_base"} <= set(scored)


def test_gate_keeps_the_champion_and_a_failed_run_moves_nothing(sqlite_store: str) -> None:
    first = train(_spec())
    client = MlflowClient(sqlite_store)
    # a model that sees only age and sex cannot beat the rule: registered, not promoted
    weak = train(_spec(markers=("age_years", "sex"), name="weak"))
    assert not weak.decision.promote
    # it still accepts the rule's markers, so its rule_phenotype column is the real rule's
    scored = mlflow.pyfunc.load_model(f"models:/pheno/{weak.version}").predict(
        pd.DataFrame({"ferritin_ng_ml": [300.0], "hla_dr_mab_per_cell": [2000.0],
                      "age_years": [70.0]}))
    assert scored.loc[0, "rule_phenotype"] == "immunoparalysis"
    tags = client.get_model_version("pheno", weak.version).tags
    assert tags["gate.decision"] == "not promoted"
    assert float(tags["gate.rule_difference_ci_low"]) <= 0
    assert _aliases(client, "pheno") == {"challenger": weak.version, "champion": first.version}

    with pytest.raises(ExperimentError):
        train(_spec(label="no_such_column", name="broken"))
    failed = client.search_runs([client.get_experiment_by_name("broken").experiment_id])
    assert [run.info.status for run in failed] == ["FAILED"]
    assert _aliases(client, "pheno") == {"challenger": weak.version, "champion": first.version}

    result = runner.invoke(app, ["promote", "pheno", weak.version])
    assert result.exit_code == 0, result.output
    assert _aliases(client, "pheno")["champion"] == weak.version
    assert client.get_model_version("pheno", weak.version).tags["gate.decision"] == (
        "promoted by hand")
    result = runner.invoke(app, ["promote", "pheno", "99"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_second_run_is_judged_against_the_champion_on_the_same_patients(
    sqlite_store: str,
) -> None:
    train(_spec())
    second = train(_spec(name="again"))
    records = second.result.benchmark.records
    assert "champion" in set(records.phenotyper)
    assert second.decision.numbers["champion_version"] == "1"
    assert "champion_value" in second.decision.numbers


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """A real `mlflow server` on a free loopback port, stopped afterwards."""
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
               "--artifacts-destination", str(tmp_path / "artifacts")]
    url = f"http://127.0.0.1:{port}"
    with running_service(command, f"{url}/health", timeout_s=90):
        yield url


def test_training_against_a_live_tracking_server(
    mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    outcome = train(_spec())
    assert outcome.tracking_uri == mlflow_server
    assert not Path("mlflow.db").exists()  # nothing went to the local default store
    client = MlflowClient(mlflow_server)
    assert client.get_run(outcome.run_id).info.status == "FINISHED"
    assert _aliases(client, "pheno")["champion"] == outcome.version
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert "model_card.md" in artifacts
    model = mlflow.pyfunc.load_model(f"models:/pheno/{outcome.version}")
    assert len(model.predict(outcome.result.test.head(5))) == 5


def test_train_command_runs_an_experiment_file_and_benchmark_judges_the_champion(
    sqlite_store: str, tmp_path: Path
) -> None:
    experiment = tmp_path / "small.toml"
    experiment.write_text(
        'name = "small"\nregistered_model = "pheno"\nlabel = "phenotype_true"\n'
        '[cohort]\npreset = "provide"\nn = 1200\nseed = 4\n'
        '[candidates.logistic]\nC = [1.0]\n'
        '[benchmark]\nbootstrap = 50\nnoise_repeats = 2\n')
    result = runner.invoke(app, ["train", str(experiment)])
    assert result.exit_code == 0, result.output
    assert "Registered pheno version 1" in result.stdout
    assert "SYNTHETIC DATA" in result.stdout

    cohort = tmp_path / "held_out.parquet"
    write_table(simulate("provide", 400, seed=8), cohort)
    out = tmp_path / "bench"
    result = runner.invoke(app, ["benchmark", "--cohort", str(cohort), "--label",
                                 "phenotype_true", "--output", str(out), "--bootstrap", "30",
                                 "--noise-repeats", "0", "--model", "models:/pheno@champion"])
    assert result.exit_code == 0, result.output
    names = {r["phenotyper"] for r in json.loads((out / "benchmark.json").read_text())["records"]}
    assert "models:/pheno@champion" in names
    # judged by outcomes too: a model named by its URI in the policy table and forest plot
    trial = write_table(simulate("all-comers-trial", 1500, seed=8), tmp_path / "trial.parquet")
    result = runner.invoke(app, ["benchmark", "--cohort", str(trial), "--output",
                                 str(tmp_path / "by_outcome"), "--bootstrap", "30",
                                 "--noise-repeats", "0", "--outcome", "sofa_response",
                                 "--treatment", "treatment", "--model", "models:/pheno@champion"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "by_outcome" / "treatment_effects.png").is_file()
    assert "models:/pheno@champion" in (tmp_path / "by_outcome" / "benchmark.md").read_text()

    patient = simulate("provide", 400, seed=8)["patient_id"].iloc[3]
    picture = tmp_path / "why.png"
    result = runner.invoke(app, ["explain", "--model", "models:/pheno@champion", "--cohort",
                                 str(cohort), "--patient", patient, "--output", str(picture)])
    assert result.exit_code == 0, result.output
    assert picture.read_bytes().startswith(b"\x89PNG") and picture.stat().st_size > 10_000
    result = runner.invoke(app, ["explain", "--model", "models:/pheno@champion", "--cohort",
                                 str(cohort), "--patient", "nobody", "--output", str(picture)])
    assert result.exit_code == 2 and "No patient_id 'nobody'" in result.stderr

    result = runner.invoke(app, ["model-card", "pheno", "--output", str(tmp_path / "card.md")])
    assert result.exit_code == 0, result.output
    card = (tmp_path / "card.md").read_text()
    assert card.startswith("**NOT FOR REAL PATIENTS")  # a synthetic cohort's card says so first
    assert "\n# Model card: pheno, version 1\n" in card


def test_a_consumer_loads_the_champion_in_a_fresh_process_without_pickle(
    sqlite_store: str, tmp_path: Path
) -> None:
    """Only the registry and the model's own files: no phenotyper import in the consumer's
    code, pickle deserialisation switched off."""
    train(_spec())
    consumer = (
        "import mlflow, pandas as pd\n"
        f"mlflow.set_tracking_uri({sqlite_store!r})\n"
        "model = mlflow.pyfunc.load_model('models:/pheno@champion')\n"
        "rows = pd.DataFrame({'patient_id': ['a', 'b'], 'ferritin_ng_ml': [9000.0, 300.0],"
        " 'hla_dr_mab_per_cell': [12000.0, None]})\n"
        "out = model.predict(rows, params={'explain': 'predicted'})\n"
        "print(out[['patient_id', 'phenotype', 'rule_phenotype', 'status']].to_json())\n")
    env = {**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run([sys.executable, "-c", consumer], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    scored = json.loads(done.stdout.strip().splitlines()[-1])
    assert scored["patient_id"] == {"0": "a", "1": "b"}
    assert scored["rule_phenotype"] == {"0": "MALS", "1": "indeterminate"}
    assert set(scored["status"].values()) == {"ok"}


def test_the_model_loads_with_only_its_listed_requirements(sqlite_store: str,
                                                           tmp_path: Path) -> None:
    """A consumer environment built from the model's requirements.txt alone (no phenotyper
    installed): the code travels with the model. Builds a venv with uv (PyPI or uv's cache)."""
    outcome = train(_spec())
    local = Path(mlflow.artifacts.download_artifacts(
        f"models:/pheno/{outcome.version}", dst_path=str(tmp_path / "model")))
    uv = Path(sys.executable).parent / "uv"
    venv = tmp_path / "consumer"
    subprocess.run([str(uv), "venv", "-q", "-p", sys.executable, str(venv)], check=True,
                   timeout=300)
    subprocess.run([str(uv), "pip", "install", "-q", "-r", str(local / "requirements.txt")],
                   check=True, timeout=600, env={**os.environ, "VIRTUAL_ENV": str(venv)})
    consumer = (
        "import importlib.util, mlflow, pandas as pd\n"
        "assert importlib.util.find_spec('phenotyper') is None\n"
        f"model = mlflow.pyfunc.load_model({str(local)!r})\n"
        "out = model.predict(pd.DataFrame({'patient_id': ['a'], 'ferritin_ng_ml': [9000.0]}))\n"
        "print(out.loc[0, 'phenotype'], out.loc[0, 'status'])\n")
    env = {**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    done = subprocess.run([str(venv / "bin" / "python"), "-c", consumer], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].endswith(" ok")
