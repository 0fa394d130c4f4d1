"""The evaluator: each metric against an independent computation, intervals that cover."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import brentq
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
)

from phenotyper.contract import INDETERMINATE, PHENOTYPES, UNCLASSIFIED
from phenotyper.evaluate.benchmark import EvaluationError, Predictions, benchmark, reference_labels
from phenotyper.evaluate.bootstrap import MIN_RESAMPLING_GROUPS, bootstrap_weights
from phenotyper.evaluate.metrics import _Scorer, treatment_table
from phenotyper.rules import ImmunoSepRule, PhenotyperTags, reference_rules
from phenotyper.simulate import simulate

LABELS = np.array([*PHENOTYPES, INDETERMINATE], dtype=object)


class ColumnPhenotyper(ClassifierMixin, BaseEstimator):
    """A phenotyper whose answers are columns of the cohort: tests the evaluator alone."""

    def __init__(self, prefix: str = "a", probabilistic: bool = True) -> None:
        self.prefix = prefix
        self.probabilistic = probabilistic

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags = PhenotyperTags(probabilistic=self.probabilistic)
        return tags

    def fit(self, X: pd.DataFrame, y: object = None) -> ColumnPhenotyper:
        self.classes_ = np.array(PHENOTYPES, dtype=object)
        return self

    def predict(self, X: pd.DataFrame) -> np.ndarray:
        return X[f"{self.prefix}_label"].to_numpy(dtype=object)

    def predict_proba(self, X: pd.DataFrame) -> np.ndarray:
        return X[[f"{self.prefix}_p_{p}" for p in PHENOTYPES]].to_numpy(dtype=float)


def _random_case(n: int, seed: int, indeterminate_share: float = 0.05):
    """Truth, informative probabilities, and labels (argmax, some abstentions)."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 3, n)
    logits = rng.normal(0, 1, (n, 3)) + 1.5 * np.eye(3)[truth]
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.asarray(PHENOTYPES, dtype=object)[proba.argmax(axis=1)]
    labels[rng.random(n) < indeterminate_share] = INDETERMINATE
    return truth, proba, labels


def _frame(truth: np.ndarray, columns: dict[str, tuple[np.ndarray, np.ndarray]]) -> pd.DataFrame:
    frame = pd.DataFrame({"patient_id": [f"P{i}" for i in range(len(truth))],
                          "label": np.asarray(PHENOTYPES, dtype=object)[truth]})
    for prefix, (labels, proba) in columns.items():
        frame[f"{prefix}_label"] = labels
        for k, p in enumerate(PHENOTYPES):
            frame[f"{prefix}_p_{p}"] = proba[:, k]
    return frame


def _value(records: pd.DataFrame, phenotyper: str, metric: str, subgroup: str = "all") -> float:
    row = records[(records.phenotyper == phenotyper) & (records.metric == metric)
                  & (records.subgroup == subgroup)]
    assert len(row) == 1, (phenotyper, metric, subgroup)
    return float(row.value.iloc[0])


@pytest.fixture(scope="module")
def case():
    truth, proba, labels = _random_case(3000, seed=1)
    frame = _frame(truth, {"a": (labels, proba)})
    frame["ferritin_ng_ml"], frame["hla_dr_mab_per_cell"] = 300.0, 12000.0
    phenotypers = {"immunosep": reference_rules()["immunosep"].fit(frame),
                   "model": ColumnPhenotyper("a").fit(frame)}
    result = benchmark(phenotypers, frame, "label", n_boot=50, noise_repeats=0)
    return truth, proba, labels, result.records


def test_label_metrics_match_scikit_learn(case) -> None:
    truth, _, labels, records = case
    y = np.asarray(PHENOTYPES, dtype=object)[truth]
    assert _value(records, "model", "accuracy") == pytest.approx(accuracy_score(y, labels))
    with pytest.warns(UserWarning):  # sklearn notes the extra 'indeterminate' label
        expected = balanced_accuracy_score(y, labels)
    assert _value(records, "model", "balanced_accuracy") == pytest.approx(expected)
    assert _value(records, "model", "macro_f1") == pytest.approx(
        f1_score(y, labels, labels=list(PHENOTYPES), average="macro"))
    recall = recall_score(y, labels, labels=list(PHENOTYPES), average=None)
    precision = precision_score(y, labels, labels=list(PHENOTYPES), average=None)
    for k, p in enumerate(PHENOTYPES):
        assert _value(records, "model", f"sensitivity_{p}") == pytest.approx(recall[k])
        assert _value(records, "model", f"ppv_{p}") == pytest.approx(precision[k])
    assert _value(records, "model", "coverage") == pytest.approx(np.mean(labels != INDETERMINATE))


