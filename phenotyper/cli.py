"""The `phenotyper` command: parses arguments, calls one library function, prints."""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.progress import ProgressColumn, Task
from rich.table import Table
from rich.text import Text

from phenotyper.contract import (
    BLOCK_ROWS,
    DEFAULT_MODEL_URI,
    SKIP_ROW,
    SYNTHETIC_BANNER,
    SYNTHETIC_MODEL_BANNER,
)
from phenotyper.presets import available_presets

if TYPE_CHECKING:
    import pandas as pd

    from phenotyper.cohort import QualityReport
    from phenotyper.evaluate.benchmark import Benchmark
    from phenotyper.simulate import Preset
    from phenotyper.training.results import LatentResult

# Each command imports the layers it drives when it runs, not here: `phenotyper --help` and a
# light command (`validate`) then load no numpy, scikit-learn, MLflow or XGBoost they do not use.
app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


INTERRUPTED_EXIT_CODE = 130  # the shell's code for Ctrl-C (128 + SIGINT)


def exit_with_error(message: str) -> NoReturn:
    """Print a one-paragraph red error on stderr (no traceback) and exit with status 2."""
    Console(stderr=True).print(Text(f"Error: {message}", style="bold red"), soft_wrap=True)
    raise typer.Exit(2)


def file_destination(path: Path, example: str) -> Path:
    """`path` if a file can be written there, else exit 2 saying so (a folder, '.')."""
    if path.is_dir() or path.name in ("", ".", ".."):
        exit_with_error(f"{path} is a folder; give a file name, e.g. {path / example}.")
    return path


@app.command()
def validate(
    path: Annotated[Path, typer.Argument(help="Cohort file: CSV, TSV, TXT or Parquet.")],
    mapping: Annotated[Path | None, typer.Option(
        help="TOML file mapping the file's columns and units to the panel's.")] = None,
    issues_out: Annotated[Path | None, typer.Option(
        help="Write every row-level issue to this CSV file.")] = None,
) -> None:
    """Read a cohort file and print its data-quality report."""
    from phenotyper.cohort import CohortError, quality_report, read_cohort

    try:
        cohort = read_cohort(path, mapping)
    except CohortError as error:
        exit_with_error(str(error))
    _print_report(quality_report(cohort))
    if issues_out is not None:
        try:
            cohort.issues.to_csv(issues_out, index=False)
        except OSError as error:
            exit_with_error(f"Cannot write the issue list to {issues_out}: {error.strerror}.")
        Console().print(Text(f"Wrote {len(cohort.issues):,} issues to {issues_out}."))


@app.command()
def simulate(
    output: Annotated[Path, typer.Option(help="Where to write the cohort: .parquet or .csv.")],
    preset: Annotated[str, typer.Option(
        help=f"Simulator preset: {', '.join(available_presets())}.")
    ] = "immunosep-screening",
    n: Annotated[int, typer.Option(min=1, help="Number of patients.")] = 20_000,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same rows.")] = 0,
    samples: Annotated[int, typer.Option(
        min=1, max=2, help="Samples per patient: 2 adds a day-2 sample (sample_time 1 and 2; "
                           "the preset's [repeat] assumptions).")] = 1,
) -> None:
    """Write a synthetic cohort drawn from a calibrated preset (synthetic data, not evidence)."""
    from phenotyper import simulate as simulator
    from phenotyper.cohort import CohortError, write_table

    try:
        frame = simulator.simulate(preset, n, seed, samples)
        write_table(frame, output)
    except (simulator.PresetError, CohortError) as error:
        exit_with_error(str(error))
    except OSError as error:
        exit_with_error(f"Cannot write {output}: {error.strerror}.")
    _print_calibration(simulator.load_preset(preset), frame)
    Console().print(Text(f"Wrote {len(frame):,} synthetic "
                         + (f"samples of {n:,} patients" if samples > 1 else "patients")
                         + f" to {output}."))


