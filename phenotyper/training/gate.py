"""The promotion gate: whether a trained model may become champion, and why, from the
held-out benchmark alone."""

from __future__ import annotations

from typing import Any

from phenotyper.contract import HIGHER_IS_BETTER
from phenotyper.evaluate.benchmark import RULE_DETERMINATE
from phenotyper.evaluate.robustness import AGREEMENT_SCENARIO
from phenotyper.training.results import GateDecision, TrainingResult
from phenotyper.training.spec import (
    AGREEMENT,
    CHAMPION,
    LATENT_CLASS,
    REFERENCE_RULE,
    SELECTION_METRICS,
    TWO_MARKER,
)


def promotion_decision(result: TrainingResult, champion_version: str | None) -> GateDecision:
    """Whether the selected model may become champion, on the held-out patients.

    `superiority` (default): the paired 95% CI of the rule metric's difference from the
    ImmunoSep rule is above zero, overall and (`selection.determinate`) on the patients the rule
    can type, so abstentions alone cannot pass; the difference from the learned two-marker
    reference is reported beside it. `agreement`: the model's Cohen's kappa with the rule (on
    patients with HLA-DR measured) is non-inferior, by `agreement_margin`, to the rule's kappa
    with itself when the same patients are measured in another laboratory. Either way the model
    may be at most `champion_tolerance` worse than the current champion on the selection metric.
    """
    spec, records = result.spec, result.benchmark.records
    table = records.set_index(["phenotyper", "metric", "subgroup"])
    if result.latent is not None and spec.outcomes:
        return _by_outcomes(result, table, champion_version)
    if result.latent is not None and result.labels.get("reference") == LATENT_CLASS:
        return GateDecision(False, "the phenotypes were learned without labels and the cohort "
                            "has neither outcome columns nor a reference column, so nothing "
                            "shows they pick the right patients for the right drug. Registered, "
                            "not promoted: add [outcome] columns to judge them",
                            {"gate": "none (label-free, no outcomes)"})
    selected = result.selected
    _, metric, higher_better = SELECTION_METRICS[spec.selection_metric]
    challenger = float(table.loc[(selected, metric, "all"), "value"])
    numbers: dict[str, float | str] = {"gate": spec.gate, "selection_metric": spec.selection_metric,
                                       "challenger_value": challenger,
                                       "tolerance": spec.champion_tolerance}

    def difference(name: str, other: str, subgroup: str = "all",
                   metric_name: str = spec.rule_metric) -> Any:
        key = (name, f"{metric_name}_minus_{other}", subgroup)
        return table.loc[key] if key in table.index else None

    if spec.gate == AGREEMENT:
        stem = f"kappa_with_rule_minus_rule_self_kappa_{AGREEMENT_SCENARIO}"
        key = (selected, stem, "all")
        if key not in table.index:
            return GateDecision(False, "the agreement gate needs patients with HLA-DR measured "
                                "and re-measurements (benchmark.noise_repeats)", numbers)
        row = table.loc[key]
        kappa = float(table.loc[(selected, "kappa_with_rule", "all"), "value"])
        numbers.update({"kappa_with_rule": kappa, "kappa_difference": float(row.value),
                        "kappa_difference_ci_low": float(row.ci_low),
                        "kappa_difference_ci_high": float(row.ci_high),
                        "agreement_margin": spec.agreement_margin})
        if not row.ci_low > -spec.agreement_margin:
            return GateDecision(False, f"{selected} agrees with the ImmunoSep rule less than the "
                                f"rule agrees with itself between laboratories, beyond the margin "
                                f"{spec.agreement_margin} (kappa difference {row.value:+.3f}, 95% "
                                f"CI {row.ci_low:+.3f} to {row.ci_high:+.3f})", numbers)
        passed = (f"agrees with the ImmunoSep rule (kappa {kappa:.3f}) within "
                  f"{spec.agreement_margin} of the rule's own between-lab kappa "
                  f"(difference {row.value:+.3f}, CI low {row.ci_low:+.3f})")
    else:
        overall = difference(selected, REFERENCE_RULE)
        numbers["rule_metric"] = spec.rule_metric
        determinate = difference(selected, REFERENCE_RULE, RULE_DETERMINATE)
        two = difference(selected, TWO_MARKER)
        for prefix, row in (("rule", overall), ("determinate", determinate),
                            ("two_marker", two)):
            if row is not None:
                numbers.update({f"{prefix}_difference": float(row.value),
                                f"{prefix}_difference_ci_low": float(row.ci_low),
                                f"{prefix}_difference_ci_high": float(row.ci_high)})
        if result.labels.get("warning"):
            return GateDecision(False, "the label is the ImmunoSep rule's own answer, so no "
                                "model can beat the rule against it; judge a model that "
                                "reproduces the rule with selection.gate = 'agreement'",
                                numbers)
        if not overall.ci_low > 0:
            return GateDecision(False, f"{selected} does not beat the ImmunoSep rule on "
                                f"{spec.rule_metric} (paired 95% CI {overall.ci_low:+.4f} to "
                                f"{overall.ci_high:+.4f} includes or is below 0)", numbers)
        if spec.determinate and determinate is not None and not determinate.ci_low > 0:
            return GateDecision(False, f"{selected} beats the ImmunoSep rule overall but not on "
                                f"the patients the rule can type ({spec.rule_metric} "
                                f"{determinate.value:+.4f}, paired 95% CI "
                                f"{determinate.ci_low:+.4f} to {determinate.ci_high:+.4f}): its "
                                "lead is the rule's abstentions", numbers)
        if spec.two_marker == "require" and two is not None and not two.ci_low > 0:
            return GateDecision(False, f"{selected} does not beat the two-marker reference on "
                                f"{spec.rule_metric} ({two.value:+.4f}, paired 95% CI "
                                f"{two.ci_low:+.4f} to {two.ci_high:+.4f}): the markers beyond "
                                "ferritin and HLA-DR add nothing measurable", numbers)
        passed = (f"beats the ImmunoSep rule on {spec.rule_metric} ({overall.value:+.4f}"
                  + (f"; {determinate.value:+.4f} where the rule can type"
                     if determinate is not None else "")
                  + (f"; {two.value:+.4f} against the two-marker reference" if two is not None
                     else "") + ")")
    return _against_champion(passed, table, selected, metric, higher_better, spec,
                             champion_version, numbers)

