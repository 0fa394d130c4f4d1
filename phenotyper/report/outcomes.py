"""The benchmark report's outcome sections: policy value, prognosis, treatment effect by phenotype.

Summarise (`policy_table`: one row per phenotyper, the numbers with their intervals), then render
(Markdown tables, a forest plot). Wording follows `evaluate.Benchmark.meta["outcome"]`: which
estimator ran, on how many patients, and what the design could not support.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from phenotyper import markdown
from phenotyper.contract import ARM_OF, PREDICTED_LABELS
from phenotyper.evaluate.benchmark import MISSING, Numbers
from phenotyper.evaluate.outcomes import (
    AIPW,
    BEST_ARM,
    BY_TRUE_PHENOTYPE,
    DRUGS,
    IPW,
    MAX_UNSUPPORTED_SHARE,
    MIN_ARM_PATIENTS,
    NOBODY,
    PROPENSITY_FLOOR,
)

FOREST_FILE = "treatment_effects.png"
PSEUDO_PHENOTYPERS = (BY_TRUE_PHENOTYPE, BEST_ARM, NOBODY)  # not classifiers: policies only
PSEUDO_TEXT = {
    BY_TRUE_PHENOTYPE: "ceiling: treat by the true (simulated) phenotype",
    BEST_ARM: "ceiling: each patient's best arm (simulated truth)",
    NOBODY: "treat nobody (placebo for all)",
}
METHOD_TEXT = {
    IPW: "inverse probability weighting with the recorded probability of the arm received "
         "(normalised; 95% percentile bootstrap intervals by patient)",
    AIPW: "doubly robust AIPW: propensity (multinomial logistic) and outcome (logistic, per "
          "arm) models cross-fitted by patient, 95% intervals from the influence function",
}



def _estimate(value: float, low: float, high: float, difference: bool = False,
              percent: bool = True) -> str:
    """Rates and risk differences as shares (`27.3% (25.1-29.4)`, `+1.2 pp ...`); odds ratios
    plain with two decimals."""
    return markdown.estimate(value, low, high, difference, percent,
                             digits=None if percent else 2)


_table = markdown.table


def policy_names(names: Sequence[str], numbers: Numbers, outcome: str) -> list[str]:
    """Phenotypers with a policy value for `outcome`, in report order, then the references."""
    metric = f"policy_value_{outcome}"
    shown = [n for n in (*names, BY_TRUE_PHENOTYPE, BEST_ARM, NOBODY)
             if (n, metric, "all") in numbers or (n, f"true_{metric}", "all") in numbers]
    return list(dict.fromkeys(shown))


def policy_table(names: Sequence[str], numbers: Numbers, outcome: str, reference: str,
                 describe: bool = True) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the policy-value table of one outcome (`describe`: say what the
    reference policies are, beside their names)."""
    metric = f"policy_value_{outcome}"
    simulated = any((n, f"true_{metric}", "all") in numbers for n in names)
    header = ["phenotyper", "policy value", f"minus {reference}", "minus nobody"]
    header += ["true value (simulated)"] if simulated else []
    header += ["effective sample size"]
    rows = []
    for name in policy_names(names, numbers, outcome):
        row = [f"{name} ({PSEUDO_TEXT[name]})" if describe and name in PSEUDO_TEXT else name,
               _estimate(*numbers.get((name, metric, "all"), MISSING)),
               _estimate(*numbers.get((name, f"{metric}_minus_{reference}", "all"), MISSING),
                         difference=True),
               _estimate(*numbers.get((name, f"{metric}_minus_{NOBODY}", "all"), MISSING),
                         difference=True)]
        if simulated:
            row.append(_estimate(*numbers.get((name, f"true_{metric}", "all"), MISSING)))
        ess = numbers.get((name, f"policy_ess_{outcome}", "all"), MISSING)[0]
        row.append(f"{ess:,.0f}" if math.isfinite(ess) else "n/a")
        rows.append(row)
    return header, rows


