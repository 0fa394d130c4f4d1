"""`phenotyper simulate`: what it writes reads back unchanged, and errors are clear."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from phenotyper.cli import app
from phenotyper.cohort import CohortError, read_cohort, write_table
from phenotyper.simulate import SYNTHETIC_COLUMN, is_synthetic, simulate

runner = CliRunner(env={"COLUMNS": "200"})


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_simulated_file_reads_back_as_the_same_cohort_with_no_issues(
    tmp_path: Path, suffix: str
) -> None:
    output = tmp_path / f"cohort{suffix}"
    result = runner.invoke(
        app, ["simulate", "--preset", "provide", "--n", "2000", "--seed", "4",
              "--output", str(output)])
    assert result.exit_code == 0, result.output
    assert "Wrote 2,000 synthetic patients" in result.stdout
    assert "20.0%" in result.stdout  # the preset's MALS target is shown beside the result

    expected = simulate("provide", 2000, seed=4)
    cohort = read_cohort(output)
    assert cohort.issues.empty
    assert is_synthetic(cohort.data)  # the mark survives the file format
    for column in expected.columns.drop(SYNTHETIC_COLUMN):
        left, right = cohort.data[column], expected[column]
        if pd.api.types.is_numeric_dtype(right):
            pd.testing.assert_series_equal(left.astype(float), right.astype(float),
                                           check_names=False)
        else:
            assert left.astype(str).tolist() == right.astype(str).tolist(), column


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--preset", "provde"], "Did you mean 'provide'?"),
        (["--output-bad"], None),
    ],
)
def test_bad_arguments_fail_without_traceback(
    tmp_path: Path, args: list[str], expected: str | None
) -> None:
    result = runner.invoke(app, ["simulate", "--output", str(tmp_path / "c.csv"), *args])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    if expected:
        assert expected in result.stderr
    assert not (tmp_path / "c.csv").exists()


def test_unsupported_output_suffix_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["simulate", "--n", "10", "--output", str(tmp_path / "c.xlsx")])
    assert result.exit_code == 2
    assert "c.xlsx" in result.stderr and ".parquet or .csv" in result.stderr


def test_an_interrupted_write_leaves_the_old_file_and_no_debris(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "cohort.parquet"
    old = simulate("provide", 50, seed=1)
    write_table(old, target)

    def write_half_then_fail(table, where, **kwargs):  # a disk that fills up mid-write
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", write_half_then_fail)
    with pytest.raises(OSError, match="No space"):
        write_table(simulate("provide", 80, seed=2), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort.parquet"]
    pd.testing.assert_frame_equal(pd.read_parquet(target), old)


def test_write_table_refuses_an_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(CohortError, match=r"\.parquet or \.csv"):
        write_table(simulate("provide", 5, seed=1), tmp_path / "cohort.json")


# --- write errors name the requested path, never the temporary file beside it -----------------

needs_proc = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")


@needs_proc
@pytest.mark.parametrize("name", ["x.csv", "x.parquet"])
def test_unwritable_output_names_the_requested_path(name: str) -> None:
    target = Path("/proc") / name  # /proc refuses new files, even for root
    result = runner.invoke(app, ["simulate", "--n", "5", "--output", str(target)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    message = result.stderr.strip()
    assert message.startswith(f"Error: Cannot write {target}: ")
    assert ".tmp" not in message and "Failed to open" not in message
    assert message.count("\n") == 0


@pytest.mark.parametrize("name", ["c.csv", "c.parquet"])
def test_output_that_is_a_directory_names_the_requested_path(tmp_path: Path, name: str) -> None:
    target = tmp_path / name
    target.mkdir()
    result = runner.invoke(app, ["simulate", "--n", "5", "--output", str(target)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"Error: Cannot write {target}: ")
    assert ".tmp" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no debris


@needs_proc
def test_write_table_error_carries_the_requested_path(tmp_path: Path) -> None:
    target = Path("/proc/cohort.parquet")
    with pytest.raises(OSError) as raised:
        write_table(simulate("provide", 5, seed=1), target)
    assert raised.value.filename == str(target)
    assert raised.value.strerror and ".tmp" not in raised.value.strerror
    assert ".tmp" not in str(raised.value)


def test_arrow_errors_while_writing_are_cohort_errors_naming_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(table, where, **kwargs):
        raise pa.ArrowInvalid(f"cannot write to '{where}'")

    monkeypatch.setattr(pa_csv, "write_csv", refuse)
    target = tmp_path / "cohort.csv"
    result = runner.invoke(app, ["simulate", "--n", "5", "--output", str(target)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert result.stderr.startswith(f"Error: Cannot write {target}: ")
    assert ".tmp" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_table_arrow_cannot_convert_is_a_cohort_error(tmp_path: Path) -> None:
    frame = pd.DataFrame({"patient_id": ["a", "b"], "mixed": [1, "x"]})
    with pytest.raises(CohortError, match=r"Cannot write .*cohort\.parquet"):
        write_table(frame, tmp_path / "cohort.parquet")
    assert list(tmp_path.iterdir()) == []


def _simulate_output(tmp_path: Path, preset: str) -> str:
    result = runner.invoke(app, ["simulate", "--preset", preset, "--n", "3000", "--seed", "1",
                                 "--output", str(tmp_path / "cohort.parquet")])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_a_trial_preset_prints_its_arms_beside_the_published_rates(tmp_path: Path) -> None:
    """ImmunoSep's targets are arm rates, and the screening table's mortality is on standard
    care: the printout compares like with like."""
    output = _simulate_output(tmp_path, "immunosep-trial")
    assert "SOFA response by arm received" in output and "28-day death by arm received" in output
    assert "35.1%" in output and "17.9%" in output  # response, treated and placebo targets
    assert "43.5%" in output and "49.7%" in output  # death targets
    assert "expected 28-day mortality on standard care" in output
    assert "No target for this table" not in output


@pytest.mark.parametrize(("preset", "disowned"), [
    ("all-comers-trial", "SOFA response by arm received"),
    ("confounded-treatment", "28-day death by arm received"),
    ("informative-missingness", "ImmunoSep rule on the measured markers"),
])
def test_a_preset_without_a_target_says_why_instead_of_showing_an_inherited_one(
    tmp_path: Path, preset: str, disowned: str
) -> None:
    output = _simulate_output(tmp_path, preset)
    after = output[output.index(disowned):]
    table = after[:after.index("No target for this table")]
    assert "target" not in table.split("\n", 2)[2]  # no target column in that table
    assert "35.1%" not in output and "17.9%" not in output
    assert "No target for this table" in after
