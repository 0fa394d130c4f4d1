"""`phenotyper serve`: MLflow's real scoring server on loopback, real HTTP requests."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from phenotyper.experiment import ExperimentSpec, train
from phenotyper.simulate import simulate

SMALL = {"logistic": {"C": [1.0]}}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """Train a small champion into ./mlflow.db, then `phenotyper serve` it; stop afterwards."""
    folder = tmp_path_factory.mktemp("serving")
    here = Path.cwd()
    os.chdir(folder)
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        train(ExperimentSpec(name="serve", registered_model="immunophenotyper",
                             label="phenotype_true", preset="provide", n=2000, cohort_seed=6,
                             candidates=SMALL, bootstrap=30, noise_repeats=0))
    finally:
        os.chdir(here)
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    port = _free_port()
    env = {**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "phenotyper"), "serve", "--port", str(port)],
        cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if process.poll() is not None:
                    raise RuntimeError(process.stderr.read().decode()[-2000:]) from None
                if time.monotonic() > deadline:
                    raise RuntimeError("scoring server did not start") from None
                time.sleep(0.5)
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _score(url: str, records: list[dict], explain: str | None = None) -> list[dict]:
    payload: dict = {"dataframe_records": records}
    if explain:
        payload["params"] = {"explain": explain}
    status, answer = _post(url, json.dumps(payload).encode())
    assert status == 200, answer
    return answer["predictions"]


def _patients(n: int) -> list[dict]:
    cohort = simulate("provide", n, seed=9).drop(
        columns=["site_id", "phenotype_true", "phenotype_rule", "death_28d", "synthetic"])
    return json.loads(cohort.to_json(orient="records"))


def test_single_patient_gets_phenotype_probabilities_rule_and_drivers(server: str) -> None:
    [row] = _score(server, _patients(1))
    assert row["status"] == "ok" and row["phenotype"] in ("MALS", "immunoparalysis",
                                                           "unclassified")
    total = sum(row[f"prob_{p}"] for p in ("MALS", "immunoparalysis", "unclassified"))
    assert total == pytest.approx(1.0)
    assert row["top_drivers"].count("(") == 3
    shap_total = row["shap_base"] + sum(v for k, v in row.items()
                                        if k.startswith("shap_") and k != "shap_base")
    assert abs(shap_total) > 0  # explanations are present and numeric


def test_batch_keeps_every_row_in_order(server: str) -> None:
    patients = _patients(60)
    rows = _score(server, patients)
    assert [r["patient_id"] for r in rows] == [p["patient_id"] for p in patients]


def test_a_hospital_without_hla_dr_can_score(server: str) -> None:
    patients = [{k: v for k, v in p.items() if k != "hla_dr_mab_per_cell"}
                for p in _patients(5)]
    rows = _score(server, patients)
    assert all(r["status"] == "ok" for r in rows)
    assert {r["rule_phenotype"] for r in rows} <= {"MALS", "indeterminate"}


def test_an_implausible_row_is_flagged_and_the_others_scored(server: str) -> None:
    patients = _patients(3)
    patients[1]["ferritin_ng_ml"] = -40.0
    rows = _score(server, patients)
    assert rows[1]["status"].startswith("ferritin_ng_ml=-40 is outside")
    assert rows[1]["phenotype"] is None or math.isnan(rows[1]["phenotype"])  # JSON null/NaN
    assert rows[0]["status"] == rows[2]["status"] == "ok"


def test_explain_all_and_none(server: str) -> None:
    [every] = _score(server, _patients(1), explain="all")
    assert "shap_MALS_ferritin_ng_ml" in every and "shap_base_unclassified" in every
    [bare] = _score(server, _patients(1), explain="none")
    assert not any(k.startswith("shap_") for k in bare)


def test_malformed_requests_get_400_with_a_message(server: str) -> None:
    status, answer = _post(server, b'{"dataframe_records": [{"ferritin_ng_ml": 300')
    assert status == 400 and answer.get("message")
    status, answer = _post(server, json.dumps(
        {"dataframe_records": [{"ferritin_ng_ml": "lots"}]}).encode())
    assert status == 400 and "ferritin_ng_ml" in answer.get("message", "")
