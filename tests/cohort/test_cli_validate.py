"""`phenotyper validate`: the report, the issue list, and clear errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
from typer.testing import CliRunner

from phenotyper.cli import app
from phenotyper.cohort import quality_report, read_cohort

runner = CliRunner(env={"COLUMNS": "200"})  # wide enough that rich does not fold cells


@pytest.fixture
def messy(tmp_path):
    """A small export with local names, a unit to convert and a few bad cells."""
    cohort = tmp_path / "export.csv"
    cohort.write_text("MRN,CRP,sofa,Ferritin\n"
                      "a,1.5,3,200\n"
                      "b,<0.5,2.5,310\n"
                      "a,haemolysed,30,\n"
                      "c,NA,7,95\n", encoding="utf-8")
    mapping = tmp_path / "export.toml"
    mapping.write_text('[columns]\npatient_id = { column = "MRN" }\n'
                       'crp_mg_l = { column = "CRP", unit = "mg/dL" }\n', encoding="utf-8")
    return cohort, mapping


def test_validate_prints_the_quality_report(messy):
    cohort, mapping = messy
    result = runner.invoke(app, ["validate", str(cohort), "--mapping", str(mapping)])
    assert result.exit_code == 0, result.output
    report = quality_report(read_cohort(cohort, mapping))
    out = result.stdout
    assert f"{report.n_rows} rows, {report.n_issues} issues on {report.n_rows_with_issues} rows" \
        in out
    for column in report.columns:
        assert column.column in out and column.source_column in out
    assert "mg/dL -> mg/L" in out
    for issue in report.issues:
        assert issue.kind in out
        assert f"row {issue.example_row}: {issue.example_value!r}" in out
    assert "'Ferritin' looks like ferritin_ng_ml" in out


def test_validate_writes_the_full_issue_list(messy, tmp_path):
    cohort, mapping = messy
    out = tmp_path / "issues.csv"
    result = runner.invoke(app, ["validate", str(cohort), "--mapping", str(mapping),
                                 "--issues-out", str(out)])
    assert result.exit_code == 0, result.output
    written = pd.read_csv(out, dtype=str, keep_default_na=False)
    expected = read_cohort(cohort, mapping).issues.astype(str)
    pd.testing.assert_frame_equal(written, expected, check_dtype=False)
    assert len(written) > 0


def test_validate_clean_file_says_so(tmp_path):
    path = tmp_path / "clean.csv"
    path.write_text("patient_id,ferritin_ng_ml\np1,300\np2,5000\n", encoding="utf-8")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0
    assert "No row-level issues" in result.stdout


@pytest.mark.parametrize(("files", "args", "expected"), [
    ({}, ["missing.csv"], ["missing.csv", "does not exist"]),
    ({"export.csv": "MRN,Ferritin\n1,200\n"}, ["export.csv"],
     ["export.csv", "'Ferritin' looks like ferritin_ng_ml", "mapping"]),
    ({"export.csv": "MRN,Ferritin\n1,200\n",
      "map.toml": '[columns]\nferritin_ng_ml = { column = "Ferritin", unit = "ng/ml FEU" }\n'},
     ["export.csv", "--mapping", "map.toml"],
     ["map.toml", "ferritin_ng_ml", "unknown unit 'ng/ml FEU'", "ng/mL"]),
    ({"export.csv": "MRN,Ferritin\n1,200\n",
      "map.toml": '[columns]\nferritin_ng_ml = { column = "ferritin" }\n'},
     ["export.csv", "--mapping", "map.toml"],
     ["map.toml", "'ferritin'", "export.csv", "Did you mean 'Ferritin'?"]),
])
def test_validate_errors_are_one_clear_paragraph(tmp_path, monkeypatch, files, args, expected):
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["validate", *args])
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    message = result.stderr
    assert message.startswith("Error: ") and message.strip().count("\n") == 0
    for text in expected:
        assert text in message
    assert "Traceback" not in result.output


def test_validate_unwritable_issue_list_is_a_clear_error(messy, tmp_path):
    cohort, mapping = messy
    target = tmp_path / "no" / "such" / "dir" / "issues.csv"
    result = runner.invoke(app, ["validate", str(cohort), "--mapping", str(mapping),
                                 "--issues-out", str(target)])
    assert result.exit_code == 2
    assert str(target) in result.stderr


def test_validate_error_from_a_real_process_has_no_traceback(tmp_path):
    path = tmp_path / "labs.csv"
    path.write_text("MRN;HLA-DR;IL-6\n1;4000;12\n", encoding="utf-8")
    done = subprocess.run([sys.executable, "-m", "phenotyper.cli", "validate", str(path)],
                          capture_output=True, text=True, check=False, timeout=60)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    for text in ("labs.csv", "'HLA-DR' looks like hla_dr_mab_per_cell",
                 "'IL-6' looks like il6_pg_ml"):
        assert text in done.stderr


@pytest.mark.parametrize("raised, code", [(KeyboardInterrupt, 130), (None, 0)])
def test_exit_codes_ctrl_c_is_130_and_success_is_0(tmp_path, monkeypatch, raised, code):
    """The console script's codes (Click alone would end Ctrl-C with 1, the internal-error
    code); Ctrl-C is raised where the reading would be, as the terminal's signal would."""
    import phenotyper.cohort
    from phenotyper.cli import main

    path = tmp_path / "c.csv"
    path.write_text("patient_id,crp_mg_l\na,5\n")
    if raised is not None:
        def interrupted(*args, **kwargs):
            raise raised
        monkeypatch.setattr(phenotyper.cohort, "read_cohort", interrupted)
    monkeypatch.setattr(sys, "argv", ["phenotyper", "validate", str(path)])
    with pytest.raises(SystemExit) as done:
        main()
    assert (done.value.code or 0) == code


def test_a_full_width_number_is_read_and_flagged_not_a_traceback(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("patient_id,ferritin_ng_ml\na,\uff16\uff11\uff10\uff10\nb,300\n",
                    encoding="utf-8")
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "unicode_digits" in result.stdout
    assert read_cohort(path).data["ferritin_ng_ml"].tolist() == [6100.0, 300.0]
