"""The scoring report: one self-contained HTML page summarising a scored cohort (from
`scoring.summary.ScoreSummary` and the run's manifest)."""

from __future__ import annotations

import base64
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from matplotlib.figure import Figure

import phenotyper
from phenotyper.cohort import IMPLAUSIBLE, NEGATIVE, UNKNOWN_CATEGORY, UNPARSEABLE
from phenotyper.contract import (
    INDETERMINATE,
    MODEL_REJECTED,
    NOT_SCORED,
    SCORED_KINDS,
    SYNTHETIC_BANNER,
    VALUE_SET_ASIDE,
)
from phenotyper.drift import sites_most_moved
from phenotyper.plots import png_bytes
from phenotyper.plots.scoring import (
    MODEL_NAME,
    agreement_figure,
    distribution_figure,
    probability_figure,
    shap_figure,
)
from phenotyper.report.benchmark import SYNTHETIC_TITLE
from phenotyper.scoring.summary import ScoreSummary

# --- batch scoring report (`phenotyper score --report`) ---------------------------------------

MAX_SITES = 30  # sites listed in the report, the largest first
DISAGREEMENTS = 3  # largest model-vs-rule disagreements put into words
DRIFTED_MARKERS = 3  # markers beyond a drift threshold listed per site, the most moved first
UNSCORED_REASONS = {
    UNPARSEABLE: "a value the model uses is not a number",
    NEGATIVE: "a value the model uses is negative",
    IMPLAUSIBLE: "a value the model uses is outside its plausible range",
    UNKNOWN_CATEGORY: "a code the model uses is not recognised (e.g. sex)",
    MODEL_REJECTED: "the model's own input checks refused a value",
}
TEMPLATE = "score_report.html.j2"  # in phenotyper/report/templates, with report.css


@dataclass(frozen=True)
class _Count:
    """A table cell holding a count and its share of the row, optionally with the first row
    numbers of the input file it counts; `same` shades it (model and rule agree)."""

    count: str
    share: str
    examples: str = ""
    same: bool = False


def score_report_html(summary: ScoreSummary, manifest: dict[str, Any]) -> str:
    """One self-contained HTML page on a batch scoring run (`phenotyper score --report`).

    The page holds everything it shows: inline CSS and figures as base64 PNG, no script and no
    address outside the file, so it opens offline and can be mailed or archived as one file.
    Counts come from `summary` (phenotypes, model vs rule, sites, histograms, SHAP) and the run's
    facts from `manifest` (input, model, timings, synthetic status); the page is the template
    `templates/score_report.html.j2`, rendered with autoescaping so every value from the data
    stays text.
    """
    synthetic = bool(manifest.get("synthetic_input"))
    suffix = SYNTHETIC_TITLE if synthetic else ""
    return _environment().get_template(TEMPLATE).render(
        title=f"Phenotyper scoring report: {Path(str(manifest['input'])).name}",
        banners=[*manifest.get("warnings", []), *([SYNTHETIC_BANNER] if synthetic else [])],
        run=_run_facts(manifest),
        cards=_cards(summary),
        called=f"{_called_by_both(summary):,}",
        distribution=_distribution(summary, suffix),
        agreement=_agreement(summary, suffix),
        probabilities=_probabilities(summary, suffix),
        explanations=_explanations(summary, manifest, suffix),
        sites=_sites(summary),
        drift=_drift(manifest.get("drift")),
        repeated=_repeated(manifest.get("repeated_samples")),
        unscored=_unscored(summary),
        version=phenotyper.__version__,
    )


@functools.cache
def _environment() -> jinja2.Environment:
    """The report templates (HTML-quoting every value), made once, on first use."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("phenotyper.report", "templates"),
        autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=True)


def _run_facts(manifest: dict[str, Any]) -> dict[str, Any]:
    """The run's facts as text: input, model, timings."""
    model = manifest["model"]
    timings = manifest["timings_s"]
    speed = manifest.get("rows_per_s")
    return {
        "input": str(manifest["input"]),
        "mapping": str(manifest["mapping"]) if manifest.get("mapping") else None,
        "rows": f"{manifest['rows_in']:,} in, {manifest['rows_out']:,} out",
        "model": str(model["uri"]),
        "registered": (f"{model.get('name') or 'not registered'}, "
                       f"version {model.get('version') or 'n/a'}, "
                       f"run {model.get('run_id') or 'n/a'}"),
        "engine": str(manifest["engine"]),
        "explain": str(manifest["explain"]),
        "time": f"{timings['total']:.2f} s" + (f" ({speed:,.0f} rows/s)" if speed else ""),
        "stages": ", ".join(f"{name.replace('_', ' ')} {seconds:.2f} s"
                            for name, seconds in timings.items() if name != "total"),
        "sha256": str(manifest["input_sha256"]),
    }


