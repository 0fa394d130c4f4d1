"""The presets' calibration: each target a preset claims beside its simulated value, n = 20000.

Rule shares and mortality by the rule's answer (in a trial, expected mortality on standard
care) and, in a trial, SOFA response and death by arm: `simulate.calibration_checks`, the
quantities `phenotyper simulate` prints. Targets a preset disowns (`{}`, e.g. a sensitivity
preset's) are left out. Writes benchmarks/results/calibration_table.json and prints a Markdown
table. Each preset is simulated with seeds 0..S-1; the table gives the mean over seeds and the
largest deviation.

    .venv/bin/python benchmarks/calibration_table.py [--seeds 20] [--n 20000]
"""

from __future__ import annotations

import argparse

import numpy as np
from results_file import write_results  # benchmarks/ is on sys.path when run

from phenotyper.simulate import available_presets, calibration_checks, load_preset
from phenotyper.simulate import simulate as simulate_cohort


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--n", type=int, default=20_000)
    args = parser.parse_args()

    records = []
    for name in available_presets():
        preset = load_preset(name)
        runs = [calibration_checks(preset, simulate_cohort(preset, args.n, seed))
                for seed in range(args.seeds)]
        for position, check in enumerate(runs[0]):
            if check.target is None:
                continue
            values = np.array([run[position].simulated for run in runs])
            records.append({
                "preset": name, "quantity": check.quantity, "phenotype": check.group,
                "target_pct": round(100 * check.target, 1),
                "simulated_mean_pct": round(100 * values.mean(), 2),
                "max_abs_deviation_pp": round(100 * np.abs(values - check.target).max(), 2),
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
