"""Training without labels: latent classes named by profile, checked against the simulator's
truth; the three supervision modes; distillation into a packaged model; the gate by outcomes;
the clear errors."""

import dataclasses

import numpy as np
import pandas as pd
import pytest

from phenotyper.contract import PHENOTYPES, TRUE_PHENOTYPE
from phenotyper.latent import posterior
from phenotyper.packaged import PackagedPhenotyper
from phenotyper.simulate import simulate
from phenotyper.training.export import export
from phenotyper.training.gate import promotion_decision
from phenotyper.training.label_free import LATENT, fit_label_free
from phenotyper.training.spec import LATENT_CLASS, ExperimentError, ExperimentSpec, load_spec

FAST = {"candidates": {"logistic": {"C": [1.0]}}, "bootstrap": 100, "noise_repeats": 0,
        "latent_classes": (2, 4), "latent_restarts": 2, "stability_refits": 2}


def spec_for(**changes) -> ExperimentSpec:
    return ExperimentSpec(**{"name": "lf", "registered_model": "lf",
                             "preset": "immunosep-screening", "n": 3000, "cohort_seed": 4,
                             "supervision": "none", **FAST, **changes})


def value(result, phenotyper: str, metric: str) -> float:
    records = result.benchmark.records
    row = records[(records.phenotyper == phenotyper) & (records.metric == metric)
                  & (records.subgroup == "all")]
    return float(row.value.iloc[0])


@pytest.fixture(scope="module")
def unlabelled():
    return fit_label_free(spec_for())


def test_label_free_classes_agree_with_the_latent_truth_better_than_the_rule(unlabelled):
    """Named from profiles alone, the latent classes recover the simulator's phenotypes:
    accuracy above 0.85 (the Bayes posterior reaches about 0.91 on this law) and balanced
    accuracy above the ImmunoSep rule's, on held-out patients."""
    assert unlabelled.benchmark.meta["label"] == TRUE_PHENOTYPE  # judged against, not fitted
    assert value(unlabelled, LATENT, "accuracy") > 0.85
    assert value(unlabelled, "logistic", "accuracy") > 0.85
    assert (value(unlabelled, "logistic", "balanced_accuracy")
            > value(unlabelled, "immunosep", "balanced_accuracy"))
    latent = unlabelled.latent
    assert latent.mixture.classes == PHENOTYPES
    assert latent.preferred_k == 3
    assert latent.sizes["MALS"] < latent.sizes["immunoparalysis"] < latent.sizes["unclassified"]
    assert latent.profile.loc["MALS", "ferritin_ng_ml"] > 4420  # named by ferritin
    assert latent.profile["hla_dr_mab_per_cell"].idxmin() == "immunoparalysis"
    assert latent.stability["kept_mean"] > 0.9


def test_the_truth_column_is_never_fitted():
    """Shuffling the reference column changes the judgement, not the fitted mixture."""
    spec = spec_for(n=1500)
    first = fit_label_free(spec)
    cohort = simulate("immunosep-screening", 1500, 4)
    cohort[TRUE_PHENOTYPE] = np.random.default_rng(0).permutation(cohort[TRUE_PHENOTYPE])
    np.testing.assert_allclose(posterior(first.latent.mixture, cohort),
                               posterior(fit_label_free(spec).latent.mixture, cohort))


def test_the_distilled_package_reproduces_the_posterior_it_learned(unlabelled, tmp_path):
    """The packaged model's latent_prob_* are the mixture's posterior (to 1e-9), and the
    distilled candidate's probabilities are within 0.03 of it on average (measured: about
    0.01 for logistic regression)."""
    candidate = unlabelled.candidates["logistic"].estimator
    export(candidate, tmp_path, unlabelled.latent.mixture)
    scored = PackagedPhenotyper(tmp_path).predict(unlabelled.test)
    truth = posterior(unlabelled.latent.mixture, unlabelled.test)
    latent = scored[[f"latent_prob_{p}" for p in PHENOTYPES]].to_numpy()
    np.testing.assert_allclose(latent, truth, atol=1e-9)
    distilled = scored[[f"prob_{p}" for p in PHENOTYPES]].to_numpy()
    assert np.mean(np.abs(distilled - truth)) < 0.03
    assert unlabelled.latent.distillation["logistic"] < 0.03
    entropy = -(truth * np.log(np.clip(truth, 1e-300, 1))).sum(axis=1)
    np.testing.assert_allclose(scored["latent_entropy"], entropy, atol=1e-9)
    # the supervised package format is unchanged: no latent columns without the mixture
    export(candidate, tmp_path / "plain")
    assert not any(c.startswith("latent_") for c in
                   PackagedPhenotyper(tmp_path / "plain").predict(unlabelled.test.head(3)))


