"""Benchmark figures: confusion matrices, reliability, decision curves and flip rates, from
one `evaluate.Benchmark`."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay

from phenotyper.contract import PHENOTYPES
from phenotyper.evaluate.benchmark import MISSING, Benchmark, Numbers
from phenotyper.evaluate.metrics import TREATED_PHENOTYPE
from phenotyper.plots import colour_of, grid


def confusion_figure(benchmark: Benchmark, names: list[str], suffix: str = "") -> Figure:
    """One confusion matrix per phenotyper, coloured by row share, annotated with counts."""
    figure, axes = grid(len(names), 3, 4.6, 3.6)
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


def reliability_figure(benchmark: Benchmark, names: list[str], suffix: str = ""
                        ) -> Figure | None:
    """Reliability curves, one panel per phenotype; None when no phenotyper gives probabilities."""
    curves = benchmark.reliability
    if curves.empty:
        return None
    colours = colour_of(names)
    phenotypes = [p for p in PHENOTYPES if p in set(curves["phenotype"])]
    figure, axes = grid(len(phenotypes), 3, 4.2, 4.4)
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


def decision_figure(benchmark: Benchmark, names: list[str], suffix: str = "") -> Figure:
    """Decision curves, one panel per treatment, with treat-all and treat-none."""
    curves = benchmark.decision_curves
    # Rules often coincide (same people treated): earlier lines drawn wider show beneath.
    styles = {name: {"color": colour, "linewidth": 1.5 + 1.0 * (len(names) - 1 - i)}
              for i, (name, colour) in enumerate(colour_of(names).items())}
    styles["treat all"] = {"color": "grey", "linestyle": "--"}
    styles["treat none"] = {"color": "black", "linestyle": ":"}
    treatments = list(dict.fromkeys(curves["treatment"]))
    figure, axes = grid(len(treatments), 2, 5.6, 4.6)
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


def flip_figure(benchmark: Benchmark, names: list[str], numbers: Numbers, suffix: str = ""
                 ) -> Figure | None:
    """Flip rates per phenotyper and scenario, all patients and near a cut-off, with intervals."""
    scenarios = benchmark.remeasured_scenarios()
    if not scenarios:
        return None
    figure, axes = grid(2, 2, max(5.0, 1.3 * len(names)), 4.6)
    x = np.arange(len(names))
    width = 0.8 / len(scenarios)
    for ax, (stem, title) in zip(axes, (("flip_rate_", "all patients"),
                                        ("flip_rate_near_cutoff_", "patients near a cut-off")),
                                 strict=True):
        for i, scenario in enumerate(scenarios):
            value, low, high = (100 * np.array(column) for column in zip(
                *(numbers.get((name, f"{stem}{scenario}", "all"), MISSING) for name in names),
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
