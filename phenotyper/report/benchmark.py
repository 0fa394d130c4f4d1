"""The benchmark report: benchmark.json (every number, with its interval), benchmark.md
(tables a reader can check) and the figures, from one `evaluate.Benchmark`."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

import phenotyper
from phenotyper import markdown
from phenotyper.contract import (
    ANAKINRA,
    FERRITIN_MALS_NG_ML,
    HLA_DR_IMMUNOPARALYSIS_MAB_PER_CELL,
    INTERFERON_GAMMA,
    PHENOTYPES,
    SYNTHETIC_BANNER,
)
from phenotyper.evaluate.benchmark import (
    MISSING,
    RECORD_COLUMNS,
    RULE_DETERMINATE,
    Benchmark,
    Numbers,
)
from phenotyper.evaluate.bootstrap import MAX_UNDEFINED_SHARE, MIN_RESAMPLING_GROUPS
from phenotyper.files import write_bytes_atomic
from phenotyper.plots import png_bytes
from phenotyper.plots.benchmark import (
    confusion_figure,
    decision_figure,
    flip_figure,
    reliability_figure,
)
from phenotyper.report.outcomes import (
    FOREST_FILE,
    PSEUDO_PHENOTYPERS,
    forest_figure,
    outcome_markdown,
)
from phenotyper.rules import reference_rules

JSON_FILE, MARKDOWN_FILE = "benchmark.json", "benchmark.md"
CONFUSION_FILE, RELIABILITY_FILE = "confusion_matrices.png", "reliability.png"
DECISION_FILE, FLIP_FILE = "decision_curves.png", "flip_rates.png"
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
    numbers = benchmark.numbers()
    suffix = SYNTHETIC_TITLE if _synthetic(benchmark) else ""
    labelled = benchmark.meta.get("label") is not None
    figures = {
        CONFUSION_FILE: confusion_figure(benchmark, names, suffix) if labelled else None,
        RELIABILITY_FILE: reliability_figure(benchmark, names, suffix),
        DECISION_FILE: decision_figure(benchmark, names, suffix) if labelled else None,
        FLIP_FILE: flip_figure(benchmark, names, numbers, suffix),
        FOREST_FILE: forest_figure(benchmark.meta, _forest_names(benchmark, names), numbers,
                                   suffix),
    }
    drawn = {name: png_bytes(figure) for name, figure in figures.items() if figure is not None}
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


def _probabilistic(names: Iterable[str], numbers: Numbers) -> list[str]:
    """Phenotypers whose probabilities were judged (rules have no log loss)."""
    return [name for name in names if (name, "log_loss", "all") in numbers]


def format_estimate(
    metric: str, value: float, low: float, high: float, difference: bool = False
) -> str:
    """A metric's estimate with its interval, as a share of patients (%) when it is one."""
    return markdown.estimate(value, low, high, difference,
                             percent=metric.startswith(SHARE_PREFIXES))




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


