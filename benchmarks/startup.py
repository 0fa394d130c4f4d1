"""Start-up of the `phenotyper` command against `python -c "import typer, rich"`, in one run.

Each round runs every command once, in a shuffled order, as a fresh process (what a user
waits for); the table gives the median wall time over rounds and its ratio to the anchor's
median, and which heavy libraries each command imported (`-X importtime`). The target:
`phenotyper --help` and each command's `--help` within 1.5x of the anchor; `validate` without
MLflow, XGBoost, numba or scikit-learn.

With `--score` it also trains a small XGBoost champion (300 rounds) into a throwaway store and
times a fresh `phenotyper score` of a one-patient CSV with explanations (the first explained
row) against `python -c "import mlflow.pyfunc, xgboost"`, interleaved: once with an empty
compiled-kernel cache (the kernels compile), then with the cache the first run left. The
target: the cached run within 1 s of the anchor. Writes benchmarks/results/startup.json.

    .venv/bin/python benchmarks/startup.py [--rounds 7] [--score]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_file import code_version, write_results  # benchmarks/ is on sys.path when run

PACKAGE = Path(__file__).resolve().parent.parent / "phenotyper"
HEAVY = ("numpy", "pandas", "pyarrow", "scipy", "sklearn", "matplotlib", "numba", "xgboost",
         "mlflow")
COMMANDS = ("validate", "simulate", "benchmark", "train", "promote", "model-card", "serve",
            "score", "explain")
ENTRY = "from phenotyper.cli import main; main()"
# What Typer itself costs to render a help page (Typer >= 0.29 builds pydantic adapters for
# the parameters): a one-command app with one option, the floor any Typer CLI starts from.
TRAIN = ("from phenotyper.runs.train import train\n"
         "from phenotyper.training.spec import ExperimentSpec\n"
         "train(ExperimentSpec(name='startup', registered_model='immunophenotyper', "
         "label='phenotype_true', preset='immunosep-screening', n=3000, candidates="
         "{'xgboost': {'max_depth': [3], 'n_estimators': [300]}}, bootstrap=20, "
         "noise_repeats=0))")
TYPER_FLOOR = ("import typer\napp = typer.Typer()\n@app.command()\ndef run(n: int = 1):\n"
               "    pass\n@app.command()\ndef other(): pass\napp()")


def _run(arguments: list[str], cwd: Path | None = None, env: dict | None = None
         ) -> tuple[float, set[str]]:
    """Wall time of a fresh interpreter running `arguments`, and the heavy top-level modules
    it imported."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-X", "importtime", *arguments],
                          capture_output=True, text=True, check=False, cwd=cwd, env=env)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{arguments} failed: {done.stderr[-2000:]}")
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0]
                for line in done.stderr.splitlines() if line.startswith("import time:")}
    return elapsed, imported & set(HEAVY)


def _score_rows(rounds: int) -> list[dict]:
    """Seconds to a fresh `phenotyper score`'s first explained row, cold and cached kernels,
    against importing MLflow's pyfunc and XGBoost."""
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        env = {**os.environ, "XDG_CACHE_HOME": str(root / "cache")}
        env.pop("MLFLOW_TRACKING_URI", None)
        subprocess.run([sys.executable, "-c", TRAIN], check=True, capture_output=True,
                       cwd=root, env=env)
        subprocess.run([sys.executable, "-c", ENTRY, "simulate", "--n", "1", "--output",
                        str(root / "one.csv")], check=True, capture_output=True)
        score = ["-c", ENTRY, "score", "--input", "one.csv", "--output", "one.parquet"]
        anchor_case = ["-c", "import mlflow.pyfunc, xgboost"]
        times: dict[str, list[float]] = {"import mlflow.pyfunc, xgboost": [],
                                         "phenotyper score, 1 row (kernels cached)": []}
        cold: list[float] = []
        for _ in range(rounds):
            shutil.rmtree(root / "cache", ignore_errors=True)
            cold.append(_run(score, root, env)[0])
            times["phenotyper score, 1 row (kernels cached)"].append(_run(score, root, env)[0])
            times["import mlflow.pyfunc, xgboost"].append(_run(anchor_case, root, env)[0])
        times["phenotyper score, 1 row (empty kernel cache)"] = cold
    anchor = statistics.median(times["import mlflow.pyfunc, xgboost"])
    return [{"command": name, "median_s": round(statistics.median(t), 3),
             "over_anchor_s": round(statistics.median(t) - anchor, 3)}
            for name, t in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--score", action="store_true")
    args = parser.parse_args()
    # as an installed package has it (pip compiles on install; PYTHONDONTWRITEBYTECODE, set
    # on some machines, would otherwise make every run compile phenotyper from source)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(PACKAGE)], check=True)

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
    score_rows = _score_rows(args.rounds) if args.score else []
    write_results("startup", {"python": sys.version.split()[0], "rounds": args.rounds,
                              "code": code_version(), "rows": rows, "score": score_rows})
    print(f"Python {sys.version.split()[0]}, {args.rounds} rounds, medians\n")
    print("| command | wall (s) | x import typer, rich | x Typer app --help | heavy imports |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| `{row['command']}` | {row['median_s']:.2f} | {row['ratio_to_anchor']:.2f} | "
              f"{row['ratio_to_typer_floor']:.2f} | "
              f"{', '.join(row['heavy_imports']) or 'none'} |")
    for row in score_rows:
        print(f"{row['command']}: {row['median_s']:.2f} s ({row['over_anchor_s']:+.2f} s over "
              "import mlflow.pyfunc, xgboost)")


if __name__ == "__main__":
    main()
