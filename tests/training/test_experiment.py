"""Experiment specs, splits, tuning and the promotion gate (no MLflow here)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import accuracy_score, log_loss

from phenotyper.cohort import write_table
from phenotyper.contract import PHENOTYPES
from phenotyper.evaluate.benchmark import Benchmark
from phenotyper.simulate import bayes_posterior, simulate
from phenotyper.training.fit import fit_and_evaluate, resolve_features, split_cohort
from phenotyper.training.gate import promotion_decision
from phenotyper.training.results import TrainingResult
from phenotyper.training.spec import (
    CHAMPION,
    ExperimentError,
    ExperimentSpec,
    default_spec,
    load_spec,
)

EXPERIMENTS = Path(__file__).parents[2] / "experiments"
SMALL = {"logistic": {"C": [1.0]}, "xgboost": {"max_depth": [2], "n_estimators": [60]}}


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_experiments_are_valid(path: Path) -> None:
    spec = load_spec(path)
    assert spec.registered_model and spec.candidates


def test_the_four_promised_experiments_ship() -> None:
    names = {p.stem for p in EXPERIMENTS.glob("*.toml")}
    assert {"immunosep_full_panel", "routine_labs_only", "external_sites",
            "assay_noise"} <= names
    assert "hla_dr_mab_per_cell" in load_spec(EXPERIMENTS / "routine_labs_only.toml").exclude
    assert load_spec(EXPERIMENTS / "external_sites.toml").split_by == "site"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('name="x"\nregistered_model="m"\nlabel="y"\n[cohort]\npreset="provide"\nseeed=1\n',
         r"\[cohort\]: unknown key 'seeed'. Did you mean 'seed'\?"),
        ('name="x"\nregistered_model="m"\nlabel="y"\nlabels="z"\n[cohort]\npreset="provide"\n',
         r"unknown key 'labels'. Did you mean 'label'\?"),
        ('name="x"\nregistered_model="m"\n[cohort]\npreset="provide"\n', "needs 'label'"),
        ('name="x"\nregistered_model="m"\nlabel="y"\n[cohort]\npreset="provide"\n'
         '[split]\nby="hospital"\n', "split.by 'hospital' is not known"),
        ('name="x"\nregistered_model="m"\nlabel="y"\n[cohort]\npreset="provide"\n'
         '[candidates.xgbost]\nmax_depth=[3]\n', "Did you mean 'xgboost'"),
        ('name="x"\nregistered_model="m"\nlabel="y"\n[cohort]\npreset="provide"\n'
         '[candidates.logistic]\nC=1.0\n', r"candidates.logistic.C must be a non-empty list"),
        ('name="x"\nregistered_model="m"\nlabel="y"\n[cohort]\npreset="provide"\n'
         '[features]\nexclude=["hla_dr"]\n', "feature marker 'hla_dr' is not known"),
        ('name="x"\nregistered_model="m"\nlabel="y"\n[cohort]\npath="a.csv"\npreset="provide"\n',
         "either 'path' or 'preset', not both"),
        ('name="x"\nregistered_model="m"\nlabel="y"\n[cohort]\npreset="provide"\nn="many"\n',
         "'cohort.n' must be int"),
        ('name="x"\nregistered_model="m"\nlabel="y"\n[cohort]\npreset="provide"\n'
         '[outcome]\noutcome="sofa_response"\npropensity="p"\n', "'propensity' needs 'treatment'"),
        ('name="x"\nregistered_model="m"\nlabel="y"\n[cohort]\npreset="provide"\n'
         '[outcome]\ntreatment="treatment"\n', r"\[outcome\]: name the outcome column"),
        ('name="x"\nregistered_model="m"\nlabel="y"\n[cohort]\npreset="provide"\n'
         '[outcome]\noutcom="sofa_response"\n', "Did you mean 'outcome'"),
        ('name="x"\nregistered_model="m"\nlabel="y"\n[cohort]\npreset="provide"\n'
         '[selection]\ngate="agreemnt"\n', "Did you mean 'agreement'"),
        ('name="x"\nregistered_model="m"\nlabel="y"\n[cohort]\npreset="provide"\n'
         '[selection]\ntwo_marker="always"\n', "selection.two_marker 'always' is not known"),
    ],
)
def test_bad_experiment_files_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ExperimentError, match=message) as error:
        load_spec(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("by, key", [("patient", "patient_id"), ("site", "site_id")])
def test_split_keeps_each_group_on_one_side(by: str, key: str) -> None:
    cohort = simulate("provide", 2000, seed=1)
    cohort = pd.concat([cohort, cohort.iloc[:300]], ignore_index=True)  # repeated patients
    spec = ExperimentSpec(name="x", registered_model="m", label="phenotype_true",
                          preset="provide", split_by=by)
    train, test = split_cohort(spec, cohort)
    assert len(train) + len(test) == len(cohort)
    assert not set(cohort[key].iloc[train]) & set(cohort[key].iloc[test])


def test_split_by_time_tests_on_the_latest_patients_with_all_their_samples() -> None:
    """Each patient's first sample_time orders them; the latest quarter (every sample of
    theirs) is held out, so no test patient was seen before any training patient."""
    cohort = simulate("provide", 400, seed=1, samples=2)
    admitted = pd.Series(np.random.default_rng(2).permutation(400) * 1.0,
                         index=cohort["patient_id"].unique())
    cohort["sample_time"] = cohort["patient_id"].map(admitted) + cohort["sample_time"] - 1
    spec = ExperimentSpec(name="x", registered_model="m", label="phenotype_true",
                          preset="provide", split_by="time", test_size=0.25)
    train, test = split_cohort(spec, cohort)
    assert len(train) + len(test) == len(cohort) and len(test) == 2 * 100
    first = cohort.groupby("patient_id")["sample_time"].min()
    train_ids, test_ids = set(cohort.patient_id.iloc[train]), set(cohort.patient_id.iloc[test])
    assert not train_ids & test_ids
    assert first[list(train_ids)].max() < first[list(test_ids)].min()
    cohort.loc[5, "sample_time"] = None
    with pytest.raises(ExperimentError, match="1 rows have no readable sample_time"):
        split_cohort(spec, cohort)
    with pytest.raises(ExperimentError, match="needs a 'sample_time' column"):
        split_cohort(spec, cohort.drop(columns="sample_time"))


def test_features_default_to_measured_panel_markers_minus_exclusions() -> None:
    cohort = simulate("provide", 200, seed=1)
    cohort["il6_pg_ml"] = np.nan  # this hospital does not measure IL-6
    spec = ExperimentSpec(name="x", registered_model="m", label="phenotype_true",
                          preset="provide", exclude=("hla_dr_mab_per_cell",))
    features = resolve_features(spec, cohort)
    assert "il6_pg_ml" not in features and "hla_dr_mab_per_cell" not in features
    assert {"ferritin_ng_ml", "sofa", "sex"} <= set(features)


@pytest.fixture(scope="module")
def small_result() -> TrainingResult:
    spec = ExperimentSpec(name="small", registered_model="m", label="phenotype_true",
                          preset="provide", n=1500, cohort_seed=2, candidates=SMALL,
                          bootstrap=100, noise_repeats=2)
    return fit_and_evaluate(spec)


def test_every_candidate_is_tuned_and_judged_beside_the_rules(small_result) -> None:
    names = set(small_result.benchmark.records.phenotyper)
    assert {"immunosep", "ferritin_only", "logistic", "xgboost"} <= names
    for candidate in small_result.candidates.values():
        assert candidate.cv_score > 0 and len(candidate.cv_table) == 1
        assert set(candidate.calibration) == set(PHENOTYPES)
    # the selection is by cross-validation, never by the test set
    chosen = min(small_result.candidates.values(), key=lambda c: c.cv_score)
    assert small_result.selected == chosen.kind
    assert not set(small_result.train.patient_id) & set(small_result.test.patient_id)


def _with_records(result: TrainingResult, rows: list[tuple]) -> TrainingResult:
    records = pd.DataFrame(rows, columns=["phenotyper", "metric", "subgroup", "value",
                                          "ci_low", "ci_high"])
    judged = Benchmark(records, {}, {}, pd.DataFrame(), pd.DataFrame(), {})
    return dataclasses.replace(result, benchmark=judged, selected="logistic")


@pytest.mark.parametrize(
    ("rule_ci_low", "challenger", "champion", "promote", "reason"),
    [
        (0.01, 0.30, None, True, "no champion yet"),
        (-0.01, 0.30, None, False, "does not beat the ImmunoSep rule"),
        (0.01, 0.305, 0.30, True, "within 0.01"),
        (0.01, 0.32, 0.30, False, "worse than champion"),
    ],
)
def test_promotion_gate(small_result, rule_ci_low, challenger, champion, promote,
                        reason) -> None:
    rows = [("logistic", "balanced_accuracy_minus_immunosep", "all", 0.05, rule_ci_low, 0.08),
            ("logistic", "log_loss", "all", challenger, 0.0, 1.0)]
    if champion is not None:
        rows.append((CHAMPION, "log_loss", "all", champion, 0.0, 1.0))
    decision = promotion_decision(_with_records(small_result, rows),
                                  None if champion is None else "1")
    assert decision.promote is promote
    assert reason in decision.reason
    assert decision.numbers["challenger_value"] == challenger


def test_the_gate_does_not_pass_a_lead_made_of_the_rules_abstentions(small_result) -> None:
    rows = [("logistic", "balanced_accuracy_minus_immunosep", "all", 0.05, 0.02, 0.08),
            ("logistic", "balanced_accuracy_minus_immunosep", "rule=determinate", 0.0, -0.01,
             0.01),
            ("logistic", "log_loss", "all", 0.3, 0.0, 1.0)]
    decision = promotion_decision(_with_records(small_result, rows), None)
    assert not decision.promote
    assert "the rule's abstentions" in decision.reason
    lenient = dataclasses.replace(_with_records(small_result, rows), spec=dataclasses.replace(
        small_result.spec, determinate=False))
    assert promotion_decision(lenient, None).promote


def test_the_policy_experiment_judges_outcomes() -> None:
    spec = load_spec(EXPERIMENTS / "policy_all_comers.toml")
    assert spec.preset == "all-comers-trial"
    assert spec.outcomes == ("sofa_response", "death_28d")
    assert (spec.treatment, spec.propensity) == ("treatment", "treatment_probability")


def test_the_card_calls_probabilities_calibrated_only_where_the_intervals_say_so(
        small_result) -> None:
    from phenotyper.contract import PHENOTYPES
    from phenotyper.report.card import calibration_supported, model_card

    numbers = {}
    for phenotype in PHENOTYPES:
        numbers[("m", f"calibration_intercept_{phenotype}", "all")] = (0.05, -0.1, 0.2)
        numbers[("m", f"calibration_slope_{phenotype}", "all")] = (0.97, 0.9, 1.05)
    assert calibration_supported(numbers, "m")
    numbers[("m", "calibration_slope_MALS", "all")] = (0.80, 0.72, 0.88)
    assert not calibration_supported(numbers, "m")
    card = model_card(small_result, "1", promotion_decision(small_result, None))
    supported = calibration_supported(
        {(r.phenotyper, r.metric, r.subgroup): (r.value, r.ci_low, r.ci_high)
         for r in small_result.benchmark.records.itertuples()}, small_result.selected)
    assert ("probabilities whose test-set calibration intervals all contain the ideal" in card) \
        is supported
    assert "the simulator's latent phenotype" in card
    assert "internal validation" in card and "Patients per class" in card
    assert "sensitivity" in card and "PPV" in card


def test_unknown_label_is_a_clear_error(tmp_path: Path) -> None:
    path = write_table(simulate("provide", 100, seed=1), tmp_path / "c.parquet")
    with pytest.raises(ExperimentError, match="Did you mean 'phenotype_true'"):
        fit_and_evaluate(default_spec(path, "phenotype_tru", "m"))


@pytest.mark.parametrize("preset", ["immunosep-screening", "provide"])
def test_default_training_gets_close_to_the_bayes_optimum(tmp_path: Path, preset: str) -> None:
    """The issue's target, on cohorts from a known law: accuracy >= 98.5% of the Bayes
    classifier's and log loss within 0.03 of it, with the defaults of --cohort/--label."""
    path = write_table(simulate(preset, 20_000, seed=21), tmp_path / "cohort.parquet")
    spec = dataclasses.replace(default_spec(path, "phenotype_true", "m"), bootstrap=20,
                               noise_repeats=0)  # the model does not depend on these
    result = fit_and_evaluate(spec)
    model = result.candidates[result.selected].estimator
    truth = result.test["phenotype_true"]
    optimum = bayes_posterior(preset, result.test)
    optimum_accuracy = accuracy_score(truth, np.asarray(PHENOTYPES)[optimum.argmax(axis=1)])
    optimum_loss = log_loss(truth, optimum, labels=list(PHENOTYPES))
    proba = model.predict_proba(result.test)
    classes = [str(c) for c in model.classes_]
    assert accuracy_score(truth, model.predict(result.test)) >= 0.985 * optimum_accuracy
    assert log_loss(truth, proba, labels=classes) <= optimum_loss + 0.03


