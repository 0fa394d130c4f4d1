"""`phenotyper score --report`: one self-contained HTML page whose numbers are the run's, and
which a real browser renders with its figures, offline."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.colors
import matplotlib.image
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from phenotyper import plots
from phenotyper.contract import SYNTHETIC_BANNER
from phenotyper.plots.scoring import MODEL_NAME, RULE_NAME
from phenotyper.report import scoring as report
from phenotyper.runs.score import score_file
from phenotyper.scoring.request import ScoreRequest
from phenotyper.scoring.summary import ScoreSummary
from phenotyper.simulate import simulate

MODEL = "models:/batchmodel/1"  # registered by the `store` fixture (conftest.py)
SECTIONS = ("distribution", "agreement", "probabilities", "explanations", "sites", "unscored")
CHROMIUM = "chromium"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """What the tests read in a report: cell text of each table by section, every src/href,
    and how often each tag occurs."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: Counter = Counter()
        self.sources: list[str] = []
        self.image_sources: list[str] = []
        self.tables: dict[str | None, list[list[list[str]]]] = {}
        self._section: str | None = None
        self._cell: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags[tag] += 1
        self.sources += [value or "" for name, value in attrs if name in ("src", "href")]
        if tag == "img":
            self.image_sources.append(attributes.get("src") or "")
        elif tag == "section":
            self._section = attributes.get("id")
        elif tag == "table":
            self.tables.setdefault(self._section, []).append([])
        elif tag == "tr":
            self.tables[self._section][-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._section][-1][-1].append(" ".join(" ".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _number(cell: str) -> int:
    """The count a cell starts with ("1,234 (41.1%) rows 5, 9" -> 1234)."""
    return int(cell.split()[0].replace(",", ""))


def _messy_cohort(path: Path) -> Path:
    """3,000 simulated patients as CSV, with cells a lab export might have."""
    cohort = simulate("provide", 3000, seed=5).astype({"ferritin_ng_ml": object,
                                                       "crp_mg_l": object})
    cohort.loc[3, "ferritin_ng_ml"] = -40  # negative: not scored (file row 4)
    cohort.loc[10, "crp_mg_l"] = "haemolysed"  # not a number: not scored (row 11)
    cohort.loc[11, "crp_mg_l"] = "<5"  # censored: an issue, still scored
    cohort.loc[12, "patient_id"] = None  # no id: an issue, still scored
    cohort.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def scored(store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """The messy cohort scored with and without explanations: explain -> (manifest, report)."""
    folder = tmp_path_factory.mktemp("score_report")
    cohort = _messy_cohort(folder / "cohort.csv")
    runs = {}
    for explain in ("predicted", "none"):
        html = folder / f"report_{explain}.html"
        manifest = score_file(ScoreRequest(MODEL, cohort, folder / f"scored_{explain}.parquet",
                                           explain=explain, report_path=html))
        runs[explain] = (manifest, html)
    return runs


def _render(page: Path, folder: Path) -> tuple[np.ndarray, str]:
    """Headless Chromium on a local page, network cut off: a screenshot (RGB floats) and the
    DOM as the browser built it."""
    if shutil.which(CHROMIUM) is None:
        pytest.fail("Chromium is needed to check how the report renders and was not found: "
                    "run `make setup`, which installs it.")
    screenshot = folder / f"{page.stem}.png"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--window-size=1280,6000", f"--user-data-dir={folder / 'chromium-profile'}",
               "--host-resolver-rules=MAP * ~NOTFOUND", f"--screenshot={screenshot}",
               "--dump-dom", page.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and screenshot.exists(), done.stderr
    return matplotlib.image.imread(screenshot)[..., :3], done.stdout


def _pixels_like(image: np.ndarray, colour: str) -> int:
    """How many pixels have (nearly) this matplotlib colour."""
    target = np.array(matplotlib.colors.to_rgb(colour))
    return int((np.abs(image - target).max(axis=-1) < 0.04).sum())


def _figures(page: Page) -> list[np.ndarray]:
    """The report's embedded figures, decoded (RGB floats)."""
    return [matplotlib.image.imread(io.BytesIO(base64.b64decode(source.partition(",")[2])))
            [..., :3] for source in page.image_sources]


def _assert_figures_shown(page: Page, screenshot: np.ndarray, colours: dict[str, int]) -> None:
    """Each colour fills at least the given number of pixels in the figures, and the screenshot
    shows (nearly) all of them: an image the browser could not show, or showed cut or
    shrunk, fails. The page's own CSS uses none of these colours."""
    figures = _figures(page)
    for colour, least in colours.items():
        expected = sum(_pixels_like(figure, colour) for figure in figures)
        assert expected >= least, colour
        assert _pixels_like(screenshot, colour) >= 0.98 * expected, colour


def test_report_is_self_contained_and_its_numbers_are_the_manifests(scored):
    manifest, path = scored["predicted"]
    text = path.read_text(encoding="utf-8")
    page = Page(text)

    assert page.tags["script"] == page.tags["link"] == page.tags["iframe"] == 0
    assert "http://" not in text and "https://" not in text and "@import" not in text
    assert all(source.startswith("data:image/png;base64,") for source in page.sources)
    assert len(page.image_sources) == 4
    for source in page.image_sources:
        assert base64.b64decode(source.partition(",")[2]).startswith(PNG_SIGNATURE)

    assert text.count(SYNTHETIC_BANNER) == 1
    for section in SECTIONS:
        assert f'<section id="{section}">' in text
    for fact in (manifest["input"], manifest["input_sha256"], manifest["model"]["uri"],
                 manifest["model"]["run_id"], "--explain predicted",
                 f"{manifest['rows_in']:,} in, {manifest['rows_out']:,} out",
                 f"({manifest['rows_per_s']:,.0f} rows/s)"):
        assert fact in text

    (distribution,) = page.tables["distribution"]
    shown = {row[0]: (_number(row[1]), _number(row[3])) for row in distribution[1:]}
    for label in (*manifest["phenotype_counts"], *manifest["rule_phenotype_counts"]):
        assert shown[label] == (manifest["rule_phenotype_counts"].get(label, 0),
                                manifest["phenotype_counts"].get(label, 0))
    assert shown["all rows"] == (3000, 3000)

    (agreement,) = page.tables["agreement"]
    models = agreement[0][1:-1]
    cells = {(row[0], model): cell for row in agreement[1:]
             for model, cell in zip(models, row[1:-1], strict=True)}
    for item in manifest["model_vs_rule"]:
        cell = cells[(item["rule"], item["model"])]
        assert _number(cell) == item["rows"]
        if item["rule"] != item["model"]:
            assert cell.endswith("rows " + ", ".join(map(str, item["example_rows"])))
    assert sum(_number(cell) for cell in cells.values()) == 3000
    largest = max((item for item in manifest["model_vs_rule"]
                   if item["rule"] != item["model"] and item["model"] != "not scored"),
                  key=lambda item: item["rows"])
    assert (f"<b>{largest['rows']:,}</b> rows the rule calls {largest['rule']}, the model "
            f"calls {largest['model']}") in text

    not_scored = manifest["rows_in"] - manifest["rows_by_status"]["ok"]
    assert not_scored == manifest["phenotype_counts"]["not scored"] == 2
    assert f"<b>{not_scored:,}</b><span>not scored</span>" in text
    reasons, examples = page.tables["unscored"]
    assert {row[0]: _number(row[2]) for row in reasons[1:]} == {"negative": 1, "unparseable": 1}
    assert [_number(row[0]) for row in examples[1:]] == [
        example["row"] for example in manifest["unscored_examples"]] == [4, 11]
    assert "crp_mg_l &#39;haemolysed&#39;: not a number" in text  # markupsafe's spelling
    assert f"<b>{manifest['rows_with_issues']:,} rows</b> carry reader issues" in text

    (sites,) = page.tables["sites"]
    names = [row[0] for row in sites[1:]]
    assert names == sorted(names) and len(names) == 20
    assert sum(_number(row[1]) for row in sites[1:]) == 3000
    assert f"over the {manifest['rows_by_status']['ok']:,} explained rows" in text
    assert "softmax logit" in text.rpartition("<footer>")[2]


def test_browser_renders_every_figure(scored, tmp_path):
    _, path = scored["predicted"]
    page = Page(path.read_text(encoding="utf-8"))
    screenshot, dom = _render(path, tmp_path)
    assert dom.count("<img ") == 4
    rule, model = plots.colour_of([RULE_NAME, MODEL_NAME]).values()
    # the model's colour: phenotype, probability and SHAP bars; the rule's: phenotype bars;
    # the heatmap's darkest blue: the diagonal of the agreement figure
    _assert_figures_shown(page, screenshot, {model: 60_000, rule: 15_000, "#08306b": 10_000})


def test_a_run_without_explanations_says_so_and_still_renders(scored, tmp_path):
    manifest, path = scored["none"]
    text = path.read_text(encoding="utf-8")
    assert manifest["mean_abs_shap"] == {}
    explanations = text.partition('<section id="explanations">')[2].partition("</section>")[0]
    assert "this run had no explanations (<code>--explain none</code>)" in explanations
    assert "<img" not in explanations
    page = Page(text)
    screenshot, dom = _render(path, tmp_path)
    assert dom.count("<img ") == page.tags["img"] == 3
    model = plots.colour_of([RULE_NAME, MODEL_NAME])[MODEL_NAME]
    _assert_figures_shown(page, screenshot, {model: 40_000, "#08306b": 10_000})


def test_many_sites_show_the_largest_and_data_text_is_escaped():
    classes = ["MALS", "immunoparalysis", "unclassified"]
    sizes = {f"S{i:02d}": 5 + i for i in range(40)} | {"<b>S&1</b>": 100}
    site = np.repeat(list(sizes), list(sizes.values()))
    n = len(site)
    probabilities = np.tile([[0.7, 0.2, 0.1]], (n, 1))
    frame = pd.DataFrame({
        "row": np.arange(1, n + 1), "patient_id": [f"<p{i}>" for i in range(n)],
        "site_id": site, "phenotype": "MALS",
        **{f"prob_{name}": probabilities[:, i] for i, name in enumerate(classes)},
        "rule_phenotype": "MALS", "status": "ok", "issues": ""})
    summary = ScoreSummary(classes=classes, features=["ferritin_ng_ml"])
    summary.add(pa.Table.from_pandas(frame, preserve_index=False),
                np.full(n, "ok", dtype=object))
    manifest = {"input": "<export>.csv", "input_sha256": "0" * 64, "mapping": None,
                "model": {"uri": MODEL, "name": "batchmodel", "version": "1", "run_id": "r"},
                "engine": "local", "explain": "none", "rows_in": n, "rows_out": n,
                "timings_s": {"score": 0.5, "total": 1.0}, "rows_per_s": float(n),
                "synthetic_input": False}
    text = report.score_report_html(summary, manifest)
    (sites,) = Page(text).tables["sites"]
    shown = [row[0] for row in sites[1:]]
    assert len(shown) == report.MAX_SITES and shown == sorted(shown)
    assert "<b>S&1</b>" in shown and "S00" not in shown  # the largest kept, the smallest not
    left_out = sorted(sizes.values())[:len(sizes) - report.MAX_SITES]
    assert f"{len(left_out)} smaller sites ({sum(left_out):,} rows) are left out" in text
    assert "&lt;b&gt;S&amp;1&lt;/b&gt;" in text and "<b>S&1</b>" not in text
    assert "&lt;export&gt;.csv" in text and "<export>" not in text
    assert SYNTHETIC_BANNER not in text
    assert re.search(r"<b>100\.0%</b><span>model agrees with the rule</span>", text)
    assert "Every row was scored." in text
