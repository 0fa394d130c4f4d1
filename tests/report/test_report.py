"""The written benchmark: every file there, valid, and the numbers as the evaluator made them."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

import phenotyper
from phenotyper.evaluate.benchmark import Benchmark, benchmark
from phenotyper.panel import NUMERIC_MARKERS
from phenotyper.report import benchmark as report
from phenotyper.report.benchmark import write_benchmark
from phenotyper.rules import reference_rules
from phenotyper.simulate import TRUTH_COLUMN, simulate

FIGURES = ("confusion_matrices.png", "reliability.png", "decision_curves.png", "flip_rates.png")
SYNTHETIC_NOTE = ("If the cohort is synthetic (e.g. from `phenotyper simulate`), these numbers "
                  "check the software; they are not clinical evidence.")
SOURCE = "simulated immunosep-screening, n=2000, seed 3"
BANNER = ("**SYNTHETIC DATA: these numbers check the software; they are not clinical "
          "evidence.**")


def _logistic(train: pd.DataFrame) -> object:
    """A probabilistic phenotyper: logistic regression on imputed log markers."""
    markers = make_pipeline(SimpleImputer(strategy="median"), FunctionTransformer(np.log1p),
                            StandardScaler())
    model = make_pipeline(ColumnTransformer([("markers", markers, list(NUMERIC_MARKERS))]),
                          LogisticRegression(max_iter=1000))
    return model.fit(train, train[TRUTH_COLUMN])


@pytest.fixture(scope="module")
def benchmarks() -> dict[str, Benchmark]:
    cohort = simulate("immunosep-screening", 2000, seed=3)
    rules = {name: rule.fit(cohort) for name, rule in reference_rules().items()}
    logistic = _logistic(simulate("immunosep-screening", 2000, seed=4))
    settings = {"n_boot": 100, "noise_repeats": 3, "seed": 5}
    return {
        "with_model": benchmark({**rules, "logistic": logistic}, cohort, TRUTH_COLUMN, **settings),
        "rules_only": benchmark(rules, cohort, TRUTH_COLUMN, **settings),
    }


@pytest.fixture(scope="module")
def written(benchmarks: dict[str, Benchmark], tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[Benchmark, Path, list[Path]]:
    folder = tmp_path_factory.mktemp("report") / "out"  # does not exist yet: created
    result = benchmarks["with_model"]
    return result, folder, write_benchmark(result, folder, SOURCE)


def _record(result: Benchmark, name: str, metric: str) -> tuple[float, float, float]:
    row = result.records.query("phenotyper == @name and metric == @metric and subgroup == 'all'")
    assert len(row) == 1
    return tuple(row[["value", "ci_low", "ci_high"]].iloc[0])


def test_every_file_is_written_and_no_temporary_file_is_left(written) -> None:
    _, folder, paths = written
    expected = {"benchmark.json", "benchmark.md", *FIGURES}
    assert {path.name for path in paths} == expected
    assert all(path.parent == folder and path.is_file() for path in paths)
    assert {path.name for path in folder.iterdir()} == expected


@pytest.mark.parametrize("name", FIGURES)
def test_figures_are_readable_pngs(written, name: str) -> None:
    path = written[1] / name
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 20_000
    height, width, _ = matplotlib.image.imread(path).shape
    assert height >= 300 and width >= 500


def test_json_holds_the_records_exactly_and_no_nan(written) -> None:
    result, folder, _ = written
    text = (folder / "benchmark.json").read_text()
    assert not re.search(r"\bNaN\b|Infinity", text)
    document = json.loads(text)
    assert document["meta"]["source"] == SOURCE
    assert document["meta"]["phenotyper_version"] == phenotyper.__version__
    assert document["meta"]["n_patients"] == result.meta["n_patients"]
    assert any(record["value"] is None for record in document["records"])  # NaN -> null
    records = pd.DataFrame(document["records"])
    expected = result.records[list(records.columns)]
    pd.testing.assert_frame_equal(records, expected, check_dtype=False)
    for name, frame in result.confusion.items():
        assert document["confusion"][name] == frame.to_dict(orient="index")
        assert document["treatment"][name] == result.treatment[name].to_dict(orient="index")


def test_markdown_names_every_phenotyper_and_carries_the_synthetic_note(written) -> None:
    result, folder, _ = written
    markdown = (folder / "benchmark.md").read_text()
    assert SYNTHETIC_NOTE in markdown
    assert SOURCE in markdown
    headline = next(line for line in markdown.splitlines() if line.startswith("| metric |"))
    names = [cell.strip() for cell in headline.strip("|").split("|")][1:]
    assert names[0] == "immunosep"  # the reference first
    assert sorted(names) == sorted(result.records["phenotyper"].unique())


def test_headline_shows_the_reference_accuracy_first(written) -> None:
    result, folder, _ = written
    value, low, high = _record(result, "immunosep", "accuracy")
    cell = f"{100 * value:.1f}% ({100 * low:.1f}-{100 * high:.1f})"
    assert f"| accuracy | {cell} |" in (folder / "benchmark.md").read_text()


def test_differences_whose_interval_excludes_zero_are_starred(written) -> None:
    result, folder, _ = written
    markdown = (folder / "benchmark.md").read_text()
    value, low, high = _record(result, "logistic", "accuracy_minus_immunosep")
    assert low > 0  # the model beats the rule on this cohort: the star must show
    assert f"{100 * value:+.1f} pp ({100 * low:.1f} to {100 * high:.1f}) * |" in markdown
    value, low, high = _record(result, "immunosep_hla_dr_8000", "coverage_minus_immunosep")
    assert low <= 0 <= high  # same markers needed, same coverage: no star
    assert f"{100 * value:+.1f} pp ({100 * low:.1f} to {100 * high:.1f}) |" in markdown


def test_markdown_tables_are_well_formed(written) -> None:
    lines = (written[1] / "benchmark.md").read_text().splitlines()
    tables, current = [], []
    for line in [*lines, ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    assert len(tables) >= 10
    for table in tables:
        widths = {len(re.findall(r"(?<!\\)\|", line)) for line in table}
        assert len(widths) == 1, table[0]
        assert re.fullmatch(r"\|(:?---:?\|)+", table[1])
        assert len(table) >= 3


def test_rules_only_draws_no_reliability_and_removes_a_stale_one(
        benchmarks: dict[str, Benchmark], tmp_path: Path) -> None:
    write_benchmark(benchmarks["with_model"], tmp_path, SOURCE)
    assert (tmp_path / "reliability.png").exists()
    paths = write_benchmark(benchmarks["rules_only"], tmp_path, SOURCE)
    assert "reliability.png" not in {path.name for path in paths}
    assert not (tmp_path / "reliability.png").exists()
    markdown = (tmp_path / "benchmark.md").read_text()
    assert "`reliability.png`: not drawn" in markdown
    assert "logistic" not in markdown


def test_a_failure_while_rendering_leaves_the_previous_report_untouched(
        benchmarks: dict[str, Benchmark], tmp_path: Path) -> None:
    result = benchmarks["rules_only"]
    paths = write_benchmark(result, tmp_path, SOURCE)
    before = {path: path.read_bytes() for path in paths}
    broken = dataclasses.replace(result, meta={k: v for k, v in result.meta.items()
                                               if k != "n_boot"})
    with pytest.raises(KeyError):
        write_benchmark(broken, tmp_path, "another source")
    assert {path: path.read_bytes() for path in paths} == before
    assert sorted(tmp_path.iterdir()) == sorted(paths)


def _section(markdown: str, title: str) -> str:
    """The text of one `## title` section."""
    return markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _written_figures(result: Benchmark, folder: Path, monkeypatch: pytest.MonkeyPatch
                     ) -> tuple[str, list]:
    """Write the report, keeping the figures (not their PNGs) to read their titles."""
    figures: list = []
    monkeypatch.setattr(report, "png_bytes", lambda figure: figures.append(figure) or b"png")
    write_benchmark(result, folder, SOURCE)
    return (folder / "benchmark.md").read_text(), figures


def test_a_synthetic_benchmark_says_so_first_in_every_file(
        benchmarks: dict[str, Benchmark], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = benchmarks["with_model"]
    synthetic = dataclasses.replace(result, meta={**result.meta, "synthetic": True})
    markdown, figures = _written_figures(synthetic, tmp_path, monkeypatch)
    assert markdown.startswith(BANNER + "\n")
    assert SYNTHETIC_NOTE not in markdown  # the banner replaces the conditional note
    assert json.loads((tmp_path / "benchmark.json").read_text())["meta"]["synthetic"] is True
    assert len(figures) == len(FIGURES)
    for figure in figures:
        assert figure.get_suptitle().endswith(" (synthetic data)"), figure.get_suptitle()


def test_a_benchmark_not_known_to_be_synthetic_keeps_the_conditional_note(
        benchmarks: dict[str, Benchmark], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = benchmarks["with_model"]
    assert result.meta["synthetic"] is False
    markdown, figures = _written_figures(result, tmp_path, monkeypatch)
    assert markdown.startswith("# Phenotyper benchmark")
    assert SYNTHETIC_NOTE in markdown and "SYNTHETIC DATA" not in markdown
    assert json.loads((tmp_path / "benchmark.json").read_text())["meta"]["synthetic"] is False
    assert not any(figure.get_suptitle().endswith("(synthetic data)") for figure in figures)


def test_a_tiny_cohort_is_flagged_and_no_difference_is_starred(tmp_path: Path) -> None:
    cohort = simulate("immunosep-screening", 3, seed=3)
    rules = {name: rule.fit(cohort) for name, rule in reference_rules().items()}
    result = benchmark(rules, cohort, TRUTH_COLUMN, n_boot=50, noise_repeats=2, synthetic=True)
    write_benchmark(result, tmp_path, SOURCE)
    markdown = (tmp_path / "benchmark.md").read_text()
    head = markdown.split("## Headline", 1)[0]
    assert f"> **Warning.** {result.meta['warning']}" in head
    assert "Only 3 patients" in head
    differences = _section(markdown, "Differences from `immunosep`")
    assert not re.search(r"\) \*", differences)  # no interval, so no star
    assert " (" not in _section(markdown, "Headline").split("| accuracy |", 1)[1].split("\n")[0]
    document = json.loads((tmp_path / "benchmark.json").read_text())
    assert document["meta"]["warning"] == result.meta["warning"]


def test_the_report_says_what_an_indeterminate_answer_counts_as(written) -> None:
    markdown = (written[1] / "benchmark.md").read_text()
    per_phenotype = " ".join(_section(markdown, "Per phenotype").split())
    assert "not a false positive" in per_phenotype
    assert "true negative" in per_phenotype
    treatment = " ".join(_section(markdown, "Treatment").split())
    assert "for an unclassified patient that counts as treatment agreement" in treatment
    assert "missed immunotherapy" in treatment
    headline = " ".join(_section(markdown, "Headline").split())
    assert "counts as wrong." not in headline  # not wrong for every metric: say which
    assert "accuracy, balanced accuracy and macro F1" in headline
