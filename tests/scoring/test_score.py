"""`phenotyper score`: streamed batch scoring that loses nothing and never leaves half a file."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from phenotyper.cli import app
from phenotyper.cohort import read_cohort
from phenotyper.runs.score import score_file
from phenotyper.scoring.request import ScoreRequest, ScoringError
from phenotyper.simulate import simulate
from phenotyper.tracking import registry

runner = CliRunner(env={"COLUMNS": "200"})
MODEL = "models:/batchmodel/1"  # registered by the `store` fixture (conftest.py)


MESSY = (
    "MRN,Ferritin (ug/L),hla_dr_mab_per_cell,crp_mg_l,sex,ward\n"
    "a,6100,2000,150,F,icu1\n"
    "b,-50,3000,80,M,icu1\n"          # negative ferritin: not scored, rule from HLA-DR
    "c,>2000,9000,40,female,icu2\n"   # censored, straddles the cut-off: set to missing, scored
    "a,900,12000,haemolysed,M,icu2\n"  # repeated id: scored; unparseable CRP: not scored
    ",300,7000,20,x,icu2\n"           # no id: scored; unknown sex code: not scored
    "f,1200,15000,35,M,icu3\n"
)
MAPPING = ('[columns]\npatient_id = { column = "MRN" }\n'
           'ferritin_ng_ml = { column = "Ferritin (ug/L)", unit = "ug/L" }\n')


@pytest.fixture
def messy(tmp_path: Path) -> tuple[Path, Path]:
    cohort, mapping = tmp_path / "export.csv", tmp_path / "export.toml"
    cohort.write_text(MESSY, encoding="utf-8")
    mapping.write_text(MAPPING, encoding="utf-8")
    return cohort, mapping


def _score(store: Path, cohort: Path, output: Path, **options) -> dict:
    return score_file(ScoreRequest(MODEL, cohort, output, **options))


def test_every_row_comes_out_in_order_with_its_status_and_reasons(store, messy, tmp_path):
    cohort, mapping = messy
    output = tmp_path / "scored.parquet"
    manifest = _score(store, cohort, output, mapping_path=mapping)
    out = pd.read_parquet(output)
    assert out["row"].tolist() == [1, 2, 3, 4, 5, 6]
    assert out["patient_id"].fillna("<none>").tolist() == ["a", "b", "c", "a", "<none>", "f"]
    status = out.set_index("row")["status"]
    assert status[1] == status[3] == status[6] == "ok"
    assert status[2].startswith("not scored: ferritin_ng_ml '-50': negative value")
    assert status[4].startswith("not scored: crp_mg_l 'haemolysed': not a number")
    assert status[5].startswith("not scored: sex 'x': not a recognised sex code")
    unscored = out[out["status"] != "ok"]
    assert unscored["phenotype"].isna().all() and unscored["prob_MALS"].isna().all()
    assert unscored["shap_ferritin_ng_ml"].isna().all()
    scored = out[out["status"] == "ok"]
    assert scored[["prob_MALS", "prob_immunoparalysis", "prob_unclassified"]].sum(
        axis=1).to_numpy() == pytest.approx(1.0)
    # the rule never acts on a rejected value: without ferritin it cannot rule out MALS
    assert out.loc[1, "rule_phenotype"] == "indeterminate"
    assert out.loc[0, "rule_phenotype"] == "MALS"
    issues = out.set_index("row")["issues"]
    assert "censored" not in issues[1] and issues[1] == ""
    assert "cannot settle the ImmunoSep cut-off" in issues[3]
    assert "same patient_id as row 1" in issues[4]
    assert "patient_id is missing" in issues[5]
    assert manifest["rows_in"] == manifest["rows_out"] == 6
    assert manifest["rows_by_status"] == {"ok": 3, "negative": 1, "unparseable": 1,
                                          "unknown_category": 1}


def test_rejected_values_as_missing_score_every_row_and_name_what_was_set_aside(
        store, messy, tmp_path):
    cohort, mapping = messy
    output, report = tmp_path / "scored.parquet", tmp_path / "report.html"
    manifest = _score(store, cohort, output, mapping_path=mapping, rejected_values="missing",
                      report_path=report)
    out = pd.read_parquet(output).set_index("row")
    assert out["phenotype"].notna().all()
    status = out["status"]
    assert status[1] == status[3] == status[6] == "ok"
    assert status[2].startswith("scored without ferritin_ng_ml '-50': negative value")
    assert status[4].startswith("scored without crp_mg_l 'haemolysed': not a number")
    assert status[5].startswith("scored without sex 'x': not a recognised sex code")
    # each row scores as if the value had not been measured
    read = read_cohort(cohort, mapping).data
    reference = registry.load_packaged(MODEL).predict(read)
    assert out["prob_MALS"].to_numpy() == pytest.approx(reference["prob_MALS"].to_numpy())
    assert out.loc[2, "rule_phenotype"] == "indeterminate"  # the rule never uses it either
    assert manifest["rejected_values"] == "missing"
    assert manifest["rows_by_status"] == {"ok": 3, "value_set_aside": 3}
    assert manifest["unscored_examples"] == []
    assert "scored with a rejected value set aside" in report.read_text(encoding="utf-8")


def test_scores_equal_the_model_on_the_whole_file_whatever_the_block_size(store, tmp_path):
    cohort = tmp_path / "cohort.parquet"
    simulate("provide", 2500, seed=11).to_parquet(cohort, row_group_size=400)
    one = tmp_path / "one.parquet"
    many = tmp_path / "many.csv"
    _score(store, cohort, one, block_rows=10_000)
    _score(store, cohort, many, block_rows=333)
    whole, blocks = pd.read_parquet(one), pd.read_csv(many, keep_default_na=False,
                                                       na_values=[""])
    assert len(whole) == len(blocks) == 2500
    expected = registry.load_packaged(MODEL).predict(read_cohort(cohort).data)
    for column in ("patient_id", "phenotype", "rule_phenotype", "status", "top_drivers"):
        assert whole[column].tolist() == expected[column].tolist()
        assert blocks[column].astype(str).tolist() == expected[column].astype(str).tolist()
    numeric = [c for c in expected if c.startswith(("prob_", "shap_"))]
    np.testing.assert_allclose(whole[numeric], expected[numeric], rtol=0, atol=1e-12)
    np.testing.assert_allclose(blocks[numeric], expected[numeric], rtol=1e-12, atol=1e-12)



@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_blocks_written_in_the_background_come_out_in_order(store, tmp_path, suffix):
    """The writer thread writes block after block while the next is scored: the file is the
    one a single block gives."""
    cohort = tmp_path / "cohort.parquet"
    simulate("provide", 1200, seed=12).to_parquet(cohort)
    one, many = tmp_path / f"one{suffix}", tmp_path / f"many{suffix}"
    _score(store, cohort, one, block_rows=10_000)
    _score(store, cohort, many, block_rows=100)
    read = pd.read_parquet if suffix == ".parquet" else pd.read_csv
    pd.testing.assert_frame_equal(read(many), read(one))


def test_a_failed_background_write_stops_the_run_and_leaves_nothing(store, tmp_path,
                                                                     monkeypatch):
    cohort = tmp_path / "cohort.parquet"
    simulate("provide", 1200, seed=12).to_parquet(cohort)
    output = tmp_path / "scored.parquet"
    output.write_text("previous results\n")
    written = []
    original = pq.ParquetWriter.write_table

    def failing(self, table, *args, **kwargs):
        written.append(len(table))
        if len(written) == 4:
            raise OSError(28, "No space left on device")
        return original(self, table, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", failing)
    with pytest.raises(OSError, match="No space left"):
        _score(store, cohort, output, block_rows=100)
    assert len(written) in (4, 5)  # the failure surfaces at the next block or at the end
    assert output.read_text() == "previous results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort.parquet", "scored.parquet"]

# MESSY as it is (Arrow's reader reads it all), and with a blank line and a line of spaces
# (Arrow's reader hands over to pandas' from the block of the line of spaces on).
@pytest.mark.parametrize("text", [MESSY, MESSY.replace("\nf,", "\n\n   \nf,")])
def test_both_csv_readers_give_the_same_scores(store, messy, tmp_path, text):
    cohort, mapping = messy
    cohort.write_text(text, encoding="utf-8")
    results = []
    for reader in ("arrow", "pandas"):
        output = tmp_path / f"{reader}.parquet"
        manifest = _score(store, cohort, output, mapping_path=mapping, block_rows=2,
                          csv_reader=reader)
        results.append((pd.read_parquet(output), {key: value for key, value in manifest.items()
                                                  if key not in ("output", "timings_s",
                                                                 "rows_per_s")}))
    (arrow, arrow_manifest), (pandas, pandas_manifest) = results
    pd.testing.assert_frame_equal(arrow, pandas)
    assert arrow_manifest == pandas_manifest
    assert len(arrow) == text.count("\n") - 1
    assert arrow["issues"].str.contains("patient_id is missing").sum() == (
        3 if text != MESSY else 1)


def test_manifest_names_the_model_input_and_counts(store, tmp_path):
    cohort = tmp_path / "cohort.csv"
    simulate("provide", 300, seed=2).to_csv(cohort, index=False)
    output = tmp_path / "scored.parquet"
    _score(store, cohort, output, explain="none")
    manifest = json.loads((tmp_path / "scored.parquet.manifest.json").read_text())
    version = MlflowClient().get_model_version("batchmodel", "1")
    registered = datetime.fromtimestamp(version.creation_timestamp / 1000, UTC)
    assert manifest["model"] == {"uri": MODEL, "resolved_uri": MODEL, "name": "batchmodel",
                                 "version": "1", "run_id": version.run_id,
                                 "registered_at": registered.isoformat(timespec="seconds")}
    assert manifest["input_sha256"] == hashlib.sha256(cohort.read_bytes()).hexdigest()
    assert manifest["rows_in"] == manifest["rows_out"] == 300
    assert sum(manifest["phenotype_counts"].values()) == 300
    assert sum(item["rows"] for item in manifest["model_vs_rule"]) == 300
    assert manifest["synthetic_input"] is True
    assert set(manifest["timings_s"]) >= {"read_and_validate", "score", "write", "total"}
    assert not any(c.startswith("shap_") for c in pd.read_parquet(output).columns)


def test_a_failure_deep_in_the_file_leaves_no_output_and_the_old_file_intact(store, tmp_path):
    rows = ["ferritin_ng_ml,hla_dr_mab_per_cell"] + [f"{100 + i},8000" for i in range(50)]
    rows.append("100,8000,extra-field")  # a ragged line after several blocks were scored
    cohort = tmp_path / "export.csv"
    cohort.write_text("\n".join(rows) + "\n")
    output = tmp_path / "scored.csv"
    output.write_text("previous results\n")
    result = runner.invoke(app, ["score", "--model", MODEL, "--input", str(cohort),
                                 "--output", str(output), "--block-rows", "10"])
    assert result.exit_code == 2
    assert "more fields than the header" in result.output and "Traceback" not in result.output
    assert output.read_text() == "previous results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.csv", "scored.csv"]


def test_ctrl_c_leaves_nothing_at_the_destination_and_says_so(store, tmp_path):
    cohort = tmp_path / "cohort.parquet"
    # enough rows that scoring lasts seconds after the write starts, so the signal lands
    # mid-run however fast the scoring machine is
    simulate("provide", 200_000, seed=4).to_parquet(cohort)
    output = tmp_path / "scored.parquet"
    # a child inherits an ignored SIGINT (as under `nohup ... &`): give it Ctrl-C as a terminal
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "phenotyper.cli", "score", "--model", MODEL, "--input",
             str(cohort), "--output", str(output), "--block-rows", "500"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}"})
    finally:
        signal.signal(signal.SIGINT, previous)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".scored.parquet.*.tmp")):  # the write has started
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert process.poll() is None, "scoring ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Interrupted: nothing was written to" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort.parquet"]


@pytest.mark.parametrize(("arguments", "message"), [
    (["--input", "missing.csv", "--output", "out.parquet"], "does not exist"),
    (["--input", "cohort.csv", "--output", "out.xlsx"], "name the output .parquet or .csv"),
    (["--input", "cohort.csv", "--output", "cohort.csv"], "is the input file"),
    (["--input", "cohort.csv", "--output", "out.csv", "--engine", "dask"], "--engine must be"),
    (["--input", "cohort.csv", "--output", "out.csv", "--explain", "some"], "--explain must"),
    (["--input", "cohort.csv", "--output", "out.csv", "--rejected-values", "impute"],
     "--rejected-values must be one of skip-row, missing"),
    (["--input", "cohort.csv", "--output", "out.csv", "--report", "r.pdf"], "name it .html"),
    (["--input", "cohort.csv", "--output", "out.csv", "--model", "models:/nothing@champion"],
     "Cannot load model models:/nothing@champion"),
    (["--input", "cohort.csv", "--output", "out.csv", "--model", "models:/batchmodel"],
     "give a version or an alias"),
])
def test_bad_requests_get_a_clear_error(store, tmp_path, monkeypatch, arguments, message):
    monkeypatch.chdir(tmp_path)
    simulate("provide", 20, seed=1).to_csv("cohort.csv", index=False)
    result = runner.invoke(app, ["score", "--model", MODEL, *arguments])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort.csv"]


def test_cli_prints_counts_and_shows_no_progress_bar_off_a_terminal(store, tmp_path):
    cohort = tmp_path / "cohort.csv"
    simulate("provide", 200, seed=3).to_csv(cohort, index=False)
    result = runner.invoke(app, ["score", "--model", MODEL, "--input", str(cohort),
                                 "--output", str(tmp_path / "out.parquet")])
    assert result.exit_code == 0, result.output
    assert "Scored 200 rows" in result.output and "Scoring cohort.csv" not in result.output
    # which version scored, and when it was registered (trained)
    assert "Model: batchmodel version 1, registered 20" in result.output
    assert " UTC (models:/batchmodel/1)" in result.output


def test_request_refuses_an_unknown_engine_before_reading(tmp_path):
    with pytest.raises(ScoringError, match="--engine must be one of local, spark"):
        score_file(ScoreRequest(MODEL, tmp_path / "x.csv", tmp_path / "y.csv", engine="gpu"))


def test_an_alias_is_pinned_to_one_version_and_report_folders_are_made(store, tmp_path):
    with registry.using_store(registry.store_uri()) as client:
        registry.promote(client, "batchmodel", "1")
    cohort = tmp_path / "cohort.parquet"
    simulate("provide", 50, seed=8).to_parquet(cohort)
    report = tmp_path / "new" / "folder" / "report.html"
    manifest = score_file(ScoreRequest("models:/batchmodel@champion", cohort,
                                       tmp_path / "out" / "scored.parquet", report_path=report))
    assert manifest["model"]["uri"] == "models:/batchmodel@champion"
    assert manifest["model"]["resolved_uri"] == "models:/batchmodel/1"
    assert report.is_file() and (tmp_path / "out" / "scored.parquet.manifest.json").is_file()


def test_an_output_that_is_a_folder_is_refused_before_any_work(store, tmp_path):
    (tmp_path / "scored.parquet").mkdir()
    simulate("provide", 20, seed=1).to_csv(tmp_path / "cohort.csv", index=False)
    result = runner.invoke(app, ["score", "--model", MODEL, "--input",
                                 str(tmp_path / "cohort.csv"), "--output",
                                 str(tmp_path / "scored.parquet")])
    assert result.exit_code == 2 and "is a folder" in result.output
    assert not any((tmp_path / "scored.parquet").iterdir())


def test_tree_model_explanations_are_xgboosts_numbers_from_the_compiled_tables(store, tmp_path):
    """Batch scoring a tree model explains with the compiled tables, and every SHAP column
    of the output equals what XGBoost's own pred_contribs gives through the same model."""
    from phenotyper.treeshap import XGBoostContributions

    cohort = tmp_path / "cohort.parquet"
    simulate("provide", 3000, seed=4).to_parquet(cohort)
    output = tmp_path / "scored.parquet"
    manifest = score_file(ScoreRequest("models:/batchtrees/1", cohort, output, explain="all",
                                       block_rows=1000))
    assert manifest["explainer"]["method"] == "compiled TreeSHAP tables"
    assert manifest["explainer"]["table_bytes"] > 0
    scored = pd.read_parquet(output)
    reference_model = registry.load_packaged("models:/batchtrees/1")
    reference_model.explainer = XGBoostContributions(reference_model.booster, "reference")
    reference = reference_model.predict(read_cohort(cohort).data, explain="all")
    shap_columns = [c for c in reference.columns if c.startswith("shap_")]
    assert len(shap_columns) > 2 * len(reference_model.features)
    logits = [reference[[f"shap_base_{label}"] + [f"shap_{label}_{f}" for f in
                                                  reference_model.features]].sum(axis=1)
              for label in reference_model.classes]
    scale = float(np.abs(np.column_stack(logits)).max())  # the model's output scale
    np.testing.assert_allclose(scored[shap_columns], reference[shap_columns], rtol=0,
                               atol=1e-5 * max(1.0, scale))
    assert (scored["phenotype"] == reference["phenotype"]).all()