def _cards(summary: ScoreSummary) -> list[tuple[str, str]]:
    """The key counts: (name, value)."""
    scored = sum(summary.by_status.get(kind, 0) for kind in SCORED_KINDS)
    set_aside = summary.by_status.get(VALUE_SET_ASIDE, 0)
    agree = sum(summary.agreement.get((name, name), 0) for name in summary.classes)
    return [
        ("rows", f"{summary.rows:,}"),
        ("scored by the model", f"{scored:,}"),
        *([("scored with a rejected value set aside", f"{set_aside:,}")] if set_aside else []),
        ("not scored", f"{summary.rows - scored:,}"),
        ("model agrees with the rule", _percent(agree, _called_by_both(summary))),
        ("rows with reader issues", f"{summary.issue_rows:,}"),
    ]


def _distribution(summary: ScoreSummary, suffix: str) -> dict[str, Any]:
    """Model and rule phenotype counts side by side: bar chart and table."""
    labels = _phenotype_labels(summary)
    rows = [[label, *(cell for counts in (summary.rule, summary.phenotypes)
                      for cell in (f"{counts.get(label, 0):,}",
                                   _percent(counts.get(label, 0), summary.rows)))]
            for label in labels]
    everything = [f"{summary.rows:,}", _percent(summary.rows, summary.rows)]
    rows.append(["all rows", *everything, *everything])
    return {"figure": _data_uri(distribution_figure(summary, labels, suffix)),
            "header": ["phenotype", "rule", "%", MODEL_NAME, "%"], "rows": rows}


def _agreement(summary: ScoreSummary, suffix: str) -> dict[str, Any]:
    """Rule phenotype x model phenotype: counts, row shares, example rows, and the largest
    disagreements (and the rows the rule could not call) for the text."""
    rules, models = _agreement_labels(summary)
    rows: list[list[str | _Count]] = []
    for rule in rules:
        total = sum(summary.agreement.get((rule, model), 0) for model in models)
        cells: list[str | _Count] = [rule]
        for model in models:
            count = summary.agreement.get((rule, model), 0)
            examples = (", ".join(str(row) for row in summary.agreement_rows[(rule, model)])
                        if count and rule != model else "")
            cells.append(_Count(f"{count:,}", _percent(count, total), examples, rule == model))
        rows.append([*cells, f"{total:,}"])
    disagreements = sorted(((count, rule, model) for (rule, model), count
                            in summary.agreement.items()
                            if rule != model and rule in summary.classes
                            and model in summary.classes), reverse=True)[:DISAGREEMENTS]
    undecided = summary.rule.get(INDETERMINATE, 0)
    decided = sum(summary.agreement.get((INDETERMINATE, model), 0) for model in summary.classes)
    return {
        "figure": _data_uri(agreement_figure(summary, rules, models, suffix)),
        "header": ["rule \\ model", *models, "rows"], "rows": rows,
        "disagreements": [{"rows": f"{count:,}", "rule": rule, "model": model,
                           "share": _percent(count, summary.rule[rule])}
                          for count, rule, model in disagreements],
        "undecided": ({"rows": _rows(undecided), "called": f"{decided:,}"}
                      if undecided else None),
    }


def _probabilities(summary: ScoreSummary, suffix: str) -> dict[str, Any] | None:
    """Histograms of each phenotype's predicted probability over the scored rows; None when
    no row was scored."""
    if not any(np.sum(counts) for counts in summary.histograms.values()):
        return None
    return {"figure": _data_uri(probability_figure(summary, suffix)),
            "bins": len(next(iter(summary.histograms.values())))}


def _explanations(summary: ScoreSummary, manifest: dict[str, Any], suffix: str
                  ) -> dict[str, Any]:
    """Mean |SHAP contribution| per marker, or why the run has none."""
    means = summary.mean_abs_shap()
    return {"figure": _data_uri(shap_figure(means, suffix)) if means else None,
            "explained": f"{summary.explained:,}", "explain_none": manifest["explain"] == "none"}