@app.command()
def benchmark(
    cohort: Annotated[Path, typer.Option(help="Held-out cohort: CSV, TSV, TXT or Parquet.")],
    output: Annotated[Path, typer.Option(
        help="Folder for benchmark.json, benchmark.md and the figures.")],
    label: Annotated[str | None, typer.Option(
        help="Column with the reference phenotype (e.g. phenotype_true). Optional when "
             "--outcome is given.")] = None,
    outcome: Annotated[list[str] | None, typer.Option(
        help="0/1 outcome column to judge phenotypers by (e.g. sofa_response, death_28d); "
             "repeat for several, the first heads the tables.")] = None,
    treatment: Annotated[str | None, typer.Option(
        help="Column with the arm received (anakinra, interferon_gamma, placebo; empty if not "
             "randomised): treatment effects and policy values.")] = None,
    propensity: Annotated[str | None, typer.Option(
        help="Column with the probability of the arm received (a trial's allocation). Without "
             "it, policy values are doubly robust (AIPW).")] = None,
    higher_is_better: Annotated[list[str] | None, typer.Option(
        help="An outcome (other than sofa_response or death_28d) for which higher is better; "
             "repeatable.")] = None,
    lower_is_better: Annotated[list[str] | None, typer.Option(
        help="An outcome for which lower is better; repeatable.")] = None,
    mapping: Annotated[Path | None, typer.Option(
        help="TOML file mapping the file's columns, units and labels to the panel's.")] = None,
    bootstrap: Annotated[int, typer.Option(
        min=10, help="Bootstrap resamples (by patient) for the 95% intervals.")] = 1000,
    noise_repeats: Annotated[int, typer.Option(
        min=0, help="Re-measurements per assay-noise scenario (0 skips robustness).")] = 20,
    seed: Annotated[int, typer.Option(help="Seed for resampling and re-measurement.")] = 0,
    model: Annotated[list[str] | None, typer.Option(
        help="MLflow model URI to judge beside the rules (models:/NAME@ALIAS, runs:/ID/model); "
             "repeat for several.")] = None,
) -> None:
    """Judge the fixed-threshold rules (and models) side by side, by a reference label and by
    outcomes, with confidence intervals."""
    if label is None and not outcome:
        exit_with_error("Give a reference label (--label) or outcome columns (--outcome), or "
                        "both.")
    if treatment is None and propensity is not None:
        exit_with_error("--propensity needs --treatment (the arm whose probability it is).")
    both = set(higher_is_better or []) & set(lower_is_better or [])
    if both:
        exit_with_error(f"{', '.join(sorted(both))}: give --higher-is-better or "
                        "--lower-is-better, not both.")
    from phenotyper.cohort import CohortError, read_cohort
    from phenotyper.evaluate.benchmark import EvaluationError
    from phenotyper.evaluate.benchmark import benchmark as run_benchmark
    from phenotyper.evaluate.outcomes import OutcomeError, OutcomeSpec
    from phenotyper.report.benchmark import write_benchmark
    from phenotyper.rules import reference_rules
    from phenotyper.simulate import is_synthetic

    directions = {**{name: True for name in higher_is_better or []},
                  **{name: False for name in lower_is_better or []}}
    try:
        spec = (OutcomeSpec(tuple(outcome), treatment, propensity, directions) if outcome
                else None)
    except OutcomeError as error:
        exit_with_error(str(error))
    try:
        read = read_cohort(cohort, mapping)
        data = read.data
        phenotypers = {name: rule.fit(data) for name, rule in reference_rules().items()}
        phenotypers.update(_load_models(model or []))
        result = run_benchmark(phenotypers, data, label, n_boot=bootstrap, seed=seed,
                               noise_repeats=noise_repeats,
                               synthetic=is_synthetic(data), outcomes=spec,
                               label_recode=read.label_recode)
        written = write_benchmark(result, output, source=str(cohort))
    except (CohortError, EvaluationError) as error:
        exit_with_error(str(error))
    except OSError as error:
        exit_with_error(f"Cannot write the benchmark to {output}: {error.strerror}.")
    _print_headline(result)
    Console().print(Text(f"Wrote {', '.join(path.name for path in written)} to {output}."))


@app.command()
def train(
    experiment: Annotated[Path | None, typer.Argument(
        help="Experiment TOML file (see experiments/). Omit to run the defaults on --cohort.")
    ] = None,
    cohort: Annotated[Path | None, typer.Option(
        help="Cohort file in panel columns, for a run of the defaults without a TOML.")] = None,
    label: Annotated[str | None, typer.Option(
        help="Column with the reference phenotype (with --cohort).")] = None,
    name: Annotated[str | None, typer.Option(
        help="Registered model name (with --cohort).")] = None,
    mapping: Annotated[Path | None, typer.Option(
        help="TOML mapping of the cohort's columns and units (with --cohort).")] = None,
    supervision: Annotated[str | None, typer.Option(
        help="Learn latent classes (with --cohort): none (no labels), partial (a few in "
             "--label) or noisy-rule (start from the ImmunoSep rule).")] = None,
) -> None:
    """Train, benchmark against the rules, log to MLflow, register, and apply the gate."""
    from phenotyper.cohort import CohortError
    from phenotyper.evaluate.benchmark import EvaluationError
    from phenotyper.runs.train import train as run_training
    from phenotyper.simulate import PresetError
    from phenotyper.tracking.registry import store_uri
    from phenotyper.training.label_free import LATENT
    from phenotyper.training.spec import SUPERVISED, ExperimentError, default_spec, load_spec

    try:
        if experiment is not None:
            if cohort or label or name or supervision:
                exit_with_error("Give either an experiment file or --cohort/--label/--name"
                                "/--supervision.")
            spec = load_spec(experiment)
        elif cohort and name and (label or supervision):
            spec = default_spec(cohort, label, name, mapping, supervision or SUPERVISED)
        else:
            exit_with_error("Give an experiment file, or --cohort and --name with --label "
                            "(supervised) or --supervision none|partial|noisy-rule.")
        outcome = run_training(spec, store_uri())
    except (ExperimentError, CohortError, EvaluationError, PresetError) as error:
        exit_with_error(str(error))
    shown = ["immunosep", LATENT, *outcome.result.candidates, "two_marker", "champion"]
    _print_headline(outcome.result.benchmark, shown)
    console = Console()
    labels = outcome.result.labels  # what the label said, what was left out and why
    if outcome.result.latent is not None:
        _print_latent(console, outcome.result.latent)
    elif labels:
        left_out = labels["n_unlabelled"] + labels["n_unreadable"]
        console.print(Text(labels["summary"], style="yellow" if left_out else ""))
        if labels.get("warning"):
            console.print(Text(f"Warning: {labels['warning']}", style="bold yellow"))
    verdict = "promoted to champion" if outcome.decision.promote else "not promoted"
    console.print(Text(
        f"Registered {outcome.model_name} version {outcome.version} (alias challenger): "
        f"{verdict}. {outcome.decision.reason}.", style="bold"))
    console.print(Text(f"Tracking: {outcome.tracking_uri}  run {outcome.run_id}. Browse with: "
                       f"mlflow ui --backend-store-uri {outcome.tracking_uri}"))


