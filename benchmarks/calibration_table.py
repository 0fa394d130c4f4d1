"""The presets' calibration: target vs simulated rule shares and mortality at n = 20000.

Writes benchmarks/results/calibration_table.json and prints a Markdown table. Each preset is
simulated with seeds 0..S-1; the table gives the mean over seeds and the largest deviation.

    .venv/bin/python benchmarks/calibration_table.py [--seeds 20] [--n 20000]
"""

from __future__ import annotations

import argparse

import numpy as np
from results_file import write_results  # benchmarks/ is on sys.path when run

from phenotyper.simulate import available_presets, load_preset, mortality_by_rule, rule_shares
from phenotyper.simulate import simulate as simulate_cohort


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--n", type=int, default=20_000)
    args = parser.parse_args()

    records = []
    for name in available_presets():
        targets = load_preset(name)["targets"]
        runs = [simulate_cohort(name, args.n, seed) for seed in range(args.seeds)]
        for quantity, measure in (("rule_share", rule_shares), ("mortality_by_rule",
                                                                mortality_by_rule)):
            observed = [measure(run) for run in runs]
            for phenotype, target in targets[quantity].items():
                values = np.array([o[phenotype] for o in observed])
                records.append({
                    "preset": name, "quantity": quantity, "phenotype": phenotype,
                    "target_pct": round(100 * target, 1),
                    "simulated_mean_pct": round(100 * values.mean(), 2),
                    "max_abs_deviation_pp": round(100 * np.abs(values - target).max(), 2),
                })
    write_results("calibration_table", {"n": args.n, "seeds": args.seeds, "rows": records})
    print(f"n = {args.n}, seeds 0..{args.seeds - 1}\n")
    print("| preset | quantity | phenotype | target % | simulated mean % | max abs dev (pp) |")
    print("|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['preset']} | {r['quantity']} | {r['phenotype']} | {r['target_pct']} | "
              f"{r['simulated_mean_pct']} | {r['max_abs_deviation_pp']} |")


if __name__ == "__main__":
    main()
