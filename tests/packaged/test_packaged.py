"""The packaged phenotyper: same answers as the fitted model, exact and additive SHAP values,
the output contract row by row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shap

from phenotyper.contract import OK
from phenotyper.models import LogitRecalibrated, PanelFeatures, build_candidate
from phenotyper.packaged.model import PackagedPhenotyper, _sex
from phenotyper.panel import PANEL
from phenotyper.simulate import simulate
from phenotyper.training.export import export
from phenotyper.treeshap import TreeShapTables

FEATURES = list(PANEL)
TOLERANCE = 1e-4  # the bar for exact SHAP values


@pytest.fixture(scope="module")
def cohorts() -> tuple[pd.DataFrame, pd.DataFrame]:
    return simulate("provide", 2500, seed=1), simulate("provide", 400, seed=2)


def _fit(kind: str, train: pd.DataFrame, recalibrated: bool = False):
    params = {"xgboost": {"n_estimators": 40, "max_depth": 3}, "logistic": {"C": 1.0},
              "gaussian": {}}[kind]
    model = build_candidate(kind, FEATURES, params)
    if recalibrated:
        model = LogitRecalibrated(model, cv=3)
    return model.fit(train, train["phenotype_true"])


def _packaged(model, folder: Path) -> PackagedPhenotyper:
    export(model, folder)
    return PackagedPhenotyper(folder)


def _class_columns(out: pd.DataFrame, classes: list[str]) -> np.ndarray:
    return out[[f"prob_{c}" for c in classes]].to_numpy()


@pytest.mark.parametrize("kind", ["logistic", "xgboost", "gaussian"])
@pytest.mark.parametrize("recalibrated", [False, True])
def test_packaged_model_gives_the_fitted_models_probabilities(
    cohorts, tmp_path: Path, kind: str, recalibrated: bool
) -> None:
    train, test = cohorts
    model = _fit(kind, train, recalibrated)
    packaged = _packaged(model, tmp_path)
    expected = model.predict_proba(test)
    assert [str(c) for c in model.classes_] == packaged.classes
    for explain in ("predicted", "none"):  # with TreeSHAP/contributions, and from the margin
        out = packaged.predict(test, explain=explain)
        np.testing.assert_allclose(_class_columns(out, packaged.classes), expected, atol=1e-6)
        assert (out["phenotype"].to_numpy() == model.predict(test)).all()


def test_tree_shap_values_equal_shaps_tree_explainer(cohorts, tmp_path: Path) -> None:
    """The packaged model explains with the compiled tables (not a silent fallback), and its
    numbers are shap's and XGBoost's."""
    train, test = cohorts
    model = _fit("xgboost", train)
    packaged = _packaged(model, tmp_path)
    assert isinstance(packaged.explainer, TreeShapTables)
    assert packaged.describe_explainer()["method"] == "compiled TreeSHAP tables"
    contributions, _, _ = packaged.contributions(test)
    transformed = model[0].transform(test)
    reference = np.asarray(shap.TreeExplainer(model[-1].booster_).shap_values(transformed))
    if reference.shape[1] != len(FEATURES):  # (classes, rows, features) in some shap versions
        reference = np.moveaxis(reference, 0, -1)
    np.testing.assert_allclose(np.moveaxis(contributions, 1, 2), reference, atol=TOLERANCE)


def test_linear_shap_values_are_coefficient_times_centred_value(cohorts, tmp_path) -> None:
    """coef x (x - mean) in the model's standardised feature space, computed from the fitted
    scikit-learn steps; a marker's missing indicator counts towards that marker."""
    train, test = cohorts
    model = _fit("logistic", train)
    contributions, base, _ = _packaged(model, tmp_path).contributions(test)
    prepared = model[:-1].transform(test)  # features, imputation + indicators, scaling
    background = model[:-1].transform(train).mean(axis=0)
    coef = model[-1].coef_
    per_column = (prepared - background)[:, None, :] * coef[None, :, :]
    indicator_of = model.named_steps["impute"].indicator_.features_
    expected = per_column[:, :, : len(FEATURES)].copy()
    for position, feature in enumerate(indicator_of):
        expected[:, :, feature] += per_column[:, :, len(FEATURES) + position]
    np.testing.assert_allclose(contributions, expected, atol=TOLERANCE)
    np.testing.assert_allclose(base, model[-1].intercept_ + coef @ background, atol=TOLERANCE)