def test_the_package_profiles_its_training_cohort_without_any_single_patients_value(store):
    profile = registry.load_packaged(MODEL).spec["profile"]
    assert profile["synthetic"] is True and len(profile["cohort_sha256"]) == 64
    assert sum(profile["phenotype_shares"].values()) == pytest.approx(1.0)
    cohort = simulate("provide", 2000, seed=6)  # the `store` fixture's training cohort
    ferritin = profile["markers"]["ferritin_ng_ml"]
    assert profile["patients"] == ferritin["patients"] < len(cohort)  # the training split only
    edges = np.array(ferritin["decile_edges"])
    assert len(edges) == 9 and (np.diff(edges) > 0).all()
    assert cohort["ferritin_ng_ml"].min() < edges[0] and edges[-1] < cohort["ferritin_ng_ml"].max()
    assert ferritin["bin_shares"] == pytest.approx([0.1] * 10, abs=0.002)
    assert set(ferritin) == {"patients", "measured", "missing_share", "decile_edges",
                             "bin_shares"}  # no minimum, maximum or extreme quantile
    for name, marker in profile["markers"].items():  # the split's missingness is the cohort's
        assert marker["missing_share"] == pytest.approx(cohort[name].isna().mean(), abs=0.03)
    assert max(m["missing_share"] for m in profile["markers"].values()) > 0.05


