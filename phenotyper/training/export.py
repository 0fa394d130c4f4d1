"""A fitted candidate written as the packaged model's plain data (packaged/ reads it back
without scikit-learn). Training owns this: only a fitted estimator can be exported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from phenotyper.contract import FERRITIN_MALS_NG_ML, HLA_DR_IMMUNOPARALYSIS_MAB_PER_CELL
from phenotyper.latent import Mixture
from phenotyper.models import GaussianClassifier, LogitRecalibrated, WeightedXGBClassifier
from phenotyper.packaged.format import BOOSTER_FILE, FORMAT_VERSION, SPEC_FILE
from phenotyper.panel import LINEAR_SCALE_MARKERS, PANEL


def export(model: Any, folder: Path, latent: Mixture | None = None,
           profile: dict[str, Any] | None = None) -> Path:
    """Write a fitted candidate as plain data into `folder`; returns the spec file.
    `latent`: the mixture a label-free candidate was distilled from, carried as a new key
    (the package-format rule: old keys unchanged) so scoring adds its posterior.
    `profile`: the training cohort's profile (drift.training_profile), a new key too."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    calibration = None
    if isinstance(model, LogitRecalibrated):
        calibration = {"coef": model.calibration_matrix_.tolist(),
                       "intercept": model.calibration_intercept_.tolist()}
        model = model.base_
    features_step, classifier = model[0], model[-1]
    features = list(features_step.features)
    spec: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "features": features,
        "log_features": [f for f in features if f in PANEL and f not in LINEAR_SCALE_MARKERS],
        "classes": [str(c) for c in classifier.classes_],
        "calibration": calibration,
        "rule": {"ferritin_threshold_ng_ml": FERRITIN_MALS_NG_ML,
                 "hla_dr_threshold_mab_per_cell": HLA_DR_IMMUNOPARALYSIS_MAB_PER_CELL},
        "ranges": {f: [PANEL[f].low, PANEL[f].high] for f in features
                   if f in PANEL and PANEL[f].is_numeric},
    }
    if isinstance(classifier, WeightedXGBClassifier):
        classifier.booster_.get_booster().save_model(str(folder / BOOSTER_FILE))
        spec["kind"] = "xgboost"
        spec["logit_offset"] = (-np.log(classifier.class_weight_)).tolist()
        spec["booster"] = BOOSTER_FILE
    elif isinstance(classifier, GaussianClassifier):
        spec["kind"] = "gaussian"
        spec["gaussian"] = classifier.mixture_.as_dict()  # its columns name the features used
    else:
        imputer, scaler = model.named_steps["impute"], model.named_steps["scale"]
        indicator = getattr(imputer, "indicator_", None)
        spec["kind"] = "linear"
        spec["impute_median"] = imputer.statistics_.tolist()
        spec["indicator_of"] = ([] if indicator is None
                                else [int(i) for i in indicator.features_])
        spec["scale_mean"] = scaler.mean_.tolist()
        spec["scale_sd"] = scaler.scale_.tolist()
        spec["coef"] = classifier.coef_.tolist()
        spec["intercept"] = classifier.intercept_.tolist()
    if latent is not None:
        spec["latent"] = latent.as_dict()
    if profile is not None:
        spec["profile"] = profile
    path = folder / SPEC_FILE
    path.write_text(json.dumps(spec, indent=1))
    return path