def test_specificity_and_npv_by_hand() -> None:
    """A 6-patient table worked on paper: MALS row/column of the confusion matrix."""
    truth = np.array([0, 0, 1, 1, 2, 2])
    labels = np.array(["MALS", "unclassified", "MALS", "immunoparalysis", "indeterminate",
                       "unclassified"], dtype=object)
    scorer = _Scorer(truth, Predictions(labels, np.full((6, 3), 1 / 3), False))
    metrics = scorer.label_metrics(np.ones((1, 6)))
    # MALS: TP 1, FN 1, FP 1, TN 3 -> specificity 3/4, NPV 3/4, PPV 1/2, sensitivity 1/2
    assert metrics["specificity_MALS"][0] == pytest.approx(3 / 4)
    assert metrics["npv_MALS"][0] == pytest.approx(3 / 4)
    assert metrics["ppv_MALS"][0] == pytest.approx(1 / 2)
    # unclassified: TP 1, FN 1 (indeterminate), FP 1, TN 3
    assert metrics["specificity_unclassified"][0] == pytest.approx(3 / 4)
    assert metrics["accuracy"][0] == pytest.approx(3 / 6)
    assert metrics["coverage"][0] == pytest.approx(5 / 6)


def test_probability_metrics_match_scikit_learn_with_and_without_weights(case) -> None:
    truth, proba, labels, records = case
    y = np.asarray(PHENOTYPES, dtype=object)[truth]
    assert _value(records, "model", "log_loss") == pytest.approx(
        log_loss(y, proba, labels=list(PHENOTYPES)))
    assert _value(records, "model", "brier") == pytest.approx(
        brier_score_loss(y, proba, labels=list(PHENOTYPES)))
    scorer = _Scorer(truth, Predictions(labels, proba, True))
    weights = np.random.default_rng(2).integers(0, 4, (2, len(truth))).astype(float)
    weights[0] = 1.0
    for k, p in enumerate(PHENOTYPES):
        auroc, ap = scorer.auroc_ap(weights, k)
        for row in range(2):
            w = weights[row]
            assert auroc[row] == pytest.approx(roc_auc_score(truth == k, proba[:, k],
                                                             sample_weight=w))
            assert ap[row] == pytest.approx(average_precision_score(truth == k, proba[:, k],
                                                                    sample_weight=w))
        assert _value(records, "model", f"auroc_{p}") == pytest.approx(auroc[0])


def test_auroc_handles_ties_like_scikit_learn() -> None:
    truth, _, labels = _random_case(500, seed=3)
    coarse = np.round(np.random.default_rng(4).random((500, 3)), 1)  # many tied scores
    scorer = _Scorer(truth, Predictions(labels, coarse, True))
    auroc, ap = scorer.auroc_ap(np.ones((1, 500)), 0)
    assert auroc[0] == pytest.approx(roc_auc_score(truth == 0, coarse[:, 0]))
    assert ap[0] == pytest.approx(average_precision_score(truth == 0, coarse[:, 0]))


def test_calibration_intercept_and_slope_match_independent_fits(case) -> None:
    truth, proba, _, records = case
    for k, p in enumerate(PHENOTYPES):
        y = (truth == k).astype(float)
        x = np.log(proba[:, k] / (1 - proba[:, k]))
        fit = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(x[:, None], y)
        assert _value(records, "model", f"calibration_slope_{p}") == pytest.approx(
            fit.coef_[0, 0], abs=1e-4)
        intercept = brentq(lambda a, x=x, y=y: np.sum(y - 1 / (1 + np.exp(-(a + x)))), -10, 10)
        assert _value(records, "model", f"calibration_intercept_{p}") == pytest.approx(
            intercept, abs=1e-4)


