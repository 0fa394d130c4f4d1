"""Fuzzing: no text in a cell and no damage to an export's bytes can break a run.

A lab export can hold anything: NUL bytes, control characters, other scripts' digits, a cut-off
last line, a second BOM. The reader must account for every cell (a number, a missing value or
a row-level issue) and every row, on every reader path; the CLI must end with a clear message
(exit 2), never a traceback (exit 1), and a scored file must have exactly the rows read.
"""

from __future__ import annotations

import functools
import json
import math
import re
import traceback
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from phenotyper.cli import app
from phenotyper.cohort import CSV_READERS, CohortError, open_cohort
from phenotyper.panel import CANONICAL_COLUMNS, PANEL
from phenotyper.simulate import simulate

runner = CliRunner(env={"COLUMNS": "500"})  # wide enough that the summary line is not folded
MODEL = "models:/batchmodel/1"  # registered by the `store` fixture (conftest.py)
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# The spec's missing-value spellings, written out independently of the code under test.
MISSING_SPELLINGS = frozenset({"", "na", "n/a", "#n/a", "nan", "null", "none", "-", "."})
USABLE_WITH_ISSUE = {"censored_low", "censored_high", "ambiguous_separator", "unicode_digits"}
UNUSABLE = {"unparseable", "negative", "implausible"}
RULE_MARKERS = ("ferritin_ng_ml", "hla_dr_mab_per_cell")
SHOWN_CHARS = 200  # an issue shows at most this much of a cell (the spec's cut-off)

# --- a small valid export ---------------------------------------------------------------------

# the simulator's export cut to a few columns (each column read costs time, not coverage):
# the ids, both ImmunoSep rule markers, an ordinary marker, an integer one, sex and a label
EXPORT = simulate("provide", 6, seed=1)[["patient_id", "site_id", "ferritin_ng_ml",
                                         "hla_dr_mab_per_cell", "crp_mg_l", "sofa", "sex",
                                         "phenotype_true"]]


def cell_texts(frame: pd.DataFrame) -> list[list[str]]:
    """Every cell as the text an export would hold (a missing value as an empty cell)."""
    return [["" if isinstance(value, float) and math.isnan(value) else str(value)
             for value in row] for row in frame.itertuples(index=False)]


