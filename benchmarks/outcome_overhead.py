"""What the outcome section adds to a benchmark: the issue asks for under 30% at 20,000
patients and 1,000 resamples.

One `--n`-patient cohort per preset is judged against `label="phenotype_true"` by the reference
rules and a logistic candidate (every panel marker present, C = 1, fitted on another `--n`-patient
draw of the same preset), with the default re-measurement (`--noise-repeats`, 20) and
`--resamples` bootstrap resamples: once without outcomes and once with
`outcomes=OutcomeSpec(("sofa_response", "death_28d"), ...)`. The two runs alternate within each
of `--rounds` rounds (the order flips every round) and the overhead is the median over rounds of
(with / without - 1), a ratio inside one run that a noisy machine leaves comparable.

- `all-comers-trial`: known propensity (`treatment_probability`) -> IPW;
- `confounded-treatment`: no propensity -> cross-fitted AIPW (reported separately).

Where the time goes: the outcome section's parts are timed on their own in each round (reading
the columns, the AIPW nuisance fit or the trial's positivity shares, the whole `OutcomeScorer`
construction, its regressions, the bootstrap products `values(weights)`, and `records`);
bootstrap weights are drawn by the benchmark for the label section anyway, so they are timed
apart and not charged to outcomes.
Above the target (or with `--profile`) the with-outcomes benchmark is run under cProfile and
the top functions are printed and stored. Writes benchmarks/results/outcome_overhead.json and
prints a Markdown table.

    .venv/bin/python benchmarks/outcome_overhead.py [--n 20000] [--resamples 1000] [--rounds 3]
        [--noise-repeats 20] [--presets all-comers-trial confounded-treatment] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from typing import Any

import numpy as np
from results_file import code_version, write_results  # benchmarks/ is on sys.path when run

from phenotyper.contract import DEATH_28D, SOFA_RESPONSE, TREATMENT_PROBABILITY, TRUE_PHENOTYPE
from phenotyper.evaluate.benchmark import benchmark, predict
from phenotyper.evaluate.bootstrap import _interval, bootstrap_weights, resampling_groups
from phenotyper.evaluate.outcomes import (
    AIPW,
    OutcomeScorer,
    OutcomeSpec,
    cross_fit,
    read_outcomes,
    stratum_support,
)
from phenotyper.models import build_candidate
from phenotyper.panel import PANEL, PATIENT_ID
from phenotyper.rules import reference_rules
from phenotyper.simulate import simulate

OUTCOMES = (SOFA_RESPONSE, DEATH_28D)
SPECS = {
    "all-comers-trial": OutcomeSpec(OUTCOMES, propensity=TREATMENT_PROBABILITY),
    "confounded-treatment": OutcomeSpec(OUTCOMES),
}
TARGET = 0.30
REFERENCE = "immunosep"
COHORT_SEED, TRAINING_SEED = 1, 2


def phenotypers(preset: str, n: int) -> tuple[Any, dict[str, Any], list[str]]:
    cohort = simulate(preset, n, seed=COHORT_SEED)
    training = simulate(preset, n, seed=TRAINING_SEED)
    features = [c for c in PANEL if c in training and training[c].notna().any()]
    logistic = build_candidate("logistic", features, {"C": 1.0}).fit(
        training, training[TRUE_PHENOTYPE])
    judged = {name: rule.fit(cohort) for name, rule in reference_rules().items()}
    judged["logistic"] = logistic
    return cohort, judged, features


def timed(call: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def parts(cohort: Any, judged: dict[str, Any], spec: OutcomeSpec, n_boot: int
          ) -> dict[str, float]:
    """Seconds of each piece of the outcome section, done as `benchmark` does it."""
    labels = {name: predict(est, cohort).labels for name, est in judged.items()}
    groups, _ = resampling_groups(cohort[PATIENT_ID])
    out: dict[str, float] = {}
    out["read_outcomes"], data = timed(lambda: read_outcomes(cohort, spec))
    if data.method == AIPW:
        out["nuisance_cross_fit"], _ = timed(lambda: cross_fit(cohort, data, groups, 0))
    else:
        out["positivity_stratum_support"], _ = timed(lambda: stratum_support(cohort, data))
    out["scorer_construction"], scorer = timed(
        lambda: OutcomeScorer(cohort, spec, labels, REFERENCE, groups, 0))
    out["of_which_regressions"], _ = timed(scorer._regressions)
    weights_s = values_s = 0.0
    samples = []
    start = time.perf_counter()
    for weights in bootstrap_weights(groups, n_boot, 0):
        drawn = time.perf_counter()
        samples.append(scorer.values(weights))
        values_s += time.perf_counter() - drawn
    weights_s = time.perf_counter() - start - values_s
    out["bootstrap_values"] = values_s
    ones = np.ones((1, len(cohort)))
    out["records"], _ = timed(lambda: scorer.records(scorer.values(ones), np.concatenate(samples),
                                                     _interval))
    out["bootstrap_weights_shared"] = weights_s  # drawn for the label section anyway
    out["n_contrasts"] = len(scorer.plan.contrasts)
    out["n_ratios"] = len(scorer.plan.numerators)
    return out


def profile(call: Any, top: int = 20) -> dict[str, Any]:
    profiler = cProfile.Profile()
    profiler.enable()
    call()
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = []
    for (file, line, function), (_, calls, tottime, cumtime, _) in stats.stats.items():
        rows.append({"function": f"{file.split('/site-packages/')[-1]}:{line}({function})",
                     "calls": calls, "tottime_s": round(tottime, 3),
                     "cumtime_s": round(cumtime, 3)})
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(top)
    return {"by_tottime": sorted(rows, key=lambda r: -r["tottime_s"])[:top],
            "by_cumtime": sorted(rows, key=lambda r: -r["cumtime_s"])[:top],
            "text": text.getvalue()}


def study(preset: str, args: argparse.Namespace) -> dict[str, Any]:
    spec = SPECS[preset]
    cohort, judged, features = phenotypers(preset, args.n)

    def run(outcomes: OutcomeSpec | None) -> float:
        seconds, _ = timed(lambda: benchmark(judged, cohort, label=TRUE_PHENOTYPE,
                                             n_boot=args.resamples, seed=0,
                                             noise_repeats=args.noise_repeats,
                                             outcomes=outcomes))
        return seconds

    rounds = []
    for r in range(args.rounds):
        if r % 2 == 0:
            without = run(None)
            with_outcomes = run(spec)
        else:
            with_outcomes = run(spec)
            without = run(None)
        pieces = parts(cohort, judged, spec, args.resamples)
        rounds.append({"without_s": without, "with_s": with_outcomes,
                       "overhead": with_outcomes / without - 1, "parts_s": pieces})
        print(f"  {preset} round {r + 1}: without {without:.1f} s, with {with_outcomes:.1f} s, "
              f"overhead {with_outcomes / without - 1:+.1%}", flush=True)
    overhead = float(np.median([r["overhead"] for r in rounds]))
    without = float(np.median([r["without_s"] for r in rounds]))
    part_names = [k for k in rounds[0]["parts_s"] if not k.startswith("n_")]
    median_parts = {k: float(np.median([r["parts_s"][k] for r in rounds])) for k in part_names}
    outcome_s = (median_parts["scorer_construction"] + median_parts["bootstrap_values"]
                 + median_parts["records"])
    result = {
        "preset": preset, "method": read_outcomes(cohort, spec).method, "n": args.n,
        "resamples": args.resamples, "noise_repeats": args.noise_repeats,
        "phenotypers": list(judged), "logistic_features": features,
        "n_contrasts": rounds[0]["parts_s"]["n_contrasts"],
        "n_ratios": rounds[0]["parts_s"]["n_ratios"],
        "rounds": rounds, "median_overhead": overhead, "target": TARGET,
        "meets_target": overhead < TARGET,
        "median_without_s": without,
        "median_parts_s": median_parts,
        # each part of the outcome section as a share of the benchmark without outcomes
        "parts_over_without": {k: v / without for k, v in median_parts.items()},
        "outcome_parts_over_without": outcome_s / without,
    }
    if args.profile or overhead >= TARGET:
        result["profile_with_outcomes"] = profile(
            lambda: benchmark(judged, cohort, label=TRUE_PHENOTYPE, n_boot=args.resamples,
                              seed=0, noise_repeats=args.noise_repeats, outcomes=spec))
        print(result["profile_with_outcomes"]["text"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--noise-repeats", type=int, default=20)
    parser.add_argument("--presets", nargs="+", choices=list(SPECS), default=list(SPECS))
    parser.add_argument("--profile", action="store_true",
                        help="profile the with-outcomes benchmark even below the target")
    args = parser.parse_args()

    studies = [study(preset, args) for preset in args.presets]
    path = write_results("outcome_overhead", {"code": code_version(), "studies": studies})

    print(f"\nn = {args.n:,}, {args.resamples} resamples, noise_repeats = {args.noise_repeats}, "
          f"{len(studies[0]['phenotypers'])} phenotypers, median of {args.rounds} rounds; "
          f"target overhead < {TARGET:.0%}\n")
    print("| preset | method | without (s) | with (s) per round | overhead per round | "
          "median overhead | target |")
    print("|---|---|---|---|---|---|---|")
    for s in studies:
        without = ", ".join(f"{r['without_s']:.1f}" for r in s["rounds"])
        with_outcomes = ", ".join(f"{r['with_s']:.1f}" for r in s["rounds"])
        overheads = ", ".join(f"{r['overhead']:+.1%}" for r in s["rounds"])
        print(f"| {s['preset']} | {s['method']} | {without} | {with_outcomes} | {overheads} | "
              f"**{s['median_overhead']:+.1%}** | {'met' if s['meets_target'] else 'MISSED'} |")
    print("\nWhere the outcome section's time goes (median seconds over rounds, and as a share "
          "of the benchmark without outcomes):\n")
    names = list(dict.fromkeys(name for s in studies for name in s["median_parts_s"]))
    print("| part | " + " | ".join(f"{s['preset']} ({s['method']})" for s in studies) + " |")
    print("|---|" + "---|" * len(studies))
    for name in names:
        cells = [f"{s['median_parts_s'][name]:.2f} s ({s['parts_over_without'][name]:.1%})"
                 if name in s["median_parts_s"] else "-" for s in studies]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("| construction + values + records | " + " | ".join(
        f"{s['outcome_parts_over_without']:.1%}" for s in studies) + " |")
    print("| contrasts / ratios in the plan | " + " | ".join(
        f"{s['n_contrasts']} / {s['n_ratios']}" for s in studies) + " |")
    print(f"\nWritten to {path}")


if __name__ == "__main__":
    main()