def test_a_miscalibrated_candidate_is_recalibrated() -> None:
    """Heavy regularisation shrinks probabilities towards the prior (slope >> 1 out of fold);
    the run must notice and recalibrate on out-of-fold logits."""
    spec = ExperimentSpec(name="shrunk", registered_model="m", label="phenotype_true",
                          preset="provide", n=4000, cohort_seed=5,
                          candidates={"logistic": {"C": [0.0005]}}, bootstrap=50,
                          noise_repeats=0)
    result = fit_and_evaluate(spec)
    candidate = result.candidates["logistic"]
    assert candidate.recalibrated
    assert candidate.calibration_test["p_value"] < candidate.calibration_test["alpha"]
    assert max(abs(slope - 1) for _, slope in candidate.calibration.values()) > 0.15
    records = result.benchmark.records
    own = records[(records.phenotyper == "logistic") & ~records.metric.str.contains("minus")]
    slopes = own[own.metric.str.startswith("calibration_slope_")].value
    intercepts = own[own.metric.str.startswith("calibration_intercept_")].value
    # out of fold the slopes were ~10; held out they must now be near 1 (tolerance: the test
    # set has 1000 patients, so a slope's or an intercept's standard error is about 0.1)
    assert len(slopes) == 3 and (abs(slopes - 1) < 0.3).all()
    assert (abs(intercepts) < 0.3).all()
    proba = candidate.estimator.predict_proba(result.test)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)