@pytest.mark.parametrize("kind", ["logistic", "xgboost"])
def test_shap_values_add_up_to_the_predicted_log_odds_on_every_row(cohorts, tmp_path, kind):
    train, test = cohorts
    packaged = _packaged(_fit(kind, train, recalibrated=True), tmp_path)
    out = packaged.predict(test)
    shap_columns = [f"shap_{f}" for f in FEATURES]
    total = out["shap_base"] + out[shap_columns].sum(axis=1)
    proba = _class_columns(out, packaged.classes)
    rows, top = np.arange(len(out)), proba.argmax(axis=1)
    contributions, base, _ = packaged.contributions(test)
    logits = contributions.sum(axis=2) + base
    np.testing.assert_allclose(total, logits[rows, top], atol=1e-8)
    # and they are the model's own logits: their differences are log-probability ratios
    np.testing.assert_allclose(logits[rows, top] - logits[:, 0],
                               np.log(proba[rows, top]) - np.log(proba[:, 0]), atol=1e-6)


def test_output_contract_keeps_every_row_in_order_and_flags_bad_rows(cohorts, tmp_path):
    train, test = cohorts
    packaged = _packaged(_fit("xgboost", train), tmp_path)
    rows = test.head(6).copy()
    rows["ferritin_ng_ml"] = rows["ferritin_ng_ml"].astype(object)
    rows.loc[1, "ferritin_ng_ml"] = -50.0  # implausible
    rows.loc[3, "ferritin_ng_ml"] = "haemolysed"  # not a number
    rows.loc[4, "hla_dr_mab_per_cell"] = np.nan  # a hospital without flow cytometry
    out = packaged.predict(rows)
    assert out["patient_id"].tolist() == rows["patient_id"].tolist()
    assert out.loc[1, "status"].startswith("ferritin_ng_ml=-50 is outside")
    assert "not a number" in out.loc[3, "status"]
    assert out.loc[[0, 2, 4, 5], "status"].eq(OK).all()
    assert out.loc[[1, 3], "phenotype"].isna().all() and out.loc[[1, 3], "prob_MALS"].isna().all()
    assert out.loc[[0, 2, 4, 5], "phenotype"].notna().all()
    assert out.loc[4, "rule_phenotype"] in ("indeterminate", "MALS")
    assert {"shap_base", "top_drivers", *(f"shap_{f}" for f in FEATURES)} <= set(out.columns)
    assert out.loc[0, "top_drivers"].count("(") == 3


@pytest.mark.parametrize("kind", ["logistic", "xgboost"])
def test_rejected_values_as_missing_score_the_row_without_them(cohorts, tmp_path, kind):
    train, test = cohorts
    packaged = _packaged(_fit(kind, train), tmp_path)
    rows = test.head(4).copy()
    rows[["crp_mg_l", "sex"]] = rows[["crp_mg_l", "sex"]].astype(object)
    rows.loc[1, "crp_mg_l"] = 1410.0  # implausible
    rows.loc[2, ["crp_mg_l", "sex"]] = ["haemolysed", "x"]  # two values set aside
    without = rows.copy()
    without.loc[[1, 2], "crp_mg_l"] = np.nan
    without.loc[2, "sex"] = np.nan
    out = packaged.predict(rows, explain="all", rejected_values="missing")
    expected = packaged.predict(without, explain="all")
    assert out.loc[1, "status"].startswith("scored without crp_mg_l=1410 is outside")
    assert out.loc[2, "status"] == ("scored without crp_mg_l is not a number ('haemolysed'); "
                                    "sex 'x' is not F or M")
    assert out.loc[[0, 3], "status"].eq(OK).all()
    numbers = [c for c in out.columns if c.startswith(("prob_", "shap_"))]
    pd.testing.assert_frame_equal(out[numbers], expected[numbers])
    assert out["phenotype"].tolist() == expected["phenotype"].tolist()
    skipped = packaged.predict(rows)
    assert skipped.loc[[1, 2], "phenotype"].isna().all()
    assert skipped.loc[1, "status"] == out.loc[1, "status"].removeprefix("scored without ")
    with pytest.raises(ValueError, match="rejected_values must be one of"):
        packaged.predict(rows, rejected_values="impute")