def test_calibrated_probabilities_have_slope_one_and_intercept_zero() -> None:
    rng = np.random.default_rng(5)
    n = 30_000
    proba = rng.dirichlet([1, 1, 1], n)
    truth = np.array([rng.choice(3, p=row) for row in proba])
    scorer = _Scorer(truth, Predictions(np.asarray(PHENOTYPES, object)[proba.argmax(1)], proba,
                                        True))
    for k in range(3):
        intercept, slope = scorer.calibration(np.ones((1, n)), k)
        assert intercept[0] == pytest.approx(0, abs=0.05)
        assert slope[0] == pytest.approx(1, abs=0.05)  # tolerance: ~3 standard errors


def test_rules_get_no_probability_metrics(case) -> None:
    records = case[3]
    rule_metrics = set(records[records.phenotyper == "immunosep"].metric)
    assert "log_loss" not in rule_metrics and "calibration_slope_MALS" not in rule_metrics
    assert "accuracy" in rule_metrics and "auroc_MALS" in rule_metrics


def test_treatment_table_and_harmful_errors_by_hand() -> None:
    truth = np.array([0, 0, 0, 1, 1, 2, 2])
    labels = np.array(["MALS", "immunoparalysis", "indeterminate", "MALS", "immunoparalysis",
                       "unclassified", "MALS"], dtype=object)
    scorer = _Scorer(truth, Predictions(labels, np.full((7, 3), 1 / 3), False))
    confusion = scorer.confusion(np.ones((1, 7)))
    table = treatment_table(confusion)[0]
    # needed anakinra: given anakinra 1, interferon-gamma 1, none 1
    np.testing.assert_array_equal(table, [[1, 1, 1], [1, 1, 0], [1, 0, 1]])
    metrics = scorer.metrics(np.ones((1, 7)))
    assert metrics["harm_interferon_gamma_to_MALS"][0] == pytest.approx(1 / 7)
    assert metrics["harm_anakinra_to_immunoparalysis"][0] == pytest.approx(1 / 7)
    assert metrics["missed_immunotherapy"][0] == pytest.approx(1 / 7)
    assert metrics["unneeded_immunotherapy"][0] == pytest.approx(1 / 7)
    assert metrics["treatment_agreement"][0] == pytest.approx(3 / 7)


def test_net_benefit_by_hand() -> None:
    truth = np.array([0, 0, 1, 2, 2])
    proba = np.array([[0.6, 0.2, 0.2], [0.2, 0.4, 0.4], [0.3, 0.6, 0.1], [0.1, 0.1, 0.8],
                      [0.05, 0.05, 0.9]])
    model = _Scorer(truth, Predictions(np.array(["MALS"] * 5, object), proba, True))
    # anakinra at threshold 0.25: treat patients 1 and 3 (p_MALS >= .25): TP 1, FP 1
    expected = (1 - 1 * 0.25 / 0.75) / 5
    assert model.net_benefit(np.ones((1, 5)), "anakinra", 0.25)[0] == pytest.approx(expected)
    rule = _Scorer(truth, Predictions(np.array(["MALS", "MALS", "MALS", "unclassified",
                                                "unclassified"], object), proba, False))
    # a rule treats whom it labels: TP 2, FP 1, at any threshold
    for threshold in (0.1, 0.5):
        odds = threshold / (1 - threshold)
        assert rule.net_benefit(np.ones((1, 5)), "anakinra", threshold)[0] == pytest.approx(
            (2 - odds) / 5)


def test_bootstrap_resamples_whole_patients() -> None:
    groups = np.array(["a", "a", "b", "c", "c", "c"])
    for block in bootstrap_weights(groups, 50, seed=1):
        for row in block:
            assert row[0] == row[1] and row[3] == row[4] == row[5]
            assert row[[0, 2, 3]].sum() == 3  # three patients drawn per resample