def test_a_calibrated_candidate_is_left_alone() -> None:
    """A model whose out-of-fold probabilities pass the joint calibration test (p 0.30 on
    this seed; the six degrees of freedom of matrix scaling) is used as is."""
    spec = ExperimentSpec(name="calibrated", registered_model="m", label="phenotype_true",
                          preset="provide", n=4000, cohort_seed=5,
                          candidates={"logistic": {"C": [1.0]}}, bootstrap=20,
                          noise_repeats=0)
    candidate = fit_and_evaluate(spec).candidates["logistic"]
    assert not candidate.recalibrated
    assert candidate.calibration_test["p_value"] >= candidate.calibration_test["alpha"]
    assert candidate.calibration_test["df"] == 6


# --- the label vocabulary -----------------------------------------------------------------

TINY = {"candidates": {"logistic": {"C": [1.0]}}, "bootstrap": 20, "noise_repeats": 0}
SPELLINGS = {"MALS": "Mals", "immunoparalysis": "IMMUNOPARALYSIS",
             "unclassified": " intermediate "}


def _tiny_spec(path: Path, label: str, mapping: Path | None = None) -> ExperimentSpec:
    return dataclasses.replace(default_spec(path, label, "m", mapping), **TINY)


@pytest.fixture(scope="module")
def labelled_cohort() -> pd.DataFrame:
    """A small simulated cohort with a label column in the spellings users write."""
    cohort = simulate("provide", 1500, seed=7)
    cohort["lab"] = cohort["phenotype_true"].map(SPELLINGS).astype(object)
    return cohort