def _sites(summary: ScoreSummary) -> dict[str, Any]:
    """Model phenotypes per site (n and row %), the largest MAX_SITES sites, sorted by site."""
    labels = [*summary.classes, NOT_SCORED]
    largest = sorted(summary.sites.items(), key=lambda item: -sum(item[1].values()))
    shown = sorted(largest[:MAX_SITES], key=lambda item: str(item[0]))
    rows = []
    for site, counts in shown:
        total = sum(counts.values())
        rows.append([str(site), f"{total:,}",
                     *(_Count(f"{counts.get(label, 0):,}", _percent(counts.get(label, 0), total))
                       for label in labels)])
    left_out = largest[MAX_SITES:]
    return {"header": ["site", "rows", *labels], "rows": rows, "max_sites": MAX_SITES,
            "left_out": ({"sites": f"{len(left_out):,}",
                          "rows": f"{sum(sum(counts.values()) for _, counts in left_out):,}"}
                         if left_out else None)}


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _drift(drift: dict[str, Any] | None) -> dict[str, Any] | None:
    """The input against the model's training profile: every marker overall, the markers
    beyond a threshold per site (the sites that moved most first), phenotype shares."""
    if not drift:
        return None

    def marker_row(row: dict[str, Any], *scope: str) -> list[str]:
        return [*scope, str(row["marker"]), _number(row["psi"]), _number(row["ks_at_deciles"]),
                f"{_share(row['outside_share'])} ({_share(row['outside_share_training'])})",
                f"{_share(row['missing_share'])} ({_share(row['missing_share_training'])})",
                "yes" if row["beyond_threshold"] else ""]

    header = ["marker", "PSI", "KS at deciles", "outside the training deciles (training)",
              "missing (training)", "beyond a threshold"]
    moved = sites_most_moved(drift)
    return {
        "thresholds": {key: f"{value:g}" for key, value in drift["thresholds"].items()},
        "header": header, "overall": [marker_row(row) for row in drift["overall"]],
        "site_header": ["site", *header],
        "sites": [marker_row(row, str(site)) for site, markers in moved[:MAX_SITES]
                  for row in markers[:DRIFTED_MARKERS]],
        "sites_moved": f"{len(moved):,}", "sites_total": f"{len(drift['by_site']):,}",
        "shares": [[name, _share(shares["training"]), _share(shares["input"])]
                   for name, shares in drift.get("phenotype_shares", {}).items()],
    }


def _repeated(repeated: dict[str, Any] | None) -> dict[str, Any] | None:
    """Stability of the phenotype between a patient's consecutive samples, model and rule."""
    if not repeated:
        return None
    return {
        "pairs": f"{repeated['pairs']:,}",
        "patients": f"{repeated['patients_with_repeats']:,}",
        "rows": [[who, f"{repeated[key]['pairs']:,}", _share(repeated[key]["kept_share"])]
                 for who, key in ((MODEL_NAME, "model"), ("ImmunoSep rule", "rule"))],
        "published": _share(repeated["published_rule_kept_share"]),
        "per_patient": repeated["per_patient"],
        "counts": ", ".join(f"{name} {count:,}" for name, count in
                            repeated.get("phenotype_counts", {}).items()),
        "counted_patients": f"{repeated.get('patients', 0):,}",
    }


def _unscored(summary: ScoreSummary) -> dict[str, Any]:
    """Rows the model did not score, by reason with examples, and rows with reader issues."""
    reasons = [(kind, count) for kind, count in summary.by_status.most_common()
               if kind not in SCORED_KINDS]
    examples = summary.unscored_examples
    return {
        "unscored": f"{sum(count for _, count in reasons):,}", "rows": f"{summary.rows:,}",
        "reasons_header": ["reason", "meaning", "rows"],
        "reasons": [[str(kind), UNSCORED_REASONS.get(kind, str(kind)), f"{count:,}"]
                    for kind, count in reasons],
        "shown": f"{len(examples):,}",
        "examples_header": ["row", "patient id", "status"],
        "examples": [[f"{example['row']:,}", str(example["patient_id"] or "(none)"),
                      str(example["status"])] for example in examples],
        "issues": _rows(summary.issue_rows),
    }


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


def _data_uri(figure: Figure) -> str:
    """A figure as an inline base64 PNG, so the page needs no other file."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(figure)).decode("ascii")
