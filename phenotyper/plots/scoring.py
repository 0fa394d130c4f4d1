"""Scoring-report figures: phenotype shares, model-vs-rule agreement, probabilities and mean
|SHAP|, from a `scoring.summary.ScoreSummary`."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from phenotyper.plots import colour_of, grid
from phenotyper.scoring.summary import ScoreSummary

RULE_NAME, MODEL_NAME = "ImmunoSep rule", "model"


def distribution_figure(summary: ScoreSummary, labels: list[str], suffix: str) -> Figure:
    """Grouped bars: rows per phenotype, rule and model, in the benchmark's colours."""
    colours = colour_of([RULE_NAME, MODEL_NAME])
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


def agreement_figure(summary: ScoreSummary, rules: list[str], models: list[str], suffix: str
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


def probability_figure(summary: ScoreSummary, suffix: str) -> Figure:
    """One histogram per phenotype of P(phenotype) over the scored rows."""
    colour = colour_of([RULE_NAME, MODEL_NAME])[MODEL_NAME]
    figure, axes = grid(len(summary.classes), 3, 3.3, 2.6)  # 3 panels fit the page width
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


def shap_figure(means: dict[str, float], suffix: str) -> Figure:
    """Horizontal bars of mean |SHAP| per marker, the largest on top."""
    colour = colour_of([RULE_NAME, MODEL_NAME])[MODEL_NAME]
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
