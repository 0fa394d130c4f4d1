"""`phenotyper train` and the label column: what was left out, the rule-label warning, and a
missing phenotype as one clear error (exit code 2, no traceback)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from phenotyper.cli import app
from phenotyper.cohort import write_table
from phenotyper.simulate import simulate

runner = CliRunner(env={"COLUMNS": "400"})  # wide enough that rich does not wrap a sentence


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh SQLite store for this test."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    yield tmp_path


def test_a_missing_phenotype_is_one_clear_error_without_traceback(store: Path) -> None:
    cohort = simulate("provide", 600, seed=5)
    cohort = cohort[cohort["phenotype_true"] != "MALS"]
    path = write_table(cohort, store / "no_mals.csv")
    result = runner.invoke(app, ["train", "--cohort", str(path), "--label", "phenotype_true",
                                 "--name", "m"])
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    [message] = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert message.startswith("Error: label column 'phenotype_true' has no 'MALS' patient")
    assert result.stderr.rstrip().endswith(message)  # one paragraph, the last thing said
    assert "add such patients" in message and "[labels]" in message
    assert "Traceback" not in result.output and "ValueError" not in result.output


def test_train_prints_what_was_left_out_and_the_rule_label_warning(store: Path) -> None:
    cohort = simulate("provide", 1200, seed=9)
    cohort["label"] = cohort["phenotype_rule"].astype(object)
    cohort.loc[[2, 5], "label"] = "??"
    cohort.loc[[6], "label"] = ""
    write_table(cohort, store / "cohort.csv")
    experiment = store / "rule.toml"
    experiment.write_text('name = "rule-label"\nregistered_model = "rulepheno"\n'
                          'label = "label"\n[cohort]\npath = "cohort.csv"\n'
                          '[candidates.logistic]\nC = [1.0]\n'
                          '[benchmark]\nbootstrap = 20\nnoise_repeats = 0\n')
    result = runner.invoke(app, ["train", str(experiment)])
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())  # rich may still wrap: compare the words
    for text in ("1,197 of 1,200 rows labelled", "1 without a label",
                 "2 unreadable values left out (row 3: '??', row 6: '??')",
                 "Warning: label column 'label' agrees with the ImmunoSep rule on 100.0%",
                 "the ImmunoSep rule's own answer", "'agreement' gate mode",
                 "Registered rulepheno version 1"):
        assert text in out, out