def test_interval_covers_the_true_accuracy_about_95_percent_of_the_time() -> None:
    """Coverage on data where the truth is known: accuracy 0.8 in the population."""
    n, repeats, covered = 300, 200, 0
    rng = np.random.default_rng(6)
    for repeat in range(repeats):
        truth = rng.integers(0, 3, n)
        correct = rng.random(n) < 0.8
        wrong = (truth + rng.integers(1, 3, n)) % 3
        labels = np.asarray(PHENOTYPES, object)[np.where(correct, truth, wrong)]
        scorer = _Scorer(truth, Predictions(labels, np.full((n, 3), 1 / 3), False))
        samples = np.concatenate([
            scorer.label_metrics(w)["accuracy"]
            for w in bootstrap_weights(np.arange(n), 400, seed=repeat)])
        low, high = np.percentile(samples, [2.5, 97.5])
        covered += low <= 0.8 <= high
    # 200 repeats: the share has SD ~1.5 points around 95%; a broken interval falls far outside
    assert 0.90 <= covered / repeats <= 0.99


@pytest.fixture(scope="module")
def simulated():
    cohort = simulate("immunosep-screening", 4000, seed=3)
    rng = np.random.default_rng(7)
    truth = cohort["phenotype_true"].to_numpy(dtype=object)
    better = truth.copy()
    flip = rng.random(len(truth)) < 0.05
    better[flip] = rng.choice(np.asarray(PHENOTYPES, object), flip.sum())
    cohort["good_label"] = better
    for p in PHENOTYPES:
        cohort[f"good_p_{p}"] = np.where(better == p, 0.9, 0.05)
    # "same": the rule's labels, with 20 of its errors fixed and 20 of its hits spoiled, so it
    # is exactly as accurate as the rule but not identical to it
    rule_labels = reference_rules()["immunosep"].fit(cohort).predict(cohort)
    almost = rule_labels.copy()
    hits, misses = np.flatnonzero(rule_labels == truth), np.flatnonzero(rule_labels != truth)
    fixed, spoiled = rng.choice(misses, 20, replace=False), rng.choice(hits, 20, replace=False)
    almost[fixed] = truth[fixed]
    almost[spoiled] = np.where(truth[spoiled] == "MALS", "unclassified", "MALS")
    cohort["same_label"] = almost
    for p in PHENOTYPES:
        cohort[f"same_p_{p}"] = (almost == p).astype(float)
    phenotypers = {**{n: r.fit(cohort) for n, r in reference_rules().items()},
                   "good": ColumnPhenotyper("good").fit(cohort),
                   "same": ColumnPhenotyper("same", probabilistic=False).fit(cohort)}
    return cohort, benchmark(phenotypers, cohort, "phenotype_true", n_boot=300, noise_repeats=5)


def test_paired_difference_excludes_zero_only_when_one_is_clearly_better(simulated) -> None:
    records = simulated[1].records
    better = records[(records.phenotyper == "good")
                     & (records.metric == "accuracy_minus_immunosep")].iloc[0]
    assert better.ci_low > 0
    same = records[(records.phenotyper == "same")
                   & (records.metric == "accuracy_minus_immunosep")].iloc[0]
    assert same.ci_low <= 0 <= same.ci_high
    # pairing: the difference is known far more precisely than either accuracy
    alone = records[(records.phenotyper == "same") & (records.metric == "accuracy")].iloc[0]
    assert (same.ci_high - same.ci_low) < 0.5 * (alone.ci_high - alone.ci_low)


def test_rule_flips_under_re_measurement_most_near_its_cut_offs(simulated) -> None:
    records = simulated[1].records
    within = _value(records, "immunosep", "flip_rate_within_lab")
    between = _value(records, "immunosep", "flip_rate_between_labs")
    near = _value(records, "immunosep", "flip_rate_near_cutoff_between_labs")
    assert 0 < within < between < near
    # a phenotyper that does not read the markers never flips
    assert _value(records, "good", "flip_rate_between_labs") == 0


def test_no_assay_noise_means_no_flips() -> None:
    cohort = simulate("provide", 500, seed=1)
    rules = {"immunosep": reference_rules()["immunosep"].fit(cohort)}
    silent = {"silent": {"ferritin_ng_ml": 0.0, "hla_dr_mab_per_cell": 0.0, "other": 0.0}}
    result = benchmark(rules, cohort, "phenotype_true", n_boot=20, noise_repeats=3,
                       assay_noise_cv=silent)
    assert _value(result.records, "immunosep", "flip_rate_silent") == 0
    assert _value(result.records, "immunosep", "accuracy_remeasured_silent") == pytest.approx(
        _value(result.records, "immunosep", "accuracy"))