def test_a_synthetic_model_scoring_real_looking_patients_says_so_everywhere(store, tmp_path):
    real = tmp_path / "hospital.csv"
    simulate("provide", 50, seed=4).drop(columns=["synthetic"]).to_csv(real, index=False)
    report = tmp_path / "report.html"
    result = runner.invoke(app, ["score", "--model", MODEL, "--input", str(real), "--output",
                                 str(tmp_path / "out.parquet"), "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "NOT FOR REAL PATIENTS" in result.output
    manifest = json.loads((tmp_path / "out.parquet.manifest.json").read_text())
    assert manifest["training_cohort"]["synthetic"] is True
    assert manifest["warnings"] and manifest["warnings"][0].startswith("NOT FOR REAL PATIENTS")
    assert "NOT FOR REAL PATIENTS" in report.read_text(encoding="utf-8")
    simulated = tmp_path / "simulated.csv"
    simulate("provide", 50, seed=4).to_csv(simulated, index=False)
    result = runner.invoke(app, ["score", "--model", MODEL, "--input", str(simulated),
                                 "--output", str(tmp_path / "sim.parquet")])
    assert result.exit_code == 0 and "NOT FOR REAL PATIENTS" not in result.output
    card = MlflowClient().get_model_version("batchmodel", "1").description
    assert card.startswith("**NOT FOR REAL PATIENTS")


def test_drift_ranks_the_markers_a_shifted_site_moved_first(store, tmp_path):
    """One site's CRP and ferritin read 4 and 3 times higher (a recalibrated analyser, far
    beyond the simulator's per-site assay spread): that site's drift table puts them first,
    beyond the PSI threshold; the other sites' CRP stays within it."""
    from phenotyper.drift import PSI_THRESHOLD

    cohort = simulate("provide", 3000, seed=12).drop(columns=["synthetic"])
    shifted = cohort["site_id"].value_counts().index[0]
    at = cohort["site_id"] == shifted
    cohort.loc[at, "crp_mg_l"] = (cohort.loc[at, "crp_mg_l"] * 4).clip(upper=1000)
    cohort.loc[at, "ferritin_ng_ml"] *= 3
    path = tmp_path / "sites.parquet"
    cohort.to_parquet(path)
    report = tmp_path / "report.html"
    result = runner.invoke(app, ["score", "--model", MODEL, "--input", str(path), "--output",
                                 str(tmp_path / "out.parquet"), "--explain", "none",
                                 "--report", str(report)])
    assert result.exit_code == 0, result.output
    drift = json.loads((tmp_path / "out.parquet.manifest.json").read_text())["drift"]
    site = drift["by_site"][shifted]
    assert {m["marker"] for m in site[:2]} == {"crp_mg_l", "ferritin_ng_ml"}
    assert all(m["psi"] > PSI_THRESHOLD and "psi" in m["beyond_threshold"] for m in site[:2])
    for name, markers in drift["by_site"].items():
        crp = next(m for m in markers if m["marker"] == "crp_mg_l")
        assert (crp["psi"] > PSI_THRESHOLD) == (name == shifted), (name, crp)
    assert f"Drift from the training patients (site {shifted}): " in result.output
    shares = drift["phenotype_shares"]
    assert sum(s["input"] for s in shares.values()) == pytest.approx(1.0)
    # the report's per-site drift table starts with the shifted site and its two markers
    html = report.read_text(encoding="utf-8")
    section = html[html.index('<section id="drift">'):]
    section = section[section.index("<th>site</th>"):]
    first_rows = [section.index(f"<td>{name}</td>") for name in ("crp_mg_l", "ferritin_ng_ml")]
    assert section.index(f"<td>{shifted}</td>") < min(first_rows) < section.index("</table>")


def test_drift_compares_this_month_with_last(store, tmp_path):
    """`phenotyper drift` on two runs' manifests: last month like training, this month with one
    site's CRP four times higher; that site's CRP moved, beyond the PSI threshold, and the
    overall table ranks CRP first. Manifests of different models are refused (exit 2)."""
    last = simulate("provide", 3000, seed=31).drop(columns=["synthetic"])
    this = simulate("provide", 3000, seed=32).drop(columns=["synthetic"])
    shifted = this["site_id"].value_counts().index[0]
    at = this["site_id"] == shifted
    this.loc[at, "crp_mg_l"] = (this.loc[at, "crp_mg_l"] * 4).clip(upper=1000)
    for name, frame in (("last", last), ("this", this)):
        frame.to_parquet(tmp_path / f"{name}.parquet")
        scored = runner.invoke(app, ["score", "--model", MODEL, "--input",
                                     str(tmp_path / f"{name}.parquet"), "--output",
                                     str(tmp_path / f"{name}_scored.parquet"), "--explain",
                                     "none"])
        assert scored.exit_code == 0, scored.output
    manifests = [str(tmp_path / f"{name}_scored.parquet.manifest.json")
                 for name in ("last", "this")]
    result = runner.invoke(app, ["drift", *manifests, "--output", "."])
    assert result.exit_code == 2 and "is a folder" in result.stderr
    result = runner.invoke(app, ["drift", *manifests, "--output", str(tmp_path / "drift.json")])
    assert result.exit_code == 0, result.output
    compared = json.loads((tmp_path / "drift.json").read_text())
    assert compared["overall"][0]["marker"] == "crp_mg_l"
    assert "missing_share_earlier" in compared["overall"][0]
    site = compared["by_site"][shifted]
    assert site[0]["marker"] == "crp_mg_l" and "psi" in site[0]["beyond_threshold"]
    assert f"Moved (site {shifted}): crp_mg_l PSI" in result.output
    others = [markers for name, markers in compared["by_site"].items() if name != shifted]
    assert all(m["psi"] < site[0]["psi"] / 3 for markers in others for m in markers
               if m["marker"] == "crp_mg_l")
    # another model's profile has other bins: no comparison
    trees = tmp_path / "trees.parquet"
    assert runner.invoke(app, ["score", "--model", "models:/batchtrees/1", "--input",
                               str(tmp_path / "this.parquet"), "--output", str(trees),
                               "--explain", "none"]).exit_code == 0
    refused = runner.invoke(app, ["drift", manifests[0], f"{trees}.manifest.json"])
    assert refused.exit_code == 2 and "different training profiles" in refused.stderr
    (tmp_path / "broken.json").write_bytes(b"\x00{not json")
    refused = runner.invoke(app, ["drift", manifests[0], str(tmp_path / "broken.json")])
    assert refused.exit_code == 2 and "Traceback" not in refused.output


def test_a_small_site_is_not_flagged_for_its_sampling_noise():
    """28 rows drawn from the training bins themselves: PSI and KS scatter beyond 0.25 and
    0.1 by chance; the noise-raised limits keep the site unflagged (PSI is not judged on fewer
    than 5 values a bin), while a real shift of the same small site (every value in the top
    bin) is still flagged, by KS; at 300 rows by PSI too."""
    from phenotyper.drift import PSI_THRESHOLD, compare

    trained = {"bin_shares": [0.1] * 10, "missing_share": 0.0, "measured": 1500,
               "patients": 1500}
    rng = np.random.default_rng(4)
    flagged = []
    for _ in range(200):
        counts = np.append(np.bincount(rng.integers(0, 10, 28), minlength=10), 0)
        row = compare(trained, counts)
        flagged.append(bool(row["beyond_threshold"]))
        assert row["limits"]["psi"] is None and row["limits"]["ks_at_deciles"] > 0.1
    assert np.mean(flagged) <= 0.03  # 1% per measure by design, three measures
    assert compare(trained, np.array([0] * 9 + [28, 0]))["beyond_threshold"] == [
        "ks_at_deciles"]
    larger = compare(trained, np.array([0] * 9 + [300, 0]))
    assert larger["limits"]["psi"] >= PSI_THRESHOLD
    assert {"psi", "ks_at_deciles"} <= set(larger["beyond_threshold"])


def test_an_input_like_the_training_cohort_shows_no_drift(store, tmp_path):
    cohort = tmp_path / "same.parquet"
    simulate("provide", 4000, seed=13).to_parquet(cohort)
    drift = _score(store, cohort, tmp_path / "out.parquet", explain="none")["drift"]
    assert drift["by_site"]
    for row in drift["overall"]:
        assert row["psi"] < 0.05 and row["ks_at_deciles"] < 0.05, row
        assert row["outside_share"] == pytest.approx(row["outside_share_training"], abs=0.04)
        # the training split holds out whole sites, whose IL-6 and IL-10 are measured less
        # often: missingness moves by up to 0.09, inside the 0.1 threshold
        assert abs(row["missing_shift"]) < 0.1 and not row["beyond_threshold"]


def test_a_folder_or_a_busy_port_is_one_clear_error(store, tmp_path):
    """Outputs that are folders (model-card, drift) and a port in use (serve) exit 2 with a
    message, not a traceback."""
    import socket

    result = runner.invoke(app, ["model-card", "batchmodel", "--output", str(tmp_path)])
    assert result.exit_code == 2 and "is a folder; give a file name" in result.stderr
    result = runner.invoke(app, ["model-card", "batchmodel", "--output", "."])
    assert result.exit_code == 2 and "is a folder" in result.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(app, ["serve", "--port", str(port)])
    assert result.exit_code == 2, result.output
    assert f"Cannot serve on 127.0.0.1:{port}" in result.stderr
    assert runner.invoke(app, ["serve", "--port", "70000"]).exit_code == 2
