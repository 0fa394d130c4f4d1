"""The scoring report: one self-contained HTML page summarising a scored cohort (from
`scoring.summary.ScoreSummary` and the run's manifest)."""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

import phenotyper
from phenotyper.cohort import IMPLAUSIBLE, NEGATIVE, UNKNOWN_CATEGORY, UNPARSEABLE
from phenotyper.contract import INDETERMINATE, MODEL_REJECTED, NOT_SCORED, OK, SYNTHETIC_BANNER
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
    figure = _img(distribution_figure(summary, labels, suffix),
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
    figure = _img(agreement_figure(summary, rules, models, suffix),
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
    figure = _img(probability_figure(summary, suffix),
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
    figure = _img(shap_figure(means, suffix), "Mean absolute SHAP contribution per marker")
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
    data = base64.b64encode(png_bytes(figure)).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{escape(alt)}">'