def test_subgroup_metrics_equal_metrics_on_the_subset(simulated) -> None:
    cohort, result = simulated
    site = sorted(cohort.site_id.unique())[0]
    subset = cohort[cohort.site_id == site]
    labels = reference_rules()["immunosep"].fit(subset).predict(subset)
    assert _value(result.records, "immunosep", "accuracy", f"site={site}") == pytest.approx(
        accuracy_score(subset.phenotype_true, labels))
    assert _value(result.records, "immunosep", "n", f"site={site}") == len(subset)
    women = cohort[cohort.sex == "F"]
    assert _value(result.records, "immunosep", "n", "sex=F") == len(women)


def test_the_benchmark_keeps_its_tables_consistent(simulated) -> None:
    cohort, result = simulated
    confusion = result.confusion["immunosep"]
    assert confusion.to_numpy().sum() == len(cohort)
    assert result.treatment["immunosep"].to_numpy().sum() == len(cohort)
    curves = result.decision_curves
    assert set(curves.phenotyper) >= {"treat all", "treat none", "immunosep", "good"}
    assert set(result.reliability.phenotyper) == {"good"}  # rules have no reliability curve


def test_patients_without_a_reference_label_are_left_out_and_counted() -> None:
    cohort = simulate("provide", 300, seed=2)
    cohort.loc[:9, "phenotype_rule"] = "indeterminate"
    cohort.loc[10:14, "phenotype_rule"] = None
    rules = {"immunosep": reference_rules()["immunosep"].fit(cohort)}
    result = benchmark(rules, cohort, "phenotype_rule", n_boot=10, noise_repeats=0)
    assert result.meta["n_left_out"] == 15
    assert _value(result.records, "immunosep", "n") == 285


def test_bad_labels_are_named_with_their_rows() -> None:
    cohort = simulate("provide", 50, seed=2)
    cohort.loc[3, "phenotype_true"] = "MAS"
    rules = {"immunosep": reference_rules()["immunosep"].fit(cohort)}
    result = benchmark(rules, cohort, "phenotype_true", n_boot=10, noise_repeats=0)
    assert "row 4: 'MAS'" in result.meta["labels"]["summary"]
    with pytest.raises(EvaluationError, match="reference phenotyper 'immunosep'"):
        benchmark({"other": rules["immunosep"]}, cohort, "phenotype_true", n_boot=10)


# --- review fixes: resampling groups, undefined resamples, tiny cohorts --------------------------


def _record(records: pd.DataFrame, phenotyper: str, metric: str, subgroup: str = "all"
            ) -> tuple[float, float, float]:
    row = records[(records.phenotyper == phenotyper) & (records.metric == metric)
                  & (records.subgroup == subgroup)]
    assert len(row) == 1, (phenotyper, metric, subgroup)
    return tuple(float(v) for v in row[["value", "ci_low", "ci_high"]].iloc[0])


def _two_column_case(n: int, seed: int, truth: np.ndarray | None = None
                     ) -> tuple[dict, pd.DataFrame]:
    """A reference (labels `a`) and a second phenotyper (`b`) on n patients."""
    case_truth, proba, labels = _random_case(n, seed)
    truth = case_truth if truth is None else truth
    other = labels.copy()
    other[:: 4] = np.asarray(PHENOTYPES, object)[truth[:: 4]]
    frame = _frame(truth, {"a": (labels, proba), "b": (other, proba[:, ::-1])})
    phenotypers = {"immunosep": ColumnPhenotyper("a", probabilistic=False).fit(frame),
                   "other": ColumnPhenotyper("b", probabilistic=False).fit(frame)}
    return phenotypers, frame


def test_rows_without_a_patient_id_are_each_their_own_group() -> None:
    groups = np.array([np.nan] * 5 + ["a", "a", None, ""], dtype=object)
    rows_differ = False
    for block in bootstrap_weights(groups, 100, seed=1):
        for row in block:
            assert row[5] == row[6]  # the two rows of patient "a" move together
            assert row[[0, 1, 2, 3, 4, 5, 7, 8]].sum() == 8  # 8 groups: 7 without id, "a"
            rows_differ |= len(set(row[:5])) > 1
    assert rows_differ