def _markdown(benchmark: Benchmark, source: str, names: list[str], numbers: Numbers,
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


def _headline(benchmark: Benchmark, names: list[str], numbers: Numbers) -> list[str]:
    rows = [[label, *(format_estimate(metric, *numbers.get((name, metric, "all"), MISSING))
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
        *markdown.table(["metric", *names], rows),
        "n/a: not computed. Probability metrics (log loss, Brier score, calibration) are not "
        "computed for fixed rules, whose one-hot output is not a probability.",
        "",
    ]


def _differences(benchmark: Benchmark, names: list[str], numbers: Numbers) -> list[str]:
    reference = benchmark.meta["reference"]
    others = names[1:]
    lines = [f"## Differences from `{reference}`", ""]
    if not others:
        return [*lines, f"Only `{reference}` was benchmarked.", ""]
    rows = [[label, *(format_estimate(metric, *numbers.get(
                (name, f"{metric}_minus_{reference}", "all"), MISSING), difference=True)
                      for name in others)]
            for metric, label in HEADLINE.items()]
    return [
        *lines,
        f"Phenotyper minus `{reference}` on the same bootstrap resamples; pp = percentage "
        f"points. `*` marks a difference whose interval excludes 0. Higher is better except "
        f"for harm, missed immunotherapy, flip rate, log loss and Brier score. n/a: the metric "
        f"is not computed for one of the two.",
        "",
        *markdown.table(["metric", *others], rows),
    ]


DETERMINATE_METRICS = {"n": "patients", "accuracy": "accuracy",
                       "balanced_accuracy": "balanced accuracy", "macro_f1": "macro F1",
                       "coverage": "coverage (not indeterminate)"}


def _determinate(benchmark: Benchmark, names: list[str], numbers: Numbers) -> list[str]:
    """Headline metrics on the patients the reference rule can type, and the differences."""
    reference = benchmark.meta["reference"]
    if (reference, "n", RULE_DETERMINATE) not in numbers:
        return []
    rows = []
    for metric, label in DETERMINATE_METRICS.items():
        cells = []
        for name in names:
            value = numbers.get((name, metric, RULE_DETERMINATE), MISSING)
            if metric == "n":
                cells.append(f"{value[0]:,.0f}")
                continue
            cell = format_estimate(metric, *value)
            if name != reference:
                cell += "; " + format_estimate(metric, *numbers.get(
                    (name, f"{metric}_minus_{reference}", RULE_DETERMINATE), MISSING),
                    difference=True)
            cells.append(cell)
        rows.append([label, *cells])
    return [
        f"## On the patients `{reference}` can type", "",
        f"The headline again on the patients for whom `{reference}` is not indeterminate: "
        "part of any phenotyper's lead over the rule is answering where the rule abstains, "
        "which this table removes. Each cell: the value, then the paired difference from "
        f"`{reference}` on the same resamples.", "",
        *markdown.table(["metric", *names], rows),
    ]


def _per_phenotype(names: list[str], numbers: Numbers) -> list[str]:
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
                                *numbers.get((name, f"{stem}_{phenotype}", "all"), MISSING))
                          for name in names)]
                for stem, label in PER_PHENOTYPE.items()]
        lines += [f"### {phenotype}", "", *markdown.table(["metric", *names], rows)]
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
            *markdown.table(["needed \\ given", *table.columns], rows),
            f"Harmful cells: **{stimulated}** MALS patients would get interferon-gamma, an "
            f"immunostimulant to a hyperinflamed patient (row `{ANAKINRA}`, column "
            f"`{INTERFERON_GAMMA}`); **{suppressed}** immunoparalysed patients would get "
            f"anakinra, an immunosuppressant to an immunoparalysed patient (row "
            f"`{INTERFERON_GAMMA}`, column `{ANAKINRA}`).",
            "",
        ]
    return lines


def _net_benefit(benchmark: Benchmark, names: list[str], numbers: Numbers) -> list[str]:
    reference = benchmark.meta["reference"]
    points = [NET_BENEFIT.match(metric) for name, metric, subgroup in numbers
              if name == reference and subgroup == "all"]
    rows = [[point["treatment"], point["threshold"],
             *(format_estimate(point.string, *numbers.get((name, point.string, "all"), MISSING))
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
        *markdown.table(["treatment", "threshold t", *names], rows),
    ]


def _robustness(benchmark: Benchmark, names: list[str], numbers: Numbers) -> list[str]:
    meta = benchmark.meta
    lines = ["## Robustness to assay noise", ""]
    scenarios = benchmark.remeasured_scenarios()
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
                format_estimate(metric, *numbers.get((name, metric, "all"), MISSING))
                for name in names)])
    return [*lines, "", *markdown.table(["scenario", "measure", *names], rows, labels=2)]


def _calibration(names: list[str], numbers: Numbers) -> list[str]:
    lines = ["## Calibration", ""]
    probabilistic = _probabilistic(names, numbers)
    if not probabilistic:
        return [*lines, "No probabilistic phenotyper was benchmarked: fixed rules give no "
                        "probabilities to calibrate.", ""]
    rows = [[name, phenotype,
             *(format_estimate(metric, *numbers.get((name, metric, "all"), MISSING))
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
        *markdown.table(["phenotyper", "phenotype", "intercept", "slope"], rows, labels=2),
    ]


def _subgroups(benchmark: Benchmark, names: list[str], numbers: Numbers) -> list[str]:
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
                 f"{numbers.get((reference, 'n', subgroup), MISSING)[0]:,.0f}",
                 *(format_estimate("accuracy", *numbers.get((name, "accuracy", subgroup), MISSING))
                   for name in names)]
                for subgroup in subgroups]
        title = SUBGROUP_TITLES.get(kind, kind)
        lines += [f"### By {title}", "", *markdown.table([title, "n", *names], rows)]
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
