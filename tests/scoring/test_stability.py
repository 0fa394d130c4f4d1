"""Repeated samples: the simulator's second sample, the reader's duplicate rule with
sample_time, and what `phenotyper score` says about phenotype stability between consecutive
samples (model and rule) and per-patient counts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from phenotyper.cli import app
from phenotyper.cohort import DUPLICATE_ID, UNPARSEABLE, read_cohort, sample_days, write_table
from phenotyper.contract import INDETERMINATE, PHENOTYPES
from phenotyper.immunosep import PUBLISHED_RULE_STABILITY
from phenotyper.panel import PATIENT_ID, SAMPLE_TIME
from phenotyper.scoring.stability import phenotype_stability
from phenotyper.simulate import RULE_COLUMN, TRUTH_COLUMN, load_preset, simulate

runner = CliRunner(env={"COLUMNS": "400"})


def _kept(frame: pd.DataFrame, column: str) -> float:
    """Share of patients whose `column` is the same on day 1 and day 2 (both determinate)."""
    day1, day2 = frame.iloc[::2][column].to_numpy(), frame.iloc[1::2][column].to_numpy()
    called = (day1 != INDETERMINATE) & (day2 != INDETERMINATE)
    return float((day1 == day2)[called].mean())


def test_the_second_sample_changes_the_latent_phenotype_at_the_preset_rate() -> None:
    """At n = 20,000 the share of patients whose latent phenotype changed is the preset's
    transition share within 3 standard errors; the first samples are the one-sample cohort."""
    n, rate = 20_000, load_preset("provide")["repeat"]["transition_share"]
    both = simulate("provide", n, seed=3, samples=2)
    assert len(both) == 2 * n and both[SAMPLE_TIME].tolist()[:4] == [1, 2, 1, 2]
    assert (both[PATIENT_ID].iloc[::2].to_numpy() == both[PATIENT_ID].iloc[1::2].to_numpy()).all()
    changed = 1 - _kept(both, TRUTH_COLUMN)
    assert abs(changed - rate) < 3 * np.sqrt(rate * (1 - rate) / n)
    pd.testing.assert_frame_equal(
        both.iloc[::2].drop(columns=SAMPLE_TIME).reset_index(drop=True),
        simulate("provide", n, seed=3))
    # the day-2 rule is the rule on the day-2 markers, and it flips more than the truth does:
    # near its cut-offs day-to-day variation and assay noise move patients across
    assert 1 - _kept(both, RULE_COLUMN) > changed


def test_a_repeated_patient_is_a_duplicate_only_at_the_same_sample_time(tmp_path: Path) -> None:
    path = tmp_path / "repeated.csv"
    path.write_text("patient_id,sample_time,ferritin_ng_ml\nA,1,100\nA,2,200\nA,2,300\n"
                    "B,2026-01-05T08:00,5\nB,2026-01-06T08:00,6\n")
    issues = read_cohort(path).issues
    assert issues[issues.kind == DUPLICATE_ID].row.tolist() == [3]
    assert "same patient_id and sample_time as row 2" in issues.detail.iloc[0]
    path.write_text("patient_id,ferritin_ng_ml\nA,100\nA,200\n")  # without sample_time: a repeat
    assert read_cohort(path).issues.kind.tolist() == [DUPLICATE_ID]
    path.write_text("patient_id,sample_time,crp_mg_l\nA,2026-01-05,1\nA,yesterday,1\n"
                    "B,2025-13-45,1\nC,,1\n")
    issues = read_cohort(path).issues  # an unreadable time is an issue; a missing one is not
    assert issues.row.tolist() == [2, 3] and set(issues.kind) == {UNPARSEABLE}
    assert (issues.column == SAMPLE_TIME).all() and "ISO 8601" in issues.detail.iloc[0]


def test_validate_says_how_many_patients_the_samples_are_of(tmp_path: Path) -> None:
    path = write_table(simulate("provide", 300, seed=4, samples=2), tmp_path / "two.csv")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "Repeated samples: 600 rows of 300 patients, ordered by sample_time" in result.stdout


def test_sample_times_are_day_numbers_or_timestamps() -> None:
    np.testing.assert_allclose(sample_days(pd.Series(["1", "2.5", None])), [1, 2.5, np.nan])
    days = sample_days(pd.Series(["2026-01-05T08:00", "2026-01-06 20:00", "later"]))
    assert days[1] - days[0] == pytest.approx(1.5) and np.isnan(days[2])


def test_stability_pairs_consecutive_samples_in_time_order() -> None:
    """Patient 1 has samples at days 3, 1, 2 (rows out of order): pairs (1,2) and (2,3);
    patient 2 one sample; patient 3 a sample without a time (never paired); id 0: no id."""
    ids = np.array([1, 1, 1, 2, 3, 3, 0, 0], dtype=np.uint64)
    days = np.array([3, 1, 2, 1, 1, np.nan, 1, 2])
    mals, para, none = 0, 1, -1
    model = np.array([para, mals, mals, mals, mals, mals, mals, para], dtype=np.int8)
    rule = np.array([para, none, mals, mals, mals, para, mals, mals], dtype=np.int8)
    out = phenotype_stability(ids, days, model, rule, "last")
    assert out["pairs"] == 2 and out["patients_with_repeats"] == 1
    tied = phenotype_stability(ids, np.where(ids == 1, 1.0, days), model, rule)
    assert tied["pairs"] == 0  # three samples at one time: duplicates, not a sequence
    assert out["model"] == {"pairs": 2, "kept_share": 0.5}  # day 1->2 kept, 2->3 changed
    assert out["rule"] == {"pairs": 1, "kept_share": 0.0}  # day 1 indeterminate: one pair
    # last sample per patient: patient 1 day 3, patient 2, patient 3 (the untimed row last),
    # and each row without an id on its own
    assert out["patients"] == 5
    assert out["phenotype_counts"] == {PHENOTYPES[0]: 3, PHENOTYPES[1]: 2}


def test_score_reports_stability_against_a_simulated_second_sample(store: Path,
                                                                   tmp_path: Path) -> None:
    """The scored stability is what the output's phenotypes and the input's rule column give
    patient by patient; the rule's is set beside the published 88.3%; --per-patient last
    counts the day-2 rows; no repeated patient is an issue."""
    both = simulate("provide", 1500, seed=21, samples=2)
    source = write_table(both, tmp_path / "two_days.parquet")
    output = tmp_path / "scored.parquet"
    result = runner.invoke(app, ["score", "--input", str(source), "--output", str(output),
                                 "--model", "models:/batchmodel/1", "--per-patient", "last",
                                 "--report", str(tmp_path / "report.html")])
    assert result.exit_code == 0, result.output
    manifest = json.loads(Path(f"{output}.manifest.json").read_text())
    repeated = manifest["repeated_samples"]
    scored = pd.read_parquet(output)
    assert len(scored) == len(both) and (scored["issues"] == "").all()
    assert repeated["pairs"] == 1500 and repeated["patients_with_repeats"] == 1500
    assert repeated["model"]["kept_share"] == pytest.approx(_kept(scored, "phenotype"))
    assert repeated["rule"]["kept_share"] == pytest.approx(_kept(both, RULE_COLUMN))
    assert repeated["published_rule_kept_share"] == PUBLISHED_RULE_STABILITY
    day2 = scored.iloc[1::2]["phenotype"].value_counts().to_dict()
    assert repeated["patients"] == 1500 and repeated["phenotype_counts"] == day2
    assert "Stability between consecutive samples (1,500 pairs" in result.stdout
    assert f"published for the rule in PROVIDE: {PUBLISHED_RULE_STABILITY:.1%}" in result.stdout
    html = (tmp_path / "report.html").read_text()
    assert '<section id="repeated">' in html and "kept the phenotype" in html


def test_a_cohort_without_sample_times_has_no_stability_section(store: Path,
                                                                tmp_path: Path) -> None:
    source = write_table(simulate("provide", 200, seed=22), tmp_path / "one_day.parquet")
    output = tmp_path / "scored.parquet"
    result = runner.invoke(app, ["score", "--input", str(source), "--output", str(output),
                                 "--model", "models:/batchmodel/1"])
    assert result.exit_code == 0, result.output
    assert json.loads(Path(f"{output}.manifest.json").read_text())["repeated_samples"] is None
    assert "Stability" not in result.stdout


def test_keep_carries_named_input_columns_into_the_output(store: Path, tmp_path: Path) -> None:
    """--keep sample_time --keep death_28d: the output ends with them, as text, row by row;
    a column the input lacks or the output has is one clear error (exit 2)."""
    both = simulate("provide", 100, seed=23, samples=2)
    both["encounter_id"] = ["E" + str(i // 2) for i in range(len(both))]
    source = write_table(both, tmp_path / "two_days.csv")
    output = tmp_path / "scored.parquet"
    arguments = ["score", "--input", str(source), "--output", str(output), "--model",
                 "models:/batchmodel/1", "--explain", "none"]
    result = runner.invoke(app, [*arguments, "--keep", "sample_time", "--keep", "death_28d",
                                 "--keep", "encounter_id"])
    assert result.exit_code == 0, result.output
    scored = pd.read_parquet(output)
    assert list(scored.columns[-3:]) == ["sample_time", "death_28d", "encounter_id"]
    assert scored["sample_time"].tolist() == both["sample_time"].astype(str).tolist()
    assert scored["death_28d"].tolist() == both["death_28d"].astype(str).tolist()
    assert scored["encounter_id"].tolist() == both["encounter_id"].tolist()
    for keep, message in (("sampletime", "the input has no column sampletime. Did you mean "
                                         "'sample_time'?"),
                          ("phenotype", "the output already has a column phenotype")):
        refused = runner.invoke(app, [*arguments, "--keep", keep])
        assert refused.exit_code == 2 and message in refused.stderr, refused.output