def test_a_cohort_without_patient_ids_still_gets_intervals() -> None:
    """read_cohort makes an all-NaN patient_id when the file has none: not one big patient."""
    phenotypers, frame = _two_column_case(300, seed=8)
    frame["patient_id"] = np.nan
    result = benchmark(phenotypers, frame, "label", n_boot=200, noise_repeats=0)
    value, low, high = _record(result.records, "immunosep", "accuracy")
    assert low < value < high and high - low > 0.05  # ~ +-2 SE of a share near 0.7 in 300
    assert result.meta["n_resampling_groups"] == 300
    _, low, high = _record(result.records, "other", "accuracy_minus_immunosep")
    assert low < high


def test_interval_is_not_given_when_the_metric_is_often_undefined() -> None:
    """One immunoparalysed patient in 40: its AUROC is undefined in ~1/3 of resamples; the
    defined two thirds would give a biased interval."""
    truth = np.array([0, 2] * 20)
    truth[7] = 1
    phenotypers, frame = _two_column_case(40, seed=9, truth=truth)
    result = benchmark(phenotypers, frame, "label", n_boot=300, noise_repeats=0)
    value, low, high = _record(result.records, "immunosep", "auroc_immunoparalysis")
    assert np.isfinite(value) and np.isnan(low) and np.isnan(high)
    _, low, high = _record(result.records, "other", "auroc_immunoparalysis_minus_immunosep")
    assert np.isnan(low) and np.isnan(high)
    value, low, high = _record(result.records, "immunosep", "accuracy")  # always defined
    assert low <= value <= high


@pytest.mark.parametrize("n", [1, MIN_RESAMPLING_GROUPS - 1])
def test_too_few_patients_give_no_intervals_and_a_warning(n: int) -> None:
    phenotypers, frame = _two_column_case(n, seed=10)
    result = benchmark(phenotypers, frame, "label", n_boot=100, noise_repeats=0)
    assert result.records[["ci_low", "ci_high"]].isna().all().all()
    assert isinstance(result.meta["warning"], str)
    assert f"Only {n} patient" in result.meta["warning"]


def test_enough_patients_give_no_warning_and_small_subgroups_no_interval() -> None:
    phenotypers, frame = _two_column_case(200, seed=11)
    frame["site_id"] = np.where(np.arange(200) < MIN_RESAMPLING_GROUPS - 1, "small", "large")
    result = benchmark(phenotypers, frame, "label", n_boot=100, noise_repeats=0)
    _, low, high = _record(result.records, "immunosep", "accuracy", "site=small")
    assert np.isnan(low) and np.isnan(high)
    assert result.meta["warning"] is None
    _, low, high = _record(result.records, "immunosep", "accuracy", "site=large")
    assert low < high


# --- macro averages over the phenotypes in the reference ------------------------------------


def test_macro_averages_run_over_the_phenotypes_present_in_the_reference() -> None:
    """No immunoparalysed patient: a phenotyper that calls some is not averaged over a third
    class (F1 0) while one that never calls it is averaged over two."""
    rng = np.random.default_rng(12)
    truth = rng.choice([0, 2], 400)
    _, proba, _ = _random_case(400, seed=12)
    labels = np.asarray(PHENOTYPES, object)[truth].copy()
    wrong = rng.random(400) < 0.2
    labels[wrong] = "immunoparalysis"
    frame = _frame(truth, {"a": (labels, proba)})
    result = benchmark({"immunosep": ColumnPhenotyper("a").fit(frame)}, frame, "label",
                       n_boot=50, noise_repeats=0)
    y = np.asarray(PHENOTYPES, dtype=object)[truth]
    present = ["MALS", "unclassified"]
    assert _value(result.records, "immunosep", "macro_f1") == pytest.approx(
        f1_score(y, labels, labels=present, average="macro"))
    assert _value(result.records, "immunosep", "balanced_accuracy") == pytest.approx(
        np.mean(recall_score(y, labels, labels=present, average=None)))
    expected = np.mean([roc_auc_score(truth == k, proba[:, k]) for k in (0, 2)])
    assert _value(result.records, "immunosep", "auroc_macro") == pytest.approx(expected)
    _, low, high = _record(result.records, "immunosep", "auroc_macro")
    assert low < high