def _by_outcomes(result: TrainingResult, table: Any, champion_version: str | None
                 ) -> GateDecision:
    """A label-free model with outcome columns: promoted when treating by it beats treating by
    the ImmunoSep rule on the first outcome's policy value (paired 95% CI on the better side
    of 0), and it is no worse than the champion's by more than `champion_tolerance`."""
    spec, selected = result.spec, result.selected
    outcome = spec.outcomes[0]
    higher = spec.higher_is_better.get(outcome, HIGHER_IS_BETTER.get(outcome, True))
    metric = f"policy_value_{outcome}"
    numbers: dict[str, float | str] = {"gate": "policy value (label-free)", "outcome": outcome}
    key = (selected, f"{metric}_minus_{REFERENCE_RULE}", "all")
    if key not in table.index:
        return GateDecision(False, "the phenotypes were learned without labels and the cohort "
                            "has no treatment column, so no policy value compares treating by "
                            f"{selected} with treating by the ImmunoSep rule; prognosis alone "
                            "cannot show it picks the right patients for the right drug. "
                            "Registered, not promoted", numbers)
    row = table.loc[key]
    numbers.update({"policy_difference": float(row.value),
                    "policy_difference_ci_low": float(row.ci_low),
                    "policy_difference_ci_high": float(row.ci_high)})
    better = row.ci_low > 0 if higher else row.ci_high < 0
    shown = (f"{metric} {row.value:+.4f} against the rule (paired 95% CI {row.ci_low:+.4f} to "
             f"{row.ci_high:+.4f}; {'higher' if higher else 'lower'} is better)")
    if not better:
        return GateDecision(False, f"treating by {selected} (learned without labels) does not "
                            f"beat treating by the ImmunoSep rule: {shown}", numbers)
    passed = f"treating by {selected} (learned without labels) beats the rule: {shown}"
    return _against_champion(passed, table, selected, metric, higher, spec, champion_version,
                             numbers)


def _against_champion(passed: str, table: Any, selected: str, metric: str, higher_better: bool,
                      spec: Any, champion_version: str | None,
                      numbers: dict[str, float | str]) -> GateDecision:
    """A model that passed the gate's test: promoted unless it is worse than the current
    champion on `metric` by more than `champion_tolerance` (or the champion cannot be judged)."""
    if champion_version is None:
        return GateDecision(True, f"{passed}; no champion yet", numbers)
    numbers["champion_version"] = champion_version
    if (CHAMPION, metric, "all") not in table.index:
        return GateDecision(False, f"the current champion (version {champion_version}) could "
                            "not be judged on this test set; promote by hand if intended",
                            numbers)
    current = float(table.loc[(CHAMPION, metric, "all"), "value"])
    challenger = float(table.loc[(selected, metric, "all"), "value"])
    numbers["champion_value"] = current
    margin = (current - challenger) if higher_better else (challenger - current)
    if margin > spec.champion_tolerance:
        return GateDecision(False, f"worse than champion version {champion_version} on "
                            f"{metric} ({challenger:.4f} vs {current:.4f}, tolerance "
                            f"{spec.champion_tolerance})", numbers)
    return GateDecision(True, f"{passed}, and is within {spec.champion_tolerance} of champion "
                        f"version {champion_version} on {metric} ({challenger:.4f} vs "
                        f"{current:.4f})", numbers)
