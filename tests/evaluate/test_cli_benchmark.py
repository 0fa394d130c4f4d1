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


@pytest.fixture(scope="module")
def trial_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_table(simulate("all-comers-trial", 2500, seed=10),
                       tmp_path_factory.mktemp("trial") / "trial.csv")


def _outcome_args(cohort: Path, out: Path) -> list[str]:
    return ["benchmark", "--cohort", str(cohort), "--output", str(out), "--bootstrap", "50",
            "--noise-repeats", "0", "--outcome", "sofa_response", "--outcome", "death_28d",
            "--treatment", "treatment", "--propensity", "treatment_probability"]


def test_benchmark_by_outcomes_prints_and_writes_the_policy_table(trial_csv: Path,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = runner.invoke(app, _outcome_args(trial_csv, out))  # no --label: outcomes alone
    assert result.exit_code == 0, result.output
    assert "Policy value: sofa_response" in result.stdout
    assert "best_arm" in result.stdout and "nobody" in result.stdout
    document = json.loads((out / "benchmark.json").read_text())
    records = {(r["phenotyper"], r["metric"], r["subgroup"]): r for r in document["records"]}
    rule = records[("immunosep", "policy_value_sofa_response", "all")]
    markdown = (out / "benchmark.md").read_text()
    # the Markdown table shows the JSON's number, and the response table comes before death's
    shown = f"{100 * rule['value']:.1f}% ({100 * rule['ci_low']:.1f}-{100 * rule['ci_high']:.1f})"
    assert shown in markdown
    assert markdown.index("Policy value: `sofa_response`") < markdown.index(
        "Policy value: `death_28d`")
    assert "## Headline" not in markdown  # no label, no label metrics
    assert document["meta"]["outcome"]["method"] == "ipw"
    assert (out / "treatment_effects.png").stat().st_size > 10_000
    assert not (out / "confusion_matrices.png").exists()


@pytest.mark.parametrize(("extra", "message"), [
    ([], "Give a reference label (--label) or outcome columns"),
    (["--outcome", "sofa_response", "--propensity", "treatment_probability"],
     "--propensity needs --treatment"),
    (["--outcome", "sofa_respons"], "Did you mean 'sofa_response'"),
    (["--outcome", "sofa_response", "--treatment", "phenotype_rule"],
     "column 'phenotype_rule' has"),
])
def test_outcome_options_get_clear_errors(trial_csv: Path, tmp_path: Path, extra: list[str],
                                          message: str) -> None:
    result = runner.invoke(app, ["benchmark", "--cohort", str(trial_csv), "--output",
                                 str(tmp_path / "b"), "--bootstrap", "10", *extra])
    assert result.exit_code == 2, result.output
    assert message in result.stderr.replace("\n", " ")
    assert "Traceback" not in result.output
    assert not (tmp_path / "b").exists()


def test_a_hospital_export_with_its_own_names_and_codes_is_judged_by_outcomes(
        tmp_path: Path) -> None:
    """Local column names and codes for the arm, the outcomes and the label, through a mapping
    file: the benchmark reads them as phenotyper's own."""
    trial = simulate("all-comers-trial", 1500, seed=12)
    export = trial.rename(columns={"treatment": "Arm", "treatment_probability": "P_arm",
                                   "sofa_response": "Responder", "death_28d": "Died"})
    export["Arm"] = export["Arm"].map({"anakinra": "A", "interferon_gamma": "G",
                                       "placebo": "P"})
    export["Responder"] = export["Responder"].map({1: "yes", 0: "no"})
    export["Phenotype"] = export["phenotype_true"].map(
        {"MALS": "1", "immunoparalysis": "2", "unclassified": "3"})
    export = export.drop(columns=["phenotype_true"])
    path = write_table(export, tmp_path / "export.csv")
    mapping = tmp_path / "mapping.toml"
    mapping.write_text(
        '[columns]\ntreatment = { column = "Arm", values = { "A" = "anakinra", '
        '"G" = "interferon_gamma", "P" = "placebo" } }\ntreatment_probability = "P_arm"\n'
        'sofa_response = "Responder"\ndeath_28d = "Died"\n'
        '[labels]\n"1" = "MALS"\n"2" = "immunoparalysis"\n"3" = "unclassified"\n')
    out = tmp_path / "bench"
    result = runner.invoke(app, [*_outcome_args(path, out), "--mapping", str(mapping),
                                 "--label", "Phenotype"])
    assert result.exit_code == 0, result.output
    document = json.loads((out / "benchmark.json").read_text())
    assert document["meta"]["labels"]["n_recoded"] == len(trial)
    records = {(r["phenotyper"], r["metric"], r["subgroup"]): r["value"]
               for r in document["records"]}
    assert records[("immunosep", "n", "all")] == len(trial)
    # the same numbers as the cohort in phenotyper's own names
    direct = tmp_path / "direct"
    canonical = write_table(trial, tmp_path / "canonical.csv")
    assert runner.invoke(app, [*_outcome_args(canonical, direct), "--label",
                               "phenotype_true"]).exit_code == 0
    again = {(r["phenotyper"], r["metric"], r["subgroup"]): r["value"]
             for r in json.loads((direct / "benchmark.json").read_text())["records"]}
    key = ("immunosep", "policy_value_sofa_response", "all")
    assert records[key] == pytest.approx(again[key])