def test_a_resample_without_a_present_phenotype_leaves_the_macro_average_undefined() -> None:
    truth = np.array([0, 0, 1, 1, 2, 2])
    labels = np.array(["MALS", "unclassified", "immunoparalysis", "immunoparalysis",
                       "unclassified", "MALS"], dtype=object)
    scorer = _Scorer(truth, Predictions(labels, np.full((6, 3), 1 / 3), False))
    weights = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 2, 1, 1, 2]], dtype=float)
    metrics = scorer.label_metrics(weights)
    assert metrics["balanced_accuracy"][0] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    # no MALS patient drawn: the mean over the other two would be a different metric
    assert np.isnan(metrics["balanced_accuracy"][1])
    # F1 of MALS is still defined (2 false calls): 0; immunoparalysis 1; unclassified 1/2
    assert metrics["macro_f1"][1] == pytest.approx((0 + 1 + 1 / 2) / 3)


# --- what an abstention counts as --------------------------------------------------------------


def test_an_abstention_is_no_false_positive_and_gives_no_immunotherapy() -> None:
    """The definitions the report states: for specificity and NPV, `indeterminate` is "not
    called"; for treatment it is no immunotherapy, which is right for an unclassified patient."""
    truth = np.array([0, 1, 2, 2])
    labels = np.array(["MALS", "immunoparalysis", "indeterminate", "unclassified"], dtype=object)
    metrics = _Scorer(truth, Predictions(labels, np.full((4, 3), 1 / 3), False)).metrics(
        np.ones((1, 4)))
    assert metrics["specificity_MALS"][0] == 1.0  # the abstention is a true negative for MALS
    assert metrics["sensitivity_unclassified"][0] == 0.5  # and a miss for unclassified
    assert metrics["npv_unclassified"][0] == pytest.approx(2 / 3)
    assert metrics["accuracy"][0] == pytest.approx(3 / 4)
    assert metrics["treatment_agreement"][0] == 1.0  # indeterminate -> none, as needed


# --- calibration that fails honestly -------------------------------------------------------------


def _scorer_with(truth: np.ndarray, proba: np.ndarray) -> _Scorer:
    labels = np.asarray(PHENOTYPES, object)[proba.argmax(axis=1)]
    return _Scorer(truth, Predictions(labels, proba, True))


def test_constant_predictions_have_no_calibration_slope() -> None:
    truth = np.array([0, 1, 2, 0, 0, 1, 2, 2, 1, 0])
    scorer = _scorer_with(truth, np.full((10, 3), 1 / 3))
    intercept, slope = scorer.calibration(np.ones((1, 10)), 0)
    assert np.isnan(slope[0])
    # calibration-in-the-large is still defined: logit(4/10) - logit(1/3)
    assert intercept[0] == pytest.approx(np.log(4 / 6) - np.log(1 / 2))
    # a resample that draws only patients with the same prediction: no slope either
    proba = np.random.default_rng(13).dirichlet([1, 1, 1], 10)
    proba[:4] = proba[0]
    weights = np.zeros((1, 10))
    weights[0, :4] = 1
    assert np.isnan(_scorer_with(truth, proba).calibration(weights, 0)[1][0])


def test_separated_outcomes_have_no_calibration_slope() -> None:
    p = np.random.default_rng(0).uniform(0.05, 0.95, 30)
    truth = np.where(p > 0.5, 0, 2)
    scorer = _scorer_with(truth, np.column_stack([p, np.zeros(30), 1 - p]))
    intercept, slope = scorer.calibration(np.ones((1, 30)), 0)
    assert np.isnan(slope[0])  # the maximum likelihood slope is infinite
    assert np.isfinite(intercept[0])  # both outcomes occur: the offset model has an answer