def outcome_markdown(meta: dict, names: Sequence[str], numbers: Numbers) -> list[str]:
    """The outcome sections of benchmark.md."""
    outcome = meta.get("outcome")
    if not outcome:
        return []
    reference = meta["reference"]
    lines = ["## Outcomes: what treating by each phenotyper is worth", ""]
    direction = ", ".join(f"`{o}` ({'higher' if up else 'lower'} is better)"
                          for o, up in outcome["higher_is_better"].items())
    lines += [f"Outcomes: {direction}."]
    missing = {o: n for o, n in outcome["n_outcome_missing"].items() if n}
    if missing:
        lines += ["", "Outcome unknown (empty) for " + ", ".join(
            f"{n:,} patients in `{o}`" for o, n in missing.items()) + ": they are left out of "
            "that outcome's numbers, which assumes their outcomes are like those of similar "
            "patients whose outcome is known."]
    method = outcome.get("method")
    if method is None:
        lines += ["", "No treatment column was given: only the prognostic section is "
                  "computed. Give `--treatment` (and `--propensity` for a trial) to judge who "
                  "benefits."
                  + (" The cohort has a `treatment` column." if outcome.get("treatment_column_seen")
                     else ""), ""]
    else:
        arms = ", ".join(f"{arm} {count:,}" for arm, count in outcome["arm_counts"].items())
        lines += [
            f"Policy value: the expected outcome had every patient been treated as the "
            f"phenotyper says (MALS: {ARM_OF['MALS']}; immunoparalysis: "
            f"{ARM_OF['immunoparalysis']}; unclassified or indeterminate: "
            f"{ARM_OF['unclassified']}), estimated by {METHOD_TEXT[method]}. Patients by arm "
            f"received: {arms}; {outcome['n_not_randomised']:,} without a treatment (not "
            "randomised) are left out of treatment effects and policy values, which therefore "
            "describe the treated or randomised patients only. Differences are "
            "paired (the same resamples or the same patients' scores); `*` marks an interval "
            "that excludes 0. Effective sample size: (sum of weights)^2 / sum of squared "
            "weights of the patients whose arm matches the policy.",
        ]
        low, high = outcome["propensity_range"] or (math.nan, math.nan)
        if method == AIPW:
            lines += ["", f"Overlap: the estimated (cross-fitted) probability of the arm each "
                      f"patient received ranges {low:.3f}-{high:.3f}; for "
                      f"{outcome['propensity_clipped']:,} patients it was below "
                      f"{PROPENSITY_FLOOR} and was clipped to it (so were other arms' "
                      "probabilities below it, where a policy needs them). Without "
                      "randomisation the "
                      "estimate also assumes that the covariates (the panel, sex and the "
                      "rule's answer) capture why clinicians chose each arm: no unmeasured "
                      "confounding."]
        else:
            lines += ["", f"Recorded probabilities of the arm received range {low:.3f}-"
                      f"{high:.3f}."]
        if outcome["not_supported"]:
            withheld = "; ".join(
                f"`{item['phenotyper']}` {item['metric'].replace('_', ' ')}"
                f"{'' if item['subgroup'] == 'all' else ' (' + item['subgroup'] + ')'}: "
                f"{item['why']}" for item in outcome["not_supported"][:12])
            more = len(outcome["not_supported"]) - 12
            lines += ["", f"**Withheld** (n/a below): {withheld}"
                      f"{f'; and {more} more (benchmark.json, meta.outcome)' if more > 0 else ''}"
                      f". An estimate is withheld when more than {MAX_UNSUPPORTED_SHARE:.0%} of "
                      f"the patients it concerns had an estimated probability below "
                      f"{PROPENSITY_FLOOR} of the arm it needs (no comparable patient got it: a "
                      "trial that randomised each rule stratum to its own drug, for example, "
                      "supports per-stratum effects, not a comparison of policies), or when an "
                      f"arm compared has fewer than {MIN_ARM_PATIENTS} patients."]
        for item in outcome.get("not_fitted", []):
            lines += ["", f"Not fitted: `{item['phenotyper']}` {item['what']} for "
                      f"`{item['outcome']}`: {item['why']}."]
        lines += [""]
        treated = sum(outcome["arm_counts"].values())
        everyone = treated + outcome["n_not_randomised"]
        for name in outcome["outcomes"]:
            header, rows = policy_table(names, numbers, name, reference)
            if rows:
                better = "higher" if outcome["higher_is_better"][name] else "lower"
                lines += [f"### Policy value: `{name}` ({better} is better; the {treated:,} of "
                          f"{everyone:,} patients with a treatment)", "", *_table(header, rows)]
    lines += _prognosis(outcome, names, numbers)
    if method is not None:
        lines += _effects(outcome, names, numbers)
    return lines