def quoted(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def export_csv(row: int, column: str, text: str) -> bytes:
    """The export as UTF-8 CSV with `text` (quoted) in one cell."""
    grid = cell_texts(EXPORT)
    grid[row][list(EXPORT.columns).index(column)] = quoted(text)
    lines = [",".join(EXPORT.columns), *(",".join(cells) for cells in grid)]
    return ("\n".join(lines) + "\n").encode()


def export_parquet(path: Path, row: int, column: str, text: str) -> None:
    """The export as Parquet, `column` a string column holding `text` in one cell."""
    strings: list[str | None] = [cells[list(EXPORT.columns).index(column)] or None
                                 for cells in cell_texts(EXPORT)]
    strings[row] = text
    table = pa.Table.from_pandas(EXPORT, preserve_index=False)
    at = table.schema.get_field_index(column)
    pq.write_table(table.set_column(at, column, pa.array(strings, pa.string())), path)


def read_every_way(path: Path) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """(data, issues) from each reader path: both CSV readers whole and in blocks of 4 rows
    (duplicate ids and decimal commas are tracked across blocks), or Parquet whole and in
    blocks."""
    readers = CSV_READERS if path.suffix == ".csv" else ("parquet",)
    readings = {}
    for reader in readers:
        for block_rows in (None, 4):
            options = {} if reader == "parquet" else {"csv_reader": reader}
            blocks = list(open_cohort(path, block_rows=block_rows, **options).blocks())
            readings[f"{reader}, blocks of {block_rows}"] = (
                pd.concat([block.data for block in blocks], ignore_index=True),
                pd.concat([block.issues for block in blocks], ignore_index=True))
    return readings


@functools.cache
def baseline(tmp: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The unmodified export's canonical data and issues."""
    path = tmp / "baseline.csv"
    path.write_bytes(export_csv(0, "patient_id", str(EXPORT["patient_id"].iloc[0])))
    [block] = open_cohort(path, block_rows=None).blocks()
    return block.data[list(CANONICAL_COLUMNS)], block.issues


def normalised(text: str) -> str:
    """A cell as the reader compares it with the missing spellings: stripped, NFKC, Arabic
    decimal and thousands marks as ASCII."""
    text = unicodedata.normalize("NFKC", text.strip())
    return text.translate({0x066B: ".", 0x066C: ",", 0x060C: ","}).strip()


def shown(text: str) -> str:
    if len(text) <= SHOWN_CHARS:
        return text
    return f"{text[:SHOWN_CHARS]}... ({len(text):,} characters)"


def is_mostly_nul(content: bytes) -> bool:
    """Whether a file is binary to the reader (the spec: over a tenth NULs in the first
    64 KiB), the one whole-file error a single cell may cause."""
    head = content[:65_536]
    return head.count(b"\x00") > 0.1 * len(head)


def check_other_cells_unchanged(data: pd.DataFrame, issues: pd.DataFrame, row: int,
                                column: str, base: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    """One cell's text changes that cell's reading only."""
    base_data, base_issues = base
    data = data[list(CANONICAL_COLUMNS)]
    others = data.drop(columns=column)
    pd.testing.assert_frame_equal(others, base_data.drop(columns=column))
    same_column = np.arange(len(data)) != row
    pd.testing.assert_series_equal(data[column][same_column], base_data[column][same_column])
    elsewhere = ~((issues["row"] == row + 1) & (issues["column"] == column))
    if column == "patient_id":
        elsewhere &= issues["kind"] != "duplicate_id"  # the cell may repeat another row's id
    pd.testing.assert_frame_equal(issues[elsewhere].reset_index(drop=True),
                                  base_issues.reset_index(drop=True))


def check_marker_cell(data: pd.DataFrame, issues: pd.DataFrame, row: int, column: str,
                      text: str) -> None:
    """The cell is a plausible number (maybe with an issue), or missing: a missing spelling
    without an issue, or an issue that says why."""
    found = issues[(issues["row"] == row + 1) & (issues["column"] == column)]
    assert len(found) <= 1, found
    issue = found.iloc[0] if len(found) else None
    value = data[column].iloc[row]
    marker = PANEL[column]
    if math.isnan(value):
        if issue is None:
            assert normalised(text).lower() in MISSING_SPELLINGS, (text, value)
        else:
            unusable = UNUSABLE | ({"censored_low", "censored_high"}
                                   if column in RULE_MARKERS else set())
            assert issue["kind"] in unusable, issue
    else:
        assert np.isfinite(value) and marker.low * (1 - 1e-9) <= value <= marker.high * (
            1 + 1e-9), value
        assert issue is None or issue["kind"] in USABLE_WITH_ISSUE, issue
    if issue is not None:
        assert issue["value"] == shown(text)
        assert issue["source_column"] == column and issue["detail"]


def check_id_cell(data: pd.DataFrame, issues: pd.DataFrame, row: int, column: str,
                  text: str) -> None:
    """The id is the cell's stripped text, or missing for a missing spelling (a `missing_id`
    issue for patient_id); a patient_id repeating another row's is a `duplicate_id`."""
    value = data[column].iloc[row]
    here = issues[(issues["row"] == row + 1) & (issues["column"] == column)]
    if text.strip().lower() in MISSING_SPELLINGS:
        assert pd.isna(value)
        expected = ["missing_id"] if column == "patient_id" else []
        assert here["kind"].tolist() == expected
        return
    assert value == text.strip()
    if column == "site_id":
        assert here.empty
        return
    ids = data[column].tolist()
    earlier = [k for k in range(row) if ids[k] == value]
    assert here["kind"].tolist() == (["duplicate_id"] if earlier else [])
    later = issues[(issues["kind"] == "duplicate_id") & (issues["row"] > row + 1)]
    assert later["row"].tolist() == [k + 1 for k in range(row + 1, len(ids))
                                     if ids[k] == value and not earlier]


# Anything st.text() draws (all of Unicode but surrogates), and cells built from the characters
# that matter to a number reader: digits of other scripts, signs, marks, NUL, line breaks.
NUMBERISH = [
    *"0123456789.,;<>=+-eE %\"' \t\r\n\x00\x0b\x1f\x7f",
    "\uff10", "\uff15", "\uff0e", "\u0660", "\u0663", "\u0669", "\u066b", "\u066c", "\u06f5",
    "\u0967", "\u2212", "\u2264", "\u2265", "\u00a0", "\u2009", "\u2028", "\u0085", "\ufeff",
    "\u200b", "\u00b5", "\u00bd", "\u2155", "\U0001d7d9", "\u3007"]
CELL_TEXT = st.one_of(st.text(), st.text(alphabet=st.sampled_from(NUMBERISH), max_size=12),
                      st.text(max_size=300))


def read_with_one_cell(tmp: Path, row: int, column: str, text: str, form: str
                       ) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """The export with `text` in one cell, written as `form` and read on every path: (data,
    issues), the same on each path, every row read and every other cell as in the unmodified
    export; None for a file the reader refuses as binary (mostly NULs, the one whole-file
    error a single cell may cause)."""
    path = tmp / f"fuzz.{form}"
    if form == "csv":
        path.write_bytes(export_csv(row, column, text))
    else:
        export_parquet(path, row, column, text)
    try:
        readings = read_every_way(path)
    except CohortError as error:
        assert form == "csv" and is_mostly_nul(path.read_bytes()), error
        assert str(path) in str(error) and "not a text file" in str(error)
        return None
    first_data, first_issues = next(iter(readings.values()))
    for name, (data, issues) in readings.items():
        assert len(data) == len(EXPORT), name
        pd.testing.assert_frame_equal(data[list(CANONICAL_COLUMNS)],
                                      first_data[list(CANONICAL_COLUMNS)], obj=name)
        pd.testing.assert_frame_equal(issues, first_issues, obj=name)
    check_other_cells_unchanged(first_data, first_issues, row, column, baseline(tmp))
    return first_data, first_issues


FORMS = st.sampled_from(["csv", "parquet"])
ROWS = st.integers(0, len(EXPORT) - 1)


@pytest.mark.parametrize("column", ["crp_mg_l", "ferritin_ng_ml"])
@settings(FUZZ, max_examples=70)
@given(text=CELL_TEXT, row=ROWS, form=FORMS)
@example(text="12\x00", row=0, form="csv")
@example(text="\uff11\uff12\uff13", row=1, form="csv")  # full-width 123
@example(text="\u0663\u0660\u0660\u0660", row=2, form="parquet")  # Arabic-Indic 3000
@example(text="\u0661\u0662\u066b\u0665", row=3, form="csv")  # 12.5, Arabic decimal mark
@example(text="\x1b[31m5\r\n6\x7f", row=5, form="csv")  # control characters, a line break
def test_any_text_in_a_marker_cell_is_a_number_or_an_issue_on_every_reader(
        tmp_path_factory, column, text, row, form):
    """The cell is a plausible number, a missing spelling, or an issue naming it."""
    reading = read_with_one_cell(tmp_path_factory.getbasetemp(), row, column, text, form)
    if reading is not None:
        check_marker_cell(*reading, row, column, text)


@pytest.mark.parametrize("column", ["patient_id", "site_id"])
@settings(FUZZ, max_examples=30)
@given(text=CELL_TEXT, row=ROWS, form=FORMS)
@example(text=" P0000001\t", row=3, form="csv")  # repeats row 1's id
@example(text="N/A", row=0, form="parquet")
@example(text="\x00\u202e\ufeff", row=5, form="csv")
def test_any_text_in_an_id_cell_is_kept_or_reported_on_every_reader(
        tmp_path_factory, column, text, row, form):
    """The id is the cell's text; a missing or repeated patient_id is an issue."""
    reading = read_with_one_cell(tmp_path_factory.getbasetemp(), row, column, text, form)
    if reading is not None:
        check_id_cell(*reading, row, column, text)


# --- damaged files through the CLI ------------------------------------------------------------

VALID_EXPORT = simulate("provide", 30, seed=1).to_csv(index=False).encode()
INVALID_UTF8 = [b"\xff", b"\xfe", b"\x80", b"\xc3", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80",
                b"\xf4\x90\x80\x80", b"\xc0\xaf"]
BOMS = [b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff"]
ANY_POSITION = st.integers(0, 1 << 20)  # taken modulo the length at the time

MUTATION = st.one_of(
    st.tuples(st.just("flip"), ANY_POSITION, st.integers(1, 255)),
    st.tuples(st.just("insert"), ANY_POSITION, st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("insert"), ANY_POSITION,
              st.sampled_from([b"\x00", b"\x00" * 40, b'"', b"\r", b"\n", b",", b";", b"\t",
                               b"\n\n\n", b" \n", b'"\n', *INVALID_UTF8, *BOMS])),
    st.tuples(st.just("delete"), ANY_POSITION, st.integers(1, 64)),
    st.tuples(st.just("truncate"), ANY_POSITION),
    st.tuples(st.just("duplicate_line"), ANY_POSITION),
    st.tuples(st.just("delete_line"), ANY_POSITION),
    st.tuples(st.just("replace_all"),
              st.sampled_from([b",", b"\n", b".", b"0", b"P"]),
              st.sampled_from([b";", b"\t", b"|", b"\r\n", b"\r", b",", b"", b'"', b"\x00"])),
    st.tuples(st.just("prepend"), st.sampled_from([*BOMS, b"\n", b"  \n\n", b"\x00"])),
    st.tuples(st.just("encode"), st.sampled_from(["utf-16", "utf-16-le", "latin-1"])),
)
MUTATIONS = st.lists(MUTATION, min_size=1, max_size=4)


def mutate(content: bytes, mutations: list[tuple]) -> bytes:
    """Apply (kind, *arguments) byte mutations in order; positions wrap around the length."""
    for kind, *arguments in mutations:
        at = arguments[0] % (len(content) + 1) if isinstance(arguments[0], int) else 0
        lines = content.splitlines(keepends=True)
        line = at % len(lines) if lines else 0
        if kind == "flip" and content:
            at %= len(content)
            content = content[:at] + bytes([content[at] ^ arguments[1]]) + content[at + 1:]
        elif kind == "insert":
            content = content[:at] + arguments[1] + content[at:]
        elif kind == "delete":
            content = content[:at] + content[at + arguments[1]:]
        elif kind == "truncate":
            content = content[:at]
        elif kind == "duplicate_line" and lines:
            content = b"".join(lines[:line + 1] + lines[line:])
        elif kind == "delete_line" and lines:
            content = b"".join(lines[:line] + lines[line + 1:])
        elif kind == "replace_all":
            content = content.replace(arguments[0], arguments[1])
        elif kind == "prepend":
            content = arguments[0] + content
        elif kind == "encode":
            content = content.decode("utf-8", errors="replace").encode(
                arguments[0], errors="replace")
    return content


def invoke(args: list[str]):
    """Run the CLI; an exit other than 0 (done) or 2 (a clear error) fails, with the
    traceback."""
    result = runner.invoke(app, args)
    where = "".join(traceback.format_exception(*result.exc_info)) if result.exc_info else ""
    assert result.exit_code in (0, 2), f"exit {result.exit_code}\n{result.output}\n{where}"
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert result.stderr.startswith("Error: "), result.output
    return result


def rows_validated(tmp: Path, content: bytes) -> int | None:
    """`phenotyper validate` on the file: the data rows it read, or None for a clear error."""
    path = tmp / "damaged.csv"
    path.write_bytes(content)
    result = invoke(["validate", str(path)])
    if result.exit_code == 2:
        return None
    counted = re.search(r": ([\d,]+) rows, [\d,]+ issues on", result.stdout)
    assert counted, result.stdout
    return int(counted.group(1).replace(",", ""))


@settings(FUZZ, max_examples=50)
@given(mutations=MUTATIONS)
@example(mutations=[("encode", "utf-16")])
@example(mutations=[("replace_all", b"\n", b"\r")])  # old Mac line ends
@example(mutations=[("insert", 300, b"\x00" * 40), ("insert", 900, b"\xff")])
@example(mutations=[("truncate", 2000), ("insert", 2000, b'"')])  # ends inside a quote
@example(mutations=[("prepend", b"\xef\xbb\xbf"), ("duplicate_line", 0)])  # header twice
@example(mutations=[("replace_all", b",", b";"), ("replace_all", b".", b",")])  # a German export
def test_validate_on_a_damaged_export_reports_or_refuses_never_crashes(tmp_path_factory,
                                                                        mutations):
    """Exit 0 with a report or 2 with one clear message; pandas' reader reads the rows
    `validate` read (by Arrow's reader where it can) or refuses the file too."""
    tmp = tmp_path_factory.getbasetemp()
    rows = rows_validated(tmp, mutate(VALID_EXPORT, mutations))
    try:
        [cohort] = open_cohort(tmp / "damaged.csv", block_rows=None,
                               csv_reader="pandas").blocks()
    except CohortError:
        assert rows is None
        return
    assert len(cohort.data) == rows


@pytest.mark.slow
@settings(FUZZ, max_examples=20)
@given(mutations=MUTATIONS, block_rows=st.sampled_from([7, 50_000]))
@example(mutations=[("replace_all", b"\n", b"\r\n"), ("truncate", 3000)], block_rows=7)
@example(mutations=[("insert", 1500, b"\n\n\n"), ("insert", 700, b"\xc3\x28")], block_rows=7)
@example(mutations=[("delete_line", 0)], block_rows=50_000)  # the header is lost
def test_score_on_a_damaged_export_writes_every_row_read_or_refuses(store, tmp_path_factory,
                                                                     mutations, block_rows):
    """Exit 0 or 2 only; a scored file has one row per row `validate` read, in order, and a
    file `validate` refuses is refused."""
    tmp = tmp_path_factory.getbasetemp()
    content = mutate(VALID_EXPORT, mutations)
    rows = rows_validated(tmp, content)
    output = tmp / "scored.parquet"
    manifest = output.with_name(output.name + ".manifest.json")
    output.unlink(missing_ok=True)
    manifest.unlink(missing_ok=True)
    result = invoke(["score", "--input", str(tmp / "damaged.csv"), "--output", str(output),
                     "--model", MODEL, "--block-rows", str(block_rows)])
    if rows is None:
        assert result.exit_code == 2
    if result.exit_code == 2:
        assert not output.exists()
        return
    scored = pd.read_parquet(output)
    assert len(scored) == rows
    assert scored["row"].tolist() == list(range(1, rows + 1))
    counts = json.loads(manifest.read_text(encoding="utf-8"))
    assert counts["rows_in"] == counts["rows_out"] == rows