def test_labels_in_any_case_and_intermediate_train_and_are_recorded(labelled_cohort,
                                                                    tmp_path: Path) -> None:
    cohort = labelled_cohort.copy()
    cohort.loc[[3, 40, 41], "lab"] = ["Mals?", "n/a", "?"]  # unreadable: left out, counted
    cohort.loc[[7, 8], "lab"] = ["", "indeterminate"]  # no label: left out
    path = write_table(cohort, tmp_path / "cohort.csv")
    result = fit_and_evaluate(_tiny_spec(path, "lab"))

    kept = cohort.drop(index=[3, 40, 41, 7, 8])
    labels = result.labels
    assert (labels["n_labelled"], labels["n_unlabelled"], labels["n_unreadable"]) == (
        len(kept), 2, 3)
    assert labels["unreadable_examples"] == [[4, "Mals?"], [41, "n/a"], [42, "?"]]
    truth_counts = kept["phenotype_true"].value_counts()
    assert labels["counts"] == {p: int(truth_counts[p]) for p in PHENOTYPES}
    assert len(result.train) + len(result.test) == len(kept)
    for part, key in ((result.train, "train_counts"), (result.test, "test_counts")):
        # trained and judged in the canonical words, row for row the simulated truth
        assert part["lab"].tolist() == part["phenotype_true"].tolist()
        assert labels[key] == {p: int((part["lab"] == p).sum()) for p in PHENOTYPES}
    assert set(result.candidates["logistic"].estimator.classes_) == set(PHENOTYPES)
    assert result.benchmark.meta["n_patients"] == len(result.test)
    assert labels["warning"] is None and labels["rule_agreement"] < 0.99
    assert "3 unreadable values left out" in labels["summary"]


