"""`phenotyper score --engine spark`: the model through mlflow's Spark UDF on local Spark gives
the local engine's output row by row."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from phenotyper.cli import app
from phenotyper.runs.score import score_file
from phenotyper.scoring.request import ScoreRequest
from phenotyper.simulate import simulate

pytestmark = pytest.mark.slow

MODEL = "models:/batchmodel/1"  # registered by the `store` fixture (conftest.py)
runner = CliRunner(env={"COLUMNS": "200"})


def _messy_cohort(path, rows: int) -> None:
    """A simulated cohort as CSV with rejected and flagged cells and a repeated id."""
    frame = simulate("provide", rows, seed=21).astype({"ferritin_ng_ml": "str", "crp_mg_l": "str"})
    frame.loc[3, "ferritin_ng_ml"] = "-50"
    frame.loc[10, "crp_mg_l"] = "haemolysed"
    frame.loc[11, "ferritin_ng_ml"] = ">2000"
    frame.loc[12, "patient_id"] = frame.loc[2, "patient_id"]
    frame.loc[13, "sex"] = "x"
    frame.to_csv(path, index=False)


@pytest.mark.parametrize(("explain", "model"), [
    ("predicted", MODEL),
    ("all", "models:/batchtrees/1"),  # XGBoost: the executors compile the SHAP tables too
])
def test_spark_engine_equals_the_local_engine_row_by_row(store, tmp_path, explain, model):
    cohort = tmp_path / "cohort.csv"
    _messy_cohort(cohort, 3000)
    local, spark = tmp_path / "local.parquet", tmp_path / "spark.parquet"
    score_file(ScoreRequest(model, cohort, local, explain=explain, block_rows=700))
    manifest = score_file(ScoreRequest(model, cohort, spark, explain=explain, engine="spark",
                                       block_rows=700))
    expected, got = pd.read_parquet(local), pd.read_parquet(spark)
    assert list(got.columns) == list(expected.columns)
    assert got["row"].tolist() == list(range(1, 3001))
    text = [c for c in expected if expected[c].dtype != np.float64]
    numeric = [c for c in expected if expected[c].dtype == np.float64]
    pd.testing.assert_frame_equal(got[text], expected[text])
    np.testing.assert_allclose(got[numeric], expected[numeric], rtol=1e-12, atol=1e-12)
    assert (got["status"] != "ok").sum() == 3
    assert manifest["engine"] == "spark" and manifest["rows_out"] == 3000
    # the scratch space of the run is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cohort.csv", "local.parquet", "local.parquet.manifest.json", "spark.parquet",
        "spark.parquet.manifest.json"]


def test_spark_engine_from_the_command_line(store, tmp_path):
    cohort = tmp_path / "cohort.parquet"
    simulate("provide", 500, seed=3).to_parquet(cohort)
    output = tmp_path / "scored.csv"
    result = runner.invoke(app, ["score", "--model", MODEL, "--input", str(cohort),
                                 "--output", str(output), "--engine", "spark",
                                 "--explain", "none"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "scored.csv.manifest.json").read_text())
    assert manifest["engine"] == "spark" and manifest["rows_by_status"] == {"ok": 500}
    assert pd.read_csv(output)["row"].tolist() == list(range(1, 501))
