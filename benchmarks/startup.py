"""Start-up of the `phenotyper` command against `python -c "import typer, rich"`, in one run.

Each round runs every command once, in a shuffled order, as a fresh process (what a user
waits for); the table gives the median wall time over rounds and its ratio to the anchor's
median, and which heavy libraries each command imported (`-X importtime`). The target:
`phenotyper --help` and each command's `--help` within 1.5x of the anchor; `validate` without
MLflow, XGBoost, numba or scikit-learn. Writes benchmarks/results/startup.json.

    .venv/bin/python benchmarks/startup.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_file import code_version, write_results  # benchmarks/ is on sys.path when run

HEAVY = ("numpy", "pandas", "pyarrow", "scipy", "sklearn", "matplotlib", "numba", "xgboost",
         "mlflow")
COMMANDS = ("validate", "simulate", "benchmark", "train", "promote", "model-card", "serve",
            "score", "explain")
ENTRY = "from phenotyper.cli import app; app()"
# What Typer itself costs to render a help page (Typer >= 0.29 builds pydantic adapters for
# the parameters): a one-command app with one option, the floor any Typer CLI starts from.
TYPER_FLOOR = ("import typer\napp = typer.Typer()\n@app.command()\ndef run(n: int = 1):\n"
               "    pass\n@app.command()\ndef other(): pass\napp()")


def _run(arguments: list[str]) -> tuple[float, set[str]]:
    """Wall time of a fresh interpreter running `arguments`, and the heavy top-level modules
    it imported."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-X", "importtime", *arguments],
                          capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{arguments} failed: {done.stderr[-2000:]}")
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0]
                for line in done.stderr.splitlines() if line.startswith("import time:")}
    return elapsed, imported & set(HEAVY)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        cohort = Path(folder) / "cohort.csv"
        subprocess.run([sys.executable, "-c", ENTRY, "simulate", "--n", "2000", "--output",
                        str(cohort)], check=True, capture_output=True)
        cases = {"import typer, rich": ["-c", "import typer, rich"],
                 "two-command Typer app --help": ["-c", TYPER_FLOOR, "--help"],
                 "phenotyper --help": ["-c", ENTRY, "--help"],
                 **{f"phenotyper {c} --help": ["-c", ENTRY, c, "--help"] for c in COMMANDS},
                 "phenotyper validate (2,000 rows)": ["-c", ENTRY, "validate", str(cohort)]}
        times: dict[str, list[float]] = {name: [] for name in cases}
        modules: dict[str, set[str]] = {}
        rng = random.Random(0)
        for _ in range(args.rounds):
            order = list(cases)
            rng.shuffle(order)
            for name in order:
                elapsed, imported = _run(cases[name])
                times[name].append(elapsed)
                modules[name] = imported
    anchor = statistics.median(times["import typer, rich"])
    floor = statistics.median(times["two-command Typer app --help"])
    rows = [{"command": name, "median_s": round(statistics.median(t), 3),
             "ratio_to_anchor": round(statistics.median(t) / anchor, 2),
             "ratio_to_typer_floor": round(statistics.median(t) / floor, 2),
             "heavy_imports": sorted(modules[name])} for name, t in times.items()]
    write_results("startup", {"python": sys.version.split()[0], "rounds": args.rounds,
                              "code": code_version(), "rows": rows})
    print(f"Python {sys.version.split()[0]}, {args.rounds} rounds, medians\n")
    print("| command | wall (s) | x import typer, rich | x Typer app --help | heavy imports |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| `{row['command']}` | {row['median_s']:.2f} | {row['ratio_to_anchor']:.2f} | "
              f"{row['ratio_to_typer_floor']:.2f} | "
              f"{', '.join(row['heavy_imports']) or 'none'} |")


if __name__ == "__main__":
    main()
