"""`phenotyper benchmark`: the rules judged on a cohort file, written as a report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from phenotyper.cli import app
from phenotyper.cohort import write_table
from phenotyper.rules import reference_rules
from phenotyper.simulate import simulate

runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def cohort_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_table(simulate("immunosep-screening", 1500, seed=9),
                       tmp_path_factory.mktemp("cohort") / "held_out.csv")


def test_benchmark_writes_json_markdown_and_figures(cohort_csv: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = runner.invoke(app, ["benchmark", "--cohort", str(cohort_csv), "--label",
                                 "phenotype_true", "--output", str(out), "--bootstrap", "50",
                                 "--noise-repeats", "2"])
    assert result.exit_code == 0, result.output
    for name in ("benchmark.json", "benchmark.md", "confusion_matrices.png",
                 "decision_curves.png", "flip_rates.png"):
        assert (out / name).is_file(), name
    document = json.loads((out / "benchmark.json").read_text())
    names = {record["phenotyper"] for record in document["records"]}
    assert names == set(reference_rules())
    assert {"phenotyper", "metric", "value", "ci_low", "ci_high"} <= set(document["records"][0])
    assert "immunosep" in result.stdout and "1,500 patients" in result.stdout


def test_unknown_label_column_is_a_clear_error(cohort_csv: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["benchmark", "--cohort", str(cohort_csv), "--label",
                                 "phenotype_tru", "--output", str(tmp_path / "b")])
    assert result.exit_code == 2
    assert "Did you mean 'phenotype_true'?" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "b").exists()
