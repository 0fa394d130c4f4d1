"""The model card: what a registered version is, how it was judged and what it may be used
for, in Markdown stored with the version."""

from __future__ import annotations

from typing import TYPE_CHECKING

import phenotyper
from phenotyper import markdown
from phenotyper.calibration import SHRINKAGE_PATIENTS
from phenotyper.contract import SYNTHETIC_BANNER, SYNTHETIC_MODEL_BANNER
from phenotyper.evaluate.benchmark import MISSING, RULE_DETERMINATE, Numbers
from phenotyper.report.benchmark import DETERMINATE_METRICS, HEADLINE, format_estimate
from phenotyper.report.outcomes import policy_table

if TYPE_CHECKING:
    from pathlib import Path

    from phenotyper.training.recalibration import LocalRecalibration
    from phenotyper.training.results import CandidateResult, GateDecision, TrainingResult

from phenotyper.contract import PHENOTYPES

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


def calibration_supported(numbers: Numbers, name: str) -> bool:
    """Whether every phenotype's test-set calibration interval contains the ideal (intercept
    0, slope 1): the only case in which the card calls the probabilities calibrated."""
    for phenotype in PHENOTYPES:
        _, low, high = numbers.get((name, f"calibration_intercept_{phenotype}", "all"), MISSING)
        _, slope_low, slope_high = numbers.get((name, f"calibration_slope_{phenotype}", "all"),
                                               MISSING)
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
    reference = spec.label or labels.get("reference")
    metric = ("soft-label log loss against the latent posterior" if result.latent is not None
              else spec.selection_metric)
    lines = [f"**{SYNTHETIC_MODEL_BANNER}**", "", f"**{SYNTHETIC_BANNER}**", ""
             ] if synthetic else []
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
    if result.latent is not None:
        lines += latent_section(result)
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
         f"`{reference}` column, and the model is only as good as that label."),
        "",
        f"- Reference label `{reference}`"
        + (" (judged against, never fitted)" if result.latent is not None else "") + ": "
        + LABEL_DEFINITIONS.get(reference, "as supplied in the cohort; phenotyper does not "
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
        f"{metric} inside the training set (CV {metric} "
        f"{candidate.cv_score:.4f}); parameters {candidate.best_params}. Out-of-fold "
        "calibration (intercept, slope) per phenotype: "
        + ", ".join(f"{p} ({i:+.2f}, {s:.2f})" for p, (i, s) in candidate.calibration.items())
        + "; " + _calibration_verdict(candidate),
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
               *(format_estimate(metric, *numbers.get((name, metric, "all"), MISSING))
                 for name in compared)]
        for other in (reference, two_marker):
            if other:
                row.append(format_estimate(metric, *numbers.get(
                    (selected, f"{metric}_minus_{other}", "all"), MISSING), difference=True))
        rows.append(row)
    lines += markdown.table(header, rows)
    if (reference, "n", RULE_DETERMINATE) in numbers:
        n = numbers[(reference, "n", RULE_DETERMINATE)][0]
        rows = [[DETERMINATE_METRICS[metric],
                 *(format_estimate(metric, *numbers.get((name, metric, RULE_DETERMINATE),
                                                        MISSING)) for name in compared),
                 format_estimate(metric, *numbers.get(
                     (selected, f"{metric}_minus_{reference}", RULE_DETERMINATE), MISSING),
                     difference=True)]
                for metric in ("accuracy", "balanced_accuracy", "macro_f1")]
        lines += ["", f"On the {n:,.0f} test patients `{reference}` can type (its "
                  "abstentions removed):", "",
                  *markdown.table(["metric", *compared, f"{selected} minus {reference}"], rows)]
    rows = [[phenotype, *(format_estimate(f"{stem}_{phenotype}", *numbers.get(
                (name, f"{stem}_{phenotype}", "all"), MISSING))
                for stem in ("sensitivity", "ppv") for name in (selected, reference))]
            for phenotype in PHENOTYPES]
    lines += ["", "Per phenotype (one against the rest):", "",
              *markdown.table(["phenotype", f"sensitivity {selected}", f"sensitivity {reference}",
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
                lines += [f"`{outcome_name}`:", "", *markdown.table(head, rows)]
    lines += ["", "## Calibration on the test set", "",
              ("Every phenotype's intervals contain the ideal (intercept 0, slope 1)."
               if calibrated else "Not every interval contains the ideal (intercept 0, slope "
               "1): the probabilities are not shown to be calibrated on these patients."), ""]
    rows = [[phenotype,
             format_estimate("intercept", *numbers.get(
                 (selected, f"calibration_intercept_{phenotype}", "all"), MISSING)),
             format_estimate("slope", *numbers.get(
                 (selected, f"calibration_slope_{phenotype}", "all"), MISSING))]
            for phenotype in PHENOTYPES]
    lines += markdown.table(["phenotype", "intercept (0 is ideal)", "slope (1 is ideal)"], rows)
    lines += ["", "## Subgroups", "", "Accuracy by subgroup (n patients):", ""]
    rows = []
    for (name, metric, subgroup), value in sorted(numbers.items()):
        if name == selected and metric == "accuracy" and subgroup != "all":
            n = numbers.get((name, "n", subgroup), MISSING)[0]
            rule = numbers.get((reference, "accuracy", subgroup), MISSING)
            rows.append([subgroup, f"{n:,.0f}", format_estimate("accuracy", *value),
                         format_estimate("accuracy", *rule)])
    lines += markdown.table(["subgroup", "n", selected, reference], rows)
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


NAMING_RULES = ("MALS is the class with the highest ferritin; immunoparalysis the lowest "
                "monocyte HLA-DR and lymphocytes; unclassified the rest (the ImmunoSep "
                "definitions, matched on the class profiles alone, never on labels)")
MODE_WORDS = {
    "none": "from the markers alone, without any label",
    "partial": "from the markers, with a few adjudicated patients anchoring their classes",
    "noisy-rule": "from the markers, starting from the ImmunoSep rule's answers, whose error "
                  "rates against the learned classes were then estimated",
}


def latent_section(result: TrainingResult) -> list[str]:
    """The card's account of phenotypes learned without (or with few) labels."""
    latent = result.latent
    lines = ["## Phenotypes learned without labels", "",
             f"The phenotypes were learned {MODE_WORDS[latent.mode]}: a {latent.mixture.covariance}"
             "-covariance Gaussian mixture over the lab markers (log scale; SOFA and age "
             "linear), fitted by EM with missing markers marginalised and censored results as "
             f"intervals. Three classes were fitted and named: {NAMING_RULES}. The selected "
             "model was distilled from the mixture's posterior (soft labels as weights); the "
             "output's `latent_prob_*` columns are the mixture's own posterior.", ""]
    lines += markdown.table(
        ("classes", "BIC", "ICL", "entropy", "iterations"),
        [(int(r.classes), f"{r.bic:,.0f}", f"{r.icl:,.0f}", f"{r.entropy:.3f}",
          int(r.iterations)) for r in latent.sweep.itertuples()])
    lines += ["", f"BIC prefers **{latent.preferred_k}** classes. Training patients by class: "
              + ", ".join(f"{p} {n:,}" for p, n in latent.sizes.items()) + ".", ""]
    lines += markdown.table(("class", *PHENOTYPES), [
        (name, *(f"{scores[p]:+.2f}" for p in PHENOTYPES))
        for name, scores in latent.naming.scores.items()])
    lines += ["", "Profile scores per fitted class (standardised class means; the one-to-one "
              "match with the highest total names the classes).", ""]
    stability = latent.stability
    if stability.get("refits"):
        lines.append(f"- Stability: over {stability['refits']} bootstrap refits, on average "
                     f"{stability['kept_mean']:.1%} of patients kept their class (lowest "
                     f"{stability['kept_min']:.1%}).")
    lines.append("- Distillation, mean |candidate probability - posterior| on the test "
                 "patients: " + ", ".join(f"{k} {v:.3f}" for k, v in
                                          latent.distillation.items()) + ".")
    lines += [f"- Warning: {warning}." for warning in latent.warnings]
    return [*lines, ""]


def _calibration_verdict(candidate: CandidateResult) -> str:
    """What the joint out-of-fold calibration test (`calibration.calibration_test`) said and
    what training did about it."""
    test = candidate.calibration_test
    said = ("" if test is None else
            f"the joint test (matrix scaling against no change) gave a likelihood ratio of "
            f"{test['statistic']:.1f} on {test['df']} df, p = {test['p_value']:.3g}")
    if candidate.recalibrated:
        return (f"{said}, below {test['alpha']:g}, so its logits were recalibrated on the "
                "same folds.")
    return f"{said}: no evidence of miscalibration, used as is." if said else "used as is."


def recalibration_section(parent_card: str, name: str, version: str, parent_version: str,
                          result: LocalRecalibration, cohort: Path, warning: str | None) -> str:
    """The parent version's card under this version's title, with what local recalibration
    did put first: the test, the held-out numbers before and after, the shrinkage."""
    held = result.held_out
    counts = ", ".join(f"{p} {n:,}" for p, n in result.counts.items())
    lines = [
        f"# Model card: {name}, version {version} (version {parent_version} recalibrated)",
        "",
        f"## Local recalibration of version {parent_version}",
        "",
        f"Recalibrated on `{cohort.name}` ({counts} labelled patients). Joint calibration test "
        f"of version {parent_version} there: {result.before.describe()}. The logit map was "
        f"refitted (matrix scaling, shrunk toward no change by a prior worth "
        f"{SHRINKAGE_PATIENTS:g} patients) and judged by {held['folds']}-fold cross-fitting "
        "on the local patients:",
        "",
        "| held out (lower is better) | before | after |",
        "|---|---|---|",
        f"| log loss | {held['log_loss_before']:.4f} | {held['log_loss_after']:.4f} |",
        f"| calibration likelihood ratio (6 df; 12.6 is p = 0.05) | "
        f"{held['statistic_before']:.1f} | {held['statistic_after']:.1f} |",
        "",
        "Point estimates on the local patients, without intervals. Only the map from the "
        "model's logits to probabilities changed (the markers' contributions are the parent's, "
        "mapped linearly): probabilities move, and so can phenotype calls and the order of "
        "patients by a phenotype's probability. The rest of this card describes the parent "
        "version's training.",
    ]
    if warning:
        lines += ["", f"**Warning:** {warning}."]
    banner, rest = _split_banner(parent_card)
    if rest.startswith("# Model card:"):  # the parent's title names the parent's version
        rest = f"*Version {parent_version}'s card follows.*" + rest.partition("\n")[2]
    return "\n".join([*banner, *lines, "", rest])


def _split_banner(card: str) -> tuple[list[str], str]:
    """A card's leading synthetic-model banner (kept on top) and the rest."""
    if card.startswith(f"**{SYNTHETIC_MODEL_BANNER}**"):
        first, _, rest = card.partition("\n\n")
        return [first, ""], rest
    return [], card
