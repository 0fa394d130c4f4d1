"""Figures and written reports: what a person (or a later program) reads after a benchmark.

`write_benchmark` turns an `evaluate.Benchmark` into `benchmark.json` (every number, for
machines), `benchmark.md` (the side-by-side tables a person reads) and PNG figures. Everything
is rendered in memory first and each file then replaces its predecessor atomically, so a failure
part-way leaves the previous report as it was, never half a file.

Figures use matplotlib's object-oriented `Figure` (no pyplot): it renders with Agg whatever the
session's backend, keeps no global figure registry (nothing to close), and importing this module
does not change the backend of a notebook that imports it.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay

import phenotyper
from phenotyper import markdown
from phenotyper.cohort import IMPLAUSIBLE, NEGATIVE, UNKNOWN_CATEGORY, UNPARSEABLE
from phenotyper.contract import SYNTHETIC_BANNER
from phenotyper.evaluate import (
    ANAKINRA,
    INTERFERON_GAMMA,
    MAX_UNDEFINED_SHARE,
    MIN_RESAMPLING_GROUPS,
    RULE_DETERMINATE,
    TREATED_PHENOTYPE,
    Benchmark,
)
from phenotyper.files import write_bytes_atomic
from phenotyper.outcome_report import (
    FOREST_FILE,
    PSEUDO_PHENOTYPERS,
    forest_figure,
    outcome_markdown,
    policy_table,
)
from phenotyper.packaged import OK
from phenotyper.score import MODEL_REJECTED, NOT_SCORED, ScoreSummary

if TYPE_CHECKING:
    from phenotyper.experiment import GateDecision, TrainingResult
from phenotyper.rules import (
    FERRITIN_MALS_NG_ML,
    HLA_DR_IMMUNOPARALYSIS_MAB_PER_CELL,
    INDETERMINATE,
    PHENOTYPES,
    reference_rules,
)

JSON_FILE, MARKDOWN_FILE = "benchmark.json", "benchmark.md"
CONFUSION_FILE, RELIABILITY_FILE = "confusion_matrices.png", "reliability.png"
DECISION_FILE, FLIP_FILE = "decision_curves.png", "flip_rates.png"
DPI = 110
RECORD_COLUMNS = ("phenotyper", "metric", "subgroup", "value", "ci_low", "ci_high")
SYNTHETIC_NOTE = ("If the cohort is synthetic (e.g. from `phenotyper simulate`), these numbers "
                  "check the software; they are not clinical evidence.")
# When the benchmark says its cohort is synthetic: SYNTHETIC_BANNER is the first line of
# benchmark.md, and this ends every figure's title.
SYNTHETIC_TITLE = " (synthetic data)"

# Headline rows, in reading order, with the words a clinician reads them by.
# Label-based treatment errors: headline rows only when no outcome says who benefits (with
# outcomes, the policy value is the headline for treatment; these stay in the Treatment section).
LABEL_TREATMENT_ROWS = ("harm_interferon_gamma_to_MALS", "harm_anakinra_to_immunoparalysis",
                        "missed_immunotherapy")
HEADLINE: dict[str, str] = {
    "coverage": "coverage (not indeterminate)",
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy (mean sensitivity)",
    "macro_f1": "macro F1",
    "auroc_macro": "AUROC, macro one-vs-rest",
    "treatment_agreement": "treatment as the reference phenotype needs",
    "harm_interferon_gamma_to_MALS": "harm: interferon-gamma to a MALS patient",
    "harm_anakinra_to_immunoparalysis": "harm: anakinra to an immunoparalysed patient",
    "missed_immunotherapy": "missed immunotherapy",
    "flip_rate_between_labs": "flip rate, re-measured in another lab",
    "accuracy_remeasured_between_labs": "accuracy, re-measured in another lab",
    "log_loss": "log loss (lower is better)",
    "brier": "Brier score (lower is better)",
}
PER_PHENOTYPE: dict[str, str] = {
    "sensitivity": "sensitivity",
    "specificity": "specificity",
    "ppv": "PPV",
    "npv": "NPV",
    "auroc": "AUROC (one-vs-rest)",
    "average_precision": "average precision",
}
# Metrics that are shares of patients: shown as % (differences in percentage points).
SHARE_PREFIXES = ("coverage", "accuracy", "treatment_agreement", "harm_", "missed_", "unneeded_",
                  "flip_rate_", "sensitivity_", "specificity_", "ppv_", "npv_")
SCENARIO_TEXT = {
    "within_lab": "the same sample run again in the same laboratory",
    "between_labs": "the same patient measured in another laboratory, on another platform",
}
SUBGROUP_TITLES = {"site": "site", "age": "age band (years)", "sex": "sex"}
NET_BENEFIT = re.compile(r"^net_benefit_(?P<treatment>.+)_at_(?P<threshold>[0-9.]+)$")

_Numbers = dict[tuple[str, str, str], tuple[float, float, float]]
_MISSING = (math.nan, math.nan, math.nan)


def write_benchmark(benchmark: Benchmark, output_dir: Path, source: str) -> list[Path]:
    """Write benchmark.json, benchmark.md and the figures into `output_dir`; return the paths.

    `source` names the cohort (file or description) in both reports. In the JSON, `confusion`
    is {phenotyper: {reference phenotype: {predicted label: patients}}} and `treatment`
    {phenotyper: {treatment needed: {treatment given: patients}}}; NaN is written as null.
    A figure that does not apply (no probabilistic phenotyper, no re-measurement) is not drawn,
    and a stale copy from an earlier report in the same folder is removed. When
    `benchmark.meta["synthetic"]` is true, benchmark.md opens with a banner saying so and every
    figure's title ends with "(synthetic data)".
    """
    output_dir = Path(output_dir)
    names = _phenotypers(benchmark)
    numbers = _numbers(benchmark)
    suffix = SYNTHETIC_TITLE if _synthetic(benchmark) else ""
    labelled = benchmark.meta.get("label") is not None
    figures = {
        CONFUSION_FILE: _confusion_figure(benchmark, names, suffix) if labelled else None,
        RELIABILITY_FILE: _reliability_figure(benchmark, names, suffix),
        DECISION_FILE: _decision_figure(benchmark, names, suffix) if labelled else None,
        FLIP_FILE: _flip_figure(benchmark, names, numbers, suffix),
        FOREST_FILE: forest_figure(benchmark.meta, _forest_names(benchmark, names), numbers,
                                   suffix),
    }
    drawn = {name: _png(figure) for name, figure in figures.items() if figure is not None}
    contents = {
        JSON_FILE: _json(benchmark, source).encode(),
        MARKDOWN_FILE: _markdown(benchmark, source, names, numbers, drawn).encode(),
        **drawn,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, data in contents.items():
        write_bytes_atomic(output_dir / name, data)
    for name in figures.keys() - drawn.keys():
        (output_dir / name).unlink(missing_ok=True)
    return [output_dir / name for name in contents]


# --- shared helpers ---------------------------------------------------------------------------


def _synthetic(benchmark: Benchmark) -> bool:
    """Whether the benchmark says its cohort is synthetic (older benchmarks do not say)."""
    return bool(benchmark.meta.get("synthetic", False))


def _phenotypers(benchmark: Benchmark) -> list[str]:
    """Phenotyper names, reference first, the others in the order they were benchmarked."""
    reference = benchmark.meta["reference"]
    names = dict.fromkeys(benchmark.records["phenotyper"])
    return [reference, *(name for name in names
                         if name != reference and name not in PSEUDO_PHENOTYPERS)]


def _forest_names(benchmark: Benchmark, names: list[str]) -> list[str]:
    """The reference rule and the learned phenotypers: the rule variants would crowd the plot
    (their effects are in benchmark.md)."""
    rules = set(reference_rules())
    return [name for name in names if name == benchmark.meta["reference"] or name not in rules]


def _numbers(benchmark: Benchmark) -> _Numbers:
    """(phenotyper, metric, subgroup) -> (value, ci_low, ci_high), for cheap look-ups."""
    rows = benchmark.records[list(RECORD_COLUMNS)].itertuples(index=False)
    return {(p, m, s): (float(v), float(lo), float(hi)) for p, m, s, v, lo, hi in rows}


def _probabilistic(names: Iterable[str], numbers: _Numbers) -> list[str]:
    """Phenotypers whose probabilities were judged (rules have no log loss)."""
    return [name for name in names if (name, "log_loss", "all") in numbers]


def _scenarios(benchmark: Benchmark, numbers: _Numbers) -> list[str]:
    """Re-measurement scenarios the benchmark ran (none when noise_repeats was 0)."""
    reference = benchmark.meta["reference"]
    return [scenario for scenario in benchmark.meta["assay_noise_cv"]
            if (reference, f"flip_rate_{scenario}", "all") in numbers]


def format_estimate(
    metric: str, value: float, low: float, high: float, difference: bool = False
) -> str:
    """A metric's estimate with its interval, as a share of patients (%) when it is one."""
    return markdown.estimate(value, low, high, difference,
                             percent=metric.startswith(SHARE_PREFIXES))


