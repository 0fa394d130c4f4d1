"""Reading reference labels: case, spaces, PROVIDE's 'intermediate', recodes, unreadable cells
(counted with their rows, not an error), missing phenotypes and agreement with the rule."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from phenotyper.labels import (
    MAX_EXAMPLES,
    RULE_LABEL_AGREEMENT,
    RULE_LABEL_MIN_PATIENTS,
    missing_phenotypes,
    read_labels,
    rule_agreement,
    rule_derived_warning,
)
from phenotyper.rules import ImmunoSepRule
from phenotyper.simulate import simulate

# Written out here, independently of the code under test: the index of each phenotype.
CODE = {"MALS": 0, "immunoparalysis": 1, "unclassified": 2}


@pytest.fixture(scope="module")
def cohort() -> pd.DataFrame:
    return simulate("provide", 600, seed=11)


def test_labels_are_read_in_any_case_around_spaces_and_intermediate_is_unclassified() -> None:
    values = ["MALS", "mals", " Mals ", "IMMUNOPARALYSIS", "Immunoparalysis\t", "Unclassified",
              "intermediate", " INTERMEDIATE "]
    reading = read_labels(values, "lab")
    assert reading.codes.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert reading.labelled.all()
    assert (reading.n_unlabelled, reading.n_unreadable) == (0, 0)
    assert reading.phenotypes.tolist() == ["MALS"] * 3 + ["immunoparalysis"] * 2 + [
        "unclassified"] * 3
    assert reading.counts() == {"MALS": 3, "immunoparalysis": 2, "unclassified": 3}


def test_empty_and_indeterminate_cells_have_no_label() -> None:
    values = pd.Series([None, np.nan, "", "   ", "indeterminate", " Indeterminate", pd.NA,
                        "MALS"], dtype=object)
    reading = read_labels(values, "lab")
    assert reading.codes.tolist() == [-1] * 7 + [0]
    assert reading.labelled.tolist() == [False] * 7 + [True]
    assert (reading.n_unlabelled, reading.n_unreadable) == (7, 0)
    assert reading.unreadable_examples == ()
    assert "7 without a label" in reading.summary()


def test_unreadable_values_are_counted_with_their_rows_and_left_out(cohort) -> None:
    labels = cohort["phenotype_true"].astype(object).copy()
    bad_rows = [1, 4, 30, 31, 200, 201, 599]  # positions; rows count from 1
    labels.iloc[bad_rows] = ["Mals?", "x", "MALS-like", "1", "n/a", "x", "paralysed"]
    reading = read_labels(labels, "phenotype_site")
    assert reading.n_unreadable == len(bad_rows)
    assert reading.n_unlabelled == 0
    assert not reading.labelled[bad_rows].any() and (reading.codes[bad_rows] == -1).all()
    assert reading.n_labelled == len(cohort) - len(bad_rows)
    assert reading.unreadable_examples == ((2, "Mals?"), (5, "x"), (31, "MALS-like"),
                                           (32, "1"), (201, "n/a"))
    assert len(reading.unreadable_examples) == MAX_EXAMPLES
    expected = labels.drop(labels.index[bad_rows]).map(CODE).to_numpy()
    np.testing.assert_array_equal(reading.codes[reading.labelled], expected)
    summary = reading.summary()
    for text in ("label column 'phenotype_site'", "7 unreadable values left out",
                 "row 2: 'Mals?'", "row 201: 'n/a'", "'intermediate' (read as 'unclassified')",
                 "[labels]", "mapping file"):
        assert text in summary, summary


def test_recode_reads_numeric_codes_first_then_label_words(cohort) -> None:
    codes_of_truth = cohort["phenotype_true"].map(CODE).to_numpy()
    numeric = cohort["phenotype_true"].map({"MALS": 1, "immunoparalysis": 2,
                                            "unclassified": 3}).to_numpy()
    recode = {"1": "MALS", "2": "immunoparalysis", " 3 ": "intermediate"}
    for column in (numeric, numeric.astype(float), numeric.astype(str)):
        reading = read_labels(column, "code", recode)
        np.testing.assert_array_equal(reading.codes, codes_of_truth)
        assert reading.n_recoded == len(cohort) and reading.n_unreadable == 0
    # without the recode, numbers are unreadable, and say so
    plain = read_labels(numeric, "code")
    assert plain.n_unreadable == len(cohort) and plain.n_labelled == 0
    assert plain.unreadable_examples[0] == (1, str(numeric[0]))


def test_recode_is_exact_first_then_case_insensitive_and_comes_before_the_words() -> None:
    recode = {"Inter": "unclassified", "inter": "MALS", " ? ": "indeterminate",
              "Unclassified": "immunoparalysis"}
    values = ["Inter", "inter", "INTER", "?", " ? ", "Unclassified", "unclassified", "MALS"]
    reading = read_labels(values, "lab", recode)
    # "INTER" matches no key exactly; case-insensitively the first such key ("Inter") wins;
    # "unclassified" matches the key "Unclassified" case-insensitively, so it is recoded too
    assert reading.codes.tolist() == [2, 0, 2, -1, -1, 1, 1, 0]
    assert reading.n_unlabelled == 2 and reading.n_recoded == 7


def test_a_recode_to_an_unknown_word_is_refused() -> None:
    with pytest.raises(ValueError, match=r"'1' to 'MAL'.*'MALS', 'immunoparalysis'"):
        read_labels(["1"], "lab", {"1": "MAL"})


def test_missing_phenotypes(cohort) -> None:
    assert missing_phenotypes(read_labels(cohort["phenotype_true"], "t")) == ()
    two = cohort.loc[cohort["phenotype_true"] != "immunoparalysis", "phenotype_true"]
    assert missing_phenotypes(read_labels(two, "t")) == ("immunoparalysis",)
    only_mals = ["MALS", "", "x", "indeterminate"]
    assert missing_phenotypes(read_labels(only_mals, "t")) == ("immunoparalysis",
                                                               "unclassified")


def test_rule_agreement_counts_labelled_patients_the_rule_can_type(cohort) -> None:
    frame = cohort.copy()
    # HLA-DR not measured for 40 patients without MALS-range ferritin: the rule cannot type them
    low_ferritin = np.flatnonzero(frame["ferritin_ng_ml"].to_numpy() <= 4420)[:40]
    frame.loc[frame.index[low_ferritin], "hla_dr_mab_per_cell"] = np.nan
    rule = ImmunoSepRule().fit(frame).predict(frame)
    assert (rule[low_ferritin] == "indeterminate").all()
    labels = frame["phenotype_true"].astype(object).copy()
    labels.iloc[:10] = ""  # and 10 patients have no label
    reading = read_labels(labels, "phenotype_true")

    share, n = rule_agreement(reading, rule)
    compared = reading.labelled & (rule != "indeterminate")
    assert n == compared.sum() == len(frame) - len(set(low_ferritin) | set(range(10)))
    assert share == pytest.approx((labels[compared] == rule[compared]).mean())
    assert share < RULE_LABEL_AGREEMENT
    assert rule_derived_warning(reading, rule) is None

    # the simulator's phenotype_rule is the rule on the measured markers: the rule's own answer
    own = read_labels(cohort["phenotype_rule"], "phenotype_rule")
    rule_on_cohort = ImmunoSepRule().fit(cohort).predict(cohort)
    share, n = rule_agreement(own, rule_on_cohort)
    assert share == 1.0 and n == (cohort["phenotype_rule"] != "indeterminate").sum()
    warning = rule_derived_warning(own, rule_on_cohort)
    for text in ("'phenotype_rule'", "100.0%", "ImmunoSep rule's own answer",
                 "by construction", "'agreement' gate mode", "Cohen's kappa", "outcomes"):
        assert text in warning, warning


def test_a_rule_label_on_too_few_patients_gives_no_warning(cohort) -> None:
    few = cohort.head(RULE_LABEL_MIN_PATIENTS - 1)
    rule = ImmunoSepRule().fit(few).predict(few)
    reading = read_labels(few["phenotype_rule"], "phenotype_rule")
    assert rule_agreement(reading, rule)[0] == 1.0
    assert rule_derived_warning(reading, rule) is None
    enough = cohort.head(RULE_LABEL_MIN_PATIENTS + 20)
    rule = ImmunoSepRule().fit(enough).predict(enough)
    assert rule_derived_warning(read_labels(enough["phenotype_rule"], "r"), rule) is not None


def test_no_label_at_all_gives_nan_agreement_and_a_fixing_summary() -> None:
    reading = read_labels(["x", "", "indeterminate"], "lab")
    assert rule_agreement(reading, ["MALS", "MALS", "MALS"]) == (pytest.approx(np.nan,
                                                                               nan_ok=True), 0)
    summary = reading.summary()
    assert "0 of 3 rows labelled" in summary and "[labels]" in summary


def test_the_plain_record_is_json(cohort) -> None:
    labels = cohort["phenotype_true"].astype(object).copy()
    labels.iloc[3] = "?"
    record = read_labels(labels, "t", {"x": "MALS"}).as_dict()
    again = json.loads(json.dumps(record))
    assert again["n_unreadable"] == 1 and again["unreadable_examples"] == [[4, "?"]]
    assert again["counts"] == {p: int((labels == p).sum()) for p in CODE}
    assert again["recode"] == {"x": "MALS"}
