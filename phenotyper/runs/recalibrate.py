"""The local recalibration run: score a hospital's labelled sample with a registered model,
test its calibration there, and when it is off register the recalibrated package as a new
version tagged with its parent, champion only if it beats the parent on held-out patients."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np

from phenotyper.cohort import read_cohort
from phenotyper.contract import PHENOTYPES, is_scored
from phenotyper.files import file_sha256
from phenotyper.labels import RULE_LABEL_AGREEMENT, RULE_LABEL_MIN_PATIENTS, read_labels
from phenotyper.labels import rule_agreement as label_rule_agreement
from phenotyper.packaged import PackagedPhenotyper
from phenotyper.packaged.format import ARTIFACT, SPEC_FILE
from phenotyper.report.card import recalibration_section
from phenotyper.simulate import simulate
from phenotyper.suggest import did_you_mean
from phenotyper.tracking.log import experiment_run, log_packaged_model, record_decision
from phenotyper.tracking.registry import (
    champion_version,
    describe_model,
    packaged_folder,
    store_uri,
    using_store,
)
from phenotyper.training.recalibration import (
    LocalRecalibration,
    RecalibrationError,
    compose,
    recalibrate,
)
from phenotyper.training.results import GateDecision

EXAMPLE_PRESET = "provide"  # the new version's input example: synthetic, no local patient


@dataclass(frozen=True)
class RecalibrationOutcome:
    """What `recalibrate_model` found and did."""

    parent: dict  # registry.describe_model of the model recalibrated
    result: LocalRecalibration
    n_unscored: int  # labelled rows the model could not score (left out)
    rule_agreement: float  # share of labelled patients whose label is the rule's answer
    labels: str  # what the label column held (labels.LabelReading.summary)
    warning: str | None
    version: str | None  # the new registered version, when the map was refitted
    decision: GateDecision | None


def recalibrate_model(model_uri: str, cohort_path: Path, label: str,
                      mapping: Path | None = None, seed: int = 0,
                      tracking_uri: str | None = None) -> RecalibrationOutcome:
    """Recalibrate a registered model (models:/NAME/VERSION or @ALIAS) on a local labelled
    cohort; registers a new version only when the joint test says the model is off there."""
    uri = tracking_uri or store_uri()
    cohort = read_cohort(cohort_path, mapping)
    if label not in cohort.data:
        hint = did_you_mean(label, [str(c) for c in cohort.data.columns])
        raise RecalibrationError(f"label column '{label}' is not in {cohort_path}.{hint}")
    reading = read_labels(cohort.data[label], label, cohort.label_recode)
    with using_store(uri) as client:
        parent = describe_model(client, model_uri)
        if parent["version"] is None:
            raise RecalibrationError(f"give a registered model (models:/NAME/VERSION or "
                                     f"models:/NAME@champion), not {model_uri}")
        with tempfile.TemporaryDirectory() as folder:
            package = Path(shutil.copytree(packaged_folder(parent["resolved_uri"], uri),
                                           Path(folder) / ARTIFACT))
            scored = PackagedPhenotyper(package).predict(cohort.data, explain="none")
            use = reading.labelled & np.array([is_scored(s) for s in scored["status"]])
            proba = scored.loc[use, [f"prob_{p}" for p in PHENOTYPES]].to_numpy(dtype=float)
            try:
                result = recalibrate(reading.codes[use], proba, seed)
            except RecalibrationError as error:
                raise RecalibrationError(f"{error}. {reading.summary()}") from None
            agreement, compared = label_rule_agreement(reading, scored["rule_phenotype"])
            warning = _rule_like(label, agreement, compared)
            version = decision = None
            if result.refit:
                version, decision = _register(client, parent, package, result, cohort_path,
                                              warning)
    return RecalibrationOutcome(parent, result, int((reading.labelled & ~use).sum()),
                                agreement, reading.summary(), warning, version, decision)


def _rule_like(label: str, agreement: float, compared: int) -> str | None:
    if compared < RULE_LABEL_MIN_PATIENTS or not agreement >= RULE_LABEL_AGREEMENT:
        return None
    return (f"label column '{label}' agrees with the ImmunoSep rule on {agreement:.1%} of the "
            f"{compared:,} patients the rule can type: it looks like the rule's own answer, so "
            "recalibrating to it teaches the model the rule's cut-offs, not the patients' state")


def _register(client, parent: dict, package: Path, result: LocalRecalibration,
              cohort_path: Path, warning: str | None) -> tuple[str, GateDecision]:
    """Write the composed map into the package, register it, tag it, apply the decision."""
    name, digest = parent["name"], file_sha256(cohort_path)
    for earlier in client.search_model_versions(f"name='{name}'"):
        if (earlier.tags.get("parent_version") == parent["version"] and
                earlier.tags.get("recalibration.cohort_sha256") == digest):
            raise RecalibrationError(
                f"version {earlier.version} is already version {parent['version']} "
                f"recalibrated on this cohort (same SHA-256); nothing registered. Use "
                f"models:/{name}/{earlier.version}, or recalibrate on new patients")
    spec_path = package / SPEC_FILE
    spec = json.loads(spec_path.read_text())
    spec["calibration"] = compose(result.mapping, spec["calibration"], len(spec["classes"]))
    spec["recalibration"] = {**result.as_dict(), "parent_version": parent["version"],
                             "cohort_sha256": digest}  # a new key
    spec_path.write_text(json.dumps(spec, indent=1))
    champion = champion_version(client, name)
    held = result.held_out
    if warning is not None:
        reason = "the local labels look like the ImmunoSep rule's own answer"
    elif not result.improves:
        reason = "held-out local log loss and calibration did not both improve"
    elif champion != parent["version"]:
        reason = (f"it beats version {parent['version']} on held-out local patients, but "
                  f"that version is not the champion ({champion or 'none'})")
    else:
        reason = f"it beats version {parent['version']} on held-out local patients"
    decision = GateDecision(result.improves and warning is None and
                            champion == parent["version"], reason,
                            {**{k: v for k, v in held.items()},
                             "test_p_value": result.before.p_value})
    with experiment_run(f"{name}-recalibration", run_name=f"recalibrate v{parent['version']}"):
        mlflow.log_params({"parent_version": parent["version"], "cohort": str(cohort_path),
                           "n": sum(result.counts.values())})
        mlflow.log_metrics({k: float(v) for k, v in held.items()})
        example = simulate(EXAMPLE_PRESET, 3, seed=0)
        version = log_packaged_model(package, example, spec["features"], name)
        client.set_model_version_tag(name, version, "parent_version", parent["version"])
        client.set_model_version_tag(name, version, "recalibration.cohort_sha256", digest)
        card = recalibration_section(client.get_model_version(name, parent["version"])
                                     .description or "", name, version, parent["version"],
                                     result, cohort_path, warning)
        record_decision(client, name, version, decision, card)
    return version, decision