def _print_latent(console: Console, latent: LatentResult) -> None:
    """What a label-free training found: BIC's choice, the named classes, stability."""
    sizes = ", ".join(f"{p} {n:,}" for p, n in latent.sizes.items())
    console.print(Text(
        f"Latent classes ({latent.mode}): BIC prefers {latent.preferred_k} classes; three "
        f"fitted and named by their profiles ({sizes} training patients)."))
    if latent.stability.get("refits"):
        console.print(Text(f"Stability: {latent.stability['kept_mean']:.1%} of patients kept "
                           f"their class over {latent.stability['refits']} bootstrap refits."))
    for warning in latent.warnings:
        console.print(Text(f"Warning: {warning}.", style="bold yellow"))


@app.command()
def promote(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Version to make champion.")],
) -> None:
    """Move the champion alias to a registered version by hand (the gate is bypassed)."""
    from mlflow.exceptions import MlflowException

    from phenotyper.tracking.registry import promote as move_champion
    from phenotyper.tracking.registry import store_uri, using_store

    uri = store_uri()
    try:
        with using_store(uri) as client:
            previous = move_champion(client, name, version)
    except MlflowException as error:
        exit_with_error(f"Cannot promote {name} version {version} in {uri}: {error.message}")
    Console().print(Text(f"{name}@champion -> version {version} (was {previous or 'unset'})."))


@app.command()
def recalibrate(
    cohort: Annotated[Path, typer.Option(
        help="Local labelled cohort: CSV, TSV, TXT or Parquet.")],
    label: Annotated[str, typer.Option(help="Column with each patient's phenotype.")],
    model: Annotated[str, typer.Option(
        help="Registered model: models:/NAME@ALIAS or models:/NAME/VERSION.")] =
        DEFAULT_MODEL_URI,
    mapping: Annotated[Path | None, typer.Option(
        help="TOML mapping of the cohort's columns, units and labels.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the cross-fitting folds.")] = 0,
) -> None:
    """Test a registered model's calibration on local labelled patients; if it is off, register
    a recalibrated version (tagged with its parent), champion only if it beats the parent on
    held-out local patients."""
    from mlflow.exceptions import MlflowException

    from phenotyper.cohort import CohortError
    from phenotyper.runs.recalibrate import recalibrate_model
    from phenotyper.tracking.registry import store_uri
    from phenotyper.training.recalibration import RecalibrationError

    try:
        outcome = recalibrate_model(model, cohort, label, mapping, seed, store_uri())
    except (CohortError, RecalibrationError) as error:
        exit_with_error(str(error))
    except MlflowException as error:
        exit_with_error(f"Cannot load model {model}: {error.message}")
    console = Console()
    result, parent = outcome.result, outcome.parent
    console.print(Text(_model_line(parent)))
    console.print(Text(outcome.labels))
    counts = ", ".join(f"{p} {n:,}" for p, n in result.counts.items())
    console.print(Text(f"Local patients: {counts}"
                       + (f" ({outcome.n_unscored:,} labelled rows the model could not score "
                          "left out)" if outcome.n_unscored else "") + "."))
    if outcome.warning:
        Console(stderr=True).print(Text(f"Warning: {outcome.warning}.", style="bold yellow"))
    console.print(Text(f"Calibration: {result.before.describe()}."))
    if not result.refit:
        console.print(Text(f"Version {parent['version']} is kept as it is; nothing registered.",
                           style="bold"))
        return
    held = result.held_out
    table = Table(title=f"Held out ({held['folds']}-fold cross-fitting on the local patients; "
                        "lower is better)", title_justify="left")
    for column in ("", f"version {parent['version']}", "recalibrated"):
        table.add_column(column, justify="right")
    table.add_row("log loss", f"{held['log_loss_before']:.4f}", f"{held['log_loss_after']:.4f}")
    table.add_row("calibration likelihood ratio (6 df; 12.6 is p = 0.05)",
                  f"{held['statistic_before']:.1f}", f"{held['statistic_after']:.1f}")
    console.print(table)
    verdict = "promoted to champion" if outcome.decision.promote else "not promoted"
    console.print(Text(f"Registered {parent['name']} version {outcome.version} (parent "
                       f"{parent['version']}, alias challenger): {verdict}: "
                       f"{outcome.decision.reason}.", style="bold"))