def _prognosis(outcome: dict, names: Sequence[str], numbers: Numbers) -> list[str]:
    who = ("patients given no active drug (placebo or not randomised)"
           if outcome.get("method") else "all patients (no treatment column was given, so "
           "patients on a drug are in it too)")
    lines = ["### Prognosis by predicted phenotype", "",
             f"Outcome rate among {who}, and the odds ratio against `unclassified` adjusted for "
             "SOFA and age (logistic regression, model-based 95% intervals): does the "
             "phenotype separate who does badly?", ""]
    rows = []
    for name in names:
        for outcome_name in outcome["outcomes"]:
            for label in PREDICTED_LABELS:
                group = f"predicted={label}"
                rate = numbers.get((name, f"outcome_rate_{outcome_name}", group))
                if rate is None:
                    continue
                ratio = numbers.get((name, f"adjusted_odds_ratio_{outcome_name}", group),
                                    MISSING)
                rows.append([name, outcome_name, label, _estimate(*rate),
                             "reference" if label == "unclassified"
                             else _estimate(*ratio, percent=False)])
    return [*lines, *_table(["phenotyper", "outcome", "predicted", "rate", "adjusted OR"],
                            rows, labels=3)]


def _effects(outcome: dict, names: Sequence[str], numbers: Numbers) -> list[str]:
    lines = ["### Treatment effect within each predicted phenotype", "",
             "Risk difference of each drug against placebo among the patients the phenotyper "
             "puts in each phenotype, in percentage points (`*`: interval excludes 0; in "
             "brackets the patients on the drug vs on placebo), and the "
             "joint Wald test that each drug's effect (log odds) is the same in every predicted "
             f"phenotype (weighted by the inverse propensity, robust errors). See "
             f"`{FOREST_FILE}`.", ""]
    rows = []
    counts = {(item["phenotyper"], item["metric"], item["subgroup"]): (item["drug"],
                                                                      item["placebo"])
              for item in outcome.get("arm_patients", [])}
    for name in names:
        for outcome_name in outcome["outcomes"]:
            for label in PREDICTED_LABELS:
                cells = []
                for drug in DRUGS:
                    key = (name, f"treatment_effect_{drug}_{outcome_name}", f"predicted={label}")
                    cell = _estimate(*numbers.get(key, MISSING), difference=True)
                    if key in counts:
                        cell += f" [{counts[key][0]:,} vs {counts[key][1]:,}]"
                    cells.append(cell)
                if any(cell != "n/a" for cell in cells):
                    rows.append([name, outcome_name, label, *cells])
            p = numbers.get((name, f"interaction_p_{outcome_name}", "all"))
            if p is not None:
                rows.append([name, outcome_name, "interaction p", f"{p[0]:.2g}", ""])
    return [*lines, *_table(["phenotyper", "outcome", "predicted", *DRUGS], rows, labels=3)]


def forest_figure(meta: dict, names: Sequence[str], numbers: Numbers, suffix: str = ""
                  ) -> Figure | None:
    """Each drug's risk difference against placebo within each predicted phenotype, with its
    interval: one panel per outcome, one row per phenotyper x predicted phenotype x drug."""
    outcome = meta.get("outcome")
    if not outcome or outcome.get("method") is None:
        return None
    panels = []
    for outcome_name in outcome["outcomes"]:
        rows = [(name, f"{name}: {label}, {drug}", numbers[key])
                for name in names for label in PREDICTED_LABELS for drug in DRUGS
                if (key := (name, f"treatment_effect_{drug}_{outcome_name}",
                            f"predicted={label}")) in numbers]
        if rows:
            panels.append((outcome_name, rows))
    if not panels:
        return None
    height = max(3.0, 0.28 * max(len(rows) for _, rows in panels) + 1.2)
    figure = Figure(figsize=(6.4 * len(panels), height), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False).ravel()
    for ax, (outcome_name, rows) in zip(axes, panels, strict=True):
        y = np.arange(len(rows))[::-1]
        value = np.array([r[2][0] for r in rows]) * 100
        low = np.array([r[2][1] for r in rows]) * 100
        high = np.array([r[2][2] for r in rows]) * 100
        error = np.nan_to_num(np.clip([value - low, high - value], 0, None))
        for i, (name, _, _) in enumerate(rows):
            ax.errorbar(value[i], y[i], xerr=error[:, i:i + 1], fmt="o", markersize=4,
                        capsize=2, color=f"C{list(names).index(name) % 10}")
        ax.axvline(0, color="grey", linestyle="--", linewidth=1)
        ax.set_yticks(y, [label for _, label, _ in rows], fontsize="small")
        ax.set(title=outcome_name, xlabel="risk difference vs placebo (pp)")
        ax.grid(axis="x", alpha=0.3)
    figure.suptitle(f"Treatment effect within each predicted phenotype (95% CI){suffix}")
    return figure
