"""Experiments as files: the spec (TOML in experiments/), validated with errors that name the
file and the key, and the defaults `phenotyper train --cohort` runs without one."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from phenotyper.contract import HIGHER_IS_BETTER
from phenotyper.evaluate.outcomes import OutcomeError, OutcomeSpec
from phenotyper.latent import COVARIANCES, K_RANGE
from phenotyper.models import CANDIDATES
from phenotyper.panel import PANEL
from phenotyper.suggest import did_you_mean

REFERENCE_RULE = "immunosep"
CHAMPION = "champion"
# A label-free run with neither outcomes nor a reference column: the candidates are judged by
# how well they reproduce the latent classes on the held-out patients (this column), and none
# is promoted.
LATENT_CLASS = "latent_class"
# CV selection metric -> (scikit-learn scorer, evaluator metric, higher is better)
SELECTION_METRICS: dict[str, tuple[str, str, bool]] = {
    "log_loss": ("neg_log_loss", "log_loss", False),
    "balanced_accuracy": ("balanced_accuracy", "balanced_accuracy", True),
    "accuracy": ("accuracy", "accuracy", True),
    "macro_f1": ("f1_macro", "macro_f1", True),
}
# How the held-out patients are chosen: at random by patient or by site, or the latest patients
# by their first sample_time (earlier patients train, later ones test: a model judged on the
# future it will meet).
SPLITS = ("patient", "site", "time")
RULE_METRICS = ("balanced_accuracy", "accuracy", "macro_f1", "treatment_agreement")
DEFAULT_GRIDS: dict[str, dict[str, list]] = {
    "logistic": {"C": [0.1, 1.0]},
    "xgboost": {"max_depth": [3], "n_estimators": [300], "learning_rate": [0.05]},
}

_TOP_KEYS = {"name", "description", "registered_model", "label", "cohort", "features", "split",
             "candidates", "selection", "benchmark", "outcome", "supervision"}
_SECTION_KEYS = {
    "cohort": {"path", "mapping", "preset", "n", "seed"},
    "features": {"markers", "exclude", "extra"},
    "split": {"by", "test_size", "seed", "cv_folds"},
    "selection": {"metric", "rule_metric", "champion_tolerance", "gate", "determinate",
                  "agreement_margin", "two_marker"},
    "benchmark": {"bootstrap", "noise_repeats", "seed"},
    "outcome": {"treatment", "outcome", "propensity", "higher_is_better"},
    "supervision": {"mode", "reference", "classes", "covariance", "restarts",
                    "stability_refits"},
}
# How a training learns the phenotypes (`[supervision] mode`): from the label column
# (SUPERVISED, no [supervision] table); from the markers alone (latent classes, NONE); from
# latent classes anchored by a few labelled patients (PARTIAL); or from latent classes started
# from the ImmunoSep rule's answers, whose error rates are then estimated (NOISY_RULE).
SUPERVISED, NONE, PARTIAL, NOISY_RULE = "supervised", "none", "partial", "noisy-rule"
SUPERVISION_MODES = (NONE, PARTIAL, NOISY_RULE)
LABEL_FREE = (NONE, NOISY_RULE)  # modes that take no label column
# Gate modes: beat the rule (superiority), or reproduce it without HLA-DR (agreement: Cohen's
# kappa with the rule, non-inferior to the rule's own kappa under between-lab re-measurement).
SUPERIORITY, AGREEMENT = "superiority", "agreement"
GATES = (SUPERIORITY, AGREEMENT)
# The learned two-marker reference: the selected learner refitted on the rule's own markers.
TWO_MARKER = "two_marker"


class ExperimentError(ValueError):
    """An experiment file or option that cannot be run; the message names the key."""


@dataclass(frozen=True)
class ExperimentSpec:
    """A validated experiment."""

    name: str
    registered_model: str
    label: str | None = None  # the reference phenotype; PARTIAL: the few adjudicated ones
    cohort_path: str | None = None
    mapping: str | None = None
    preset: str | None = None
    n: int = 20_000
    cohort_seed: int = 0
    markers: tuple[str, ...] | None = None  # None: every panel marker the cohort has
    exclude: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    split_by: str = "patient"
    test_size: float = 0.25
    split_seed: int = 0
    cv_folds: int = 3
    candidates: dict[str, dict[str, list]] = field(default_factory=lambda: dict(DEFAULT_GRIDS))
    selection_metric: str = "log_loss"
    rule_metric: str = "balanced_accuracy"
    champion_tolerance: float = 0.01
    gate: str = SUPERIORITY
    determinate: bool = True  # superiority must also hold on the patients the rule can type
    agreement_margin: float = 0.05
    # "report": the difference from the two-marker reference is shown; "require": the model
    # must also beat it (paired CI above 0), i.e. the markers beyond the rule's must add.
    two_marker: str = "report"
    outcomes: tuple[str, ...] = ()
    treatment: str | None = None
    propensity: str | None = None
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    bootstrap: int = 1000
    noise_repeats: int = 20
    benchmark_seed: int = 0
    supervision: str = SUPERVISED
    # label-free modes: a column to judge against, never fitted (a simulated cohort's truth)
    reference: str | None = None
    latent_classes: tuple[int, int] = K_RANGE  # the BIC sweep's range (3 is always fitted)
    latent_covariance: str = "tied"
    latent_restarts: int = 3
    stability_refits: int = 10
    description: str = ""
    source: str = ""


def _unknown(where: str, keys: set[str], allowed: set[str]) -> None:
    for key in sorted(keys - allowed):
        hint = did_you_mean(key, sorted(allowed))
        raise ExperimentError(f"{where}: unknown key '{key}'.{hint} "
                              f"Allowed: {', '.join(sorted(allowed))}.")


def _typed(where: str, key: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ExperimentError(f"{where}: '{key}' must be {names}, not {value!r}.")
    return value


def load_spec(path: str | Path) -> ExperimentSpec:
    """Read and validate an experiment TOML file; errors name the file and the key."""
    path = Path(path)
    try:
        document = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ExperimentError(f"Experiment file {path} does not exist.") from None
    except tomllib.TOMLDecodeError as error:
        raise ExperimentError(f"Experiment file {path} is not valid TOML: {error}.") from None
    where = f"Experiment file {path}"
    _unknown(where, set(document), _TOP_KEYS)
    for required in ("name", "registered_model"):
        if required not in document:
            raise ExperimentError(f"{where}: missing '{required}'.")
    sections = {}
    for section, allowed in _SECTION_KEYS.items():
        table = _typed(where, section, document.get(section, {}), dict)
        _unknown(f"{where} [{section}]", set(table), allowed)
        sections[section] = table
    cohort, features, split = sections["cohort"], sections["features"], sections["split"]
    selection, bench = sections["selection"], sections["benchmark"]
    grids = _typed(where, "candidates", document.get("candidates", DEFAULT_GRIDS), dict)
    markers = features.get("markers", "all")
    spec = ExperimentSpec(
        name=_typed(where, "name", document["name"], str),
        registered_model=_typed(where, "registered_model", document["registered_model"], str),
        label=(None if "label" not in document
               else _typed(where, "label", document["label"], str)),
        description=_typed(where, "description", document.get("description", ""), str),
        cohort_path=cohort.get("path"),
        mapping=cohort.get("mapping"),
        preset=cohort.get("preset"),
        n=_typed(where, "cohort.n", cohort.get("n", 20_000), int),
        cohort_seed=_typed(where, "cohort.seed", cohort.get("seed", 0), int),
        markers=None if markers == "all" else tuple(_typed(where, "features.markers", markers,
                                                           list)),
        exclude=tuple(_typed(where, "features.exclude", features.get("exclude", []), list)),
        extra=tuple(_typed(where, "features.extra", features.get("extra", []), list)),
        split_by=_typed(where, "split.by", split.get("by", "patient"), str),
        test_size=_typed(where, "split.test_size", split.get("test_size", 0.25), float),
        split_seed=_typed(where, "split.seed", split.get("seed", 0), int),
        cv_folds=_typed(where, "split.cv_folds", split.get("cv_folds", 3), int),
        candidates={kind: _typed(where, f"candidates.{kind}", grid, dict)
                    for kind, grid in grids.items()},
        selection_metric=_typed(where, "selection.metric", selection.get("metric", "log_loss"),
                                str),
        rule_metric=_typed(where, "selection.rule_metric",
                           selection.get("rule_metric", "balanced_accuracy"), str),
        champion_tolerance=_typed(where, "selection.champion_tolerance",
                                  selection.get("champion_tolerance", 0.01), (float, int)),
        gate=_typed(where, "selection.gate", selection.get("gate", SUPERIORITY), str),
        determinate=_typed(where, "selection.determinate", selection.get("determinate", True),
                           bool),
        agreement_margin=_typed(where, "selection.agreement_margin",
                                selection.get("agreement_margin", 0.05), (float, int)),
        two_marker=_typed(where, "selection.two_marker", selection.get("two_marker", "report"),
                          str),
        **_outcome_fields(where, sections["outcome"]),
        bootstrap=_typed(where, "benchmark.bootstrap", bench.get("bootstrap", 1000), int),
        noise_repeats=_typed(where, "benchmark.noise_repeats", bench.get("noise_repeats", 20),
                             int),
        benchmark_seed=_typed(where, "benchmark.seed", bench.get("seed", 0), int),
        **_supervision_fields(where, sections["supervision"]),
        source=str(path),
    )
    check_spec(spec, where)
    return spec


def _supervision_fields(where: str, table: dict[str, Any]) -> dict[str, Any]:
    """The `[supervision]` table (none: supervised by the label column)."""
    if not table:
        return {}
    if "mode" not in table:
        raise ExperimentError(f"{where} [supervision]: name the mode, one of "
                              f"{', '.join(SUPERVISION_MODES)}.")
    classes = _typed(where, "supervision.classes", table.get("classes", list(K_RANGE)), list)
    if len(classes) != 2 or not all(isinstance(k, int) for k in classes):
        raise ExperimentError(f"{where} [supervision]: classes is the range of class counts "
                              f"BIC compares, two whole numbers such as {list(K_RANGE)}.")
    reference = table.get("reference")
    return {
        "supervision": _typed(where, "supervision.mode", table["mode"], str),
        "reference": None if reference is None else _typed(where, "supervision.reference",
                                                           reference, str),
        "latent_classes": (classes[0], classes[1]),
        "latent_covariance": _typed(where, "supervision.covariance",
                                    table.get("covariance", "tied"), str),
        "latent_restarts": _typed(where, "supervision.restarts", table.get("restarts", 3), int),
        "stability_refits": _typed(where, "supervision.stability_refits",
                                   table.get("stability_refits", 10), int),
    }


def _outcome_fields(where: str, table: dict[str, Any]) -> dict[str, Any]:
    """The `[outcome]` table: outcome (a column or a list), treatment, propensity and
    higher_is_better (true/false for every outcome, or a table by outcome)."""
    if not table:
        return {}
    outcome = table.get("outcome")
    if outcome is None:
        raise ExperimentError(f"{where} [outcome]: name the outcome column(s), e.g. outcome = "
                              '["sofa_response", "death_28d"].')
    outcomes = tuple(_typed(where, "outcome.outcome", [outcome] if isinstance(outcome, str)
                            else outcome, list))
    direction = table.get("higher_is_better", {})
    if isinstance(direction, bool):  # for the outcomes whose direction phenotyper cannot know
        direction = {name: direction for name in outcomes if name not in HIGHER_IS_BETTER}
    direction = _typed(where, "outcome.higher_is_better", direction, dict)
    treatment = table.get("treatment")
    propensity = table.get("propensity")
    if propensity is not None and treatment is None:
        raise ExperimentError(f"{where} [outcome]: 'propensity' needs 'treatment' (the arm whose "
                              "probability it is).")
    try:
        OutcomeSpec(outcomes, treatment, propensity, direction)
    except OutcomeError as error:
        raise ExperimentError(f"{where} [outcome]: {error}") from None
    return {
        "outcomes": outcomes,
        "treatment": None if treatment is None else _typed(where, "outcome.treatment",
                                                           treatment, str),
        "propensity": None if propensity is None else _typed(where, "outcome.propensity",
                                                             propensity, str),
        "higher_is_better": {str(k): _typed(where, f"outcome.higher_is_better.{k}", v, bool)
                             for k, v in direction.items()},
    }


def outcome_spec(spec: ExperimentSpec) -> OutcomeSpec | None:
    """What the benchmark judges outcomes by, or None without an [outcome] table."""
    if not spec.outcomes:
        return None
    return OutcomeSpec(spec.outcomes, spec.treatment, spec.propensity, spec.higher_is_better)


def default_spec(cohort_path: str | Path, label: str | None, name: str,
                 mapping: str | Path | None = None,
                 supervision: str = SUPERVISED) -> ExperimentSpec:
    """The defaults run by `phenotyper train --cohort --label --name [--supervision]`."""
    spec = ExperimentSpec(name=f"{name}-defaults", registered_model=name, label=label,
                          cohort_path=str(cohort_path),
                          mapping=None if mapping is None else str(mapping),
                          supervision=supervision, source=f"defaults for {cohort_path}")
    check_spec(spec, "train")
    return spec


def check_spec(spec: ExperimentSpec, where: str) -> None:
    """Cross-field checks that need no data."""
    if (spec.cohort_path is None) == (spec.preset is None):
        raise ExperimentError(f"{where} [cohort]: give either 'path' or 'preset', not "
                              f"{'both' if spec.cohort_path else 'neither'}.")

    def choose(key: str, value: str, options: tuple[str, ...] | list[str]) -> None:
        if value not in options:
            hint = did_you_mean(value, list(options))
            raise ExperimentError(f"{where}: {key} '{value}' is not known.{hint} "
                                  f"Choose from {', '.join(options)}.")

    choose("supervision.mode", spec.supervision, (SUPERVISED, *SUPERVISION_MODES))
    if spec.supervision in (SUPERVISED, PARTIAL) and spec.label is None:
        raise ExperimentError(
            f"{where}: {'a supervised' if spec.supervision == SUPERVISED else 'a partial'} "
            "training needs 'label' (the column of reference phenotypes); to learn without "
            f"labels add [supervision] mode = \"{NONE}\" (or --supervision {NONE}).")
    if spec.supervision in LABEL_FREE and spec.label is not None:
        raise ExperimentError(
            f"{where}: [supervision] mode '{spec.supervision}' learns without labels, but "
            f"'label' names the column '{spec.label}': remove it, name it as "
            "[supervision] reference to judge against it, or use mode \"partial\".")
    if spec.supervision != SUPERVISED:
        choose("supervision.covariance", spec.latent_covariance, COVARIANCES)
        low, high = spec.latent_classes
        if not 2 <= low <= 3 <= high:
            raise ExperimentError(f"{where}: supervision.classes {list(spec.latent_classes)} "
                                  "must run from 2 or 3 to 3 or more (three classes are "
                                  "always fitted and named).")
        if spec.latent_restarts < 1 or spec.stability_refits < 0:
            raise ExperimentError(f"{where}: supervision.restarts must be at least 1 and "
                                  "supervision.stability_refits at least 0.")
    choose("split.by", spec.split_by, SPLITS)
    choose("selection.metric", spec.selection_metric, tuple(SELECTION_METRICS))
    choose("selection.rule_metric", spec.rule_metric, RULE_METRICS)
    choose("selection.gate", spec.gate, GATES)
    choose("selection.two_marker", spec.two_marker, ("report", "require"))
    if not 0 <= spec.agreement_margin < 1:
        raise ExperimentError(f"{where}: selection.agreement_margin must be at least 0 and "
                              "below 1 (a difference in Cohen's kappa).")
    if spec.gate == AGREEMENT and spec.noise_repeats < 1:
        raise ExperimentError(f"{where}: the agreement gate compares with the rule's own kappa "
                              "under re-measurement: set benchmark.noise_repeats to at least 1.")
    for kind in spec.candidates:
        choose("candidate", kind, CANDIDATES)
    for marker in (*(spec.markers or ()), *spec.exclude):
        choose("feature marker", marker, tuple(PANEL))
    if not spec.candidates:
        raise ExperimentError(f"{where}: [candidates] lists no candidate.")
    if not 0 < spec.test_size < 1:
        raise ExperimentError(f"{where}: split.test_size must be between 0 and 1.")
    if spec.cv_folds < 2:
        raise ExperimentError(f"{where}: split.cv_folds must be at least 2.")
    for kind, grid in spec.candidates.items():
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ExperimentError(f"{where}: candidates.{kind}.{key} must be a non-empty "
                                      f"list of values to try, e.g. [{values!r}].")