def test_explain_modes(cohorts, tmp_path) -> None:
    train, test = cohorts
    packaged = _packaged(_fit("logistic", train), tmp_path)
    none = packaged.predict(test.head(3), explain="none")
    assert not any(c.startswith("shap_") for c in none.columns)
    every = packaged.predict(test.head(3), explain="all")
    for label in packaged.classes:
        assert f"shap_base_{label}" in every and f"shap_{label}_ferritin_ng_ml" in every
    with pytest.raises(ValueError, match="explain"):
        packaged.predict(test.head(3), explain="some")


def test_export_is_plain_data(cohorts, tmp_path) -> None:
    train, _ = cohorts
    export(_fit("xgboost", train), tmp_path / "trees")
    export(_fit("logistic", train), tmp_path / "linear")
    names = {p.name for p in (tmp_path / "trees").iterdir()} | {
        p.name for p in (tmp_path / "linear").iterdir()}
    assert names == {"phenotyper.json", "booster.ubj"}


def test_odd_inputs_never_lose_the_batch(cohorts, tmp_path) -> None:
    train, test = cohorts
    packaged = _packaged(_fit("xgboost", train), tmp_path)
    assert packaged.predict(test.head(0)).empty
    rows = test.head(4).copy()
    rows.loc[0, "ferritin_ng_ml"] = np.inf
    rows.loc[1, "ferritin_ng_ml"] = -5.0
    out = packaged.predict(rows)
    assert len(out) == 4 and out.loc[[2, 3], "status"].eq(OK).all()
    assert out.loc[[0, 1], "status"].str.contains("outside").all()
    assert out.loc[[0, 1], "rule_phenotype"].isin(["indeterminate", "immunoparalysis",
                                                   "unclassified"]).all()
    assert out.loc[0, "rule_phenotype"] != "MALS"  # an infinite ferritin is not evidence


@pytest.mark.parametrize("explain", ["predicted", "all", "none"])
def test_a_small_request_is_answered_as_the_same_rows_in_a_large_batch(cohorts, tmp_path,
                                                                        explain):
    """The scoring server's few-row requests are read in one go (not column by column) and
    their top drivers formatted row by row: same answers as one big batch, whatever the
    columns' dtypes (numbers, text, pandas' nullable types, odd sex codes)."""
    train, test = cohorts
    packaged = _packaged(_fit("xgboost", train), tmp_path)
    rows = test.head(40).copy()
    rows.loc[rows.index[3], "crp_mg_l"] = np.nan
    rows.loc[rows.index[5], "ferritin_ng_ml"] = -5.0  # rejected: status, no drivers
    rows["sofa"] = rows["sofa"].astype("Int64")  # a nullable integer column with a gap
    rows.loc[rows.index[7], "sofa"] = pd.NA
    rows["il6_pg_ml"] = rows["il6_pg_ml"].astype(str)  # numbers as text, parsed
    rows.loc[rows.index[8], "il6_pg_ml"] = "haemolysed"
    rows["sex"] = rows["sex"].astype(object)
    rows.loc[rows.index[[9, 10, 11]], "sex"] = [" female ", "x", None]
    for given in (rows, rows.astype({"ferritin_ng_ml": object})):
        batch = packaged.predict(given, explain=explain)
        small = pd.concat([packaged.predict(given.iloc[i:i + 2], explain=explain)
                           for i in range(0, 40, 2)], ignore_index=True)
        pd.testing.assert_frame_equal(small, batch.reset_index(drop=True))
    assert (batch["status"] != OK).sum() == 3  # ferritin -5, il6 text, sex "x"
    if explain != "none":
        assert batch["top_drivers"].str.contains("=").sum() == 37
        assert batch.loc[5, "top_drivers"] == ""


def test_sex_is_coded_alike_in_training_and_in_the_packaged_model() -> None:
    """One coding (panel.SEX_CODE): M 1, F 0, a missing sex missing (never female), in the
    training transform and the packaged model's reading of the same canonical values."""
    values = ["F", "M", None, "M"]
    trained = PanelFeatures(["sex"]).fit(pd.DataFrame({"sex": values})).transform(
        pd.DataFrame({"sex": values}))[:, 0]
    status = [OK] * len(values)
    packaged = _sex(np.array(values, dtype=object), status)
    np.testing.assert_array_equal(trained, [0.0, 1.0, np.nan, 1.0])
    np.testing.assert_array_equal(packaged, trained)
    assert status == [OK] * len(values)