_table = markdown.table


# --- benchmark.json ---------------------------------------------------------------------------


def _json(benchmark: Benchmark, source: str) -> str:
    document = {
        "meta": {**benchmark.meta, "synthetic": _synthetic(benchmark), "source": source,
                 "phenotyper_version": phenotyper.__version__},
        "records": benchmark.records[list(RECORD_COLUMNS)].to_dict(orient="records"),
        "confusion": {name: frame.to_dict(orient="index")
                      for name, frame in benchmark.confusion.items()},
        "treatment": {name: frame.to_dict(orient="index")
                      for name, frame in benchmark.treatment.items()},
    }
    return json.dumps(_plain(document), indent=1, allow_nan=False) + "\n"


def _plain(value: Any) -> Any:
    """What JSON can hold: str keys, lists, Python scalars; NaN and infinities become None."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# --- benchmark.md -----------------------------------------------------------------------------


def _markdown(benchmark: Benchmark, source: str, names: list[str], numbers: _Numbers,
              drawn: Iterable[str]) -> str:
    sections = [_header(benchmark, source), outcome_markdown(benchmark.meta, names, numbers)]
    if benchmark.meta.get("label") is not None:
        sections += [
            _headline(benchmark, names, numbers),
            _differences(benchmark, names, numbers),
            _determinate(benchmark, names, numbers),
            _per_phenotype(names, numbers),
            _treatment(benchmark, names),
            _net_benefit(benchmark, names, numbers),
            _robustness(benchmark, names, numbers),
            _calibration(names, numbers),
            _subgroups(benchmark, names, numbers),
        ]
    sections.append(_figures(set(drawn), benchmark.meta))
    return "\n".join(line for section in sections for line in section)


def _header(benchmark: Benchmark, source: str) -> list[str]:
    meta = benchmark.meta
    lines = [f"**{SYNTHETIC_BANNER}**", ""] if _synthetic(benchmark) else []
    lines += ["# Phenotyper benchmark", ""]
    if meta.get("warning"):
        lines += [f"> **Warning.** {meta['warning']}", ""]
    if meta.get("label_warning"):
        lines += [f"> **The label is the rule.** {meta['label_warning']}", ""]
    if meta.get("label") is None:
        judged = (f"Cohort: `{source}`, {meta['n_patients']:,} patients, judged by outcomes "
                  "alone (no reference label).")
    else:
        summary = meta.get("labels", {}).get("summary", "")
        judged = (f"Cohort: `{source}`. Reference standard: the `{meta['label']}` column; "
                  f"{meta['n_patients'] - meta['n_left_out']:,} of {meta['n_patients']:,} "
                  f"patients have a reference label, {meta['n_left_out']:,} are left out of the "
                  f"label metrics (still in the outcome metrics). Reading the labels: "
                  f"{summary}")
    lines += [
        f"{judged} Every phenotyper is judged on the same patients, and differences are "
        f"taken from `{meta['reference']}`. Intervals are {meta['confidence']:.0%} percentile "
        f"intervals from {meta['n_boot']:,} bootstrap resamples by patient (all of a patient's "
        f"rows move together, a row without a patient id counts as a patient of its own; a "
        f"difference uses the same resamples for both phenotypers). An interval is n/a when "
        f"fewer than {MIN_RESAMPLING_GROUPS} patients can be resampled (in the cohort or the "
        f"subgroup), or when the metric is undefined in more than {MAX_UNDEFINED_SHARE:.0%} of "
        f"the resamples (e.g. a phenotype with very few patients). "
        f"Seed {meta['seed']}; phenotyper {phenotyper.__version__}.",
        "",
    ]
    if not _synthetic(benchmark):
        lines += [f"> **Note.** {SYNTHETIC_NOTE}", ""]
    return lines


def headline_metrics(meta: dict[str, Any]) -> dict[str, str]:
    """The headline rows for a benchmark: label-based treatment errors give way to the policy
    value when the benchmark judged treatment by outcomes."""
    by_outcome = bool(meta.get("outcome", {}).get("method"))
    return {metric: label for metric, label in HEADLINE.items()
            if not (by_outcome and metric in LABEL_TREATMENT_ROWS)}


def _headline(benchmark: Benchmark, names: list[str], numbers: _Numbers) -> list[str]:
    rows = [[label, *(format_estimate(metric, *numbers.get((name, metric, "all"), _MISSING))
                      for name in names)]
            for metric, label in headline_metrics(benchmark.meta).items()]
    return [
        "## Headline",
        "",
        "Percentages are shares of patients. An `indeterminate` answer (a needed marker is "
        "missing) is never right: it counts as wrong in accuracy, balanced accuracy and macro "
        "F1. It is no false positive either: see the per-phenotype section for specificity and "
        "NPV, and the treatment section for what it means for treatment. Balanced accuracy, "
        "macro F1 and macro AUROC average over the phenotypes present in the reference labels "
        "(the same phenotypes for every phenotyper).",
        "",
        *_table(["metric", *names], rows),
        "n/a: not computed. Probability metrics (log loss, Brier score, calibration) are not "
        "computed for fixed rules, whose one-hot output is not a probability.",
        "",
    ]


def _differences(benchmark: Benchmark, names: list[str], numbers: _Numbers) -> list[str]:
    reference = benchmark.meta["reference"]
    others = names[1:]
    lines = [f"## Differences from `{reference}`", ""]
    if not others:
        return [*lines, f"Only `{reference}` was benchmarked.", ""]
    rows = [[label, *(format_estimate(metric, *numbers.get(
                (name, f"{metric}_minus_{reference}", "all"), _MISSING), difference=True)
                      for name in others)]
            for metric, label in HEADLINE.items()]
    return [
        *lines,
        f"Phenotyper minus `{reference}` on the same bootstrap resamples; pp = percentage "
        f"points. `*` marks a difference whose interval excludes 0. Higher is better except "
        f"for harm, missed immunotherapy, flip rate, log loss and Brier score. n/a: the metric "
        f"is not computed for one of the two.",
        "",
        *_table(["metric", *others], rows),
    ]


DETERMINATE_METRICS = {"n": "patients", "accuracy": "accuracy",
                       "balanced_accuracy": "balanced accuracy", "macro_f1": "macro F1",
                       "coverage": "coverage (not indeterminate)"}


def _determinate(benchmark: Benchmark, names: list[str], numbers: _Numbers) -> list[str]:
    """Headline metrics on the patients the reference rule can type, and the differences."""
    reference = benchmark.meta["reference"]
    if (reference, "n", RULE_DETERMINATE) not in numbers:
        return []
    rows = []
    for metric, label in DETERMINATE_METRICS.items():
        cells = []
        for name in names:
            value = numbers.get((name, metric, RULE_DETERMINATE), _MISSING)
            if metric == "n":
                cells.append(f"{value[0]:,.0f}")
                continue
            cell = format_estimate(metric, *value)
            if name != reference:
                cell += "; " + format_estimate(metric, *numbers.get(
                    (name, f"{metric}_minus_{reference}", RULE_DETERMINATE), _MISSING),
                    difference=True)
            cells.append(cell)
        rows.append([label, *cells])
    return [
        f"## On the patients `{reference}` can type", "",
        f"The headline again on the patients for whom `{reference}` is not indeterminate: "
        "part of any phenotyper's lead over the rule is answering where the rule abstains, "
        "which this table removes. Each cell: the value, then the paired difference from "
        f"`{reference}` on the same resamples.", "",
        *_table(["metric", *names], rows),
    ]


def _per_phenotype(names: list[str], numbers: _Numbers) -> list[str]:
    lines = ["## Per phenotype", "",
             "One phenotype against the rest. Sensitivity: share of the phenotype's patients "
             "called it; PPV: share of the calls that are right. Specificity and NPV read "
             "\"negative\" as \"not called this phenotype\": an `indeterminate` answer is "
             "not a false positive, so it counts as a true negative for each phenotype the "
             "patient does not have (specificity), while for the phenotype the patient has it "
             "is a miss (lower sensitivity and NPV). n/a: undefined (e.g. the PPV of a "
             "phenotype the phenotyper never calls).", ""]
    for phenotype in PHENOTYPES:
        rows = [[label, *(format_estimate(f"{stem}_{phenotype}",
                                *numbers.get((name, f"{stem}_{phenotype}", "all"), _MISSING))
                          for name in names)]
                for stem, label in PER_PHENOTYPE.items()]
        lines += [f"### {phenotype}", "", *_table(["metric", *names], rows)]
    return lines


def _treatment(benchmark: Benchmark, names: list[str]) -> list[str]:
    lines = ["## Treatment", "",
             "What each phenotyper's answer would give (MALS: anakinra; immunoparalysis: "
             "interferon-gamma; unclassified or indeterminate: placebo, no immunotherapy) "
             "against what the "
             "reference phenotype needs. Patients; rows = needed, columns = given. An "
             "`indeterminate` answer gives no immunotherapy, as in ImmunoSep, which did not "
             "randomise patients it could not type: for an unclassified patient that counts "
             "as treatment agreement (no immunotherapy is what the patient needs), for a MALS "
             "or immunoparalysed patient as missed immunotherapy.", ""]
    for name in names:
        table = benchmark.treatment[name]
        rows = [[needed, *(int(count) for count in counts)] for needed, counts in
                zip(table.index, table.to_numpy(), strict=True)]
        stimulated = int(table.loc[ANAKINRA, INTERFERON_GAMMA])
        suppressed = int(table.loc[INTERFERON_GAMMA, ANAKINRA])
        lines += [
            f"### {name}", "",
            *_table(["needed \\ given", *table.columns], rows),
            f"Harmful cells: **{stimulated}** MALS patients would get interferon-gamma, an "
            f"immunostimulant to a hyperinflamed patient (row `{ANAKINRA}`, column "
            f"`{INTERFERON_GAMMA}`); **{suppressed}** immunoparalysed patients would get "
            f"anakinra, an immunosuppressant to an immunoparalysed patient (row "
            f"`{INTERFERON_GAMMA}`, column `{ANAKINRA}`).",
            "",
        ]
    return lines


def _net_benefit(benchmark: Benchmark, names: list[str], numbers: _Numbers) -> list[str]:
    reference = benchmark.meta["reference"]
    points = [NET_BENEFIT.match(metric) for name, metric, subgroup in numbers
              if name == reference and subgroup == "all"]
    rows = [[point["treatment"], point["threshold"],
             *(format_estimate(point.string, *numbers.get((name, point.string, "all"), _MISSING))
               for name in names)]
            for point in points if point]
    return [
        "## Net benefit", "",
        "Net benefit at threshold t = (true positives - false positives x t/(1-t)) / patients, "
        "in true positives per patient: treating patients who have the phenotype, less those "
        "treated without it at the exchange rate t implies. A model treats when P(phenotype) "
        ">= t; a rule treats whom it labels, whatever t. Higher is better; "
        f"`{DECISION_FILE}` shows every threshold beside treat-all and treat-none.",
        "",
        *_table(["treatment", "threshold t", *names], rows),
    ]


def _robustness(benchmark: Benchmark, names: list[str], numbers: _Numbers) -> list[str]:
    meta = benchmark.meta
    lines = ["## Robustness to assay noise", ""]
    scenarios = _scenarios(benchmark, numbers)
    if not scenarios:
        return [*lines, f"Not measured: the benchmark ran with noise_repeats = "
                        f"{meta['noise_repeats']}.", ""]
    near = meta["near_cutoff_relative"]
    lines += [
        f"Each patient's markers are measured again {meta['noise_repeats']} times per scenario "
        "(log-normal noise with the coefficient of variation, CV, below) and phenotyped again. "
        "Flip rate: share of re-measurements whose phenotype differs from the one on the "
        "original markers. Accuracy re-measured: share of re-measurements phenotyped right. "
        f"Near the cut-off: ferritin within {near:.0%} of {FERRITIN_MALS_NG_ML:g} ng/mL or "
        f"HLA-DR within {near:.0%} of {HLA_DR_IMMUNOPARALYSIS_MAB_PER_CELL:g} antibodies/cell "
        "(the ImmunoSep thresholds), where a fixed rule is most fragile.",
        "",
    ]
    for scenario in scenarios:
        cvs = ", ".join(f"`{marker}` {cv:.1%}" if marker != "other" else f"other markers {cv:.1%}"
                        for marker, cv in meta["assay_noise_cv"][scenario].items())
        lines.append(f"- `{scenario}` ({SCENARIO_TEXT.get(scenario, scenario)}): CV {cvs}.")
    rows = []
    for scenario in scenarios:
        for metric, label in ((f"flip_rate_{scenario}", "flip rate, all patients"),
                              (f"flip_rate_near_cutoff_{scenario}", "flip rate, near a cut-off"),
                              (f"accuracy_remeasured_{scenario}", "accuracy re-measured")):
            rows.append([scenario, label, *(
                format_estimate(metric, *numbers.get((name, metric, "all"), _MISSING))
                for name in names)])
    return [*lines, "", *_table(["scenario", "measure", *names], rows, labels=2)]


def _calibration(names: list[str], numbers: _Numbers) -> list[str]:
    lines = ["## Calibration", ""]
    probabilistic = _probabilistic(names, numbers)
    if not probabilistic:
        return [*lines, "No probabilistic phenotyper was benchmarked: fixed rules give no "
                        "probabilities to calibrate.", ""]
    rows = [[name, phenotype,
             *(format_estimate(metric, *numbers.get((name, metric, "all"), _MISSING))
               for metric in (f"calibration_intercept_{phenotype}",
                              f"calibration_slope_{phenotype}"))]
            for name in probabilistic for phenotype in PHENOTYPES]
    return [
        *lines,
        "Logistic recalibration of each phenotype's one-vs-rest probability. Intercept (slope "
        "fixed at 1): ideal 0; above 0, the predicted probabilities are too low on average. "
        "Slope: ideal 1; below 1, the probabilities are too extreme (over-confident). Rules "
        "have no probabilities and are not listed.",
        "",
        *_table(["phenotyper", "phenotype", "intercept", "slope"], rows, labels=2),
    ]


def _subgroups(benchmark: Benchmark, names: list[str], numbers: _Numbers) -> list[str]:
    reference = benchmark.meta["reference"]
    groups: dict[str, list[str]] = {}
    for subgroup in dict.fromkeys(benchmark.records["subgroup"]):
        if subgroup != "all" and (reference, "n", subgroup) in numbers:
            groups.setdefault(subgroup.partition("=")[0], []).append(subgroup)
    lines = ["## Subgroups", "",
             "Accuracy (share of patients phenotyped right, indeterminate counted as wrong) in "
             "each subgroup; n = patients in the subgroup. Small subgroups have wide intervals, "
             f"and below {MIN_RESAMPLING_GROUPS} patients none (n/a).",
             ""]
    for kind, subgroups in groups.items():
        rows = [[subgroup.partition("=")[2],
                 f"{numbers.get((reference, 'n', subgroup), _MISSING)[0]:,.0f}",
                 *(format_estimate("accuracy", *numbers.get((name, "accuracy", subgroup), _MISSING))
                   for name in names)]
                for subgroup in subgroups]
        title = SUBGROUP_TITLES.get(kind, kind)
        lines += [f"### By {title}", "", *_table([title, "n", *names], rows)]
    return lines


def _figures(drawn: set[str], meta: dict[str, Any]) -> list[str]:
    described = {
        CONFUSION_FILE: "reference phenotype x predicted label for each phenotyper "
                        "(patients and row %)",
        RELIABILITY_FILE: "predicted probability against observed share, per phenotype",
        DECISION_FILE: "net benefit against threshold, per treatment",
        FLIP_FILE: "flip rate under re-measurement, per phenotyper and scenario",
        FOREST_FILE: "each drug's risk difference against placebo within each predicted "
                     "phenotype (forest plot)",
    }
    if meta.get("label") is None:
        described = {FOREST_FILE: described[FOREST_FILE]}
    elif not meta.get("outcome"):
        del described[FOREST_FILE]
    not_drawn = {
        FOREST_FILE: "no treatment column was given",
        RELIABILITY_FILE: "no probabilistic phenotyper was benchmarked (fixed rules give no "
                          "probabilities)",
        FLIP_FILE: "the benchmark ran without re-measurement (noise_repeats = 0)",
    }
    lines = ["## Figures", ""]
    for name, text in described.items():
        if name in drawn:
            lines.append(f"- [`{name}`]({name}): {text}.")
        else:
            lines.append(f"- `{name}`: not drawn: {not_drawn[name]}.")
    return [*lines, ""]


# --- figures ----------------------------------------------------------------------------------


def _colours(names: list[str]) -> dict[str, str]:
    """One colour per phenotyper, the same in every figure."""
    return {name: f"C{i % 10}" for i, name in enumerate(names)}


def _grid(count: int, columns: int, width: float, height: float) -> tuple[Figure, np.ndarray]:
    """A figure with `count` panels, `columns` a row; unused panels hidden."""
    columns = min(count, columns)
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(width * columns, height * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    return figure, axes[:count]


def _confusion_figure(benchmark: Benchmark, names: list[str], suffix: str = "") -> Figure:
    """One confusion matrix per phenotyper, coloured by row share, annotated with counts."""
    figure, axes = _grid(len(names), 3, 4.6, 3.6)
    for ax, name in zip(axes, names, strict=True):
        counts = benchmark.confusion[name]
        # ConfusionMatrixDisplay needs a square matrix: pad an all-zero `indeterminate`
        # reference row (no reference phenotype is indeterminate), then crop it from view.
        square = counts.reindex(index=counts.columns, fill_value=0).to_numpy()
        totals = square.sum(axis=1, keepdims=True)
        shares = np.divide(square, totals, out=np.zeros(square.shape), where=totals > 0)
        display = ConfusionMatrixDisplay(shares, display_labels=list(counts.columns))
        display.plot(ax=ax, colorbar=False, xticks_rotation=30,
                     im_kw={"vmin": 0, "vmax": 1, "cmap": "Blues"})
        for (row, column), text in np.ndenumerate(display.text_):
            text.set_text(f"{square[row, column]:,}\n{shares[row, column]:.0%}")
            text.set_visible(row < len(counts))
        ax.set_ylim(len(counts) - 0.5, -0.5)
        ax.set(title=name, xlabel="predicted label", ylabel="reference phenotype")
    figure.colorbar(display.im_, ax=list(axes), label="share of the reference phenotype's patients",
                    shrink=0.8)
    figure.suptitle(f"Reference phenotype x predicted label (patients, row %){suffix}")
    return figure


def _reliability_figure(benchmark: Benchmark, names: list[str], suffix: str = ""
                        ) -> Figure | None:
    """Reliability curves, one panel per phenotype; None when no phenotyper gives probabilities."""
    curves = benchmark.reliability
    if curves.empty:
        return None
    colours = _colours(names)
    phenotypes = [p for p in PHENOTYPES if p in set(curves["phenotype"])]
    figure, axes = _grid(len(phenotypes), 3, 4.2, 4.4)
    for ax, phenotype in zip(axes, phenotypes, strict=True):
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
        for name, curve in curves[curves["phenotype"] == phenotype].groupby("phenotyper",
                                                                              sort=False):
            ax.plot(curve["predicted"], curve["observed"], marker="o", color=colours[name],
                    label=name)
        ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal", title=phenotype,
               xlabel=f"mean predicted P({phenotype})",
               ylabel=f"observed share with {phenotype}")
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper left", fontsize="small")
    figure.suptitle("Reliability: predicted probability vs observed share (quantile bins)"
                    + suffix)
    return figure


def _decision_figure(benchmark: Benchmark, names: list[str], suffix: str = "") -> Figure:
    """Decision curves, one panel per treatment, with treat-all and treat-none."""
    curves = benchmark.decision_curves
    # Rules often coincide (same people treated): earlier lines drawn wider show beneath.
    styles = {name: {"color": colour, "linewidth": 1.5 + 1.0 * (len(names) - 1 - i)}
              for i, (name, colour) in enumerate(_colours(names).items())}
    styles["treat all"] = {"color": "grey", "linestyle": "--"}
    styles["treat none"] = {"color": "black", "linestyle": ":"}
    treatments = list(dict.fromkeys(curves["treatment"]))
    figure, axes = _grid(len(treatments), 2, 5.6, 4.6)
    for ax, treatment in zip(axes, treatments, strict=True):
        panel = curves[curves["treatment"] == treatment]
        for name, curve in panel.groupby("phenotyper", sort=False):
            ax.plot(curve["threshold"], curve["net_benefit"], label=name, **styles[name])
        phenotype = TREATED_PHENOTYPE.get(treatment, treatment)
        ax.set_ylim(-0.05, panel["net_benefit"].max() + 0.05)
        ax.set(title=f"{treatment} (for {phenotype})",
               xlabel=f"threshold probability of {phenotype}",
               ylabel="net benefit (true positives per patient)")
        ax.grid(alpha=0.3)
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper",
                  fontsize="small")
    figure.suptitle(f"Decision curves: net benefit of treating on each phenotyper's answer"
                    f"{suffix}")
    return figure


def _flip_figure(benchmark: Benchmark, names: list[str], numbers: _Numbers, suffix: str = ""
                 ) -> Figure | None:
    """Flip rates per phenotyper and scenario, all patients and near a cut-off, with intervals."""
    scenarios = _scenarios(benchmark, numbers)
    if not scenarios:
        return None
    figure, axes = _grid(2, 2, max(5.0, 1.3 * len(names)), 4.6)
    x = np.arange(len(names))
    width = 0.8 / len(scenarios)
    for ax, (stem, title) in zip(axes, (("flip_rate_", "all patients"),
                                        ("flip_rate_near_cutoff_", "patients near a cut-off")),
                                 strict=True):
        for i, scenario in enumerate(scenarios):
            value, low, high = (100 * np.array(column) for column in zip(
                *(numbers.get((name, f"{stem}{scenario}", "all"), _MISSING) for name in names),
                strict=True))
            error = np.nan_to_num(np.clip([value - low, high - value], 0, None))  # n/a: none
            ax.bar(x + (i - (len(scenarios) - 1) / 2) * width, value, width, yerr=error,
                   capsize=3, label=scenario.replace("_", " "))
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set(title=title, ylabel="flip rate (% of re-measurements)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(title="re-measured", fontsize="small")
    figure.suptitle("Phenotype flips when the same patients are measured again "
                    f"({benchmark.meta['confidence']:.0%} CI){suffix}")
    return figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


# --- model card -------------------------------------------------------------------------------

CARD_METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc_macro", "coverage",
                "treatment_agreement", "harm_interferon_gamma_to_MALS",
                "harm_anakinra_to_immunoparalysis", "flip_rate_between_labs", "log_loss",
                "brier")


# What a simulated cohort's label columns mean (a user's own column is described by its name).
LABEL_DEFINITIONS = {
    "phenotype_true": "the simulator's latent phenotype: known only in simulation, assigned by "
                      "the simulated law, not by a clinician",
    "phenotype_rule": "the ImmunoSep rule applied to the measured markers: a model trained on "
                      "it learns the rule, it cannot beat it",
}


def calibration_supported(numbers: _Numbers, name: str) -> bool:
    """Whether every phenotype's test-set calibration interval contains the ideal (intercept
    0, slope 1): the only case in which the card calls the probabilities calibrated."""
    for phenotype in PHENOTYPES:
        _, low, high = numbers.get((name, f"calibration_intercept_{phenotype}", "all"), _MISSING)
        _, slope_low, slope_high = numbers.get((name, f"calibration_slope_{phenotype}", "all"),
                                               _MISSING)
        if not (low <= 0 <= high and slope_low <= 1 <= slope_high):
            return False
    return True


def model_card(result: TrainingResult, version: str, decision: GateDecision) -> str:
    """A Model Card (Mitchell et al. 2019) for one registered version, in Markdown."""
    spec, records = result.spec, result.benchmark.records
    selected, reference = result.selected, result.benchmark.meta["reference"]
    numbers = {(r.phenotyper, r.metric, r.subgroup): (r.value, r.ci_low, r.ci_high)
               for r in records.itertuples()}
    synthetic = bool(result.benchmark.meta.get("synthetic"))
    candidate = result.candidates[selected]
    calibrated = calibration_supported(numbers, selected)
    two_marker = "two_marker" if result.two_marker is not None else None
    labels = result.labels
    by_site = spec.split_by == "site"
    lines = [f"**{SYNTHETIC_BANNER}**", ""] if synthetic else []
    lines += [
        f"# Model card: {spec.registered_model}, version {version}",
        "",
        f"Experiment `{spec.name}` ({spec.source}). phenotyper {phenotyper.__version__}."
        + (f" {spec.description}" if spec.description else ""),
        "",
        f"**Promotion gate ({spec.gate}):** {decision.reason}.",
        "",
    ]
    if labels.get("warning"):
        lines += [f"> **The label is the rule.** {labels['warning']}", ""]
    lines += [
        "## Intended use",
        "",
        "Research use: estimate a septic adult's immune phenotype (MALS, immunoparalysis or "
        "unclassified, as defined for the ImmunoSep trial) from lab markers, with "
        + ("probabilities whose test-set calibration intervals all contain the ideal"
           if calibrated else "probabilities (not all of whose calibration intervals contain "
           "the ideal: read the calibration section before using them as risks)")
        + ", for retrospective cohort studies and for designing trial enrichment. It is meant "
        "to be compared with, not to replace, the fixed-threshold rules.",
        "",
        "## Out of scope",
        "",
        "- Treatment decisions for an individual patient: this is not a medical device and has "
        "not been validated prospectively.",
        "- Children, patients without sepsis, and populations unlike the training cohort.",
        "- Inputs outside the panel's units and plausible ranges (the reader flags them).",
        "",
        "## Data",
        "",
        ("**Synthetic.** Training and test patients were drawn from the simulator "
         f"({result.cohort_source}); the numbers below check the software and are not "
         "clinical evidence." if synthetic else
         f"The user's cohort `{result.cohort_source}`; the reference phenotype is the "
         f"`{spec.label}` column, and the model is only as good as that label."),
        "",
        f"- Reference label `{spec.label}`: "
        + LABEL_DEFINITIONS.get(spec.label, "as supplied in the cohort; phenotyper does not "
                                "know who assigned it, so say so in the experiment's "
                                "description") + ".",
    ]
    if labels.get("summary"):
        lines.append(f"- Reading the label: {labels['summary']}")
    counts = [(name, labels.get(key)) for name, key in (("training", "train_counts"),
                                                        ("test", "test_counts"))]
    lines.append(
        f"- Training patients: {len(result.train):,}; held-out test patients: "
        f"{len(result.test):,}, split by {spec.split_by}"
        + (" (whole sites held out: internal-external validation, sites of the same cohort "
           "the model did not see)" if by_site else "") + ". Patients per class: "
        + "; ".join(f"{name} " + ", ".join(f"{p} {n:,}" for p, n in count.items())
                    for name, count in counts if count) + ".")
    lines.append(f"- Features ({len(result.features)}): "
                 f"{', '.join(f'`{f}`' for f in result.features)}.")
    missing = [(f, float(result.train[f].isna().mean())) for f in result.features
               if f in result.train]
    lines.append("- Missing in the training set: " + ", ".join(
        f"`{f}` {share:.0%}" for f, share in missing if share > 0) + "; the others complete."
        if any(share > 0 for _, share in missing) else "- No feature is missing in the "
        "training set.")
    lines += [
        "",
        "## Model",
        "",
        f"`{selected}`, chosen by {spec.cv_folds}-fold grouped cross-validation on "
        f"{spec.selection_metric} inside the training set (CV {spec.selection_metric} "
        f"{candidate.cv_score:.4f}); parameters {candidate.best_params}. Out-of-fold "
        "calibration (intercept, slope) per phenotype: "
        + ", ".join(f"{p} ({i:+.2f}, {s:.2f})" for p, (i, s) in candidate.calibration.items())
        + ("; outside tolerance, so its logits were recalibrated on the same folds."
           if candidate.recalibrated else "; within tolerance, used as is."),
    ]
    if two_marker:
        lines += ["", f"Two-marker reference (`{two_marker}`): the same learner and settings "
                  "refitted on the rule's own markers only. What the model gains over it is "
                  "what the other markers add; what it gains over the rule beyond that is "
                  "better cut-offs and fewer abstentions on the rule's markers."]
    lines += [
        "",
        f"## Held-out performance against the `{reference}` rule",
        "",
        f"95% bootstrap intervals by patient ({result.benchmark.meta['n_boot']} resamples); "
        "differences use the same resamples for both. "
        + ("Whole sites held out: internal-external validation." if by_site else
           "Held-out patients of the same cohort: internal validation."),
        "",
    ]
    compared = [name for name in (selected, reference, two_marker) if name]
    header = ["metric", *compared, f"{selected} minus {reference}"]
    header += [f"{selected} minus {two_marker}"] if two_marker else []
    rows = []
    for metric in CARD_METRICS:
        row = [HEADLINE.get(metric, metric.replace("_", " ")),
               *(format_estimate(metric, *numbers.get((name, metric, "all"), _MISSING))
                 for name in compared)]
        for other in (reference, two_marker):
            if other:
                row.append(format_estimate(metric, *numbers.get(
                    (selected, f"{metric}_minus_{other}", "all"), _MISSING), difference=True))
        rows.append(row)
    lines += _table(header, rows)
    if (reference, "n", RULE_DETERMINATE) in numbers:
        n = numbers[(reference, "n", RULE_DETERMINATE)][0]
        rows = [[DETERMINATE_METRICS[metric],
                 *(format_estimate(metric, *numbers.get((name, metric, RULE_DETERMINATE),
                                                        _MISSING)) for name in compared),
                 format_estimate(metric, *numbers.get(
                     (selected, f"{metric}_minus_{reference}", RULE_DETERMINATE), _MISSING),
                     difference=True)]
                for metric in ("accuracy", "balanced_accuracy", "macro_f1")]
        lines += ["", f"On the {n:,.0f} test patients `{reference}` can type (its "
                  "abstentions removed):", "",
                  *_table(["metric", *compared, f"{selected} minus {reference}"], rows)]
    rows = [[phenotype, *(format_estimate(f"{stem}_{phenotype}", *numbers.get(
                (name, f"{stem}_{phenotype}", "all"), _MISSING))
                for stem in ("sensitivity", "ppv") for name in (selected, reference))]
            for phenotype in PHENOTYPES]
    lines += ["", "Per phenotype (one against the rest):", "",
              *_table(["phenotype", f"sensitivity {selected}", f"sensitivity {reference}",
                       f"PPV {selected}", f"PPV {reference}"], rows)]
    outcome = result.benchmark.meta.get("outcome")
    if outcome and outcome.get("method"):
        assumption = (" Not randomised: the estimate also assumes that the panel, sex and "
                      "the rule's answer capture why clinicians chose each arm (no unmeasured "
                      "confounding)." if outcome["method"] == "aipw" else "")
        directions = ", ".join(f"`{o}` {'higher' if up else 'lower'} is better"
                               for o, up in outcome["higher_is_better"].items())
        lines += ["", "## Outcomes on the test patients", "",
                  "Policy value: the expected outcome had the test patients been treated as "
                  "each phenotyper says (MALS: anakinra; immunoparalysis: interferon-gamma; "
                  f"otherwise placebo), by {outcome['method'].upper()}, among the "
                  f"{sum(outcome['arm_counts'].values()):,} patients with a treatment "
                  f"({directions}).{assumption} n/a: withheld, with the reason in the run's "
                  "benchmark report, which also has prognosis and treatment effects by "
                  "phenotype. The promotion gate judged the label, not these outcomes: they "
                  "did not decide the promotion.", ""]
        names = [*compared] + (["champion"] if ("champion", "n", "all") in numbers else [])
        for outcome_name in outcome["outcomes"]:
            head, rows = policy_table(names, numbers, outcome_name, reference)
            if rows:
                lines += [f"`{outcome_name}`:", "", *_table(head, rows)]
    lines += ["", "## Calibration on the test set", "",
              ("Every phenotype's intervals contain the ideal (intercept 0, slope 1)."
               if calibrated else "Not every interval contains the ideal (intercept 0, slope "
               "1): the probabilities are not shown to be calibrated on these patients."), ""]
    rows = [[phenotype,
             format_estimate("intercept", *numbers.get(
                 (selected, f"calibration_intercept_{phenotype}", "all"), _MISSING)),
             format_estimate("slope", *numbers.get(
                 (selected, f"calibration_slope_{phenotype}", "all"), _MISSING))]
            for phenotype in PHENOTYPES]
    lines += _table(["phenotype", "intercept (0 is ideal)", "slope (1 is ideal)"], rows)
    lines += ["", "## Subgroups", "", "Accuracy by subgroup (n patients):", ""]
    rows = []
    for (name, metric, subgroup), value in sorted(numbers.items()):
        if name == selected and metric == "accuracy" and subgroup != "all":
            n = numbers.get((name, "n", subgroup), _MISSING)[0]
            rule = numbers.get((reference, "accuracy", subgroup), _MISSING)
            rows.append([subgroup, f"{n:,.0f}", format_estimate("accuracy", *value),
                         format_estimate("accuracy", *rule)])
    lines += _table(["subgroup", "n", selected, reference], rows)
    lines += [
        "",
        "## Caveats",
        "",
        "- The reference label defines what \"right\" means; labels near the ferritin and HLA-DR "
        "cut-offs are unstable (PROVIDE: 88.3% day-1/day-2 agreement).",
        "- Performance can fall at sites whose analysers or case mix differ from training; "
        "check the site rows above and re-validate before use elsewhere.",
        "- Missing markers are handled (imputation or native missing values), but a patient "
        "with few markers gets a less certain answer: read the probabilities, not only the "
        "label.",
    ]
    if synthetic:
        lines.append("- Every number here comes from synthetic patients.")
    return "\n".join(lines) + "\n"


# --- batch scoring report (`phenotyper score --report`) ---------------------------------------

RULE_NAME, MODEL_NAME = "ImmunoSep rule", "model"
MAX_SITES = 30  # sites listed in the report, the largest first
DISAGREEMENTS = 3  # largest model-vs-rule disagreements put into words
UNSCORED_REASONS = {
    UNPARSEABLE: "a value the model uses is not a number",
    NEGATIVE: "a value the model uses is negative",
    IMPLAUSIBLE: "a value the model uses is outside its plausible range",
    UNKNOWN_CATEGORY: "a code the model uses is not recognised (e.g. sex)",
    MODEL_REJECTED: "the model's own input checks refused a value",
}
SCORE_CSS = """
body { margin: 0; background: #eef0f3; color: #1d2329;
       font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 20px 36px 36px; background: #fff; }
h1 { font-size: 1.55rem; margin: 4px 0 2px; }
h2 { font-size: 1.2rem; margin: 28px 0 8px; padding-bottom: 3px; border-bottom: 2px solid #dfe3e8; }
p { margin: 6px 0; max-width: 72em; }
code { font: 0.86em ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.banner { background: #9b1c1c; color: #fff; font-weight: 700; font-size: 1.05rem;
          padding: 10px 16px; border-radius: 4px; margin: 8px 0 12px; }
.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 10px 0;
         font-size: 0.9rem; }
.facts dt { color: #5b6570; }
.facts dd { margin: 0; overflow-wrap: anywhere; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 14px 0 4px; }
.card { border: 1px solid #dfe3e8; border-radius: 6px; padding: 6px 14px; min-width: 130px; }
.card b { display: block; font-size: 1.45rem; font-variant-numeric: tabular-nums; }
.card span { color: #5b6570; font-size: 0.85rem; }
.side { display: flex; flex-wrap: wrap; gap: 20px 28px; align-items: flex-start; }
.side ul { flex: 1 1 320px; margin: 8px 0; padding-left: 1.2em; }
.side li { margin-bottom: 6px; }
img { max-width: 100%; height: auto; }
table { border-collapse: collapse; font-size: 0.88rem; margin: 6px 0; }
th, td { border: 1px solid #dfe3e8; padding: 3px 9px; vertical-align: top; }
th { background: #f3f5f7; text-align: left; font-weight: 600; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
td.same { background: #e3f2e6; font-weight: 600; }
small { color: #66707a; }
.examples { display: block; color: #66707a; font-size: 0.78rem; }
footer { margin-top: 28px; padding-top: 8px; border-top: 1px solid #dfe3e8; color: #5b6570;
         font-size: 0.85rem; }
"""

_Cell = str | tuple[str, str]  # cell HTML, or (cell HTML, extra css class)


def score_report_html(summary: ScoreSummary, manifest: dict[str, Any]) -> str:
    """One self-contained HTML page on a batch scoring run (`phenotyper score --report`).

    The page holds everything it shows: inline CSS and figures as base64 PNG, no script and no
    address outside the file, so it opens offline and can be mailed or archived as one file.
    Counts come from `summary` (phenotypes, model vs rule, sites, histograms, SHAP) and the run's
    facts from `manifest` (input, model, timings, synthetic status); text from the data is
    escaped.
    """
    synthetic = bool(manifest.get("synthetic_input"))
    suffix = SYNTHETIC_TITLE if synthetic else ""
    sections = [
        _score_header(summary, manifest, synthetic),
        _distribution_section(summary, suffix),
        _agreement_section(summary, suffix),
        _probability_section(summary, suffix),
        _shap_section(summary, manifest, suffix),
        _site_section(summary),
        _unscored_section(summary),
        _score_footer(),
    ]
    title = f"Phenotyper scoring report: {Path(str(manifest['input'])).name}"
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{escape(title)}</title>\n<style>{SCORE_CSS}</style>\n</head>\n<body>\n"
            "<main>\n" + "\n".join(sections) + "\n</main>\n</body>\n</html>\n")


def _score_header(summary: ScoreSummary, manifest: dict[str, Any], synthetic: bool) -> str:
    """Title, the synthetic banner, the run's facts (input, model, timings) and key counts."""
    model = manifest["model"]
    timings = manifest["timings_s"]
    stages = ", ".join(f"{name.replace('_', ' ')} {seconds:.2f} s"
                       for name, seconds in timings.items() if name != "total")
    speed = manifest.get("rows_per_s")
    facts = {
        "Input": f"<code>{escape(str(manifest['input']))}</code>",
        "Column mapping": (f"<code>{escape(str(manifest['mapping']))}</code>"
                           if manifest.get("mapping") else "none (canonical column names)"),
        "Rows": f"{manifest['rows_in']:,} in, {manifest['rows_out']:,} out",
        "Model": f"<code>{escape(str(model['uri']))}</code>",
        "Registered": escape(f"{model.get('name') or 'not registered'}, "
                             f"version {model.get('version') or 'n/a'}, "
                             f"run {model.get('run_id') or 'n/a'}"),
        "Engine": escape(str(manifest["engine"])),
        "Explanations": f"<code>--explain {escape(str(manifest['explain']))}</code>",
        "Time": (f"{timings['total']:.2f} s" + (f" ({speed:,.0f} rows/s)" if speed else "")
                 + f"<br><small>{escape(stages)}</small>"),
        "Input SHA-256": f"<code>{escape(str(manifest['input_sha256']))}</code>",
    }
    scored = summary.by_status.get(OK, 0)
    called = _called_by_both(summary)
    agree = sum(summary.agreement.get((name, name), 0) for name in summary.classes)
    cards = {
        "rows": f"{summary.rows:,}",
        "scored by the model": f"{scored:,}",
        "not scored": f"{summary.rows - scored:,}",
        "model agrees with the rule": _percent(agree, called),
        "rows with reader issues": f"{summary.issue_rows:,}",
    }
    parts = [f'<div class="banner">{escape(SYNTHETIC_BANNER)}</div>'] if synthetic else []
    parts += [
        "<h1>Batch scoring report</h1>",
        '<dl class="facts">' + "".join(f"<dt>{name}</dt><dd>{value}</dd>"
                                       for name, value in facts.items()) + "</dl>",
        '<div class="cards">' + "".join(f'<div class="card"><b>{value}</b><span>{name}</span>'
                                        "</div>" for name, value in cards.items()) + "</div>",
        f"<p><small>Agreement: share of the {called:,} rows that both the model scored and "
        "the rule could call (not indeterminate).</small></p>",
    ]
    return "\n".join(parts)


def _distribution_section(summary: ScoreSummary, suffix: str) -> str:
    """Model and rule phenotype counts side by side: bar chart and table."""
    labels = _phenotype_labels(summary)
    rows = [[escape(label),
             *(cell for counts in (summary.rule, summary.phenotypes)
               for cell in (f"{counts.get(label, 0):,}", _percent(counts.get(label, 0),
                                                                   summary.rows)))]
            for label in labels]
    rows.append(["all rows", f"{summary.rows:,}", _percent(summary.rows, summary.rows),
                 f"{summary.rows:,}", _percent(summary.rows, summary.rows)])
    table = _html_table(["phenotype", "rule", "%", MODEL_NAME, "%"], rows)
    figure = _img(_distribution_figure(summary, labels, suffix),
                  "Phenotype counts: the model beside the ImmunoSep rule")
    return ('<section id="distribution">\n<h2>Phenotypes: model and ImmunoSep rule</h2>\n'
            "<p>How many rows each answer gives. The rule says <em>indeterminate</em> when a "
            "marker it needs is missing; <em>not scored</em> rows are explained below.</p>\n"
            f'<div class="side">{figure}{table}</div>\n</section>')


def _agreement_section(summary: ScoreSummary, suffix: str) -> str:
    """Rule phenotype x model phenotype: counts, row shares, example rows, and the largest
    disagreements in words."""
    rules, models = _agreement_labels(summary)
    rows = []
    for rule in rules:
        total = sum(summary.agreement.get((rule, model), 0) for model in models)
        cells: list[_Cell] = [escape(rule)]
        for model in models:
            count = summary.agreement.get((rule, model), 0)
            cell = f"{count:,} <small>({_percent(count, total)})</small>"
            if rule == model:
                cells.append((cell, "same"))
                continue
            if count:
                examples = ", ".join(str(row) for row in summary.agreement_rows[(rule, model)])
                cell += f'<span class="examples">rows {examples}</span>'
            cells.append(cell)
        rows.append([*cells, f"{total:,}"])
    table = _html_table(["rule \\ model", *(escape(model) for model in models), "rows"], rows)
    disagreements = sorted(((count, rule, model) for (rule, model), count
                            in summary.agreement.items()
                            if rule != model and rule in summary.classes
                            and model in summary.classes), reverse=True)[:DISAGREEMENTS]
    sentences = [f"<li><b>{count:,}</b> rows the rule calls {escape(rule)}, the model calls "
                 f"{escape(model)} ({_percent(count, summary.rule[rule])} of the rule's "
                 f"{escape(rule)}).</li>" for count, rule, model in disagreements]
    undecided = summary.rule.get(INDETERMINATE, 0)
    if undecided:
        decided = sum(summary.agreement.get((INDETERMINATE, model), 0)
                      for model in summary.classes)
        sentences.append(f"<li><b>{_rows(undecided)}</b> the rule cannot call (indeterminate): "
                         f"the model gives {decided:,} of them a phenotype.</li>")
    words = (f"<ul>{''.join(sentences)}</ul>" if sentences
             else "<p>The model and the rule agree on every row both could call.</p>")
    figure = _img(_agreement_figure(summary, rules, models, suffix),
                  "Heatmap: rule phenotype by model phenotype, row shares")
    return ('<section id="agreement">\n<h2>Model vs rule</h2>\n'
            "<p>Rows: the rule's phenotype; columns: the model's. Each cell gives rows and the "
            "share of the rule's row; the diagonal (same answer) is shaded. Off the diagonal, "
            "the first row numbers of the input file are listed so the cases can be looked up."
            f"</p>\n<div class=\"side\">{figure}{words}</div>\n{table}\n</section>")


def _probability_section(summary: ScoreSummary, suffix: str) -> str:
    """Histograms of each phenotype's predicted probability over the scored rows."""
    head = '<section id="probabilities">\n<h2>Predicted probabilities</h2>\n'
    if not any(np.sum(counts) for counts in summary.histograms.values()):
        return head + "<p>No row was scored, so there are no probabilities to show.</p></section>"
    bins = len(next(iter(summary.histograms.values())))
    figure = _img(_probability_figure(summary, suffix),
                  "Histograms of the predicted probability of each phenotype")
    return (head + f"<p>Scored rows by predicted probability, {bins} equal bins on [0, 1]; the "
            "row axis is logarithmic so that the uncertain middle stays visible next to the "
            f"confident ends.</p>\n{figure}\n</section>")


def _shap_section(summary: ScoreSummary, manifest: dict[str, Any], suffix: str) -> str:
    """Mean |SHAP contribution| per marker, or why the run has none."""
    head = '<section id="explanations">\n<h2>What drives the predictions</h2>\n'
    means = summary.mean_abs_shap()
    if not means:
        reason = ("this run had no explanations (<code>--explain none</code>); score again "
                  "with <code>--explain predicted</code> to see which markers drive the answers"
                  if manifest["explain"] == "none" else "no row was scored, so none was explained")
        return head + f"<p>No SHAP contributions: {reason}.</p>\n</section>"
    figure = _img(_shap_figure(means, suffix), "Mean absolute SHAP contribution per marker")
    return (head + f"<p>Mean |SHAP contribution| to the predicted phenotype's softmax logit over "
            f"the {summary.explained:,} explained rows: how far each marker moves the answer, "
            f"whatever the direction.</p>\n{figure}\n</section>")


def _site_section(summary: ScoreSummary) -> str:
    """Model phenotypes per site (n and row %), the largest MAX_SITES sites, sorted by site."""
    labels = [*summary.classes, NOT_SCORED]
    largest = sorted(summary.sites.items(), key=lambda item: -sum(item[1].values()))
    shown = sorted(largest[:MAX_SITES], key=lambda item: str(item[0]))
    rows = []
    for site, counts in shown:
        total = sum(counts.values())
        rows.append([escape(str(site)), f"{total:,}",
                     *(f"{counts.get(label, 0):,} <small>({_percent(counts.get(label, 0), total)})"
                       "</small>" for label in labels)])
    table = _html_table(["site", "rows", *(escape(label) for label in labels)], rows)
    left_out = largest[MAX_SITES:]
    note = (f"<p>{len(left_out):,} smaller sites ({sum(sum(c.values()) for _, c in left_out):,} "
            f"rows) are left out; the {MAX_SITES} largest are shown.</p>\n" if left_out else "")
    return ('<section id="sites">\n<h2>By site</h2>\n<p>The model\'s phenotypes per site: rows '
            "and share of the site's rows. A site far from the others may have a different "
            f"case mix or different assays.</p>\n{note}{table}\n</section>")


def _unscored_section(summary: ScoreSummary) -> str:
    """Rows the model did not score, by reason with examples, and rows with reader issues."""
    parts = ['<section id="unscored">\n<h2>Rows not scored, and reader issues</h2>']
    reasons = [(kind, count) for kind, count in summary.by_status.most_common() if kind != OK]
    if reasons:
        unscored = sum(count for _, count in reasons)
        parts.append(f"<p><b>{unscored:,}</b> of {summary.rows:,} rows were not scored by the "
                     "model (their row is in the output, with the reason in <code>status</code>); "
                     "the rule still answers from the markers it can read.</p>")
        parts.append(_html_table(["reason", "meaning", "rows"], [
            [escape(kind), escape(UNSCORED_REASONS.get(kind, kind)), f"{count:,}"]
            for kind, count in reasons], labels=2))
        examples = summary.unscored_examples
        parts.append(f"<p>The first {len(examples):,} of them:</p>")
        parts.append(_html_table(["row", "patient id", "status"], [
            [f"{example['row']:,}", escape(example["patient_id"] or "(none)"),
             escape(example["status"])] for example in examples], labels=3))
    else:
        parts.append("<p>Every row was scored.</p>")
    parts.append(f"<p><b>{_rows(summary.issue_rows)}</b> carry reader issues that did not stop "
                 "scoring (values censored at a detection limit, ambiguous decimal separators, "
                 "missing or repeated patient ids); the output's <code>issues</code> column says "
                 "which.</p>\n</section>")
    return "\n".join(parts)


def _score_footer() -> str:
    return ("<footer>SHAP contributions are to the predicted phenotype's softmax logit: "
            "<code>shap_base</code> plus a row's contributions equals that logit. Synthetic or "
            "real: this report says what the input says (the <code>synthetic</code> column "
            "that <code>phenotyper simulate</code> writes); it does not check the data. "
            f"phenotyper {escape(phenotyper.__version__)}.</footer>")


def _phenotype_labels(summary: ScoreSummary) -> list[str]:
    """The model's classes, then indeterminate and not scored when either answer has them."""
    extra = [label for label in (INDETERMINATE, NOT_SCORED)
             if summary.rule.get(label) or summary.phenotypes.get(label)]
    return [*summary.classes, *extra]


def _agreement_labels(summary: ScoreSummary) -> tuple[list[str], list[str]]:
    """Rule answers (the model's classes and indeterminate) and model answers (+ not scored)."""
    rules = [*summary.classes, INDETERMINATE]
    rules += sorted({rule for rule, _ in summary.agreement} - set(rules))
    return rules, [*summary.classes, NOT_SCORED]


def _called_by_both(summary: ScoreSummary) -> int:
    """Rows the model scored and the rule could call."""
    return sum(summary.agreement.get((rule, model), 0)
               for rule in summary.classes for model in summary.classes)


def _rows(count: int) -> str:
    return f"{count:,} row" if count == 1 else f"{count:,} rows"


def _percent(count: int, total: int) -> str:
    return f"{count / total:.1%}" if total else "n/a"


def _html_table(header: Sequence[str], rows: Iterable[Sequence[_Cell]], labels: int = 1) -> str:
    """An HTML table from cell HTML (escape data first): the first `labels` columns text, the
    rest numbers, right-aligned."""
    def cell(index: int, value: _Cell, tag: str = "td") -> str:
        content, extra = value if isinstance(value, tuple) else (value, "")
        classes = " ".join(filter(None, ["n" if index >= labels else "", extra]))
        return f'<{tag} class="{classes}">{content}</{tag}>' if classes else (
            f"<{tag}>{content}</{tag}>")

    head = "".join(cell(i, name, "th") for i, name in enumerate(header))
    body = "".join("<tr>" + "".join(cell(i, value) for i, value in enumerate(row)) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(figure: Figure, alt: str) -> str:
    """A figure as an inline base64 PNG, so the page needs no other file."""
    data = base64.b64encode(_png(figure)).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{escape(alt)}">'


def _distribution_figure(summary: ScoreSummary, labels: list[str], suffix: str) -> Figure:
    """Grouped bars: rows per phenotype, rule and model, in the benchmark's colours."""
    colours = _colours([RULE_NAME, MODEL_NAME])
    figure = Figure(figsize=(5.6, 3.4), layout="constrained")
    ax = figure.subplots()
    x = np.arange(len(labels))
    for offset, (name, counts) in zip((-0.2, 0.2), ((RULE_NAME, summary.rule),
                                                    (MODEL_NAME, summary.phenotypes)),
                                      strict=True):
        bars = ax.bar(x + offset, [counts.get(label, 0) for label in labels], 0.4,
                      color=colours[name], label=name)
        ax.bar_label(bars, fmt="{:,.0f}", fontsize="x-small", padding=1)
    ax.set_xticks(x, labels, fontsize="small")
    ax.set(ylabel="rows", title=f"Phenotypes{suffix}")
    ax.margins(y=0.12)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    return figure


def _agreement_figure(summary: ScoreSummary, rules: list[str], models: list[str], suffix: str
                      ) -> Figure:
    """Heatmap of rule x model, coloured by share of the rule's row, annotated with counts."""
    counts = np.array([[summary.agreement.get((rule, model), 0) for model in models]
                       for rule in rules])
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    figure = Figure(figsize=(6.2, 3.5), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for (row, column), share in np.ndenumerate(shares):
        ax.text(column, row, f"{counts[row, column]:,}\n{share:.0%}", ha="center",
                va="center", fontsize="small", color="white" if share > 0.6 else "black")
    ax.set_xticks(range(len(models)), models, fontsize="small")
    ax.set_yticks(range(len(rules)), rules, fontsize="small")
    ax.set(xlabel="model", ylabel=RULE_NAME, title=f"Rule x model, row shares{suffix}")
    figure.colorbar(image, ax=ax, label="share of the rule's row", shrink=0.8)
    return figure


def _probability_figure(summary: ScoreSummary, suffix: str) -> Figure:
    """One histogram per phenotype of P(phenotype) over the scored rows."""
    colour = _colours([RULE_NAME, MODEL_NAME])[MODEL_NAME]
    figure, axes = _grid(len(summary.classes), 3, 3.3, 2.6)  # 3 panels fit the page width
    for ax, name in zip(axes, summary.classes, strict=True):
        counts = summary.histograms[name]
        edges = np.linspace(0, 1, len(counts) + 1)
        ax.bar(edges[:-1], counts, np.diff(edges), align="edge", color=colour,
               edgecolor="white", linewidth=0.5)
        ax.set_yscale("log")
        ax.set(xlim=(0, 1), title=f"P({name})", xlabel="predicted probability", ylabel="rows")
        ax.grid(axis="y", alpha=0.3)
    figure.suptitle(f"Predicted probability per phenotype{suffix}")
    return figure


def _shap_figure(means: dict[str, float], suffix: str) -> Figure:
    """Horizontal bars of mean |SHAP| per marker, the largest on top."""
    colour = _colours([RULE_NAME, MODEL_NAME])[MODEL_NAME]
    names = list(means)[::-1]
    figure = Figure(figsize=(6.4, 0.9 + 0.2 * len(names)), layout="constrained")
    ax = figure.subplots()
    bars = ax.barh(names, [means[name] for name in names], color=colour)
    ax.bar_label(bars, fmt="{:.2f}", fontsize="x-small", padding=2)
    ax.margins(x=0.08, y=0.01)
    ax.set(xlabel="mean |SHAP| (softmax logit)", title=f"Drivers of the predictions{suffix}")
    ax.tick_params(axis="y", labelsize="small")
    ax.grid(axis="x", alpha=0.3)
    return figure
