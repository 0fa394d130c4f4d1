"""A new hospital, simulated: drift, local recalibration and phenotype stability, measured.

Trains a champion on simulated PROVIDE-like patients into a throwaway store, then
1. scores a simulated month in which one site's CRP and ferritin read 4 and 3 times higher, and
   reports that site's drift table (the markers most moved first) next to an unshifted site's;
2. recalibrates on local labelled samples: a hospital like the training cohort (how often the
   joint test wrongly rejects, over seeds) and one with the ImmunoSep screening mix (how often
   it rejects, and held-out log loss and calibration statistic before and after), at several
   sample sizes;
3. scores a simulated second sample per patient and compares model, rule and latent truth
   stability between day 1 and day 2, beside the published 88.3% for the rule.
Synthetic data throughout: these numbers check the software, they are not clinical evidence.
Writes benchmarks/results/new_site.json.

    .venv/bin/python benchmarks/new_site.py [--seeds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import pandas as pd
from results_file import code_version, write_results  # benchmarks/ is on sys.path when run

from phenotyper.contract import PHENOTYPES
from phenotyper.runs.score import score_file
from phenotyper.runs.train import train
from phenotyper.scoring.request import ScoreRequest
from phenotyper.simulate import simulate
from phenotyper.tracking.registry import load_packaged, store_uri
from phenotyper.training.recalibration import recalibrate
from phenotyper.training.spec import ExperimentSpec

MODEL = "models:/immunophenotyper/1"


def _drift(folder: Path) -> dict:
    month = simulate("provide", 6000, seed=101).drop(columns=["synthetic"])
    sites = month["site_id"].value_counts().index
    shifted, steady = sites[0], sites[1]
    at = month["site_id"] == shifted
    month.loc[at, "crp_mg_l"] = (month.loc[at, "crp_mg_l"] * 4).clip(upper=1000)
    month.loc[at, "ferritin_ng_ml"] *= 3
    path = folder / "month.parquet"
    month.to_parquet(path)
    manifest = score_file(ScoreRequest(MODEL, path, folder / "month_scored.parquet",
                                       explain="none"))
    drift = manifest["drift"]
    keep = ("marker", "psi", "ks_at_deciles", "outside_share", "outside_share_training",
            "missing_shift", "beyond_threshold")
    return {"shifted_site": shifted, "shifted_rows": int(at.sum()), "steady_site": steady,
            "thresholds": drift["thresholds"],
            "shifted": [{k: row[k] for k in keep} for row in drift["by_site"][shifted][:6]],
            "steady": [{k: row[k] for k in keep} for row in drift["by_site"][steady][:3]],
            "overall": [{k: row[k] for k in keep} for row in drift["overall"][:3]]}


def _recalibration(seeds: int) -> dict:
    packaged = load_packaged(MODEL)
    columns = [f"prob_{p}" for p in PHENOTYPES]
    out: dict = {}
    for preset in ("provide", "immunosep-screening"):
        for n in (200, 500, 1000):
            runs = []
            for seed in range(seeds):
                local = simulate(preset, n, seed=1000 + seed)
                proba = packaged.predict(local, explain="none")[columns].to_numpy()
                codes = pd.Categorical(local["phenotype_true"], categories=PHENOTYPES).codes
                result = recalibrate(codes, proba, seed=seed)
                runs.append({"p_value": result.before.p_value, "refit": result.refit,
                             "improves": result.improves, **(result.held_out or {})})
            table = pd.DataFrame(runs)
            refits = table[table.refit]
            out[f"{preset}_n{n}"] = {
                "seeds": seeds, "rejected_share": float(table.refit.mean()),
                "improved_share_of_refits": float(refits.improves.mean()) if len(refits)
                else None,
                **({key: float(refits[key].median()) for key in (
                    "log_loss_before", "log_loss_after", "statistic_before",
                    "statistic_after")} if len(refits) else {})}
    return out


def _stability(folder: Path) -> dict:
    both = simulate("provide", 5000, seed=202, samples=2)
    path = folder / "two_days.parquet"
    both.to_parquet(path)
    manifest = score_file(ScoreRequest(MODEL, path, folder / "two_days_scored.parquet",
                                       explain="none"))
    day1, day2 = both.iloc[::2], both.iloc[1::2]
    truth = float((day1["phenotype_true"].to_numpy() == day2["phenotype_true"].to_numpy()
                   ).mean())
    repeated = manifest["repeated_samples"]
    return {"patients": repeated["patients_with_repeats"],
            "model_kept_share": repeated["model"]["kept_share"],
            "rule_kept_share": repeated["rule"]["kept_share"],
            "rule_pairs": repeated["rule"]["pairs"],
            "truth_kept_share": truth,
            "published_rule_kept_share": repeated["published_rule_kept_share"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        os.chdir(folder)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        train(ExperimentSpec(name="new-site", registered_model="immunophenotyper",
                             label="phenotype_true", preset="provide", n=4000, cohort_seed=6,
                             candidates={"xgboost": {"max_depth": [3], "n_estimators": [200],
                                                     "learning_rate": [0.05]}},
                             bootstrap=20, noise_repeats=0), store_uri())
        results = {"synthetic": True, "training": "preset provide, n=4000, seed 6, xgboost",
                   "drift": _drift(folder), "recalibration": _recalibration(args.seeds),
                   "stability": _stability(folder), "code": code_version()}
    path = write_results("new_site", results)
    print(json.dumps(results, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
