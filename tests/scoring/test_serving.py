"""`phenotyper serve`: MLflow's real scoring server on loopback, real HTTP requests."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from phenotyper.contract import SYNTHETIC_MODEL_BANNER
from phenotyper.serving import free_port, post, running_server, running_service, score
from phenotyper.simulate import simulate
from phenotyper.tracking import registry

pytestmark = pytest.mark.slow



def _patients(n: int) -> list[dict]:
    cohort = simulate("provide", n, seed=9).drop(
        columns=["site_id", "phenotype_true", "phenotype_rule", "death_28d", "synthetic"])
    return json.loads(cohort.to_json(orient="records"))


def test_single_patient_gets_phenotype_probabilities_rule_and_drivers(server: str) -> None:
    [row] = score(server, _patients(1))
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
    rows = score(server, patients)
    assert [r["patient_id"] for r in rows] == [p["patient_id"] for p in patients]


def test_a_hospital_without_hla_dr_canscore(server: str) -> None:
    patients = [{k: v for k, v in p.items() if k != "hla_dr_mab_per_cell"}
                for p in _patients(5)]
    rows = score(server, patients)
    assert all(r["status"] == "ok" for r in rows)
    assert {r["rule_phenotype"] for r in rows} <= {"MALS", "indeterminate"}


def test_an_implausible_row_is_flagged_and_the_others_scored(server: str) -> None:
    patients = _patients(3)
    patients[1]["ferritin_ng_ml"] = -40.0
    rows = score(server, patients)
    assert rows[1]["status"].startswith("ferritin_ng_ml=-40 is outside")
    assert rows[1]["phenotype"] is None or math.isnan(rows[1]["phenotype"])  # JSON null/NaN
    assert rows[0]["status"] == rows[2]["status"] == "ok"


def test_a_rejected_value_can_be_scored_as_missing(server: str) -> None:
    """rejected_values=missing: the row is scored as if the value were not measured, and
    its status says which value was set aside."""
    patients = _patients(3)
    patients[1]["crp_mg_l"] = 1410.0
    skipped, set_aside = score(server, patients), score(server, patients, rejected_values="missing")
    assert skipped[1]["status"].startswith("crp_mg_l=1410 is outside")
    assert set_aside[1]["status"] == "scored without " + skipped[1]["status"]
    without = dict(patients[1], crp_mg_l=None)
    [expected] = score(server, [without])
    assert set_aside[1]["phenotype"] == expected["phenotype"]
    assert set_aside[1]["prob_MALS"] == pytest.approx(expected["prob_MALS"], abs=1e-12)
    assert [r["status"] for r in (set_aside[0], set_aside[2])] == ["ok", "ok"]


def test_explain_all_and_none(server: str) -> None:
    [every] = score(server, _patients(1), explain="all")
    assert "shap_MALS_ferritin_ng_ml" in every and "shap_base_unclassified" in every
    [bare] = score(server, _patients(1), explain="none")
    assert not any(k.startswith("shap_") for k in bare)


def test_malformed_requests_get_400_with_a_message(server: str) -> None:
    status, answer = post(server, b'{"dataframe_records": [{"ferritin_ng_ml": 300')
    assert status == 400 and answer.get("message")
    status, answer = post(server, b'{"records": []}')
    assert status == 400 and answer.get("message")
    for name in ("explain", "rejected_values"):  # the reason, not MLflow's generic message
        status, answer = post(server, json.dumps({"dataframe_records": _patients(1),
                                                  "params": {name: "bogus"}}).encode())
        assert status == 400 and f"params.{name} must be one of" in answer["message"], answer


def test_whole_numbers_text_and_odd_codes_are_scored_or_flagged_row_by_row(server) -> None:
    rows = score(server, [
        {"patient_id": 7, "ferritin_ng_ml": 6100, "platelets_10e9_l": 62, "sofa": 12},
        {"patient_id": 8, "ferritin_ng_ml": "lots"},
        {"patient_id": 9, "ferritin_ng_ml": 300, "sex": "X"},
        {"patient_id": 10, "ferritin_ng_ml": 300, "hla_dr_mab_per_cell": 2100, "sex": "female"},
    ])
    assert [r["patient_id"] for r in rows] == [7, 8, 9, 10]
    assert rows[0]["status"] == "ok" and rows[0]["rule_phenotype"] == "MALS"
    assert "ferritin_ng_ml is not a number" in rows[1]["status"]
    assert rows[1]["rule_phenotype"] == "indeterminate"  # the rule ignores a rejected value
    assert rows[2]["status"] == "sex 'X' is not F or M"
    assert rows[3]["status"] == "ok" and rows[3]["rule_phenotype"] == "immunoparalysis"


def test_a_tree_model_is_served_with_its_exact_shap_tables(store, monkeypatch) -> None:
    """An XGBoost model loads in the scoring server without pickle, compiles its SHAP tables
    there, and answers with the explanations the packaged model gives in process (which
    test_score checks against XGBoost's own)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    patients = _patients(5)
    with running_server(model="models:/batchtrees/1") as url:
        served = pd.DataFrame(score(url, patients, explain="all"))
    with registry.using_store(registry.store_uri()):
        local = registry.load_packaged("models:/batchtrees/1").predict(
            pd.DataFrame(patients), explain="all")
    shap_columns = [c for c in local.columns if c.startswith("shap_")]
    assert (served["status"] == "ok").all()
    np.testing.assert_allclose(served[shap_columns].to_numpy(dtype=float),
                               local[shap_columns].to_numpy(dtype=float), rtol=0, atol=1e-9)


def test_the_readmes_consumer_command_serves_without_an_activated_environment(server) -> None:
    """The README's `mlflow models serve` command, run as written from the project root with
    nothing of the environment on PATH (MLflow execs uvicorn by name)."""
    root = Path(__file__).parents[2]
    block = re.search(r"```sh\n(PATH=[^`]*?mlflow models serve[^`]*?)```",
                      (root / "README.md").read_text()).group(1)
    port = free_port()
    command = block.replace("--port 5001", f"--port {port}")
    venv_bin = str(Path(sys.executable).parent)
    path = ":".join(p for p in os.environ["PATH"].split(":") if p != venv_bin)
    env = {**os.environ, "PATH": path,
           "MLFLOW_TRACKING_URI": f"sqlite:///{Path.cwd() / 'mlflow.db'}"}
    # the oldest-Python run has its environment elsewhere: the same command, pointed there
    command = command.replace("$PWD/.venv/bin", venv_bin)
    url = f"http://127.0.0.1:{port}"
    with running_service(["bash", "-c", command], f"{url}/ping", cwd=root, env=env):
        status, answer = post(url, json.dumps(
            {"dataframe_records": _patients(2)}).encode())
    assert status == 200, answer
    assert len(answer["predictions"]) == 2


def test_serve_names_the_version_and_says_a_synthetic_model_is_not_for_real_patients(
        server, tmp_path: Path) -> None:
    """What `phenotyper serve` says before it hands over to MLflow's server, even with its
    output going to files (a service's log): the version and when it was registered, and the
    synthetic-model banner, since a server cannot tell which requests are real patients."""
    port = free_port()
    logs = {name: tmp_path / f"serve.{name}" for name in ("out", "err")}
    with logs["out"].open("w") as out, logs["err"].open("w") as err:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "phenotyper"), "serve", "--port", str(port)],
            stdout=out, stderr=err, start_new_session=True,
            env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{Path.cwd() / 'mlflow.db'}"})
        try:
            deadline = time.monotonic() + 120
            while "Serving" not in logs["out"].read_text() and time.monotonic() < deadline:
                assert process.poll() is None, logs["err"].read_text()[-1500:]
                time.sleep(0.2)
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)
    said = logs["out"].read_text()
    assert re.search(r"Model: immunophenotyper version 1, registered \d{4}-\d\d-\d\d "
                     r"\d\d:\d\d:\d\d UTC", said), said
    assert SYNTHETIC_MODEL_BANNER.split(":")[0] in logs["err"].read_text()