def test_calibration_converges_from_a_poor_start_and_is_nan_without_both_outcomes() -> None:
    rng = np.random.default_rng(1)
    proba = rng.dirichlet([1, 1, 1], 500)
    truth = np.array([rng.choice(3, p=row) for row in proba])
    scorer = _scorer_with(truth, proba)
    ones = np.ones((1, 500))
    expected = scorer.calibration(ones, 0)
    x = np.log(proba[:, 0] / (1 - proba[:, 0]))
    fit = LogisticRegression(C=np.inf, tol=1e-10, max_iter=1000).fit(x[:, None], truth == 0)
    assert expected[1][0] == pytest.approx(fit.coef_[0, 0], abs=1e-4)
    scorer.calibration_start[0] = np.array([25.0, 0.0, 8.0])  # far off: plain Newton diverges
    intercept, slope = scorer.calibration(ones, 0)
    assert intercept[0] == pytest.approx(expected[0][0], abs=1e-6)
    assert slope[0] == pytest.approx(expected[1][0], abs=1e-6)
    weights = ones.copy()
    weights[0, truth == 0] = 0  # no patient of the phenotype drawn
    assert np.isnan(scorer.calibration(weights, 0)).all()


# --- synthetic flag and reference labels -----------------------------------------------------


def test_benchmark_records_whether_the_cohort_is_synthetic() -> None:
    phenotypers, frame = _two_column_case(30, seed=14)
    assert benchmark(phenotypers, frame, "label", n_boot=10, noise_repeats=0
                     ).meta["synthetic"] is False
    assert benchmark(phenotypers, frame, "label", n_boot=10, noise_repeats=0, synthetic=True
                     ).meta["synthetic"] is True


def test_reference_labels_match_in_any_case_and_read_intermediate_as_unclassified() -> None:
    frame = pd.DataFrame({"label": ["IMMUNOPARALYSIS", "mals", " Intermediate ", "Unclassified",
                                    "INDETERMINATE", None, ""]})
    reading = reference_labels(frame, "label")
    known = reading.labelled
    np.testing.assert_array_equal(known, [True, True, True, True, False, False, False])
    assert [PHENOTYPES[c] for c in reading.codes[known]] == ["immunoparalysis", "MALS",
                                                              UNCLASSIFIED, UNCLASSIFIED]


def test_unreadable_labels_are_counted_and_left_out_of_label_metrics_only() -> None:
    """A hospital's label column may hold values phenotyper cannot read: the benchmark leaves
    those patients out of the label metrics, says how many and which, and keeps them in the
    outcome metrics."""
    from phenotyper.evaluate.outcomes import OutcomeSpec

    cohort = simulate("all-comers-trial", 1200, seed=5)
    cohort["label"] = cohort["phenotype_true"].astype(object)
    cohort.loc[[4, 9], "label"] = "sepsis"
    rules = {"immunosep": ImmunoSepRule().fit(cohort)}
    result = benchmark(rules, cohort, "label", n_boot=20, noise_repeats=0,
                       outcomes=OutcomeSpec(("sofa_response",),
                                            propensity="treatment_probability"))
    assert result.meta["labels"]["n_unreadable"] == 2
    assert result.meta["n_left_out"] == 2
    assert "row 5: 'sepsis'" in result.meta["labels"]["summary"]
    records = result.records.set_index(["phenotyper", "metric", "subgroup"])
    assert records.loc[("immunosep", "n", "all")].value == len(cohort) - 2
    assert result.meta["outcome"]["arm_counts"]["placebo"] == int(
        (cohort["treatment"] == "placebo").sum())
    recoded = benchmark(rules, cohort, "label", n_boot=20, noise_repeats=0,
                        label_recode={"sepsis": "unclassified"})
    assert recoded.meta["labels"]["n_unreadable"] == 0
    with pytest.raises(EvaluationError, match="no patient has a reference phenotype"):
        benchmark(rules, cohort.assign(label="sepsis"), "label", n_boot=20, noise_repeats=0)


def test_a_label_that_is_the_rule_itself_is_flagged() -> None:
    cohort = simulate("provide", 1500, seed=6)
    rules = {"immunosep": ImmunoSepRule().fit(cohort)}
    flagged = benchmark(rules, cohort, "phenotype_rule", n_boot=20, noise_repeats=0)
    assert "agreement" in flagged.meta["label_warning"]
    plain = benchmark(rules, cohort, "phenotype_true", n_boot=20, noise_repeats=0)
    assert plain.meta["label_warning"] is None