def test_partial_labels_anchor_the_classes(tmp_path):
    """60 adjudicated patients among 3000: the classes keep the labels' phenotypes."""
    cohort = simulate("immunosep-screening", 3000, 4)
    adjudicated = np.random.default_rng(1).choice(len(cohort), 60, replace=False)
    cohort["adjudicated"] = None
    cohort.loc[adjudicated, "adjudicated"] = cohort.loc[adjudicated, TRUE_PHENOTYPE]
    result = fit_label_free(dataclasses.replace(
        spec_for(), supervision="partial", label="adjudicated", preset=None,
        cohort_path=_write(cohort, tmp_path)))
    assert result.labels["anchors"] > 30
    assert value(result, LATENT, "accuracy") > 0.85


def _write(cohort: pd.DataFrame, folder) -> str:
    path = folder / "cohort.parquet"
    cohort.to_parquet(path)
    return str(path)


def test_noisy_rule_estimates_the_rules_error_rates_near_its_cut_offs():
    result = fit_label_free(spec_for(supervision="noisy-rule"))
    errors = result.latent.rule_errors.set_index(["band", "rule"])
    near = errors.loc[("near cut-off", "MALS"), "latent_MALS"]
    away = errors.loc[("away from cut-off", "MALS"), "latent_MALS"]
    assert near < away  # the rule's MALS is less often MALS near the ferritin cut-off
    assert value(result, LATENT, "accuracy") > 0.85


def test_with_outcomes_the_label_free_gate_judges_by_policy_value():
    spec = spec_for(preset="all-comers-trial", n=3000, outcomes=("death_28d",),
                    treatment="treatment", propensity="treatment_probability",
                    reference="phenotype_true")
    result = fit_label_free(spec)
    decision = promotion_decision(result, None)
    assert decision.numbers["gate"] == "policy value (label-free)"
    assert "policy_value_death_28d" in decision.reason
    assert decision.promote == (decision.numbers["policy_difference_ci_high"] < 0)


@pytest.mark.parametrize(("document", "message"), [
    ('label = "phenotype_true"\n[supervision]\nmode = "none"',
     "mode 'none' learns without labels"),
    ("", "needs 'label'"),
    ('[supervision]\nmode = "partial"', "a partial training needs 'label'"),
    ('[supervision]\nmode = "noisy_rule"', "'noisy_rule' is not known. Did you mean 'noisy-rule'"),
    ('[supervision]\nmode = "none"\nclasses = [4, 6]', "must run from 2 or 3 to 3 or more"),
])
def test_experiment_files_with_a_wrong_supervision_say_what_to_change(tmp_path, document,
                                                                      message):
    path = tmp_path / "e.toml"
    path.write_text('name = "x"\nregistered_model = "x"\n' + document
                    + '\n[cohort]\npreset = "provide"\n')
    with pytest.raises(ExperimentError, match=message):
        load_spec(path)


def test_a_cohort_too_small_gets_a_clear_error():
    with pytest.raises(ExperimentError, match=r"fewer than the \d+ parameters"):
        fit_label_free(spec_for(n=60, test_size=0.25))


def test_without_outcomes_or_reference_it_is_registered_not_promoted_and_says_why(tmp_path):
    cohort = simulate("immunosep-screening", 2000, 1).drop(columns=TRUE_PHENOTYPE)
    result = fit_label_free(dataclasses.replace(spec_for(), preset=None,
                                                cohort_path=_write(cohort, tmp_path)))
    assert result.labels["reference"] == LATENT_CLASS
    assert any("registered and not promoted" in w for w in result.latent.warnings)
    # judged by how well the distilled candidates reproduce the latent classes
    assert value(result, result.selected, "accuracy") > 0.9
    decision = promotion_decision(result, None)
    assert not decision.promote
    assert "Registered, not promoted" in decision.reason
    assert "outcome" in decision.reason


def test_cli_trains_without_labels_and_says_how_without_label_or_supervision(
        tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from phenotyper.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    runner = CliRunner(env={"COLUMNS": "400"})
    cohort = tmp_path / "cohort.csv"
    simulate("immunosep-screening", 1200, 2).to_csv(cohort, index=False)
    run = ["train", "--cohort", str(cohort), "--name", "unlabelled"]
    missing = runner.invoke(app, run)
    assert missing.exit_code == 2
    assert "--supervision none|partial|noisy-rule" in missing.stderr
    trained = runner.invoke(app, [*run, "--supervision", "none"])
    assert trained.exit_code == 0, trained.output
    assert "Latent classes (none): BIC prefers" in trained.stdout
    assert "latent classes" in trained.stdout  # its column in the benchmark table