def test_a_mapping_recodes_numeric_labels_for_training(labelled_cohort, tmp_path: Path) -> None:
    cohort = labelled_cohort.copy()
    cohort["code"] = cohort["phenotype_true"].map(
        {"MALS": 1, "immunoparalysis": 2, "unclassified": 3}).astype(object)
    cohort.loc[[0, 1], "code"] = 9  # "9" = not assessed
    path = write_table(cohort.drop(columns=["lab"]), tmp_path / "cohort.csv")
    mapping = tmp_path / "mapping.toml"
    mapping.write_text('[labels]\n"1" = "MALS"\n"2" = "immunoparalysis"\n"3" = "Intermediate"\n'
                       '"9" = "indeterminate"\n')
    result = fit_and_evaluate(_tiny_spec(path, "code", mapping))
    assert result.labels["n_recoded"] == len(cohort)
    assert result.labels["n_unlabelled"] == 2 and result.labels["n_unreadable"] == 0
    both = pd.concat([result.train, result.test])
    assert (both["code"] == both["phenotype_true"]).all()
    assert result.labels["recode"]["3"] == "unclassified"
    # without the mapping every value is unreadable: a clear stop naming the words and the fix
    with pytest.raises(ExperimentError, match=r"no row of label column 'code' holds a "
                       r"phenotype.*1,500 unreadable values.*'intermediate' \(read as "
                       r"'unclassified'\).*\[labels\]"):
        fit_and_evaluate(_tiny_spec(path, "code"))


def test_a_cohort_without_a_phenotype_stops_with_one_clear_error(labelled_cohort,
                                                                 tmp_path: Path) -> None:
    two = labelled_cohort[labelled_cohort["phenotype_true"] != "immunoparalysis"]
    path = write_table(two, tmp_path / "two.csv")
    with pytest.raises(ExperimentError) as error:
        fit_and_evaluate(_tiny_spec(path, "lab"))
    message = str(error.value)
    for text in ("label column 'lab' has no 'immunoparalysis' patient",
                 "phenotyper learns all three phenotypes", "add such patients", "[labels]",
                 "mapping file"):
        assert text in message, message


@pytest.mark.parametrize("side", ["test", "train"])
def test_a_training_split_without_a_phenotype_stops_clearly(labelled_cohort, tmp_path: Path,
                                                            side: str) -> None:
    """One MALS patient in the cohort: on the test side, the training split has none; on the
    training side, a cross-validation fold's training part has none."""
    spec = _tiny_spec(tmp_path / "one.csv", "lab")
    train_rows, test_rows = split_cohort(spec, labelled_cohort)
    rows = test_rows if side == "test" else train_rows
    mals = labelled_cohort.index[labelled_cohort["phenotype_true"] == "MALS"]
    keep = next(row for row in rows if row in set(mals))
    cohort = labelled_cohort.copy()
    cohort.loc[mals.drop(keep), "lab"] = "unclassified"  # same rows, so the same split
    write_table(cohort, tmp_path / "one.csv")
    where = ("the training split of label column 'lab'" if side == "test"
             else "the training part of cross-validation fold")
    with pytest.raises(ExperimentError, match=rf"{where}.*has no 'MALS' patient"):
        fit_and_evaluate(spec)


def test_a_label_that_is_the_rule_itself_is_flagged(labelled_cohort, tmp_path: Path) -> None:
    path = write_table(labelled_cohort, tmp_path / "cohort.parquet")
    result = fit_and_evaluate(_tiny_spec(path, "phenotype_rule"))
    warning = result.labels["warning"]
    assert result.labels["rule_agreement"] == 1.0
    assert result.labels["rule_agreement_n"] == len(labelled_cohort)
    for text in ("ImmunoSep rule's own answer", "no model can beat the rule",
                 "'agreement' gate mode", "Cohen's kappa", "outcomes"):
        assert text in warning, warning