@app.command("model-card")
def model_card(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    output: Annotated[Path, typer.Option(help="Where to write the card (Markdown).")],
    alias: Annotated[str, typer.Option(help="Which version, by alias.")] = "champion",
) -> None:
    """Write the model card of a registered version (the champion by default)."""
    from mlflow.exceptions import MlflowException

    from phenotyper.files import write_bytes_atomic
    from phenotyper.tracking.registry import model_card_text, store_uri, using_store

    uri = store_uri()
    try:
        with using_store(uri) as client:
            card = model_card_text(client, name, alias)
    except MlflowException as error:
        exit_with_error(f"No {name}@{alias} in {uri}: {error.message}")
    try:
        write_bytes_atomic(file_destination(output, "model_card.md"), card.encode())
    except OSError as error:
        exit_with_error(f"Cannot write {output}: {error.strerror}.")
    Console().print(Text(f"Wrote the model card of {name}@{alias} to {output}."))


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="MLflow model URI to serve.")] =
        DEFAULT_MODEL_URI,
    host: Annotated[str, typer.Option(help="Interface to bind; loopback unless told.")] =
        "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 5001,
    workers: Annotated[int, typer.Option(min=1, help="Server worker processes.")] = 1,
) -> None:
    """Serve a packaged model with MLflow's own scoring server (POST /invocations)."""
    import shutil
    import socket

    try:  # a port in use would otherwise end in uvicorn's traceback, after "Serving ..."
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, port))
    except OSError as error:
        exit_with_error(f"Cannot serve on {host}:{port}: {error.strerror}. Choose another "
                        "--port (or stop what is using it).")

    from mlflow.exceptions import MlflowException

    from phenotyper.tracking.registry import describe_model, package_spec, store_uri, using_store

    uri = store_uri()
    try:
        with using_store(uri) as client:
            info = describe_model(client, model)
            profile = package_spec(info["resolved_uri"], uri).get("profile") or {}
    except MlflowException as error:
        exit_with_error(f"Cannot load model {model}: {error.message}")
    if profile.get("synthetic"):  # a server cannot tell which requests are real patients
        Console(stderr=True).print(Text(SYNTHETIC_MODEL_BANNER, style="bold red"))
    # MLflow starts its server by name (uvicorn): this environment's tools must come first
    tools = str(Path(sys.executable).parent)
    mlflow_cli = shutil.which("mlflow", path=tools) or "mlflow"
    command = [mlflow_cli, "models", "serve", "-m", model, "--env-manager", "local",
               "--host", host, "--port", str(port), "--workers", str(workers)]
    Console().print(Text(f"{_model_line(info)}\nServing {model} from {uri} on "
                         f"http://{host}:{port}/invocations"))
    path = os.pathsep.join([tools, os.environ.get("PATH", "")])
    sys.stdout.flush()  # exec replaces the process: what is still buffered would be lost
    sys.stderr.flush()
    os.execvpe(command[0], command, {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": path})


@app.command()
def score(
    input_path: Annotated[Path, typer.Option("--input", help="Cohort file: CSV or Parquet.")],
    output: Annotated[Path, typer.Option(
        help="Scored file: .parquet or .csv. A manifest (.manifest.json) is written beside it.")],
    model: Annotated[str, typer.Option(help="MLflow model URI.")] =
        DEFAULT_MODEL_URI,
    mapping: Annotated[Path | None, typer.Option(
        help="TOML mapping of the cohort's columns and units.")] = None,
    engine: Annotated[str, typer.Option(
        help="local: this process; spark: mlflow's Spark UDF (needs the spark extra).")] =
        "local",
    explain: Annotated[str, typer.Option(
        help="SHAP columns: predicted (the predicted phenotype's), all, or none.")] =
        "predicted",
    report_path: Annotated[Path | None, typer.Option(
        "--report", help="Also write a self-contained HTML report here.")] = None,
    block_rows: Annotated[int, typer.Option(
        min=1, help="Rows read and scored at a time (memory grows with it).")] = BLOCK_ROWS,
    rejected_values: Annotated[str, typer.Option(
        help="A value that is not a number or is implausible: skip-row leaves its row "
             "unscored (for clinical use); missing scores the row without that value, the "
             "status naming what was set aside (for retrospective studies).")] = SKIP_ROW,
    per_patient: Annotated[str, typer.Option(
        help="With several samples per patient: all counts every row; first or last counts "
             "each patient's first or last sample (by sample_time). Every row is scored "
             "either way.")] = "all",
    keep: Annotated[list[str] | None, typer.Option(
        help="An input column to carry into the output as text (encounter, timestamps, "
             "outcome); repeatable.")] = None,
) -> None:
    """Score a cohort file: one output row per input row, in input order, each with a status."""
    from mlflow.exceptions import MlflowException
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from phenotyper.cohort import CohortError
    from phenotyper.runs.score import score_file
    from phenotyper.scoring.request import ScoreRequest, ScoringError
    from phenotyper.tracking.registry import store_uri

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # ours suffices
    request = ScoreRequest(model, input_path, output, mapping, explain, engine, report_path,
                           block_rows, rejected_values=rejected_values,
                           per_patient=per_patient, keep=tuple(keep or ()))
    console = Console(stderr=True)
    progress = Progress(SpinnerColumn(), TextColumn("Scoring {task.description}"),
                        TextColumn("{task.completed:,} rows"), _RowsPerSecond(),
                        TimeElapsedColumn(), console=console, disable=not console.is_terminal)
    try:
        with progress:
            task = progress.add_task(input_path.name, total=None)
            manifest = score_file(request, on_rows=lambda rows: progress.advance(task, rows),
                                  tracking_uri=store_uri())
    except KeyboardInterrupt:
        console.print(Text(f"Interrupted: nothing was written to {output} (an existing file "
                           "there is unchanged).", style="bold red"))
        raise typer.Exit(INTERRUPTED_EXIT_CODE) from None
    except (CohortError, ScoringError) as error:
        exit_with_error(str(error))
    except MlflowException as error:
        exit_with_error(f"Cannot load model {model}: {error.message}")
    except OSError as error:
        exit_with_error(f"Cannot write {error.filename or output}: {error.strerror}.")
    except Exception:
        console.print(Text(f"Scoring failed: nothing was written to {output}.", style="bold red"))
        raise
    _print_scoring(manifest, report_path)


class _RowsPerSecond(ProgressColumn):
    """Throughput of a scoring task."""

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0:,.0f} rows/s")


def _model_line(info: dict) -> str:
    """Which model version a command uses and when it was registered (trained)."""
    if info.get("version") is None:
        return f"Model: {info['uri']}"
    return (f"Model: {info['name']} version {info['version']}, registered "
            f"{info['registered_at'].replace('T', ' ').replace('+00:00', ' UTC')} "
            f"({info['uri']})")


MAX_DRIFT_LINES = 6  # console lines on drift: all rows, then the sites that moved most


def _drifted(drift: dict | None, shown: int = 3) -> list[tuple[str, str]]:
    """(scope, what moved beyond a threshold: up to `shown` markers, most moved first), all
    rows first, then the sites, the most moved first."""
    if not drift:
        return []

    from phenotyper.drift import flagged, sites_most_moved

    def said(marker: dict) -> str:
        parts = []
        if {"psi", "ks_at_deciles"} & set(marker["beyond_threshold"]):
            parts.append(f"PSI {marker['psi']:.2f}, KS {marker['ks_at_deciles']:.2f}")
        if "missing_shift" in marker["beyond_threshold"]:
            key, reference = next((k, v) for k, v in marker.items()
                                  if k.startswith("missing_share_"))
            parts.append(f"missing {marker['missing_share']:.0%} ({reference:.0%} "
                         f"{key.removeprefix('missing_share_')})")
        return f"{marker['marker']} " + ", ".join(parts)

    scopes = [("all rows", flagged(drift["overall"])),
              *((f"site {site}", markers) for site, markers in sites_most_moved(drift))]
    return [(scope, "; ".join(said(m) for m in markers[:shown]))
            for scope, markers in scopes if markers]


def _print_drift(console: Console, lines: list[tuple[str, str]], lead: str) -> None:
    for scope, markers in lines[:MAX_DRIFT_LINES]:
        console.print(Text(f"{lead} ({scope}): {markers}", style="yellow"))
    if len(lines) > MAX_DRIFT_LINES:
        console.print(Text(f"... and {len(lines) - MAX_DRIFT_LINES} more sites beyond a drift "
                           "threshold (all in the manifest's drift, and the report).",
                           style="yellow"))


def _print_scoring(manifest: dict, report_path: Path | None) -> None:
    console = Console()
    for warning in manifest["warnings"]:
        Console(stderr=True).print(Text(warning, style="bold red"))
    console.print(Text(_model_line(manifest["model"])))
    table = Table(title=f"Scored {manifest['rows_out']:,} rows at "
                        f"{manifest['rows_per_s']:,.0f} rows/s", title_justify="left")
    table.add_column("status")
    table.add_column("rows", justify="right")
    for status, rows in manifest["rows_by_status"].items():
        table.add_row(status, f"{rows:,}")
    console.print(table)
    phenotypes = ", ".join(f"{name} {rows:,}" for name, rows in
                           manifest["phenotype_counts"].items())
    console.print(Text(f"Phenotypes: {phenotypes}"))
    repeated = manifest.get("repeated_samples")
    if repeated and repeated["per_patient"] != "all":
        counts = ", ".join(f"{name} {n:,}" for name, n in repeated["phenotype_counts"].items())
        console.print(Text(f"Per patient ({repeated['per_patient']} sample, "
                           f"{repeated['patients']:,} patients): {counts}"))
    if repeated and repeated["pairs"]:
        kept = {who: repeated[who]["kept_share"] for who in ("model", "rule")}
        console.print(Text(
            f"Stability between consecutive samples ({repeated['pairs']:,} pairs, "
            f"{repeated['patients_with_repeats']:,} patients): model kept its phenotype in "
            + (f"{kept['model']:.1%}" if kept["model"] is not None else "no pair")
            + ", the rule in " + (f"{kept['rule']:.1%}" if kept["rule"] is not None else
                                  "no pair")
            + f" (published for the rule in PROVIDE: {repeated['published_rule_kept_share']:.1%})"))
    _print_drift(console, _drifted(manifest.get("drift")), "Drift from the training patients")
    console.print(Text(f"Wrote {manifest['output']} and its manifest."))
    if report_path is not None:
        console.print(Text(f"Report: {report_path}"))


@app.command()
def drift(
    earlier: Annotated[Path, typer.Argument(
        help="Manifest of the earlier run (OUTPUT.manifest.json of phenotyper score).")],
    later: Annotated[Path, typer.Argument(help="Manifest of the later run.")],
    output: Annotated[Path | None, typer.Option(
        help="Also write the comparison as JSON here.")] = None,
) -> None:
    """Compare two scoring runs' inputs (this month against last): per marker, overall and per
    site, PSI, KS and missingness shift, the markers that moved most first."""
    import json

    from phenotyper.drift import DriftError, between_runs
    from phenotyper.files import atomic_path

    runs = []
    wanted = "give the OUTPUT.manifest.json that phenotyper score wrote beside its output"
    for path in (earlier, later):
        if not path.is_file():
            exit_with_error(f"{path} does not exist or is not a file; {wanted}.")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            exit_with_error(f"{path} is not a scoring manifest (not JSON text); {wanted}.")
        if not isinstance(manifest, dict) or "rows_out" not in manifest:
            exit_with_error(f"{path} is JSON but not a scoring manifest; {wanted}.")
        if not manifest.get("drift"):
            exit_with_error(f"{path} holds no drift: its model carries no training profile. "
                            "Score that input again with a model trained by this phenotyper.")
        if "profile_sha256" not in manifest["drift"]:
            exit_with_error(f"{path} was written by an older phenotyper without bin counts; "
                            "score that input again.")
        runs.append(manifest)
    try:
        compared = between_runs(runs[0]["drift"], runs[1]["drift"])
    except DriftError as error:
        exit_with_error(f"Cannot compare {earlier} with {later}: {error}.")
    console = Console()
    if runs[0].get("input_sha256") == runs[1].get("input_sha256"):
        console.print(Text("Both manifests are of the same input file: nothing can have moved.",
                           style="yellow"))
    console.print(Text(f"{later.name} against {earlier.name} (thresholds: " + ", ".join(
        f"{name} {value:g}" for name, value in compared["thresholds"].items()) + ")"))
    table = Table(title="All rows, most moved first", title_justify="left")
    for column in ("marker", "PSI", "KS at deciles", "missing, later (earlier)", "beyond"):
        table.add_column(column, justify="left" if column == "marker" else "right")
    def shown(value: float | None, form: str) -> str:
        return "n/a" if value is None else format(value, form)

    for row in compared["overall"]:
        table.add_row(row["marker"], shown(row["psi"], ".3f"),
                      shown(row["ks_at_deciles"], ".3f"),
                      f"{shown(row['missing_share'], '.1%')} "
                      f"({shown(row['missing_share_earlier'], '.1%')})",
                      ", ".join(row["beyond_threshold"]))
    console.print(table)
    _print_drift(console, _drifted({**compared, "overall": []}), "Moved")
    for key, words in (("sites_only_earlier", "only in the earlier run"),
                       ("sites_only_later", "only in the later run")):
        if compared[key]:
            console.print(Text(f"Sites {words}: {', '.join(compared[key])}"))
    if output is not None:
        try:
            with atomic_path(file_destination(output, "drift.json")) as temporary:
                temporary.write_text(json.dumps(compared, indent=1), encoding="utf-8")
        except OSError as error:
            exit_with_error(f"Cannot write {output}: {error.strerror}.")
        console.print(Text(f"Wrote {output}."))


@app.command("explain")
def explain_patient(
    cohort: Annotated[Path, typer.Option(help="Cohort file with the patient.")],
    patient: Annotated[str, typer.Option(help="The patient_id to explain.")],
    output: Annotated[Path, typer.Option(help="PNG file for the waterfall plot.")],
    model: Annotated[str, typer.Option(help="MLflow model URI.")] =
        DEFAULT_MODEL_URI,
    mapping: Annotated[Path | None, typer.Option(
        help="TOML mapping of the cohort's columns and units.")] = None,
) -> None:
    """Draw one patient's SHAP waterfall: why the model gave this phenotype."""
    from mlflow.exceptions import MlflowException

    from phenotyper.cohort import CohortError, read_cohort
    from phenotyper.files import atomic_path
    from phenotyper.plots import SAVE_KWARGS
    from phenotyper.plots.shap import waterfall_figure
    from phenotyper.tracking.registry import load_packaged, store_uri, using_store

    try:
        data = read_cohort(cohort, mapping).data
        rows = data[data["patient_id"] == patient]
        if rows.empty:
            exit_with_error(f"No patient_id '{patient}' in {cohort}.")
        with using_store(store_uri()):
            packaged = load_packaged(model)
        figure = waterfall_figure(packaged, rows.head(1))
    except CohortError as error:
        exit_with_error(str(error))
    except MlflowException as error:
        exit_with_error(f"Cannot load model {model}: {error.message}")
    except ValueError as error:
        exit_with_error(f"{patient}: {error}")
    with atomic_path(output) as temporary:
        figure.savefig(temporary, format="png", **SAVE_KWARGS)
    Console().print(Text(f"Wrote {patient}'s explanation to {output}."))


def _load_models(uris: list[str]) -> dict[str, object]:
    """Fitted models from MLflow URIs, named by their URI."""
    if not uris:
        return {}
    from mlflow.exceptions import MlflowException

    from phenotyper.tracking.registry import load_model, store_uri, using_store

    models = {}
    for uri in uris:
        try:
            with using_store(store_uri()):
                models[uri] = load_model(uri)
        except (MlflowException, OSError) as error:
            exit_with_error(f"Cannot load model {uri}: {getattr(error, 'message', error)}")
    return models


def _print_headline(result: Benchmark, only: list[str] | None = None) -> None:
    """The report's headline for the terminal: the policy table of each outcome, then the
    label metrics, a row per metric and a column per phenotyper (`only` those, when given: a
    terminal is narrower than the report)."""
    from phenotyper.report import outcomes as outcome_report
    from phenotyper.report.benchmark import format_estimate, headline_metrics

    records = result.records[result.records.subgroup == "all"]
    numbers = {(p, m, "all"): (v, lo, hi) for p, m, v, lo, hi in records[
        ["phenotyper", "metric", "value", "ci_low", "ci_high"]].itertuples(index=False)}
    indexed = records.set_index(["phenotyper", "metric"])
    names = [n for n in dict.fromkeys(records.phenotyper)
             if (only is None or n in only) and n not in outcome_report.PSEUDO_PHENOTYPERS]
    console = Console()
    outcome_meta = result.meta.get("outcome", {})
    for outcome in outcome_meta.get("outcomes", []) if outcome_meta.get("method") else []:
        header, rows = outcome_report.policy_table(names, numbers, outcome,
                                                   result.meta["reference"], describe=False)
        if not rows:
            continue
        better = "higher" if outcome_meta["higher_is_better"][outcome] else "lower"
        table = Table(title=f"Policy value: {outcome} if treated as each phenotyper says "
                            f"({better} is better; 95% CI; n/a: see benchmark.md)")
        for i, column in enumerate(header):
            table.add_column(column, justify="left" if i == 0 else "right", overflow="fold")
        for row in rows:
            table.add_row(*(cell.replace(" (", "\n(") for cell in row))
        console.print(table)
    if result.meta.get("label") is not None:
        table = Table(title=f"Benchmark against '{result.meta['label']}' "
                            f"({result.meta['n_patients'] - result.meta['n_left_out']:,} "
                            "patients, 95% bootstrap CI)")
        table.add_column("metric")
        for name in names:
            table.add_column(name.replace("_", " "), justify="right", overflow="fold")
        for metric, words in headline_metrics(result.meta).items():
            cells = [format_estimate(metric, *indexed.loc[(name, metric)][
                         ["value", "ci_low", "ci_high"]]).replace(" (", "\n(")
                     if (name, metric) in indexed.index else "n/a" for name in names]
            if any(cell != "n/a" for cell in cells):
                table.add_row(words, *cells)
        console.print(table)
    if result.meta.get("synthetic"):
        console.print(Text(SYNTHETIC_BANNER, style="bold yellow"))
    for key in ("warning", "label_warning"):
        if result.meta.get(key):
            console.print(Text(f"Warning: {result.meta[key]}", style="bold yellow"))
    labels = result.meta.get("labels", {})
    if labels.get("n_unreadable"):
        console.print(Text(labels["summary"], style="yellow"))


# quantity -> (title, what a row is, what the value is)
CALIBRATION_TABLES = {
    "rule_share": ("ImmunoSep rule on the measured markers", "rule phenotype",
                   "share of patients"),
    "mortality_by_rule": ("28-day mortality by the rule's answer", "rule phenotype",
                          "28-day mortality"),
    "response_by_arm": ("SOFA response by arm received", "arm", "SOFA response"),
    "death_by_arm": ("28-day death by arm received", "arm", "28-day death"),
}


def _print_calibration(preset: Preset, frame: pd.DataFrame) -> None:
    """Each quantity the preset's targets describe, simulated beside its target.

    A table without any target that applies says why (the preset's note on that target), so a
    sensitivity or hypothetical preset is never compared with numbers it does not claim.
    """
    from phenotyper.simulate import calibration_checks

    console = Console()
    checks = calibration_checks(preset, frame)
    trial = bool(preset["trial"])
    console.print(Text(f"Preset {preset.name}: {preset.description}", style="bold"))
    for quantity, (title, group, column) in CALIBRATION_TABLES.items():
        rows = [c for c in checks if c.quantity == quantity]
        if not rows:
            continue
        if quantity == "mortality_by_rule" and trial:
            column = "expected 28-day mortality on standard care"
        with_targets = any(c.target is not None for c in rows)
        table = Table(title=title)
        table.add_column(group)
        for name in ("patients", column, *(["target"] if with_targets else [])):
            table.add_column(name, justify="right")
        for check in rows:
            cells = [check.group, f"{check.patients:,}", f"{100 * check.simulated:.1f}%"]
            if with_targets:
                cells.append("" if check.target is None else f"{100 * check.target:.1f}%")
            table.add_row(*cells)
        console.print(table)
        if not with_targets:
            note = next(iter(preset.notes["targets"].get(quantity, {}).values()), "none given")
            console.print(Text(f"No target for this table: {note}", style="dim"))


def _print_report(report: QualityReport) -> None:
    """Render a quality report as a summary line and two tables."""
    console = Console()
    share = 100 * report.n_rows_with_issues / report.n_rows if report.n_rows else 0.0
    console.print(Text(
        f"{report.source}: {report.n_rows:,} rows, {report.n_issues:,} issues on "
        f"{report.n_rows_with_issues:,} rows ({share:.1f}%)", style="bold"))
    if report.timed and report.patients < report.n_rows:
        console.print(Text(f"Repeated samples: {report.n_rows:,} rows of {report.patients:,} "
                           "patients, ordered by sample_time (a repeat at the same time is a "
                           "duplicate_id issue)."))
    markers = Table(title="Columns (canonical units)")
    markers.add_column("column", overflow="fold")
    markers.add_column("read from", overflow="fold")
    for name in ("missing", "min", "median", "max"):
        markers.add_column(name, justify="right")
    for item in report.columns:
        origin = [] if item.source_column == item.column else [f"'{item.source_column}'"]
        if item.unit_from != item.unit:
            origin.append(f"{item.unit_from} -> {item.unit}")
        stats = ["" if value is None else f"{value:.6g}"
                 for value in (item.min, item.median, item.max)]
        markers.add_row(*map(Text, (item.column, ", ".join(origin),
                                    f"{item.pct_missing:.1f}%", *stats)))
    console.print(markers)
    if report.issues:
        issues = Table(title="Row-level issues")
        issues.add_column("column", overflow="fold")
        issues.add_column("kind", overflow="fold")
        issues.add_column("count", justify="right")
        issues.add_column("example", overflow="fold")
        for issue in report.issues:
            issues.add_row(*map(Text, (issue.column, issue.kind, f"{issue.count:,}",
                                       f"row {issue.example_row}: {issue.example_value!r}")))
        console.print(issues)
    else:
        console.print(Text("No row-level issues.", style="green"))
    for column, canonical in report.unmapped.items():
        console.print(Text(f"Column '{column}' looks like {canonical}: map it in a mapping file "
                           "(--mapping) to use it.", style="yellow"))
    if report.absent:
        console.print(Text(f"Not in the file: {', '.join(report.absent)}.", style="dim"))


def main() -> None:
    """The `phenotyper` command. Exit codes: 0 success; 2 a wrong input or request (one clear
    message); 130 interrupted; 1 an internal error only. Its objects are frozen out of the
    garbage collector before the interpreter ends: the final collection over MLflow's,
    SQLAlchemy's and pandas' objects took a second at exit, more than a small scoring job's
    own work."""
    import click

    try:
        app()
    except SystemExit as done:
        # Click turns Ctrl-C into Abort and exits 1, the internal-error code
        if isinstance(done.__context__, click.exceptions.Abort):
            raise SystemExit(INTERRUPTED_EXIT_CODE) from None
        raise
    finally:
        gc.freeze()


if __name__ == "__main__":
    main()
