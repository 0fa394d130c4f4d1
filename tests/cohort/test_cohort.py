"""The cohort reader: messy lab values, units, mappings, clear whole-file errors."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from phenotyper.cohort import (
    CSV_READERS,
    ISSUE_COLUMNS,
    CohortError,
    _arrow_blocks,
    _delimited_blocks,
    _NotAlike,
    open_cohort,
    quality_report,
    read_cohort,
)
from phenotyper.panel import CANONICAL_COLUMNS, NUMERIC_MARKERS, PANEL

# The spec's missing-value spellings, written out independently of the code under test.
MISSING_SPELLINGS = ["", "   ", "NA", "na", "N/A", "n/a", "#N/A", "NaN", "nan", "null", "NULL",
                     "None", "-", "."]

# Reference conversions (value in unit x factor = value in the panel's canonical unit), from
# the clinical equivalences themselves, not from panel.py:
#   ferritin 1 ng/mL = 1 ug/L = 2.247 pmol/L; CRP 1 mg/dL = 10 mg/L; bilirubin 17.1 umol/L =
#   1 mg/dL; triglycerides 1 mmol/L = 88.57 mg/dL; creatinine 88.42 umol/L = 1 mg/dL; lactate
#   9.01 mg/dL = 1 mmol/L; 1 ukat/L = 60 U/L; 10^9/L = 10^3/uL = 1000 cells/uL; D-dimer
#   DDU = FEU / 2; 1 ng/mL = 1000 pg/mL; 1 year = 12 months.
CELL_COUNT = {"10^9/L": 1, "10e9/L": 1, "x10^9/L": 1, "G/L": 1, "10*9/L": 1, "10^3/uL": 1,
              "x10^3/uL": 1, "K/uL": 1, "10^3/mm3": 1, "thou/uL": 1,
              "/uL": 1 / 1000, "cells/uL": 1 / 1000, "/mm3": 1 / 1000, "cells/mm3": 1 / 1000}
CYTOKINE = {"pg/mL": 1, "ng/L": 1, "ng/mL": 1000}
ENZYME = {"U/L": 1, "IU/L": 1, "ukat/L": 60}
REFERENCE_FACTORS: dict[str, dict[str, float]] = {
    "ferritin_ng_ml": {"ng/mL": 1, "ug/L": 1, "mg/L": 1000, "pmol/L": 1 / 2.247},
    "hla_dr_mab_per_cell": {"antibodies/cell": 1, "mAb/cell": 1, "AB/c": 1, "ABC": 1,
                            "mAb/monocyte": 1, "antibodies bound per cell": 1},
    "crp_mg_l": {"mg/L": 1, "ug/mL": 1, "mg/dL": 10},
    "pct_ng_ml": {"ng/mL": 1, "ug/L": 1, "pg/mL": 1 / 1000},
    "il6_pg_ml": CYTOKINE,
    "il10_pg_ml": CYTOKINE,
    "lymphocytes_10e9_l": CELL_COUNT,
    "neutrophils_10e9_l": CELL_COUNT,
    "monocytes_10e9_l": CELL_COUNT,
    "platelets_10e9_l": CELL_COUNT,
    "fibrinogen_g_l": {"g/L": 1, "mg/dL": 1 / 100, "mg/L": 1 / 1000},
    "d_dimer_mg_l": {"mg/L FEU": 1, "mg/L": 1, "ug/mL": 1, "ug/mL FEU": 1, "ng/mL": 1 / 1000,
                     "ng/mL FEU": 1 / 1000, "ug/L": 1 / 1000, "ug/L FEU": 1 / 1000,
                     "mg/L DDU": 2, "ng/mL DDU": 2 / 1000, "ug/L DDU": 2 / 1000},
    "ast_u_l": ENZYME,
    "alt_u_l": ENZYME,
    "bilirubin_mg_dl": {"mg/dL": 1, "umol/L": 1 / 17.1},
    "triglycerides_mg_dl": {"mg/dL": 1, "mmol/L": 88.57},
    "lactate_mmol_l": {"mmol/L": 1, "mEq/L": 1, "mg/dL": 1 / 9.01},
    "creatinine_mg_dl": {"mg/dL": 1, "umol/L": 1 / 88.42, "mmol/L": 1000 / 88.42},
    "sofa": {"points": 1, "score": 1},
    "age_years": {"years": 1, "y": 1, "yr": 1, "months": 1 / 12},
}


def write(tmp_path, text: str, name: str = "cohort.csv", encoding: str = "utf-8"):
    path = tmp_path / name
    path.write_text(text, encoding=encoding)
    return path


def issues_at(cohort, row: int, column: str) -> pd.DataFrame:
    issues = cohort.issues
    return issues[(issues["row"] == row) & (issues["column"] == column)]


def single_issue(cohort, row: int, column: str) -> pd.Series:
    found = issues_at(cohort, row, column)
    assert len(found) == 1, cohort.issues
    return found.iloc[0]


def read_column(tmp_path, column: str, cells: list[str], *, sep: str = ",",
                mapping: str | None = None):
    """Read a file with a patient_id column and one marker column holding `cells`."""
    lines = [f"patient_id{sep}{column}"]
    lines += [f"p{i}{sep}\"{cell}\"" for i, cell in enumerate(cells)]
    path = write(tmp_path, "\n".join(lines) + "\n")
    mapping_path = write(tmp_path, mapping, "mapping.toml") if mapping else None
    return read_cohort(path, mapping_path)


# --- the plain case ---------------------------------------------------------------------------


def test_canonical_file_reads_typed_columns_in_order_with_extras_after(tmp_path):
    path = write(tmp_path, "note,patient_id,ferritin_ng_ml,sex,site_id,ward\n"
                           "NA,p2,5000,F,A,ICU\n"
                           "late,p1,120.5,M,B,\n")
    cohort = read_cohort(path)
    data = cohort.data
    assert list(data.columns) == [*CANONICAL_COLUMNS, "note", "ward"]
    assert data["ferritin_ng_ml"].dtype == np.float64
    assert data["ferritin_ng_ml"].tolist() == [5000.0, 120.5]
    assert data["patient_id"].tolist() == ["p2", "p1"]
    assert data["sex"].tolist() == ["F", "M"]
    assert data["note"].tolist() == ["NA", "late"]  # passed through unchanged, "NA" is text
    assert data["ward"].tolist() == ["ICU", ""]
    assert data["crp_mg_l"].isna().all()  # absent canonical column: present, all missing
    assert cohort.issues.empty
    assert list(cohort.issues.columns) == list(ISSUE_COLUMNS)
    assert cohort.columns == {"patient_id": "patient_id", "site_id": "site_id",
                              "ferritin_ng_ml": "ferritin_ng_ml", "sex": "sex"}
    assert cohort.units["ferritin_ng_ml"] == "ng/mL"
    assert cohort.source == str(path)


@pytest.mark.parametrize("cell", MISSING_SPELLINGS)
def test_missing_spellings_are_missing_not_issues(tmp_path, cell):
    cohort = read_column(tmp_path, "crp_mg_l", ["12", cell])
    assert math.isnan(cohort.data["crp_mg_l"].iloc[1])
    assert cohort.issues.empty


@pytest.mark.parametrize("cell", ["  4.5 ", "+4.5", "4,5", "4.50", "0004.5", "45e-1"])
def test_spellings_of_four_and_a_half(tmp_path, cell):
    cohort = read_column(tmp_path, "crp_mg_l", [cell])
    assert cohort.data["crp_mg_l"].iloc[0] == pytest.approx(4.5)
    assert cohort.issues.empty


# --- censored values --------------------------------------------------------------------------


@pytest.mark.parametrize(("cell", "bound", "kind"), [
    ("<0.5", 0.5, "censored_low"),
    ("< 0.5", 0.5, "censored_low"),
    ("<=0.5", 0.5, "censored_low"),
    ("\u22640.5", 0.5, "censored_low"),
    ("<0,5", 0.5, "censored_low"),
    (">100000", 100000, "censored_high"),
    (">=100000", 100000, "censored_high"),
    ("\u2265 100000", 100000, "censored_high"),
    (">100,000", 100000, "censored_high"),
])
def test_censored_values_are_kept_at_the_bound(tmp_path, cell, bound, kind):
    column = "ferritin_ng_ml" if kind == "censored_high" else "crp_mg_l"
    cohort = read_column(tmp_path, column, [cell])
    assert cohort.data[column].iloc[0] == pytest.approx(bound)
    issue = single_issue(cohort, 1, column)
    assert issue["kind"] == kind
    assert issue["value"] == cell
    assert f"{bound:g}" in issue["detail"]


def test_censored_bound_is_converted_to_canonical_units(tmp_path):
    cohort = read_column(tmp_path, "CRP", ["<0.3"],
                         mapping='[columns]\ncrp_mg_l = { column = "CRP", unit = "mg/dL" }\n')
    assert cohort.data["crp_mg_l"].iloc[0] == pytest.approx(3.0)
    assert single_issue(cohort, 1, "crp_mg_l")["kind"] == "censored_low"


# --- decimal marks and thousands separators ---------------------------------------------------


@pytest.mark.parametrize(("cell", "expected"), [
    ("4,5", 4.5), ("1.234,5", 1234.5), ("1,234.5", 1234.5), ("12,25", 12.25),
    ("1.234.567", 1234567), ("1,234,567", 1234567), ("1 234,5", 1234.5),
])
def test_unambiguous_separators(tmp_path, cell, expected):
    mapping = '[columns]\npct_ng_ml = { column = "PCT", unit = "pg/mL" }\n'
    cohort = read_column(tmp_path, "PCT", [cell], mapping=mapping)
    assert cohort.data["pct_ng_ml"].iloc[0] == pytest.approx(expected / 1000)
    assert cohort.issues.empty


def test_semicolon_file_with_decimal_commas(tmp_path):
    path = write(tmp_path, "patient_id;ferritin_ng_ml;crp_mg_l;sex\n"
                           "p1;4,420;12,5;F\n"
                           "p2;812;<0,5;M\n")
    cohort = read_cohort(path)
    assert cohort.data["crp_mg_l"].tolist() == pytest.approx([12.5, 0.5])
    assert cohort.data["ferritin_ng_ml"].tolist() == pytest.approx([4.42, 812])
    issue = single_issue(cohort, 1, "ferritin_ng_ml")
    assert issue["kind"] == "ambiguous_separator"
    assert "4.42" in issue["detail"] and "4420" in issue["detail"] and "';'" in issue["detail"]
    assert cohort.data["sex"].tolist() == ["F", "M"]


def test_ambiguous_comma_is_thousands_without_decimal_commas_in_the_column(tmp_path):
    cohort = read_column(tmp_path, "ferritin_ng_ml", ["4,420", "812.5"])
    assert cohort.data["ferritin_ng_ml"].tolist() == [4420.0, 812.5]
    issue = single_issue(cohort, 1, "ferritin_ng_ml")
    assert issue["kind"] == "ambiguous_separator"
    assert "thousands" in issue["detail"] and "4.42" in issue["detail"]


def test_ambiguous_comma_is_decimal_when_the_column_uses_decimal_commas(tmp_path):
    cohort = read_column(tmp_path, "ferritin_ng_ml", ["4,420", "812,5"])
    assert cohort.data["ferritin_ng_ml"].tolist() == pytest.approx([4.42, 812.5])
    issue = single_issue(cohort, 1, "ferritin_ng_ml")
    assert issue["kind"] == "ambiguous_separator"
    assert "decimal" in issue["detail"]
    assert issues_at(cohort, 2, "ferritin_ng_ml").empty


def test_ambiguous_dot_is_thousands_in_a_decimal_comma_column(tmp_path):
    cohort = read_column(tmp_path, "ferritin_ng_ml", ["4.420", "812,5", "4.42"])
    assert cohort.data["ferritin_ng_ml"].tolist() == pytest.approx([4420, 812.5, 4.42])
    assert single_issue(cohort, 1, "ferritin_ng_ml")["kind"] == "ambiguous_separator"
    assert len(cohort.issues) == 1


def test_dot_with_three_decimals_is_a_decimal_point_in_an_ordinary_column(tmp_path):
    cohort = read_column(tmp_path, "ferritin_ng_ml", ["4.420", "812.5"])
    assert cohort.data["ferritin_ng_ml"].tolist() == pytest.approx([4.42, 812.5])
    assert cohort.issues.empty


@pytest.mark.parametrize(("decimal", "comma_value", "dot_value"), [
    (",", 4.42, 4420.0), (".", 4420.0, 4.42)])
def test_declared_decimal_mark_settles_ambiguity_silently(tmp_path, decimal, comma_value,
                                                          dot_value):
    mapping = f'[options]\ndecimal = "{decimal}"\n'
    cohort = read_column(tmp_path, "ferritin_ng_ml", ["4,420", "4.420"], mapping=mapping)
    assert cohort.data["ferritin_ng_ml"].tolist() == pytest.approx([comma_value, dot_value])
    assert cohort.issues.empty


# --- values that cannot be used ---------------------------------------------------------------


@pytest.mark.parametrize("cell", ["haemolysed", "12 mg/L", "5..2", "4,5,6", "1e", "<", "--3",
                                  "inf", "0x10", "12%"])
def test_unparseable_cells_are_missing_with_an_issue(tmp_path, cell):
    cohort = read_column(tmp_path, "crp_mg_l", [cell, "3"])
    assert math.isnan(cohort.data["crp_mg_l"].iloc[0])
    assert cohort.data["crp_mg_l"].iloc[1] == 3.0
    issue = single_issue(cohort, 1, "crp_mg_l")
    assert (issue["kind"], issue["value"], issue["source_column"]) == (
        "unparseable", cell, "crp_mg_l")


@pytest.mark.parametrize("cell", ["-3", "\u22123", "- 3", "<-1"])
def test_negative_values_are_missing_with_an_issue(tmp_path, cell):
    cohort = read_column(tmp_path, "crp_mg_l", [cell])
    assert math.isnan(cohort.data["crp_mg_l"].iloc[0])
    assert single_issue(cohort, 1, "crp_mg_l")["kind"] == "negative"


def test_plausible_range_is_inclusive_and_checked_after_conversion(tmp_path):
    mapping = '[columns]\nferritin_ng_ml = { column = "Ferritin", unit = "mg/L" }\n'
    # 500 mg/L = 500000 ng/mL (the upper bound); 600 mg/L and 0.0005 mg/L (0.5 ng/mL) are not.
    cohort = read_column(tmp_path, "Ferritin", ["500", "600", "0.0005", "0.001"],
                         mapping=mapping)
    values = cohort.data["ferritin_ng_ml"]
    assert values.iloc[0] == pytest.approx(500_000)
    assert values.iloc[3] == pytest.approx(1)
    assert values.iloc[[1, 2]].isna().all()
    for row in (2, 3):
        issue = single_issue(cohort, row, "ferritin_ng_ml")
        assert issue["kind"] == "implausible"
        assert "1 to 500000 ng/mL" in issue["detail"]
    assert len(cohort.issues) == 2


@pytest.mark.parametrize(("cell", "ok"), [("0", True), ("24", True), ("9", True), ("2.5", False),
                                          ("25", False), ("9,0", True)])
def test_sofa_is_a_whole_number_from_0_to_24(tmp_path, cell, ok):
    cohort = read_column(tmp_path, "sofa", [cell])
    value = cohort.data["sofa"].iloc[0]
    if ok:
        assert value == float(cell.replace(",", "."))
        assert cohort.issues.empty
    else:
        assert math.isnan(value)
        assert single_issue(cohort, 1, "sofa")["kind"] == "implausible"


# --- identifiers and sex ----------------------------------------------------------------------


def test_missing_and_duplicate_patient_ids_are_flagged_and_kept(tmp_path):
    path = write(tmp_path, "patient_id,crp_mg_l\na,1\nb,2\na,3\n,4\na,5\nNA,6\n")
    cohort = read_cohort(path)
    assert cohort.data["crp_mg_l"].tolist() == [1, 2, 3, 4, 5, 6]
    assert cohort.data["patient_id"].tolist()[:3] == ["a", "b", "a"]
    duplicates = cohort.issues[cohort.issues["kind"] == "duplicate_id"]
    assert duplicates["row"].tolist() == [3, 5]
    assert all("row 1" in detail for detail in duplicates["detail"])
    missing = cohort.issues[cohort.issues["kind"] == "missing_id"]
    assert missing["row"].tolist() == [4, 6]


@pytest.mark.parametrize(("cell", "expected"), [
    ("F", "F"), ("f", "F"), ("Female", "F"), ("WOMAN", "F"), (" w ", "F"),
    ("M", "M"), ("male", "M"), ("Man", "M"), ("masc", "M")])
def test_sex_aliases(tmp_path, cell, expected):
    cohort = read_cohort(write(tmp_path, f"sex,crp_mg_l\n{cell},3\n"))
    assert cohort.data["sex"].tolist() == [expected]
    assert cohort.issues.empty


def test_sex_codes_from_the_mapping(tmp_path):
    path = write(tmp_path, "Gender,crp_mg_l\n1,3\n2,4\nF,5\nx,6\n,7\n")
    mapping = write(tmp_path, '[columns]\nsex = { column = "Gender", values = { "1" = "M", '
                              '"2" = "f" } }\n', "mapping.toml")
    cohort = read_cohort(path, mapping)
    assert cohort.data["sex"].iloc[:3].tolist() == ["M", "F", "F"]
    assert cohort.data["sex"].iloc[3:].isna().all()
    issue = single_issue(cohort, 4, "sex")
    assert (issue["kind"], issue["source_column"], issue["value"]) == (
        "unknown_category", "Gender", "x")
    assert len(cohort.issues) == 1


# --- units and mapping ------------------------------------------------------------------------


def test_reference_table_covers_every_unit_spelling_in_the_panel():
    panel_units = {name: set(PANEL[name].units) | {PANEL[name].unit} for name in NUMERIC_MARKERS}
    assert {name: set(units) for name, units in REFERENCE_FACTORS.items()} == panel_units


UNIT_CASES = [(name, unit, factor) for name, units in REFERENCE_FACTORS.items()
              for unit, factor in units.items()]


@pytest.mark.parametrize(("column", "unit", "factor"), UNIT_CASES,
                         ids=[f"{c}-{u}" for c, u, _ in UNIT_CASES])
def test_every_unit_converts_to_canonical(tmp_path, column, unit, factor):
    marker = PANEL[column]
    target = round(marker.low + (marker.high - marker.low) / 8)  # well inside the range
    source_value = target / factor
    mapping = f'[columns]\n{column} = {{ column = "Lab value", unit = "{unit}" }}\n'
    cohort = read_column(tmp_path, "Lab value", [repr(source_value)], mapping=mapping)
    assert cohort.data[column].iloc[0] == pytest.approx(source_value * factor, rel=1e-9)
    assert cohort.units[column] == unit
    assert cohort.issues.empty


@pytest.mark.parametrize(("column", "unit", "value", "canonical"), [
    ("crp_mg_l", "mg/dL", 1, 10),
    ("bilirubin_mg_dl", "umol/L", 17.1, 1),
    ("bilirubin_mg_dl", "\u00b5mol/l", 17.1, 1),
    ("triglycerides_mg_dl", "mmol/L", 1, 88.57),
    ("creatinine_mg_dl", "umol/L", 88.42, 1),
    ("lactate_mmol_l", "mg/dL", 9.01, 1),
    ("ferritin_ng_ml", "pmol/L", 2.247, 1),
    ("lymphocytes_10e9_l", "cells/uL", 1500, 1.5),
    ("alt_u_l", "ukat/L", 1, 60),
    ("d_dimer_mg_l", "ng/mL DDU", 500, 1),
])
def test_textbook_conversions(tmp_path, column, unit, value, canonical):
    mapping = f'[columns]\n{column} = {{ column = "X", unit = "{unit}" }}\n'
    cohort = read_column(tmp_path, "X", [str(value)], mapping=mapping)
    assert cohort.data[column].iloc[0] == pytest.approx(canonical, rel=1e-9)


def test_mapping_renames_columns_and_keeps_unmapped_ones(tmp_path):
    path = write(tmp_path, "MRN,Ferritin,CRP,Ward\nx1,800,2.5,ICU\n")
    mapping = write(tmp_path, '[columns]\npatient_id = "MRN"\n'
                              'ferritin_ng_ml = { column = "Ferritin", unit = "ug/L" }\n'
                              'crp_mg_l = { column = "CRP", unit = "mg/dL" }\n', "mapping.toml")
    cohort = read_cohort(path, mapping)
    row = cohort.data.iloc[0]
    assert (row["patient_id"], row["ferritin_ng_ml"], row["crp_mg_l"]) == ("x1", 800.0, 25.0)
    assert list(cohort.data.columns) == [*CANONICAL_COLUMNS, "Ward"]
    assert cohort.columns["crp_mg_l"] == "CRP"
    assert cohort.units["crp_mg_l"] == "mg/dL"


# --- Parquet ----------------------------------------------------------------------------------


def test_parquet_numeric_and_text_columns(tmp_path):
    frame = pd.DataFrame({
        "patient_id": [101, 102, 103],
        "ferritin_ng_ml": [5000.0, np.nan, -2.0],
        "crp_mg_l": ["4,5", "<0.5", "haemolysed"],
        "sex": ["female", None, "M"],
        "flag": [True, False, True],
    })
    path = tmp_path / "cohort.parquet"
    frame.to_parquet(path)
    cohort = read_cohort(path)
    data = cohort.data
    assert data["patient_id"].tolist() == ["101", "102", "103"]
    assert data["ferritin_ng_ml"].iloc[0] == 5000.0
    assert data["ferritin_ng_ml"].iloc[1:].isna().all()
    assert data["crp_mg_l"].iloc[:2].tolist() == [4.5, 0.5]
    assert data["sex"].iloc[[0, 2]].tolist() == ["F", "M"]
    assert data["flag"].tolist() == [True, False, True]
    kinds = {(row, column): kind for row, column, kind
             in cohort.issues[["row", "column", "kind"]].itertuples(index=False)}
    assert kinds == {(3, "ferritin_ng_ml"): "negative", (2, "crp_mg_l"): "censored_low",
                     (3, "crp_mg_l"): "unparseable"}


# --- property: arbitrary cells ----------------------------------------------------------------

TRICKY_CELLS = ["4,420", "4.420", "<0.5", "\u2265 12", "1.234,5", "1,234.5", "NA", "-", ".",
                "\u22123", "12 mg/L", "5..2", " 7 ", "1e3", "+2", "0,5", "1e400", "600000",
                "nan", "inf", "", "<", "1 234", "\u00a012\u00a0"]
cells_strategy = st.lists(st.one_of(st.sampled_from(TRICKY_CELLS), st.text(max_size=12)),
                          min_size=1, max_size=25)
CSV_ALPHABET = "0123456789.,;<>=+-\u2212\u2264\u2265 eENAa\t'"
csv_cells_strategy = st.lists(st.one_of(st.sampled_from(TRICKY_CELLS),
                                        st.text(alphabet=CSV_ALPHABET, max_size=10)),
                              min_size=1, max_size=25)


RULE_MARKERS = ("ferritin_ng_ml", "hla_dr_mab_per_cell")


def check_cells(cohort, cells: list[str], column: str) -> None:
    """Each cell is missing (no issue), or a number, or missing with exactly one issue."""
    assert len(cohort.data) == len(cells)
    assert cohort.data["order"].astype(int).tolist() == list(range(len(cells)))
    issues = cohort.issues[cohort.issues["column"] == column]
    assert not issues.duplicated(["row", "column"]).any()
    by_row = dict(zip(issues["row"], zip(issues["kind"], issues["value"], strict=True),
                      strict=True))
    values = cohort.data[column].to_numpy()
    for row, (cell, value) in enumerate(zip(cells, values, strict=True), start=1):
        issue = by_row.get(row)
        if cell.strip().lower() in {token.lower() for token in MISSING_SPELLINGS}:
            assert math.isnan(value) and issue is None
        elif math.isnan(value):
            unusable = {"unparseable", "negative", "implausible"}
            if column in RULE_MARKERS:  # a censored bound that straddles the rule's cut-off
                unusable |= {"censored_low", "censored_high"}
            assert issue is not None and issue[0] in unusable
        else:
            assert issue is None or issue[0] in {
                "censored_low", "censored_high", "ambiguous_separator"}
            if issue is None and re.fullmatch(r"[0-9]+(\.[0-9]+)?", cell.strip()):
                assert value == float(cell.strip())
        if issue is not None:
            assert issue[1] == cell


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cells=cells_strategy)
def test_arbitrary_text_cells_never_crash_parquet(tmp_path_factory, cells):
    path = tmp_path_factory.getbasetemp() / "property.parquet"
    pd.DataFrame({"order": range(len(cells)), "ferritin_ng_ml": cells}).to_parquet(path)
    check_cells(read_cohort(path), cells, "ferritin_ng_ml")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cells=csv_cells_strategy, sep=st.sampled_from([",", ";", "\t"]))
def test_arbitrary_text_cells_never_crash_csv(tmp_path_factory, cells, sep):
    path = tmp_path_factory.getbasetemp() / "property.csv"
    pd.DataFrame({"order": range(len(cells)), "crp_mg_l": cells}).to_csv(
        path, sep=sep, index=False, quoting=1)  # csv.QUOTE_ALL
    check_cells(read_cohort(path), cells, "crp_mg_l")


# --- quality report ---------------------------------------------------------------------------


def test_quality_report_counts_and_ranges(tmp_path):
    path = write(tmp_path, "patient_id,CRP,Ferritin\n"
                           "a,1,x\nb,2,y\nc,3,\nd,NA,5000\n")
    mapping = write(tmp_path, '[columns]\ncrp_mg_l = { column = "CRP", unit = "mg/dL" }\n',
                    "mapping.toml")
    report = quality_report(read_cohort(path, mapping))
    assert (report.n_rows, report.n_issues, report.n_rows_with_issues) == (4, 0, 0)
    crp = next(item for item in report.columns if item.column == "crp_mg_l")
    assert (crp.source_column, crp.unit, crp.unit_from) == ("CRP", "mg/L", "mg/dL")
    assert (crp.n_missing, crp.pct_missing) == (1, 25.0)
    assert (crp.min, crp.median, crp.max) == pytest.approx((10, 20, 30))
    assert report.unmapped == {"Ferritin": "ferritin_ng_ml"}
    assert "ferritin_ng_ml" in report.absent


def test_quality_report_issue_counts_match_the_issue_list(tmp_path):
    path = write(tmp_path, "patient_id,crp_mg_l,sofa\n"
                           "a,x,2\na,<1,2.5\nb,y,30\n")
    cohort = read_cohort(path)
    report = quality_report(cohort)
    counted = {(item.column, item.kind): item.count for item in report.issues}
    expected = cohort.issues.groupby(["column", "kind"]).size().to_dict()
    assert counted == expected
    assert counted[("crp_mg_l", "unparseable")] == 2
    first = next(item for item in report.issues if item.kind == "unparseable")
    assert (first.example_row, first.example_value) == (1, "x")
    assert report.n_rows_with_issues == 3


# --- whole-file errors ------------------------------------------------------------------------


def test_error_missing_file_suggests_a_near_name(tmp_path):
    write(tmp_path, "crp_mg_l\n1\n", "cohort.csv")
    with pytest.raises(CohortError, match=r"cohrt\.csv.*does not exist.*'cohort\.csv'"):
        read_cohort(tmp_path / "cohrt.csv")


@pytest.mark.parametrize(("name", "content", "pattern"), [
    ("cohort.xlsx", "x", r"unsupported type '\.xlsx'.*CSV"),
    ("cohort.csv", "", r"is empty"),
    ("cohort.csv", "crp_mg_l,sofa\n", r"no data rows"),
    ("cohort.csv", "ferritin_ng_ml,b\n1,2\n3,4,5\n", r"more fields than the header"),
    ("cohort.parquet", "not parquet at all", r"not a readable Parquet file"),
])
def test_errors_for_unreadable_files(tmp_path, name, content, pattern):
    path = write(tmp_path, content, name)
    with pytest.raises(CohortError, match=pattern) as error:
        read_cohort(path)
    assert name in str(error.value)


def test_error_for_a_workbook_saved_as_csv(tmp_path):
    path = tmp_path / "cohort.csv"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CohortError, match="not a text file"):
        read_cohort(path)


def test_latin1_file_is_read(tmp_path):
    path = write(tmp_path, "Pat\u00edent,crp_mg_l\n\u00e9,4\n", encoding="latin-1")
    cohort = read_cohort(path)
    assert cohort.data["Pat\u00edent"].tolist() == ["\u00e9"]


def test_no_marker_column_names_columns_and_suggests_a_mapping(tmp_path):
    path = write(tmp_path, "MRN,Ferritin,CRP (mg/dL),Gender\n1,200,3,F\n")
    with pytest.raises(CohortError) as error:
        read_cohort(path)
    message = str(error.value)
    for text in ("cohort.csv", "'MRN'", "'Ferritin' looks like ferritin_ng_ml",
                 "'CRP (mg/dL)' looks like crp_mg_l", "mapping"):
        assert text in message


def test_case_variant_of_a_canonical_name_is_suggested_not_accepted(tmp_path):
    path = write(tmp_path, "FERRITIN_NG_ML,Crp_mg_l\n200,3\n")
    with pytest.raises(CohortError, match="'FERRITIN_NG_ML' looks like ferritin_ng_ml"):
        read_cohort(path)


@pytest.mark.parametrize(("mapping", "pattern"), [
    ('[columns]\nferritin = { column = "Ferritin" }\n',
     r"unknown column 'ferritin'.*ferritin_ng_ml"),
    ('[columns]\nferritin_ng_ml = { column = "Ferritin", unti = "ng/mL" }\n',
     r"unknown key 'unti'.*'unit'"),
    ('[columns]\nferritin_ng_ml = { column = "Feritin" }\n',
     r"reads column 'Feritin'.*not in .*cohort\.csv.*'Ferritin'"),
    ('[columns]\nferritin_ng_ml = { column = "Ferritin", unit = "ng/dl" }\n',
     r"unknown unit 'ng/dl'.*'ng/mL'.*Accepted units: ng/mL, ug/L, mg/L, pmol/L"),
    ('[columns]\npatient_id = { column = "MRN", unit = "x" }\n', r"unknown key 'unit'"),
    ('[column]\nferritin_ng_ml = "Ferritin"\n', r"unknown key 'column'.*'columns'"),
    ('[options]\ndecimal = ";"\n', r"decimal must be"),
    ('[columns]\nferritin_ng_ml = "Ferritin"\ncrp_mg_l = "Ferritin"\n', r"used for both"),
    ('[columns\n', r"not valid TOML"),
])
def test_bad_mappings_are_explained(tmp_path, mapping, pattern):
    path = write(tmp_path, "MRN,Ferritin\n1,200\n")
    mapping_path = write(tmp_path, mapping, "local.toml")
    with pytest.raises(CohortError, match=pattern) as error:
        read_cohort(path, mapping_path)
    assert "local.toml" in str(error.value)


# --- censored values at the ImmunoSep cut-offs ------------------------------------------------


def read_rule_markers(tmp_path, ferritin: str, hla_dr: str, mapping: str | None = None):
    path = write(tmp_path, "patient_id,ferritin_ng_ml,hla_dr_mab_per_cell\n"
                           f"p1,\"{ferritin}\",\"{hla_dr}\"\n")
    return read_cohort(path, write(tmp_path, mapping, "mapping.toml") if mapping else None)


# (ferritin cell, HLA-DR cell, column whose censored bound cannot settle the rule or None,
#  what the rule must answer). Cut-offs: MALS if ferritin > 4420, else immunoparalysis if
#  HLA-DR < 5000. A value kept at its bound must fall on the same side of the cut-off as every
#  value the cell allows; otherwise it is missing and the rule abstains.
UNDECIDABLE = [
    (">2000", "3000", "ferritin_ng_ml", "indeterminate"),  # was immunoparalysis
    (">4419", "3000", "ferritin_ng_ml", "indeterminate"),
    (">4420", "3000", "ferritin_ng_ml", "indeterminate"),  # surely MALS, but 4420 is not
    ("\u2265 4420", "3000", "ferritin_ng_ml", "indeterminate"),
    ("<5000", "3000", "ferritin_ng_ml", "indeterminate"),  # was MALS
    ("<4421", "3000", "ferritin_ng_ml", "indeterminate"),
    ("300", "<6000", "hla_dr_mab_per_cell", "indeterminate"),  # was unclassified
    ("300", "<5000", "hla_dr_mab_per_cell", "indeterminate"),  # surely < 5000, 5000 is not
    ("300", "<=5000", "hla_dr_mab_per_cell", "indeterminate"),
    ("300", ">4999", "hla_dr_mab_per_cell", "indeterminate"),  # 4999.5 would be < 5000
    ("300", ">100", "hla_dr_mab_per_cell", "indeterminate"),
    ("<5000", ">100", "ferritin_ng_ml", "indeterminate"),  # both undecidable
    (">5000", "<6000", "hla_dr_mab_per_cell", "MALS"),  # MALS needs no HLA-DR
]
SETTLED = [
    (">4421", "3000", "MALS"),
    ("<4420", "3000", "immunoparalysis"),
    ("\u2264 4420", "3000", "immunoparalysis"),
    ("<10", "3000", "immunoparalysis"),
    ("300", "<4999", "immunoparalysis"),
    ("300", "<50", "immunoparalysis"),
    ("300", ">5000", "unclassified"),
    ("300", "\u2265 5000", "unclassified"),
    ("300", ">100000", "unclassified"),
]


@pytest.mark.parametrize(("ferritin", "hla_dr", "column", "phenotype"), UNDECIDABLE)
def test_censored_rule_marker_that_straddles_the_cut_off_is_missing(tmp_path, ferritin, hla_dr,
                                                                    column, phenotype):
    from phenotyper.rules import ImmunoSepRule

    cohort = read_rule_markers(tmp_path, ferritin, hla_dr)
    assert math.isnan(cohort.data[column].iloc[0])
    issue = single_issue(cohort, 1, column)
    cell = ferritin if column == "ferritin_ng_ml" else hla_dr
    assert issue["kind"] == ("censored_low" if cell.lstrip().startswith(("<", "\u2264"))
                             else "censored_high")
    assert issue["value"] == cell
    cut_off = "> 4420 ng/mL" if column == "ferritin_ng_ml" else "< 5000 antibodies/cell"
    assert "ImmunoSep cut-off" in issue["detail"] and cut_off in issue["detail"]
    assert "cannot settle" in issue["detail"] and "set to missing" in issue["detail"]
    assert ImmunoSepRule().predict(cohort.data).tolist() == [phenotype]


@pytest.mark.parametrize(("ferritin", "hla_dr", "phenotype"), SETTLED)
def test_censored_rule_marker_that_settles_the_cut_off_stays_at_the_bound(tmp_path, ferritin,
                                                                          hla_dr, phenotype):
    from phenotyper.rules import ImmunoSepRule

    cohort = read_rule_markers(tmp_path, ferritin, hla_dr)
    for column, cell in (("ferritin_ng_ml", ferritin), ("hla_dr_mab_per_cell", hla_dr)):
        bound = float(cell.lstrip("<>=\u2264\u2265 "))
        assert cohort.data[column].iloc[0] == pytest.approx(bound)
        if cell[0] in "<>\u2264\u2265":
            issue = single_issue(cohort, 1, column)
            assert issue["kind"].startswith("censored_")
            assert "kept at the bound" in issue["detail"]
    assert ImmunoSepRule().predict(cohort.data).tolist() == [phenotype]


@pytest.mark.parametrize(("cell", "kept"), [("<2", True), (">2", False), (">4.5", True),
                                            ("<4.5", False)])
def test_censored_ferritin_is_judged_against_the_cut_off_in_canonical_units(tmp_path, cell,
                                                                             kept):
    mapping = '[columns]\nferritin_ng_ml = { column = "ferritin_ng_ml", unit = "mg/L" }\n'
    cohort = read_rule_markers(tmp_path, cell, "3000", mapping=mapping)
    value = cohort.data["ferritin_ng_ml"].iloc[0]
    if kept:
        assert value == pytest.approx(float(cell[1:]) * 1000)
    else:
        assert math.isnan(value)
    assert single_issue(cohort, 1, "ferritin_ng_ml")["kind"].startswith("censored_")


def test_censored_values_of_other_markers_stay_at_the_bound_whatever_their_size(tmp_path):
    cohort = read_column(tmp_path, "il6_pg_ml", [">5000", "<4420", ">2000"])
    assert cohort.data["il6_pg_ml"].tolist() == [5000, 4420, 2000]
    assert all("kept at the bound" in detail for detail in cohort.issues["detail"])


# --- ';'-delimited files: a dot before three digits groups thousands --------------------------


@pytest.mark.parametrize(("cell", "expected", "kind"), [
    ("4.500", 4500, "ambiguous_separator"),  # plain: takes the fast path
    ("+4.500", 4500, "ambiguous_separator"),
    (" 4.500 ", 4500, "ambiguous_separator"),
    ("<4.500", 4500, "censored_low"),
    ("4.50", 4.5, None),
    ("4.5", 4.5, None),
    ("1.234,5", 1234.5, None),
])
def test_dot_before_three_digits_is_thousands_in_a_semicolon_file(tmp_path, cell, expected,
                                                                 kind):
    path = write(tmp_path, f"patient_id;il6_pg_ml;crp_mg_l\np1;{cell};12\n")
    cohort = read_cohort(path)
    assert cohort.data["il6_pg_ml"].iloc[0] == pytest.approx(expected)
    if kind is None:
        assert cohort.issues.empty
        return
    issue = single_issue(cohort, 1, "il6_pg_ml")
    assert issue["kind"] == kind
    assert "dot read as thousands separator" in issue["detail"]
    assert "';'" in issue["detail"] and "4.5" in issue["detail"]


def test_semicolon_file_without_other_decimal_commas_reads_ferritin_dot_as_thousands(tmp_path):
    path = write(tmp_path, "patient_id;ferritin_ng_ml;hla_dr_mab_per_cell\np1;4.500;3000\n")
    cohort = read_cohort(path)
    assert cohort.data["ferritin_ng_ml"].tolist() == [4500]
    assert single_issue(cohort, 1, "ferritin_ng_ml")["kind"] == "ambiguous_separator"


def test_declared_dot_decimal_reads_semicolon_file_dots_as_decimals(tmp_path):
    path = write(tmp_path, "patient_id;il6_pg_ml\np1;4.500\n")
    mapping = write(tmp_path, '[options]\ndecimal = "."\n', "mapping.toml")
    cohort = read_cohort(path, mapping)
    assert cohort.data["il6_pg_ml"].tolist() == [4.5]
    assert cohort.issues.empty


# --- blank lines: row numbers count lines after the header ------------------------------------


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_blank_lines_are_kept_as_missing_rows_so_row_numbers_match_the_file(tmp_path, newline):
    lines = ["patient_id,crp_mg_l", "a,1", "", "b,x", "   ", "c,y"]
    path = tmp_path / "cohort.csv"
    path.write_bytes(newline.join(lines).encode() + newline.encode())
    cohort = read_cohort(path)
    assert len(cohort.data) == 5
    assert cohort.data["patient_id"].isna().tolist() == [False, True, False, True, False]
    assert cohort.data["patient_id"].iloc[[0, 2, 4]].tolist() == ["a", "b", "c"]
    assert cohort.data["crp_mg_l"].isna().tolist() == [False, True, True, True, True]
    unparseable = cohort.issues[cohort.issues["kind"] == "unparseable"]
    assert unparseable["row"].tolist() == [3, 5]
    assert unparseable["value"].tolist() == ["x", "y"]
    assert cohort.issues[cohort.issues["kind"] == "missing_id"]["row"].tolist() == [2, 4]


@pytest.mark.parametrize("ending", ["", "\n", "\n\n", "\n\n\n", "\r\n\r\n", "\n  \n\t\n"])
def test_line_endings_at_the_end_of_the_file_add_no_rows(tmp_path, ending):
    path = write(tmp_path, "patient_id,crp_mg_l\na,1\nb,x" + ending)
    cohort = read_cohort(path)
    assert cohort.data["patient_id"].tolist() == ["a", "b"]
    assert cohort.issues["row"].tolist() == [2]


def test_blank_lines_before_the_header_are_skipped(tmp_path):
    path = write(tmp_path, "\n  \npatient_id,crp_mg_l\na,1\n\nb,x\n")
    cohort = read_cohort(path)
    assert list(cohort.data.columns[:2]) == ["patient_id", "site_id"]
    assert cohort.data["patient_id"].isna().tolist() == [False, True, False]
    assert cohort.data["crp_mg_l"].iloc[0] == 1
    assert cohort.issues[cohort.issues["kind"] == "unparseable"]["row"].tolist() == [3]


def test_header_followed_only_by_blank_lines_has_no_data_rows(tmp_path):
    path = write(tmp_path, "crp_mg_l,sofa\n\n\n")
    with pytest.raises(CohortError, match="no data rows"):
        read_cohort(path)


def test_blank_lines_keep_row_numbers_in_a_semicolon_utf16_file(tmp_path):
    path = write(tmp_path, "patient_id;crp_mg_l\n\na;1\n\nb;x\n\n", encoding="utf-16")
    cohort = read_cohort(path)
    assert len(cohort.data) == 4
    assert cohort.issues[cohort.issues["kind"] == "unparseable"]["row"].tolist() == [4]


# --- reading in blocks ----------------------------------------------------------------------

MESSY_ROWS = [
    "patient_id,ferritin_ng_ml,hla_dr_mab_per_cell,sex,crp_mg_l,note",
    "p1,6100,<1500,F,120,a",
    "p2,>2000,9000,male,n/a,b",
    ",abc,4000,x,-3,c",
    "",
    "p1,1.5e4,2000,M,300,d",
    "p3,\"4,420\",1200,1,<0.5,e",
    "",
    "p2,900,,f,40,f",
    "p4,700,7000,F,55,g",
    "",
    "",
]


@pytest.mark.parametrize("block_rows", [1, 2, 3, 4, 7])
def test_reading_in_blocks_gives_the_same_cohort_as_reading_whole(tmp_path, block_rows):
    path = write(tmp_path, "\n".join(MESSY_ROWS) + "\n")
    whole = read_cohort(path)
    opened = open_cohort(path, block_rows=block_rows)
    blocks = list(opened.blocks())
    # a blank row at a block's end waits for the next block (it may be the file's tail)
    assert all(len(block.data) <= block_rows + 1 for block in blocks)
    data = pd.concat([block.data for block in blocks], ignore_index=True)
    issues = pd.concat([block.issues for block in blocks], ignore_index=True)
    assert len(data) == 9  # trailing blank lines are not rows; inner ones are
    pd.testing.assert_frame_equal(data, whole.data)
    pd.testing.assert_frame_equal(issues, whole.issues)
    duplicates = issues[issues["kind"] == "duplicate_id"]
    assert duplicates["row"].tolist() == [5, 8]
    assert duplicates["detail"].tolist() == ["same patient_id as row 1", "same patient_id as row 2"]


def test_a_decimal_comma_seen_in_an_earlier_block_decides_later_ambiguous_cells(tmp_path):
    path = write(tmp_path, 'ferritin_ng_ml\n"4,5"\n"4,420"\n')
    blocks = list(open_cohort(path, block_rows=1).blocks())
    assert blocks[1].data["ferritin_ng_ml"].iloc[0] == pytest.approx(4.42)
    assert blocks[1].issues["row"].tolist() == [2]


def test_whole_file_problems_are_found_when_the_file_is_opened(tmp_path):
    path = write(tmp_path, "a,b\n1,2\n")
    with pytest.raises(CohortError, match="no recognised marker column"):
        open_cohort(path)


def test_parquet_is_read_in_blocks_with_a_stored_index_as_a_column(tmp_path):
    frame = pd.DataFrame({"ferritin_ng_ml": [100.0, 200.0, 300.0]},
                         index=pd.Index(["a", "b", "c"], name="mrn"))
    path = tmp_path / "cohort.parquet"
    frame.to_parquet(path)
    blocks = list(open_cohort(path, block_rows=2).blocks())
    assert [len(block.data) for block in blocks] == [2, 1]
    data = pd.concat([block.data for block in blocks], ignore_index=True)
    assert data["mrn"].tolist() == ["a", "b", "c"]
    assert data["ferritin_ng_ml"].tolist() == [100.0, 200.0, 300.0]


# --- two text readers, one reading ---------------------------------------------------------

# Files for both text readers: name -> (text, whether Arrow's reader hands over to pandas').
READER_FIXTURES = {
    "messy": ("\n".join(row for row in MESSY_ROWS if row) + "\n", False),
    "messy_blank_lines": ("\n".join(MESSY_ROWS) + "\n", False),
    "semicolon_decimal_commas": ('patient_id;ferritin_ng_ml;crp_mg_l;hla_dr_mab_per_cell\n'
                                 'p1;"4,420";1,5;<1500\np2;4.420;<0,5;"2.000"\n'
                                 'p3;1.234,5;12;\np1;n/a;-3;9000\n', False),
    "crlf_bom_quotes": ('\ufeffpatient_id,note,crp_mg_l,sex\r\np1,"two\r\nlines",3,F\r\n'
                        'p2,"say ""hi"", ok",x,?\r\np3,,"1,234.5",m\r\n', False),
    "no_final_line_break": ("patient_id,crp_mg_l\np1,1\np2,<2", False),
    "one_column_blank_lines": ("crp_mg_l\n1\n\n  \nx\n2\n", False),
    "short_row": ("patient_id,crp_mg_l,sofa\np1,1,2\np2,3\np3,4,5\np4,x,30\n", True),
    "spaces_only_line": ("patient_id,crp_mg_l\np1,1\n   \np2,y\n", True),
    "repeated_name": ("crp_mg_l,crp_mg_l,ferritin_ng_ml\n1,2,3\n4,5,6\n", True),
    "long_row": ("ferritin_ng_ml,b\n1,2\n3,4,5\n", True),  # an error to both
    "ends_inside_quotes": ('patient_id,crp_mg_l\np1,1\np2,2\np3,"3\n', True),  # likewise
    "header_only": ("crp_mg_l,sofa\n", False),  # likewise: no data rows
}


def read_with(path, csv_reader: str, block_rows: int | None) -> list | str:
    """Each block's (first row, data, issues), or the CohortError's message."""
    try:
        return [(block.first_row, block.data, block.issues)
                for block in open_cohort(path, block_rows=block_rows,
                                         csv_reader=csv_reader).blocks()]
    except CohortError as error:
        return str(error)


def assert_same_reading(path, block_rows: int | None) -> None:
    arrow, pandas = (read_with(path, reader, block_rows) for reader in ("arrow", "pandas"))
    if isinstance(pandas, str) or isinstance(arrow, str):
        assert arrow == pandas
        return
    assert [first for first, _, _ in arrow] == [first for first, _, _ in pandas]
    for (_, data, issues), (_, pandas_data, pandas_issues) in zip(arrow, pandas, strict=True):
        pd.testing.assert_frame_equal(data, pandas_data)
        pd.testing.assert_frame_equal(issues, pandas_issues)


@pytest.mark.parametrize("block_rows", [1, 2, 3, None])
@pytest.mark.parametrize("name", list(READER_FIXTURES))
def test_arrow_and_pandas_readers_give_the_same_blocks_and_issues(tmp_path, name, block_rows):
    path = tmp_path / "cohort.csv"
    path.write_bytes(READER_FIXTURES[name][0].encode())
    assert_same_reading(path, block_rows)


@pytest.mark.parametrize("name", list(READER_FIXTURES))
def test_arrow_reads_a_file_itself_unless_pandas_would_read_it_otherwise(tmp_path, name):
    text, hands_over = READER_FIXTURES[name]
    path = tmp_path / "cohort.csv"
    path.write_bytes(text.encode())
    opened = open_cohort(path, csv_reader="arrow")
    arrow = _arrow_blocks(path, opened.delimiter, opened.header, 2)
    if hands_over:
        with pytest.raises(_NotAlike):
            list(arrow)
        return
    pandas = [frame for frame in _delimited_blocks(path, opened.delimiter, opened.encoding, 0, 2)
              if len(frame)]
    for frame, pandas_frame in zip(list(arrow), pandas, strict=True):
        pd.testing.assert_frame_equal(frame, pandas_frame.reset_index(drop=True))


def test_arrows_reader_is_taken_for_utf8_files_without_blank_lines_before_the_header(tmp_path):
    clean = write(tmp_path, "patient_id,crp_mg_l\np1,1\n\n", "clean.csv")
    assert open_cohort(clean).csv_reader == "arrow"
    assert open_cohort(clean, csv_reader="pandas").csv_reader == "pandas"
    for name, text, encoding in (("head.csv", "\npatient_id,crp_mg_l\np1,1\n", "utf-8"),
                                 ("latin.csv", "patient_id,crp_mg_l\np\u00e9,1\n", "latin-1"),
                                 ("wide.csv", "patient_id;crp_mg_l\np1;1\n", "utf-16")):
        assert open_cohort(write(tmp_path, text, name, encoding)).csv_reader == "pandas", name
    with pytest.raises(ValueError, match="csv_reader"):
        open_cohort(clean, csv_reader="polars")


# Cells written as they come (unquoted, so quotes, delimiters and line breaks in them make rows
# ragged, quoted, blank or unterminated).
RAW_CELLS = st.lists(st.text(alphabet='"",;\n\r \t1.a<\u00e9', max_size=6), min_size=1,
                     max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cells=RAW_CELLS, block_rows=st.sampled_from([1, 2, 5, None]))
def test_arrow_and_pandas_readers_agree_on_arbitrary_text(tmp_path_factory, cells, block_rows):
    path = tmp_path_factory.getbasetemp() / "readers.csv"
    rows = [",".join(cells[k:k + 3]) for k in range(0, len(cells), 3)]
    path.write_bytes(("patient_id,crp_mg_l,note\n" + "\n".join(rows)).encode())
    assert_same_reading(path, block_rows)


# --- labels and trial columns in the mapping --------------------------------------------------

TRIAL_EXPORT = ("MRN,Ferritin,Arm,P(arm),SOFA_resp,Died28,Phenotype\n"
                "a,200,A,0.5,1,0,1\n"
                "b,5000,g,0.5,0,1,2\n"
                "c,300,P,0.5,,,Inter\n"
                "d,320,IFN-gamma,0.25,1,0,?\n"
                "e,330,X,0.5,0,0,mals\n"
                "f,340,,,,,\n")
TRIAL_MAPPING = ('[columns]\npatient_id = "MRN"\nferritin_ng_ml = "Ferritin"\n'
                 'treatment = { column = "Arm", values = { "A" = "anakinra", '
                 '"G" = "interferon_gamma", "P" = "Placebo" } }\n'
                 'treatment_probability = "P(arm)"\nsofa_response = { column = "SOFA_resp" }\n'
                 'death_28d = "Died28"\n'
                 '[labels]\n"1" = "MALS"\n"2" = "immunoparalysis"\n"Inter" = "intermediate"\n'
                 '" ? " = "indeterminate"\n')


def test_labels_recode_is_carried_on_the_cohort_and_read_with_the_label(tmp_path):
    from phenotyper.labels import read_labels

    path = write(tmp_path, TRIAL_EXPORT)
    mapping = write(tmp_path, TRIAL_MAPPING, "mapping.toml")
    expected = {"1": "MALS", "2": "immunoparalysis", "Inter": "unclassified",
                "?": "indeterminate"}
    cohort = read_cohort(path, mapping)
    assert cohort.label_recode == expected
    assert open_cohort(path, mapping).label_recode == expected
    assert all(block.label_recode == expected
               for block in open_cohort(path, mapping, block_rows=2).blocks())
    assert read_column(tmp_path, "ferritin_ng_ml", ["200"]).label_recode == {}
    # the reader leaves the label column as it is; the labels module reads it with the recode
    assert cohort.data["Phenotype"].tolist() == ["1", "2", "Inter", "?", "mals", ""]
    reading = read_labels(cohort.data["Phenotype"], "Phenotype", cohort.label_recode)
    assert reading.phenotypes.tolist() == ["MALS", "immunoparalysis", "unclassified", None,
                                           "MALS", None]
    assert (reading.n_unlabelled, reading.n_unreadable, reading.n_recoded) == (2, 0, 4)


def test_trial_and_outcome_columns_are_renamed_and_passed_through_not_parsed(tmp_path):
    path = write(tmp_path, TRIAL_EXPORT)
    cohort = read_cohort(path, write(tmp_path, TRIAL_MAPPING, "mapping.toml"))
    data = cohort.data
    trial = ["treatment", "treatment_probability", "sofa_response", "death_28d"]
    assert list(data.columns) == [*CANONICAL_COLUMNS, *trial, "Phenotype"]
    assert not {"Arm", "P(arm)", "SOFA_resp", "Died28"} & set(data.columns)
    assert data["treatment"].tolist() == ["anakinra", "interferon_gamma", "placebo",
                                          "IFN-gamma", "X", ""]
    # passed through as the file has them (text from a CSV), not parsed as markers
    assert data["treatment_probability"].tolist() == ["0.5", "0.5", "0.5", "0.25", "0.5", ""]
    assert data["death_28d"].tolist() == ["0", "1", "", "0", "0", ""]
    assert cohort.trial_columns == {"treatment": "Arm", "treatment_probability": "P(arm)",
                                    "sofa_response": "SOFA_resp", "death_28d": "Died28"}
    assert set(cohort.columns) == {"patient_id", "ferritin_ng_ml"}
    report = quality_report(cohort)
    assert {column.column for column in report.columns} == {"patient_id", "ferritin_ng_ml"}
    assert not set(trial) & set(CANONICAL_COLUMNS)
    # a treatment that is neither a code nor an arm's name is an issue, and is kept
    [issue] = cohort.issues.itertuples()
    assert (issue.row, issue.column, issue.source_column, issue.value, issue.kind) == (
        5, "treatment", "Arm", "X", "unknown_category")
    assert "anakinra, interferon_gamma, placebo" in issue.detail
    assert [(item.column, item.kind, item.count) for item in report.issues] == [
        ("treatment", "unknown_category", 1)]


def test_an_outcome_recode_turns_the_files_words_into_0_and_1(tmp_path):
    """Hospitals export "Died"/"Alive"; the recode is applied, in any case, and anything else
    passes through for the outcome reader to judge."""
    path = write(tmp_path, "Ferritin,Outcome\n200, Died\n300,ALIVE\n400,\n500,lost\n")
    mapping = write(tmp_path, '[columns]\nferritin_ng_ml = "Ferritin"\ndeath_28d = { column = '
                    '"Outcome", values = { "died" = 1, "Alive" = false } }\n', "mapping.toml")
    cohort = read_cohort(path, mapping)
    assert cohort.data["death_28d"].tolist() == ["1", "0", "", "lost"]
    blocks = open_cohort(path, mapping, block_rows=2).blocks()
    assert [v for b in blocks for v in b.data["death_28d"].tolist()] == ["1", "0", "", "lost"]


def test_a_trial_column_with_its_canonical_name_needs_no_mapping(tmp_path):
    path = write(tmp_path, "ferritin_ng_ml,treatment,death_28d\n300,Anakinra,1\n")
    cohort = read_cohort(path)
    assert cohort.data["treatment"].tolist() == ["Anakinra"]  # passed through unchanged
    assert cohort.trial_columns == {} and cohort.issues.empty


@pytest.mark.parametrize(("mapping", "pattern"), [
    ('[labels]\n"1" = "MAL"\n',
     r"\[labels\] '1' = 'MAL' is not a label.*Did you mean 'MALS'\?.*'MALS', 'immunoparalysis', "
     r"'unclassified', 'intermediate', 'indeterminate'"),
    ('[labels]\n"2" = "paralysed"\n', r"\[labels\] '2' = 'paralysed' is not a label"),
    ('[labels]\n"1" = 1\n', r"\[labels\] '1' = 1 is not a label.*'MALS'"),
    ('[labels]\n" " = "MALS"\n', r"\[labels\] has an empty key"),
    ('[labels]\n"1" = "MALS"\n" 1" = "immunoparalysis"\n', r"keys '1' and ' 1'.*keep one"),
    ('labels = "MALS"\n', r"\[labels\] must be a table"),
    ('[label]\n"1" = "MALS"\n', r"unknown key 'label'.*Did you mean 'labels'"),
    ('[columns]\ntreatment = { column = "Arm", values = { "A" = "anakinr" } }\n',
     r"treatment values maps 'A' to 'anakinr'.*Did you mean 'anakinra'\?.*Arms: anakinra, "
     r"interferon_gamma, placebo"),
    ('[columns]\ntreatment = { column = "Armm" }\n',
     r"treatment reads column 'Armm', which is not in .*cohort\.csv.*Did you mean 'Arm'"),
    ('[columns]\ntreatmnt = "Arm"\n', r"unknown column 'treatmnt'.*Did you mean treatment\?"
                                      r".*sample, trial and outcome columns: sample_time, "
                                      r"encounter_id, treatment, "),
    ('[columns]\ndeath_28d = { column = "Died28", unit = "1" }\n', r"unknown key 'unit'"),
    ('[columns]\nsofa_response = { column = "Died28", values = { "1" = "0" } }\n',
     r"sofa_response values must map codes to 1 \(the outcome happened\) or 0; fix \{'1': '0'\}"),
    ('[columns]\ndeath_28d = { column = "Died28", values = { "Died" = 2 } }\n',
     r"death_28d values must map codes to 1"),
    ('[columns]\ntreatment_probability = { column = "Died28", values = { "1" = 1 } }\n',
     r"unknown key 'values'"),
    ('[columns]\nsofa_response = "Arm"\ntreatment_probability = "Arm"\n', r"used for both"),
    ('[columns]\ndeath_28d = "Arm"\n', r"also has a column named death_28d"),
])
def test_bad_label_and_trial_mappings_are_explained(tmp_path, mapping, pattern):
    path = write(tmp_path, "MRN,Ferritin,Arm,Died28,death_28d\n1,200,A,0,0\n")
    text = '[columns]\nferritin_ng_ml = "Ferritin"\n' + mapping.removeprefix("[columns]\n") \
        if mapping.startswith("[columns]") else mapping
    mapping_path = write(tmp_path, text, "local.toml")
    with pytest.raises(CohortError, match=pattern) as error:
        read_cohort(path, mapping_path)
    assert "local.toml" in str(error.value)


UNICODE_CELLS = [("\uff11\uff12\uff13", 123.0), ("\u0663\u0660\u0660\u0660", 3000.0),
                 ("\u0661\u0662\u066b\u0665", 12.5), ("\u0967\u0968", 12.0),
                 ("\u0661\u066c\u0662\u0663\u0664\u066b\u0665", 1234.5)]


@pytest.mark.parametrize("csv_reader", CSV_READERS)
def test_unicode_digits_are_read_as_the_number_and_flagged(tmp_path, csv_reader):
    """Full-width (NFKC), Arabic-Indic with Arabic decimal and thousands marks, Devanagari."""
    text = "patient_id,ferritin_ng_ml\n" + "".join(
        f'p{i},"{cell}"\n' for i, (cell, _) in enumerate(UNICODE_CELLS)) + "p9,5\n"
    path = write(tmp_path, text)
    cohort = next(iter(open_cohort(path, csv_reader=csv_reader, block_rows=None).blocks()))
    assert cohort.data["ferritin_ng_ml"].tolist() == [v for _, v in UNICODE_CELLS] + [5.0]
    issues = cohort.issues
    assert issues["kind"].tolist() == ["unicode_digits"] * len(UNICODE_CELLS)
    assert issues["row"].tolist() == list(range(1, len(UNICODE_CELLS) + 1))
    assert issues["value"].tolist() == [cell for cell, _ in UNICODE_CELLS]
    assert "read as 123 ng/mL" in issues["detail"].iloc[0]


@pytest.mark.parametrize("csv_reader", CSV_READERS)
@pytest.mark.parametrize("position", ["first row", "after 64 KiB"])
def test_a_nul_byte_makes_its_cell_unparseable_not_the_file_binary(tmp_path, csv_reader,
                                                                   position):
    filler = 5 if position == "first row" else 4000
    rows = [f"p{i},{i % 90 + 1}" for i in range(filler)]
    rows.insert(filler - 3, "bad,12\x00")
    path = tmp_path / "cohort.csv"
    path.write_bytes(("patient_id,crp_mg_l\n" + "\n".join(rows) + "\n").encode())
    cohort = next(iter(open_cohort(path, csv_reader=csv_reader, block_rows=None).blocks()))
    assert len(cohort.data) == filler + 1
    bad = cohort.issues[cohort.issues["kind"] == "unparseable"]
    assert bad["row"].tolist() == [filler - 2]
    assert np.isnan(cohort.data["crp_mg_l"].iloc[filler - 3])
    assert cohort.data["crp_mg_l"].notna().sum() == filler


def test_a_mostly_nul_file_is_still_not_text(tmp_path):
    path = tmp_path / "cohort.csv"
    path.write_bytes("crp_mg_l\n4\n".encode("utf-16-le") * 50)  # UTF-16 without its BOM
    with pytest.raises(CohortError, match="not a text file"):
        read_cohort(path)


def test_a_megabyte_cell_and_a_number_beyond_float_range_are_flagged_not_fatal(tmp_path):
    big = "9" * 1_000_000
    path = write(tmp_path, f"patient_id,crp_mg_l\na,1e400\nb,{big}\nc,{'x' * 1_000_000}\nd,5\n")
    cohort = read_cohort(path)
    assert cohort.data["crp_mg_l"].isna().tolist() == [True, True, True, False]
    issues = cohort.issues.set_index("row")
    assert issues.loc[1, "kind"] == issues.loc[2, "kind"] == "implausible"
    assert "beyond the range of a 64-bit float" in issues.loc[1, "detail"]
    assert issues.loc[3, "kind"] == "unparseable"
    # the issue shows the start of a huge cell and its length, not the megabyte
    assert issues.loc[3, "value"].endswith("... (1,000,000 characters)")
    assert len(issues.loc[3, "value"]) < 300
