"""Read a cohort file (CSV or Parquet) into the panel's canonical columns, with row-level issues.

Lab exports are messy: local column names and units, decimal commas, censored results ("<0.5"),
free text in numeric cells. The reader maps and converts every column to the panel's canonical
form, never drops or reorders a row, and records each problem cell as a row-level issue instead
of failing, so a data manager can fix the source. Only whole-file problems (missing or corrupt
file, no marker column, bad mapping) raise `CohortError`.

Issue rows are numbered as a person counts the file: row 1 is the first line after the header.
So a blank line inside a CSV is kept as an all-missing row (its patient_id is reported missing)
rather than skipped, which would shift every later row number. Blank lines before the header and
empty rows after the last non-empty one (blank lines, or rows of empty cells, at the end of the
file) are not data and are dropped; that changes no row number. A quoted cell spanning several
lines is one row.

Censored results ("<0.5", ">2000") are kept at the bound, except for the ImmunoSep rule markers
(ferritin, HLA-DR): a bound that does not fall on the same side of the rule's cut-off as every
value the cell allows is set to missing, so the rule answers indeterminate instead of guessing.

A mapping file (TOML) names the file's columns and units when they are not canonical:

    [columns]
    ferritin_ng_ml = { column = "Ferritin", unit = "ug/L" }
    patient_id = { column = "MRN" }           # or simply: patient_id = "MRN"
    sex = { column = "Gender", values = { "1" = "M", "2" = "F" } }
    treatment = { column = "Arm", values = { "A" = "anakinra", "G" = "interferon_gamma",
                                             "P" = "placebo" } }
    death_28d = { column = "Outcome", values = { "Died" = 1, "Alive" = 0 } }
    sofa_response = "Responded"               # also: treatment_probability
    [labels]                                  # recode the reference-label column's values
    "1" = "MALS"
    "2" = "immunoparalysis"
    "Inter" = "unclassified"
    "?" = "indeterminate"                     # no label: the patient is left out
    [options]
    decimal = ","                             # "." or ","; default: decide per column

The sample, trial and outcome columns (`TRIAL_COLUMNS`: sample_time, encounter_id,
treatment, treatment_probability, sofa_response, death_28d) are not panel markers: the reader
renames the file's column to the canonical name and passes it through unparsed (it is not in
`CANONICAL_COLUMNS` or the quality report's column table), except that `treatment` codes in
`values` become arms (`contract.ARMS`); a treatment cell that is neither such a code nor an
arm's name is an `unknown_category` issue and is kept as it is. An outcome's `values` recode
the file's codes (compared stripped, in any case) to 0 or 1; other cells pass through for the
outcome reader.

`[labels]` maps label texts (compared stripped: exactly first, then in any case) to a
phenotype, `intermediate` (= unclassified) or `indeterminate` (no label); the reader does not
touch the label column, it carries the table as `Cohort.label_recode` for `labels.read_labels`,
which training and the evaluator read labels with.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import io
import re
import tomllib
import unicodedata
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from phenotyper.contract import (
    ARM_WORDS,
    ARMS,
    BLOCK_ROWS,
    DEATH_28D,
    FERRITIN_MALS_NG_ML,
    HLA_DR_IMMUNOPARALYSIS_MAB_PER_CELL,
    OUTCOME_COLUMNS,
    SOFA_RESPONSE,
    TREATMENT,
    TREATMENT_PROBABILITY,
)
from phenotyper.files import atomic_path
from phenotyper.labels import RECODE_TARGETS, recode_target
from phenotyper.panel import (
    CANONICAL_COLUMNS,
    ENCOUNTER_ID,
    NUMERIC_MARKERS,
    PANEL,
    PATIENT_ID,
    SAMPLE_TIME,
    SEX_ALIASES,
    SEX_VALUES,
    Marker,
    normalise_unit,
)
from phenotyper.suggest import did_you_mean

CSV_SUFFIXES = (".csv", ".tsv", ".txt")
# Sample, trial and outcome columns a mapping may name: renamed to these names, passed through
# unparsed (treatment codes recoded to arms); not panel columns.
TRIAL_COLUMNS: tuple[str, ...] = (SAMPLE_TIME, ENCOUNTER_ID, TREATMENT, TREATMENT_PROBABILITY,
                                  SOFA_RESPONSE, DEATH_28D)
PARQUET_SUFFIXES = (".parquet", ".pq")
ISSUE_COLUMNS = ("row", "column", "source_column", "value", "kind", "detail")

# Issue kinds, one per problem cell.
CENSORED_LOW = "censored_low"
CENSORED_HIGH = "censored_high"
AMBIGUOUS_SEPARATOR = "ambiguous_separator"
UNPARSEABLE = "unparseable"
NEGATIVE = "negative"
IMPLAUSIBLE = "implausible"
UNICODE_DIGITS = "unicode_digits"  # read as the number, but written in other digits or marks
UNKNOWN_CATEGORY = "unknown_category"
MISSING_ID = "missing_id"
DUPLICATE_ID = "duplicate_id"
ISSUE_KINDS = (CENSORED_LOW, CENSORED_HIGH, AMBIGUOUS_SEPARATOR, UNPARSEABLE, NEGATIVE,
               IMPLAUSIBLE, UNICODE_DIGITS, UNKNOWN_CATEGORY, MISSING_ID, DUPLICATE_ID)

# Cell texts that mean "not measured" (compared stripped and lower-cased): missingness, not issues.
MISSING_TOKENS = frozenset({"", "na", "n/a", "#n/a", "nan", "null", "none", "-", "."})
# Scores that only take whole numbers (the panel's `decimals` is display precision, not this).
INTEGER_MARKERS = frozenset({"sofa"})

_DELIMITERS = (",", ";", "\t", "|")
_SNIFF_BYTES = 65_536
_BINARY_NUL_SHARE = 0.1  # more NUL bytes than this share of the first 64 KiB: not text
# Delimited text readers: Arrow's (where it reads the file as pandas' does) or pandas'.
CSV_READERS = ("arrow", "pandas")
_ARROW_BLOCK_BYTES = 1 << 22
# The text of each cell of the row appended after a file for Arrow's reader: that row comes out
# as the last row only if the file does not end inside a quoted cell (which pandas refuses).
_END_CELL = "\x1fphenotyper: end of file\x1f"
ISSUE_VALUE_CHARS = 200  # an issue shows at most this much of a cell's text
_REL_TOLERANCE = 1e-9  # plausible-range bounds are inclusive up to float rounding of conversions

# A plain decimal number: the vectorised fast path casts these straight to float.
_PLAIN = r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
# Arabic decimal and thousands marks, as the dot and comma the number forms read
_ARABIC_MARKS = {"\u066b": ".", "\u066c": ",", "\u060c": ","}
# Bytes of the usual export's numbers (ASCII digits and the dot): cells made of these alone are
# `_PLAIN` exactly when they hold a digit and at most one dot, which counting finds faster.
_DIGIT_OR_DOT = np.isin(np.arange(256), list(b"0123456789."))
# Unsigned number notations tried on the rest, first full match wins:
# (name, pattern, replacements giving the decimal reading, replacements giving the grouped one).
_FORMS: tuple[tuple[str, str, tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]], ...] = (
    ("ambiguous_comma", r"\d{1,3},\d{3}", ((",", "."),), ((",", ""),)),
    ("decimal_comma", r"\d*,\d+", ((",", "."),), ()),
    ("ambiguous_dot", r"\d{1,3}\.\d{3}", (), ((".", ""),)),
    ("plain", r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?", (), ()),
    ("grouped_comma", r"\d{1,3}(?:,\d{3})+(?:\.\d+)?", ((",", ""),), ()),
    ("grouped_dot", r"\d{1,3}(?:\.\d{3})+(?:,\d+)?", ((".", ""), (",", ".")), ()),
    ("grouped_space", r"\d{1,3}(?:[ \u00a0\u202f']\d{3})+(?:[.,]\d+)?",
     ((" ", ""), ("\u00a0", ""), ("\u202f", ""), ("'", ""), (",", ".")), ()),
)
_FORM_CODE = {name: code for code, (name, *_rest) in enumerate(_FORMS)}
# Notations that only a decimal-comma writer produces: evidence for reading "4,420" as 4.42.
_COMMA_EVIDENCE = (_FORM_CODE["decimal_comma"], _FORM_CODE["grouped_dot"])

# Per-cell issue codes of numeric columns, in increasing priority (a cell keeps one issue).
# (kinds from UNPARSEABLE on set the value to missing; those before it keep it)
_CELL_KINDS = (None, AMBIGUOUS_SEPARATOR, CENSORED_LOW, CENSORED_HIGH, UNICODE_DIGITS,
               UNPARSEABLE, NEGATIVE, IMPLAUSIBLE)
_CODE = {kind: code for code, kind in enumerate(_CELL_KINDS) if kind}

# Markers the ImmunoSep rule thresholds: canonical column -> (cut-off in the panel unit, whether
# the rule fires above it). A censored value is kept at its bound only if the rule answers the
# same at the bound as for every value the cell allows; otherwise it is set to missing.
_RULE_CUT_OFFS: dict[str, tuple[float, bool]] = {
    "ferritin_ng_ml": (FERRITIN_MALS_NG_ML, True),  # MALS if ferritin > cut-off
    "hla_dr_mab_per_cell": (HLA_DR_IMMUNOPARALYSIS_MAB_PER_CELL, False),  # immunoparalysis if <
}


class CohortError(Exception):
    """A whole-file problem: the message names the file and says how to fix it."""


def empty_issues() -> pd.DataFrame:
    """An issue table with no rows (the shape every `Cohort.issues` has)."""
    return pd.DataFrame({name: pd.Series(dtype="int64" if name == "row" else "str")
                         for name in ISSUE_COLUMNS})


@dataclass(frozen=True, eq=False)
class Cohort:
    """A cohort in canonical form.

    `data` has one row per input row in input order: every canonical column (all-missing when
    the file lacks it; markers float64 in panel units, sex "F"/"M", ids as strings), then the
    file's other columns unchanged. `issues` lists problem cells (`ISSUE_COLUMNS`, 1-based
    data row numbers). `columns` maps each canonical column found to its source column and
    `units` each marker to the unit its source was in. `first_row` is the file row number of
    `data`'s first row (above 1 for a later block of a file read in blocks). `label_recode`
    is the mapping's `[labels]` table (label text -> phenotype or `indeterminate`), for
    `labels.read_labels`; `trial_columns` maps each trial/outcome column the mapping renamed
    (`TRIAL_COLUMNS`) to its source column.
    """

    data: pd.DataFrame
    issues: pd.DataFrame = field(default_factory=empty_issues)
    source: str = ""
    columns: dict[str, str] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    first_row: int = 1
    label_recode: dict[str, str] = field(default_factory=dict)
    trial_columns: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ColumnSource:
    """Where one canonical column comes from: file column, its unit and conversion factor."""

    column: str
    unit: str = ""
    factor: float = 1.0
    # codes (lower-case) -> "F"/"M" for sex, an arm of contract.ARMS for treatment, "0"/"1"
    # for an outcome
    values: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ColumnMapping:
    """A validated mapping file: column sources by canonical (or trial) name, the decimal
    mark, and the `[labels]` recode (stripped label text -> phenotype or `indeterminate`)."""

    path: Path | None = None
    columns: dict[str, ColumnSource] = field(default_factory=dict)
    decimal: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


# --- reading --------------------------------------------------------------------------------


@dataclass
class _StreamState:
    """What one block must know about the blocks before it."""

    comma_columns: set[str] = field(default_factory=set)  # columns seen with a decimal comma
    id_hashes: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint64))  # sorted
    id_first_rows: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    offset: int = 0  # rows before this block


@dataclass(frozen=True)
class CohortFile:
    """A cohort file opened for reading: header checked and columns resolved, rows not read yet.

    `blocks()` reads it block by block, so a file of any size is read in flat memory; each
    block is a `Cohort` whose issue rows are numbered in the whole file. A decimal comma seen in
    a column decides ambiguous cells from that block on (earlier blocks are not read again;
    their ambiguous cells are issues either way, and a mapping's `decimal` settles them), and
    duplicate ids are found across blocks (by a 64-bit hash of the id: a false match would
    take over 10^9 ids to be likely).
    """

    path: Path
    mapping: ColumnMapping
    sources: dict[str, ColumnSource]
    header: tuple[str, ...]  # the file's column names
    delimiter: str | None  # None for Parquet
    encoding: str = "utf-8"
    leading_blank_lines: int = 0
    block_rows: int | None = BLOCK_ROWS  # None: the whole file as one block
    trial_sources: dict[str, ColumnSource] = field(default_factory=dict)  # TRIAL_COLUMNS mapped
    csv_reader: str = "arrow"  # or "pandas" (CSV_READERS; open_cohort says when each is used)

    @property
    def columns(self) -> dict[str, str]:
        return {name: source.column for name, source in self.sources.items()}

    @property
    def data_columns(self) -> list[str]:
        """The columns of each block's `data` that come from the file, by their names there:
        canonical and renamed trial columns, then the file's other columns."""
        used = {s.column for s in (*self.sources.values(), *self.trial_sources.values())}
        return [*self.sources, *self.trial_sources,
                *(name for name in self.header if name not in used)]

    @property
    def label_recode(self) -> dict[str, str]:
        """The mapping's `[labels]` table (for `labels.read_labels`)."""
        return dict(self.mapping.labels)

    @property
    def trial_columns(self) -> dict[str, str]:
        return {name: source.column for name, source in self.trial_sources.items()}

    @property
    def units(self) -> dict[str, str]:
        return {name: source.unit for name, source in self.sources.items() if name in PANEL}

    def blocks(self) -> Iterator[Cohort]:
        """The file's rows as canonical cohorts of at most `block_rows` rows, in file order."""
        state = _StreamState()
        for raw in self._raw_blocks():
            yield _canonical(raw, self, state)
            state.offset += len(raw)
        if state.offset == 0:
            raise CohortError(f"Cohort file {self.path} has no data rows; export the cohort "
                              "again.")

    def _raw_blocks(self) -> Iterator[pd.DataFrame]:
        if self.delimiter is None:
            return _parquet_blocks(self.path, self.block_rows)
        return _without_trailing_blank_rows(self._text_blocks())

    def _text_blocks(self) -> Iterator[pd.DataFrame]:
        """Blocks of text cells: Arrow's reader's while it reads the file as pandas' would, then
        (from the first block it could not) pandas' reader's, which reads the file up to there
        again. The same blocks either way."""
        args = (self.path, self.delimiter, self.encoding, self.leading_blank_lines,
                self.block_rows)
        alike = 0  # blocks Arrow read
        if self.csv_reader == "arrow":
            try:
                for frame in _arrow_blocks(self.path, self.delimiter, self.header,
                                           self.block_rows):
                    yield frame
                    alike += 1
                return
            except _NotAlike:
                pass
        blocks = _delimited_blocks(*args)
        for _ in range(alike):
            next(blocks)
        yield from blocks


def censored_cells(cohort: Cohort) -> dict[str, np.ndarray]:
    """Per marker with censored results, a sign per data row: -1 where the value kept is an
    upper bound ("<0.5": the true value is at most it), +1 a lower bound (">100000"), 0 a
    plain value. The latent-class fit reads these cells as intervals (`latent.intervals`)."""
    signs: dict[str, np.ndarray] = {}
    issues = cohort.issues
    for kind, sign in ((CENSORED_LOW, -1), (CENSORED_HIGH, 1)):
        chosen = issues[issues["kind"] == kind]
        for column, rows in chosen.groupby("column")["row"]:
            positions = rows.to_numpy(dtype=int) - cohort.first_row
            signs.setdefault(str(column), np.zeros(len(cohort.data), np.int8))[positions] = sign
    return signs


def open_cohort(path: str | Path, mapping: str | Path | None = None,
                block_rows: int | None = BLOCK_ROWS, csv_reader: str = "arrow") -> CohortFile:
    """Open a CSV/TSV/TXT or Parquet cohort file for block-wise reading (whole-file checks);
    `block_rows=None` reads it as one block. `csv_reader` (`CSV_READERS`) picks the text reader:
    `arrow` takes Arrow's (several times faster) for a UTF-8 file with no blank lines before
    the header, else pandas'; `pandas` always pandas'. Both give the same blocks: Arrow's
    reader hands over to pandas' where pandas' would read the file otherwise (a ragged row or
    a line of spaces, a header pandas renames, a quoted cell the file ends in)."""
    path = Path(path)
    if csv_reader not in CSV_READERS:
        raise ValueError(f"csv_reader must be one of {', '.join(CSV_READERS)}, not "
                         f"{csv_reader!r}")
    column_mapping = read_mapping(mapping) if mapping is not None else ColumnMapping()
    _check_path(path)
    if path.suffix.lower() in PARQUET_SUFFIXES:
        header, delimiter, encoding, leading = _parquet_header(path), None, "", 0
    else:
        delimiter, encoding, leading = _sniff_text(path)
        header = _delimited_header(path, delimiter, encoding, leading)
        if encoding != "utf-8-sig" or leading:
            csv_reader = "pandas"
    resolved = _resolve_sources(path, header, column_mapping)
    sources = {name: source for name, source in resolved.items() if name not in TRIAL_COLUMNS}
    trial = {name: source for name, source in resolved.items() if name in TRIAL_COLUMNS}
    if not any(name in NUMERIC_MARKERS for name in sources):
        raise CohortError(_no_marker_message(path, header))
    return CohortFile(path, column_mapping, sources, tuple(header), delimiter, encoding, leading,
                      block_rows, trial_sources=trial, csv_reader=csv_reader)


def read_cohort(path: str | Path, mapping: str | Path | None = None) -> Cohort:
    """Read a whole CSV/TSV/TXT or Parquet cohort file, optionally through a TOML mapping.

    One block: a decimal comma anywhere in a column decides every ambiguous cell in it.
    """
    [cohort] = open_cohort(path, mapping, block_rows=None).blocks()
    return cohort


def _canonical(frame: pd.DataFrame, opened: CohortFile, state: _StreamState) -> Cohort:
    """One block of raw cells in canonical form, with its issues (rows numbered in the file)."""
    data: dict[str, object] = {}
    issue_parts: list[pd.DataFrame] = []
    for canonical in CANONICAL_COLUMNS:
        source = opened.sources.get(canonical)
        if source is None:
            data[canonical] = (np.full(len(frame), np.nan) if canonical in NUMERIC_MARKERS
                               else pd.Series(np.nan, index=frame.index, dtype="str"))
            continue
        raw = frame[source.column]
        if canonical in NUMERIC_MARKERS:
            comma_seen = canonical in state.comma_columns
            values, parts, comma = _read_marker(raw, PANEL[canonical], source,
                                                opened.mapping.decimal, opened.delimiter == ";",
                                                comma_seen)
            if comma:
                state.comma_columns.add(canonical)
        elif canonical == "sex":
            values, parts = _read_sex(raw, source)
        else:
            values, parts = _read_id(raw, canonical, state, _sample_times(frame, opened))
        data[canonical] = values
        issue_parts.extend(
            part.assign(column=canonical, source_column=source.column,
                        column_order=CANONICAL_COLUMNS.index(canonical))
            for part in parts)

    used = {source.column for source in opened.sources.values()}
    trial_of = {source.column: name for name, source in opened.trial_sources.items()}
    extras: dict[str, object] = {}
    for name in frame.columns:
        if name in used:
            continue
        if name not in trial_of:
            extras[name] = frame[name]
            continue
        canonical = trial_of[name]  # renamed; passed through unparsed but for treatment codes
        source = opened.trial_sources[canonical]
        extras[canonical] = frame[name]
        if canonical in OUTCOME_COLUMNS and source.values:
            text = _text(frame[name]).str.lower().map(source.values)  # _text strips
            extras[canonical] = frame[name].astype(object).where(
                text.isna().to_numpy(bool), text.to_numpy(dtype=object))
        if canonical == TREATMENT:
            extras[canonical], parts = _read_treatment(frame[name], source)
            issue_parts.extend(
                part.assign(column=canonical, source_column=source.column,
                            column_order=len(CANONICAL_COLUMNS) + TRIAL_COLUMNS.index(canonical))
                for part in parts)
    times = _sample_times(frame, opened)
    if times is not None:
        source = opened.trial_sources.get(SAMPLE_TIME)
        issue_parts.append(_read_sample_time(times).assign(
            column=SAMPLE_TIME, source_column=source.column if source else SAMPLE_TIME,
            column_order=len(CANONICAL_COLUMNS) + TRIAL_COLUMNS.index(SAMPLE_TIME)))
    index = pd.RangeIndex(len(frame))
    result = pd.DataFrame({**data, **extras}, index=index)
    issues = _collect_issues(issue_parts)
    issues["row"] += state.offset
    return Cohort(data=result, issues=issues, source=str(opened.path), columns=opened.columns,
                  units=opened.units, first_row=state.offset + 1,
                  label_recode=opened.label_recode, trial_columns=opened.trial_columns)


def _check_path(path: Path) -> None:
    """A readable cohort file of a supported type, or a CohortError that says what to do."""
    if not path.exists():
        nearby = difflib.get_close_matches(path.name, [p.name for p in path.parent.glob("*")]
                                           if path.parent.is_dir() else [], n=3)
        hint = f" Did you mean {_quoted(nearby)}?" if nearby else " Check the path."
        raise CohortError(f"Cohort file {path} does not exist.{hint}")
    if not path.is_file():
        raise CohortError(f"Cohort path {path} is not a file; give a CSV or Parquet file.")
    if path.suffix.lower() not in (*PARQUET_SUFFIXES, *CSV_SUFFIXES):
        raise CohortError(
            f"Cohort file {path} has an unsupported type '{path.suffix}'. Export it as CSV "
            f"({', '.join(CSV_SUFFIXES)}) or Parquet ({', '.join(PARQUET_SUFFIXES)}).")


def _parquet_error(path: Path, error: Exception) -> CohortError:
    return CohortError(f"Cohort file {path} is not a readable Parquet file ({error}). "
                       "Write it again, or export it as CSV.")


def _parquet_header(path: Path) -> list[str]:
    """Column names as the blocks will have them (a stored pandas index becomes column(s))."""
    first = next(_parquet_blocks(path, 1), None)
    if first is None:
        raise CohortError(f"Cohort file {path} has no data rows; export the cohort again.")
    return list(first.columns)


def _parquet_blocks(path: Path, block_rows: int | None) -> Iterator[pd.DataFrame]:
    """Record batches as frames with a fresh row index; a stored pandas index becomes
    column(s)."""
    try:
        parquet = pq.ParquetFile(path)
        tables = ([parquet.read()] if block_rows is None else
                  (pa.Table.from_batches([batch])
                   for batch in parquet.iter_batches(batch_size=block_rows)))
        for table in tables:
            frame = table.to_pandas()
            if not isinstance(frame.index, pd.RangeIndex):
                frame = frame.reset_index()
            frame.columns = [str(name) for name in frame.columns]
            yield frame.set_axis(pd.RangeIndex(len(frame)), axis=0)
    except (pa.ArrowException, OSError, ValueError) as error:
        raise _parquet_error(path, error) from None


def _sniff_text(path: Path) -> tuple[str, str, int]:
    """Delimiter, encoding and blank lines before the header of a delimited text file."""
    try:
        with path.open("rb") as handle:
            head = handle.read(_SNIFF_BYTES)
    except OSError as error:
        raise CohortError(f"Cannot read cohort file {path}: {error.strerror}.") from None
    if not head.strip():
        raise CohortError(f"Cohort file {path} is empty; export the cohort again.")
    utf16 = head[:2] in (b"\xff\xfe", b"\xfe\xff")
    # a workbook (xlsx is a zip, xls an OLE2 file) or mostly NULs (UTF-16 without a BOM, a
    # binary format); a stray NUL in a text export only makes its cell unparseable
    binary = (head.startswith((b"PK\x03\x04", b"\xd0\xcf\x11\xe0"))
              or head.count(b"\x00") > _BINARY_NUL_SHARE * len(head))
    if not utf16 and binary:
        raise CohortError(f"Cohort file {path} is not a text file (an Excel workbook?). "
                          "Save it as CSV, or as Parquet with a .parquet name.")
    encoding = "utf-16" if utf16 else "utf-8-sig"
    if not _decodes(path, encoding):
        if utf16:
            raise CohortError(f"Cohort file {path} is not valid UTF-16 text; export it "
                              "again as UTF-8 CSV.")
        encoding = "latin-1"  # most likely a Windows export; latin-1 decodes any byte sequence
    text = head.decode(encoding, errors="replace")
    return _sniff_delimiter(text), encoding, _leading_blank_lines(text)


def _decodes(path: Path, encoding: str, piece_bytes: int = 1 << 24) -> bool:
    """Whether the whole file decodes (checked before streaming: no block is read twice)."""
    decoder = codecs.getincrementaldecoder(encoding)()
    try:
        with path.open("rb") as handle:
            while piece := handle.read(piece_bytes):
                decoder.decode(piece)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _leading_blank_lines(text: str) -> int:
    """How many blank (or whitespace-only) lines come before the header."""
    blank = re.match(r"(?:[ \t\f\v]*(?:\r\n|\r|\n))*", text)
    return len(re.findall(r"\r\n|\r|\n", blank.group(0))) if blank else 0


def _delimited_header(path: Path, delimiter: str, encoding: str, leading: int) -> list[str]:
    try:
        header = pd.read_csv(path, sep=delimiter, dtype=str, nrows=0, index_col=False,
                             encoding=encoding, skiprows=leading)
    except pd.errors.EmptyDataError:
        raise CohortError(f"Cohort file {path} is empty; export the cohort again.") from None
    except pd.errors.ParserError as error:
        raise _table_error(path, delimiter, error) from None
    return [str(name) for name in header.columns]


def _delimited_blocks(path: Path, delimiter: str, encoding: str, leading: int,
                      block_rows: int | None) -> Iterator[pd.DataFrame]:
    """Every cell as text, no NA conversion, `block_rows` rows at a time; a ragged table is
    a CohortError.

    Skips `leading` blank lines before the header; blank lines after it are all-empty rows, so
    row numbers match the file.
    """
    options = {"sep": delimiter, "dtype": str, "keep_default_na": False, "na_filter": False,
               "index_col": False, "encoding": encoding, "skip_blank_lines": False,
               "skiprows": leading}
    try:
        if block_rows is None:
            with warnings.catch_warnings():
                warnings.simplefilter("error", pd.errors.ParserWarning)
                frame = pd.read_csv(path, **options)
            yield frame.fillna("")
            return
        with pd.read_csv(path, chunksize=block_rows, **options) as reader:
            while True:
                with warnings.catch_warnings():  # held per block, never across a yield
                    warnings.simplefilter("error", pd.errors.ParserWarning)
                    frame = next(reader, None)
                if frame is None:
                    return
                yield frame.fillna("")
    except (pd.errors.ParserError, pd.errors.ParserWarning) as error:
        raise _table_error(path, delimiter, error) from None


def _table_error(path: Path, delimiter: str, error: Exception) -> CohortError:
    """pandas' refusal of a delimited file, as a CohortError that says what to check."""
    name = "tab" if delimiter == "\t" else f"'{delimiter}'"
    where = re.search(r"Expected \d+ fields in line \d+, saw \d+", str(error))
    return CohortError(
        f"Cohort file {path} is not a consistent {name}-delimited table: rows have more "
        f"fields than the header ({where.group(0) if where else 'from the first row on'})."
        " Check the delimiter and quoting (in a comma-delimited file, decimal commas must "
        "be quoted).")


class _NotAlike(Exception):
    """Arrow's reader would not read the rest of the file as pandas' does."""


class _WithEndRow(io.RawIOBase):
    """A file's bytes, then one more row (on a line of its own)."""

    def __init__(self, path: Path, row: bytes) -> None:
        self._file = path.open("rb")
        size = self._file.seek(0, io.SEEK_END)
        self._file.seek(max(0, size - 1))
        self._rest = row if self._file.read(1) in (b"\r", b"\n") else b"\n" + row
        self._file.seek(0)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:
        if read := self._file.readinto(buffer):
            return read
        piece, self._rest = self._rest[:len(buffer)], self._rest[len(buffer):]
        buffer[:len(piece)] = piece
        return len(piece)

    def close(self) -> None:
        self._file.close()
        super().close()


def _arrow_blocks(path: Path, delimiter: str, header: tuple[str, ...],
                  block_rows: int | None) -> Iterator[pd.DataFrame]:
    """Every cell as text, `block_rows` rows at a time, by Arrow's streaming reader; raises
    `_NotAlike` where pandas' reader would read the file otherwise (the blocks before that are
    the ones it would give).

    An empty line is a row of empty cells to both. Arrow refuses a row with more or fewer
    cells than the header, so a ragged row or a line of spaces (one cell) stops it; pandas pads
    a short row. The file is read with a row of `_END_CELL`s after it: a file that ends inside
    a quoted cell (an error to pandas) takes that row into the cell instead of ending with it.
    """
    end_row = delimiter.join([_END_CELL] * len(header)).encode()
    read = pa_csv.ReadOptions(use_threads=True, block_size=_ARROW_BLOCK_BYTES)
    parse = pa_csv.ParseOptions(delimiter=delimiter, newlines_in_values=True,
                                ignore_empty_lines=False)
    convert = pa_csv.ConvertOptions(column_types=dict.fromkeys(header, pa.string()))
    with _WithEndRow(path, end_row) as source:
        try:
            reader = pa_csv.open_csv(source, read, parse, convert)
        except pa.ArrowInvalid:
            raise _NotAlike from None
        if reader.schema.names != list(header):  # pandas renamed a repeated or empty name
            raise _NotAlike
        pending: list[pa.RecordBatch] = []
        rows = 0
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except pa.ArrowInvalid:
                raise _NotAlike from None
            pending.append(batch)
            rows += batch.num_rows
            while block_rows is not None and rows > block_rows:  # the last block ends the file
                table = pa.Table.from_batches(pending, reader.schema)
                yield table.slice(0, block_rows).to_pandas()
                pending, rows = table.slice(block_rows).to_batches(), rows - block_rows
        table = pa.Table.from_batches(pending, reader.schema)
    if not rows or any(column[-1].as_py() != _END_CELL for column in table.columns):
        raise _NotAlike
    if rows > 1:
        yield table.slice(0, rows - 1).to_pandas()


def _sniff_delimiter(head: str) -> str:
    """The delimiter that splits the header, preferring one that splits every first line alike.

    Ties go to more header fields; a file no candidate splits is one ','-delimited column.
    """
    lines = head.splitlines()
    if len(lines) > 1 and not head.endswith(("\n", "\r")):
        lines = lines[:-1]  # the last line may be cut off by the sniff window
    lines = [line for line in lines[:50] if line.strip()]

    def score(delimiter: str) -> tuple[bool, bool, int]:
        counts = [len(fields) for fields in csv.reader(lines, delimiter=delimiter)] or [0]
        return counts[0] > 1, len(set(counts)) == 1, counts[0]

    best = max(_DELIMITERS, key=score)
    return best if score(best)[0] else ","


def _without_trailing_blank_rows(blocks: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """Text blocks without the empty rows after the file's last non-empty row (not data).

    Blank rows at the end of a block are held back until a later block shows whether any
    data follows them; row positions are renumbered from 0 in each block.
    """
    pending: pd.DataFrame | None = None
    for frame in blocks:
        if pending is not None and len(pending):
            frame = pd.concat([pending, frame], ignore_index=True)
        end = _filled_length(frame)
        if end:
            yield frame.iloc[:end].reset_index(drop=True)
        pending = frame.iloc[end:]


def _filled_length(frame: pd.DataFrame) -> int:
    """The number of rows up to and including the last row with a non-blank cell."""
    end, size = len(frame), 16
    while end:
        start = max(0, end - size)
        filled = np.zeros(end - start, dtype=bool)
        for position in range(frame.shape[1]):
            cells = frame.iloc[start:end, position].str.strip()
            filled |= cells.ne("").to_numpy(dtype=bool)
        if filled.any():
            return start + int(np.flatnonzero(filled)[-1]) + 1
        end, size = start, size * 2
    return 0


# --- writing --------------------------------------------------------------------------------


def write_table(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a table as Parquet or CSV (by suffix), atomically: a reader never sees half a file.

    An interrupted write leaves the old file (or none), never a truncated one. Failures name
    `path`, never the temporary file: an OSError with an errno is raised as such (its `strerror`
    the system's plain reason, `filename` = `path`); any other Arrow error is a CohortError.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (*PARQUET_SUFFIXES, ".csv"):
        raise CohortError(
            f"Cannot write {path}: use a .parquet or .csv file name "
            f"(got '{path.suffix or 'no suffix'}').")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        table = pa.Table.from_pandas(frame, preserve_index=False)
        with atomic_path(path) as temporary:
            try:
                if suffix == ".csv":
                    pa_csv.write_csv(table, temporary)
                else:
                    pq.write_table(table, temporary)
            except pa.ArrowException as error:
                if isinstance(error, OSError):
                    raise  # atomic_path renames it to `path`
                reason = _arrow_reason(error).replace(str(temporary), str(path))
                raise CohortError(f"Cannot write {path}: {reason}.") from None
    except OSError as error:
        if error.errno is None or not error.strerror:  # Arrow I/O errors without an errno
            raise CohortError(f"Cannot write {path}: {_arrow_reason(error)}.") from None
        raise
    except pa.ArrowException as error:  # the frame has columns Arrow cannot type
        raise CohortError(f"Cannot write {path}: {_arrow_reason(error)}.") from None
    return path


def _arrow_reason(error: Exception) -> str:
    """An Arrow error's message (some carry several parts in `args`)."""
    return "; ".join(str(part).rstrip(".") for part in error.args) or type(error).__name__


# --- mapping --------------------------------------------------------------------------------


def read_mapping(path: str | Path) -> ColumnMapping:
    """Read and validate a TOML mapping file (format in the module docstring)."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise CohortError(f"Mapping file {path} does not exist; check the path.") from None
    except OSError as error:
        raise CohortError(f"Cannot read mapping file {path}: {error.strerror}.") from None
    except tomllib.TOMLDecodeError as error:
        raise CohortError(f"Mapping file {path} is not valid TOML ({error}); see "
                          "'[columns]' examples in the phenotyper.cohort docs.") from None
    _check_keys(path, "the top level", document, ("columns", "labels", "options"))
    columns = _table(path, "[columns]", document.get("columns", {}))
    options = _table(path, "[options]", document.get("options", {}))
    labels = _label_recode(path, document.get("labels", {}))
    _check_keys(path, "[options]", options, ("decimal",))
    decimal = options.get("decimal")
    if decimal not in (None, ".", ","):
        raise CohortError(f"Mapping file {path}: [options] decimal must be \".\" or \",\", "
                          f"not {decimal!r}.")
    sources = {key: _column_source(path, key, entry) for key, entry in columns.items()}
    return ColumnMapping(path=path, columns=sources, decimal=decimal, labels=labels)


def _label_recode(path: Path, table: object) -> dict[str, str]:
    """The validated `[labels]` table: stripped label text -> phenotype or `indeterminate`."""
    if not isinstance(table, dict):
        raise CohortError(f"Mapping file {path}: [labels] must be a table of label texts and "
                          f"the phenotypes they stand for, such as [labels] \"1\" = \"MALS\", "
                          f"not {table!r}.")
    accepted = ", ".join(f"'{word}'" for word in RECODE_TARGETS)
    recode: dict[str, str] = {}
    origin: dict[str, str] = {}
    for key, value in table.items():
        stripped = key.strip()
        if not stripped:
            raise CohortError(f"Mapping file {path}: [labels] has an empty key {key!r}: an "
                              "empty label cell always means no label; recode label texts, "
                              "e.g. \"1\" = \"MALS\".")
        target = recode_target(value) if isinstance(value, str) else None
        if target is None:
            near = (difflib.get_close_matches(value.strip(), RECODE_TARGETS, n=1)
                    if isinstance(value, str) else [])
            hint = f" Did you mean '{near[0]}'?" if near else ""
            raise CohortError(f"Mapping file {path}: [labels] {key!r} = {value!r} is not a "
                              f"label phenotyper knows.{hint} A label must be recoded to one "
                              f"of {accepted} ('intermediate' is read as 'unclassified'; "
                              "'indeterminate' leaves the patient out).")
        if stripped in recode and recode[stripped] != target:
            raise CohortError(f"Mapping file {path}: [labels] keys {origin[stripped]!r} and "
                              f"{key!r} are the same label text (spaces around it are ignored) "
                              f"but recode it to '{recode[stripped]}' and '{target}'; keep one.")
        recode[stripped], origin[stripped] = target, key
    return recode


def _column_source(path: Path, key: str, entry: object) -> ColumnSource:
    """One validated `[columns]` entry."""
    known = (*CANONICAL_COLUMNS, *TRIAL_COLUMNS)
    if key not in known:
        near = (difflib.get_close_matches(key, known, n=1) or [_suggest(key)])[0]
        hint = f" Did you mean {near}?" if near else ""
        raise CohortError(f"Mapping file {path}: [columns] has unknown column {key!r}.{hint} "
                          f"Canonical columns are: {', '.join(CANONICAL_COLUMNS)}; sample, "
                          f"trial and outcome columns: {', '.join(TRIAL_COLUMNS)}.")
    where = f"[columns] {key}"
    if isinstance(entry, str):
        entry = {"column": entry}
    entry = _table(path, where, entry)
    allowed = ("column", "unit") if key in NUMERIC_MARKERS else ("column",)
    _check_keys(path, where, entry,
                (*allowed, "values") if key in ("sex", TREATMENT, *OUTCOME_COLUMNS) else allowed)
    column = entry.get("column", key)
    if not isinstance(column, str):
        raise CohortError(f"Mapping file {path}: {where} column must be a text, not {column!r}.")
    if key == TREATMENT:
        return ColumnSource(column, values=_arm_values(path, entry))
    if key in OUTCOME_COLUMNS:
        return ColumnSource(column, values=_outcome_values(path, key, entry))
    if key in TRIAL_COLUMNS:
        return ColumnSource(column)
    if key == "sex":
        return ColumnSource(column, PANEL[key].unit, values=_sex_values(path, entry))
    if key not in NUMERIC_MARKERS:
        return ColumnSource(column)
    marker = PANEL[key]
    unit = entry.get("unit", marker.unit)
    factor = marker.factor(unit) if isinstance(unit, str) else None
    if factor is None:
        accepted = list(dict.fromkeys([marker.unit, *marker.units]))
        by_norm = {normalise_unit(name): name for name in accepted}
        near = difflib.get_close_matches(normalise_unit(str(unit)), list(by_norm), n=1)
        hint = f" Did you mean '{by_norm[near[0]]}'?" if near else ""
        raise CohortError(f"Mapping file {path}: {where} has unknown unit {unit!r} for "
                          f"{marker.label}.{hint} Accepted units: {', '.join(accepted)}.")
    return ColumnSource(column, unit, factor)


def _sex_values(path: Path, entry: dict) -> dict[str, str]:
    """The `values` table of the sex entry: file codes (lower-cased) to "F"/"M"."""
    values = _table(path, "[columns] sex values", entry.get("values", {}))
    bad = {code: label for code, label in values.items()
           if not isinstance(label, str) or label.strip().upper() not in SEX_VALUES}
    if bad:
        raise CohortError(f"Mapping file {path}: [columns] sex values must map codes to "
                          f"\"F\" or \"M\"; fix {bad}.")
    return {code.strip().lower(): label.strip().upper() for code, label in values.items()}


def _outcome_values(path: Path, key: str, entry: dict) -> dict[str, str]:
    """The `values` table of an outcome entry: file codes (lower-cased) to "0" or "1"."""
    values = _table(path, f"[columns] {key} values", entry.get("values", {}))
    bad = {code: value for code, value in values.items()
           if isinstance(value, float) or value not in (0, 1)}  # True/False are 1/0
    if bad:
        raise CohortError(f"Mapping file {path}: [columns] {key} values must map codes to 1 "
                          f"(the outcome happened) or 0; fix {bad}.")
    return {code.strip().lower(): str(int(value)) for code, value in values.items()}


def _arm_word(text: str) -> str | None:
    """The arm a treatment text names (contract.ARM_WORDS: any case, spaces as '_'), or None."""
    return ARM_WORDS.get(text.strip().lower().replace(" ", "_"))


def _arm_values(path: Path, entry: dict) -> dict[str, str]:
    """The `values` table of the treatment entry: file codes (lower-cased) to an arm."""
    values = _table(path, "[columns] treatment values", entry.get("values", {}))
    codes: dict[str, str] = {}
    for code, arm in values.items():
        target = _arm_word(arm) if isinstance(arm, str) else None
        if target not in ARMS:
            near = (difflib.get_close_matches(arm.strip().lower(), ARMS, n=1)
                    if isinstance(arm, str) else [])
            hint = f" Did you mean '{near[0]}'?" if near else ""
            raise CohortError(f"Mapping file {path}: [columns] treatment values maps {code!r} "
                              f"to {arm!r}, which is not a treatment arm.{hint} Arms: "
                              f"{', '.join(ARMS)}.")
        codes[code.strip().lower()] = target
    return codes


def _table(path: Path, where: str, value: object) -> dict:
    if not isinstance(value, dict):
        raise CohortError(f"Mapping file {path}: {where} must be a table such as "
                          f"{{ column = \"...\" }}, not {value!r}.")
    return value


def _check_keys(path: Path, where: str, table: dict, allowed: tuple[str, ...]) -> None:
    for key in table:
        if key not in allowed:
            hint = did_you_mean(key, allowed)
            raise CohortError(f"Mapping file {path}: {where} has unknown key {key!r}.{hint} "
                              f"Allowed: {', '.join(allowed)}.")


def _resolve_sources(path: Path, file_columns: list[str], mapping: ColumnMapping
                     ) -> dict[str, ColumnSource]:
    """Source of each canonical column: the mapping's entry, else a same-named file column;
    and of each trial column (`TRIAL_COLUMNS`) the mapping names."""
    sources: dict[str, ColumnSource] = {}
    for canonical in (*CANONICAL_COLUMNS, *TRIAL_COLUMNS):
        source = mapping.columns.get(canonical)
        if source is None:
            if canonical in file_columns and canonical in CANONICAL_COLUMNS:
                unit = PANEL[canonical].unit if canonical in PANEL else ""
                sources[canonical] = ColumnSource(canonical, unit)
            continue
        if source.column not in file_columns:
            lower = {name.lower(): name for name in file_columns}
            near = ([lower[source.column.lower()]] if source.column.lower() in lower
                    else difflib.get_close_matches(source.column, file_columns, n=3))
            hint = f" Did you mean {_quoted(near)}?" if near else ""
            raise CohortError(
                f"Mapping file {mapping.path}: [columns] {canonical} reads column "
                f"'{source.column}', which is not in {path}.{hint} The file's columns are: "
                f"{_column_list(file_columns)}.")
        if canonical in file_columns and source.column != canonical:
            raise CohortError(
                f"Mapping file {mapping.path}: [columns] {canonical} reads column "
                f"'{source.column}', but {path} also has a column named {canonical}. Map "
                f"{canonical} to that column or rename one of the two in the file.")
        sources[canonical] = source
    by_column: dict[str, str] = {}
    for canonical, source in sources.items():
        if source.column in by_column:
            raise CohortError(
                f"Mapping file {mapping.path}: column '{source.column}' of {path} is used for "
                f"both {by_column[source.column]} and {canonical}; each file column can feed "
                "one canonical column.")
        by_column[source.column] = canonical
    return sources


# --- suggestions ----------------------------------------------------------------------------


def _squash(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _aliases() -> dict[str, str]:
    """Squashed names a column may go by (name prefixes, labels) -> canonical column."""
    aliases: dict[str, str] = {}
    for name in CANONICAL_COLUMNS:
        parts = name.split("_")
        spellings = ["_".join(parts[:k]) for k in range(len(parts), 0, -1)]
        if name in PANEL:
            spellings.append(PANEL[name].label)
        for spelling in spellings:
            if len(_squash(spelling)) >= 3:
                aliases.setdefault(_squash(spelling), name)
    return aliases


_ALIASES = _aliases()


def _suggest(column: str) -> str | None:
    """The canonical column a file column name most likely means, if any looks close."""
    squashed = _squash(re.sub(r"[(\[].*?[)\]]", "", column)) or _squash(column)
    if squashed in _ALIASES:
        return _ALIASES[squashed]
    near = difflib.get_close_matches(squashed, list(_ALIASES), n=1, cutoff=0.8)
    return _ALIASES[near[0]] if near else None


def _no_marker_message(path: Path, file_columns: list[str]) -> str:
    """Why a file has no usable marker column, and the mapping that would fix it."""
    suggestions = {name: _suggest(name) for name in file_columns}
    suggestions = {name: canonical for name, canonical in suggestions.items() if canonical}
    message = (f"Cohort file {path} has no recognised marker column. The file's columns are: "
               f"{_column_list(file_columns)}.")
    if len(file_columns) == 1:
        message += (" Only one column was found: is the file delimited by something other than "
                    "',', ';', tab or '|'?")
    if suggestions:
        looks = ", ".join(f"'{name}' looks like {canonical}"
                          for name, canonical in suggestions.items())
        markers = [(name, PANEL[canonical]) for name, canonical in suggestions.items()
                   if canonical in NUMERIC_MARKERS]
        example = ""
        if markers:
            name, marker = markers[0]
            unit = _unit_in_name(name, marker) or marker.unit
            example = (f" with, e.g., [columns] {marker.column} = {{ column = \"{name}\", "
                       f"unit = \"{unit}\" }} giving the unit the file uses,")
        message += (f" {looks}. Write a mapping file (TOML){example} and pass it with "
                    "--mapping.")
    else:
        message += (" Rename the marker columns to canonical names (e.g. ferritin_ng_ml) or "
                    "write a mapping file and pass it with --mapping.")
    return message


def _unit_in_name(column: str, marker: Marker) -> str | None:
    """A known unit written in brackets in a column name, e.g. 'CRP (mg/dL)'."""
    found = re.search(r"[(\[]([^)\]]+)[)\]]", column)
    if found and marker.factor(found.group(1)) is not None:
        return found.group(1).strip()
    return None


def _quoted(names: list[str]) -> str:
    return " or ".join(f"'{name}'" for name in names)


def _column_list(names: list[str], limit: int = 40) -> str:
    shown = ", ".join(f"'{name}'" for name in names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


# --- cells ----------------------------------------------------------------------------------


def _text(raw: pd.Series) -> pd.Series:
    """Cells as stripped text ("" when null); whole numbers print without '.0' (ids, codes)."""
    if pd.api.types.is_numeric_dtype(raw) and not pd.api.types.is_bool_dtype(raw):
        numbers = raw.astype("float64").dropna()
        if np.isfinite(numbers).all() and (numbers % 1 == 0).all():
            raw = raw.astype("Int64")
    return raw.astype("str").fillna("").str.strip()


def _is_missing(text: pd.Series) -> np.ndarray:
    return text.str.lower().isin(MISSING_TOKENS).to_numpy(dtype=bool)


def _cast(text: pd.Series, where: np.ndarray | None = None) -> np.ndarray:
    """Floats of strings that are plain decimal numbers where `where` is true (else NaN).

    A vectorised Arrow cast; masking instead of subsetting spares a copy of the column.
    """
    strings = pa.array(text, type=pa.large_string())
    if where is not None:
        strings = pc.if_else(pa.array(where), strings, pa.scalar(None, pa.large_string()))
    # np.array copies: the Arrow buffer is read-only and callers assign into the result
    return np.array(pc.cast(strings, pa.float64()).to_numpy(zero_copy_only=False))


def _plain(text: pd.Series) -> np.ndarray:
    """Which cells (stripped texts) are plain decimal numbers (`_PLAIN`)."""
    strings = pa.array(text, type=pa.large_string())
    if isinstance(strings, pa.ChunkedArray):
        strings = strings.combine_chunks()
    _validity, offsets, data = strings.buffers()
    ends = np.frombuffer(offsets, np.int64)[strings.offset:strings.offset + len(strings) + 1]
    chars = np.frombuffer(data, np.uint8)[ends[0]:ends[-1]] if data else np.empty(0, np.uint8)
    if ends.size > 1 and _DIGIT_OR_DOT[chars].all():
        dots = pc.count_substring(strings, ".").to_numpy(zero_copy_only=False)
        return (dots <= 1) & (np.diff(ends) > dots)
    return text.str.fullmatch(_PLAIN).to_numpy(dtype=bool)


def _replace(text: pd.Series, replacements: tuple[tuple[str, str], ...]) -> pd.Series:
    for old, new in replacements:
        text = text.str.replace(old, new, regex=False)
    return text


_COMMA, _DOT = 1, 2  # which separator made a cell's reading ambiguous


@dataclass
class _Numbers:
    """Numeric cells of one column in source units, with per-cell issue codes."""

    value: np.ndarray  # float64, NaN = missing
    code: np.ndarray  # int8 index into _CELL_KINDS
    other: np.ndarray  # the reading not taken for an ambiguous separator, else NaN
    ambiguous: np.ndarray  # int8: 0, _COMMA or _DOT
    reason: dict[int, str]  # _COMMA/_DOT -> why such cells were read as they were
    comma_evidence: bool = False  # the column (so far) has decimal-comma values


def _parse_numbers(text: pd.Series, decimal: str | None, semicolon: bool,
                   comma_seen: bool = False) -> _Numbers:
    """Parse stripped cell texts: fast Arrow cast of plain numbers, regex forms for the rest.

    A lone separator followed by exactly three digits ("4,420", "4.420") can be a decimal mark
    or a thousands separator. `decimal` (from the mapping) decides; in auto mode the decimal
    mark is a comma in ';'-delimited files (the convention of decimal-comma locales) and in
    columns with other decimal-comma values (in this block or, `comma_seen`, an earlier one),
    so there "4,420" is 4.42 and "4.420" is 4420;
    elsewhere a comma groups thousands and a dot is a decimal point (not flagged). Each cell
    read in auto mode with a comma, or with a dot under the decimal-comma convention, is an
    `ambiguous_separator` issue.
    """
    n = len(text)
    text, rewritten = _ascii_numbers(text)
    code = np.zeros(n, dtype=np.int8)
    other = np.full(n, np.nan)
    ambiguous = np.zeros(n, dtype=np.int8)
    plain = _plain(text)
    value = _cast(text, where=plain)
    rest = np.flatnonzero(~plain)
    rest = rest[~_is_missing(text.iloc[rest])]
    messy = _parse_messy(text.iloc[rest])
    value[rest], code[rest] = messy["value"], messy["code"]

    auto = decimal is None
    evidence = comma_seen or bool(np.isin(messy["form"], _COMMA_EVIDENCE).any())
    comma_decimal = decimal == "," or (auto and (semicolon or evidence))
    dot_grouping = comma_decimal  # a decimal-comma writer groups thousands with dots
    comma = messy["form"] == _FORM_CODE["ambiguous_comma"]
    # (separator, cells, their grouped reading, whether the grouped reading is taken)
    candidates = [(_COMMA, rest[comma], messy["grouped"][comma], not comma_decimal)]
    if dot_grouping:
        dot = messy["form"] == _FORM_CODE["ambiguous_dot"]
        # a plain "4.420" took the fast path
        fast = np.flatnonzero(text.str.fullmatch(r"[+-]?\d{1,3}\.\d{3}").to_numpy(bool))
        grouped_fast = _cast(text.iloc[fast].str.replace(".", "", regex=False))
        candidates.append((_DOT, np.concatenate([rest[dot], fast]),
                           np.concatenate([messy["grouped"][dot], grouped_fast]), True))
    for separator, cells, grouped, take_grouped in candidates:
        as_decimal = value[cells]
        value[cells], other[cells] = ((grouped, as_decimal) if take_grouped
                                      else (as_decimal, grouped))
        if auto:
            ambiguous[cells] = separator
    code[(code == 0) & (ambiguous > 0)] = _CODE[AMBIGUOUS_SEPARATOR]
    code[(code == 0) & rewritten & np.isfinite(value)] = _CODE[UNICODE_DIGITS]
    because = ("the file is ';'-delimited, which implies a decimal comma" if semicolon
               else "other values in this column use a decimal comma")
    reason = {
        _COMMA: f"comma read as decimal mark: {because}" if comma_decimal
        else "comma read as thousands separator: no value in this column uses a decimal comma",
        _DOT: f"dot read as thousands separator: {because}",
    }
    return _Numbers(value, code, other, ambiguous, reason, evidence)


def _ascii_character(character: str) -> str:
    digit = unicodedata.decimal(character, None)
    return str(digit) if digit is not None else _ARABIC_MARKS.get(character, character)


def _ascii_numbers(text: pd.Series) -> tuple[pd.Series, np.ndarray]:
    """Cells with non-ASCII text NFKC-normalised (full-width digits, compatibility forms),
    their remaining Unicode decimal digits (Arabic-Indic, Devanagari, ...) and Arabic marks
    made ASCII; returns the texts and which cells changed. A cell is never dropped: what
    still is no number is `unparseable` downstream."""
    strings = pa.array(text, type=pa.large_string())
    ascii_cells = pc.string_is_ascii(strings).to_numpy(zero_copy_only=False)
    changed = np.zeros(len(text), dtype=bool)
    others = np.flatnonzero(~ascii_cells.astype(bool))
    if not others.size:
        return text, changed
    original = text.iloc[others]
    normal = original.map(lambda cell: "".join(
        _ascii_character(c) for c in unicodedata.normalize("NFKC", cell)).strip())
    changed[others] = (normal != original).to_numpy(dtype=bool)
    text = text.copy()
    text.iloc[others] = normal.to_numpy()
    return text, changed


def _parse_messy(text: pd.Series) -> dict[str, np.ndarray]:
    """Cells that are not plain numbers: censoring, signs, separators; else unparseable.

    Returns `value` (ambiguous separators read as decimal marks), `grouped` (their reading as
    thousands separators), `form` (index into _FORMS, -1 = unparseable) and issue `code`.
    """
    m = len(text)
    low, high, negative = (np.zeros(m, dtype=bool) for _ in range(3))
    prefixed = np.flatnonzero(text.str.match("[<>+\\-\u2212\u2264\u2265]").to_numpy(bool))
    if prefixed.size:  # only these cells pay for the prefix handling
        head = _replace(text.iloc[prefixed], (("\u2212", "-"), ("\u2264", "<="), ("\u2265", ">=")))
        low[prefixed] = head.str.startswith("<").to_numpy(dtype=bool)
        high[prefixed] = head.str.startswith(">").to_numpy(dtype=bool)
        head = head.where(~(low | high)[prefixed], head.str.lstrip("<>=").str.lstrip())
        negative[prefixed] = head.str.startswith("-").to_numpy(dtype=bool)
        signed = negative[prefixed] | head.str.startswith("+").to_numpy(dtype=bool)
        text = text.copy()
        text.iloc[prefixed] = head.where(~signed, head.str.slice(1).str.lstrip()).to_numpy()

    form = np.full(m, -1, dtype=np.int8)
    todo = np.arange(m)
    for code, (_name, pattern, _decimal, _grouped) in enumerate(_FORMS):
        if not todo.size:
            break
        hit = text.iloc[todo].str.fullmatch(pattern).to_numpy(dtype=bool)
        form[todo[hit]] = code
        todo = todo[~hit]
    value = np.full(m, np.nan)
    grouped = np.full(m, np.nan)
    for code, (_name, _pattern, to_decimal, to_grouped) in enumerate(_FORMS):
        cells = np.flatnonzero(form == code)
        if cells.size:
            value[cells] = _cast(_replace(text.iloc[cells], to_decimal))
            if to_grouped:
                grouped[cells] = _cast(_replace(text.iloc[cells], to_grouped))
    sign = np.where(negative, -1.0, 1.0)
    codes = np.select([form < 0, low, high],
                      [_CODE[UNPARSEABLE], _CODE[CENSORED_LOW], _CODE[CENSORED_HIGH]], 0)
    return {"value": sign * value, "grouped": sign * grouped, "form": form,
            "code": codes.astype(np.int8)}


def _read_marker(raw: pd.Series, marker: Marker, source: ColumnSource, decimal: str | None,
                 semicolon: bool, comma_seen: bool = False
                 ) -> tuple[np.ndarray, list[pd.DataFrame], bool]:
    """One numeric marker in canonical units, its issues (without column names), and
    whether the column has shown a decimal comma so far."""
    n = len(raw)
    if pd.api.types.is_numeric_dtype(raw) and not pd.api.types.is_bool_dtype(raw):
        numbers = _Numbers(raw.to_numpy(dtype="float64", na_value=np.nan),
                           np.zeros(n, np.int8), np.full(n, np.nan), np.zeros(n, np.int8), {})
    else:
        numbers = _parse_numbers(_text(raw), decimal, semicolon, comma_seen)
    value = numbers.value * source.factor
    code = numbers.code
    with np.errstate(invalid="ignore"):
        negative = value < 0
        outside = ((value < marker.low * (1 - _REL_TOLERANCE))
                   | (value > marker.high * (1 + _REL_TOLERANCE)))
    not_whole = np.zeros(n, dtype=bool)
    if marker.column in INTEGER_MARKERS:
        not_whole = np.isfinite(value) & (value != np.round(value))
    code[negative] = _CODE[NEGATIVE]
    code[~negative & (outside | not_whole)] = _CODE[IMPLAUSIBLE]
    unsettled = _unsettled(value, code, marker)
    parts = []
    for kind_code in np.unique(code[code > 0]):
        rows, kind = np.flatnonzero(code == kind_code), _CELL_KINDS[kind_code]
        detail = _marker_detail(kind, rows, value, numbers, marker, source, not_whole,
                                unsettled)
        parts.append(_issues(rows, raw, kind, detail))
    value[(code >= _CODE[UNPARSEABLE]) | unsettled] = np.nan
    return value, parts, numbers.comma_evidence


def _unsettled(value: np.ndarray, code: np.ndarray, marker: Marker) -> np.ndarray:
    """Censored cells of a rule marker whose bound cannot stand in for the true value.

    "<X" allows any value below X, ">X" any above ("<=", ">=" alike). The ImmunoSep rule is
    strict (MALS if ferritin > 4420, immunoparalysis if HLA-DR < 5000), so a bound stands in
    only if the rule answers the same at the bound as at the far end of the interval: ferritin
    ">X" needs X > 4420 (">4420" is MALS, but 4420 is not) and "<X" needs X <= 4420; HLA-DR
    "<X" needs X < 5000 and ">X" needs X >= 5000.
    """
    if marker.column not in _RULE_CUT_OFFS:
        return np.zeros(len(value), dtype=bool)
    cut_off, fires_above = _RULE_CUT_OFFS[marker.column]
    with np.errstate(invalid="ignore"):
        at_bound = value > cut_off if fires_above else value < cut_off
    # far above the bound the rule answers `fires_above`, far below `not fires_above`
    return (((code == _CODE[CENSORED_HIGH]) & (at_bound != fires_above))
            | ((code == _CODE[CENSORED_LOW]) & (at_bound == fires_above)))


def _marker_detail(kind: str, rows: np.ndarray, value: np.ndarray, numbers: _Numbers,
                   marker: Marker, source: ColumnSource, not_whole: np.ndarray,
                   unsettled: np.ndarray) -> pd.Series:
    """The human sentence for each issue of one kind in a numeric column."""
    converted = f" (converted from {source.unit})" if source.factor != 1 else ""
    shown = _numbers(value[rows]) + f" {marker.unit}{converted}"
    bounds = f"{_number(marker.low)} to {_number(marker.high)} {marker.unit}"
    if kind in (CENSORED_LOW, CENSORED_HIGH):
        limit = "below the detection" if kind == CENSORED_LOW else "above the reporting"
        detail = f"{limit} limit; kept at the bound " + shown
        if unsettled[rows].any():
            cut_off, fires_above = _RULE_CUT_OFFS[marker.column]
            rule = f"{'>' if fires_above else '<'} {_number(cut_off)} {marker.unit}"
            detail = detail.where(
                ~unsettled[rows],
                f"{limit} limit " + shown + ": the bound cannot settle the ImmunoSep cut-off "
                f"({rule}), so the value was set to missing")
        if numbers.ambiguous[rows].any():
            detail = detail.where(numbers.ambiguous[rows] == 0,
                                  detail + "; " + _ambiguity(numbers, rows))
        return detail
    if kind == AMBIGUOUS_SEPARATOR:
        return _ambiguity(numbers, rows)
    if kind == UNICODE_DIGITS:
        return "written in non-ASCII digits or marks; read as " + shown + ": check the value"
    if kind == IMPLAUSIBLE:
        detail = shown + f" is outside the plausible range {bounds}; set to missing"
        detail = detail.where(np.isfinite(value[rows]), f"a number beyond the range of a "
                              f"64-bit float (plausible: {bounds}); set to missing")
        return detail.where(~not_whole[rows], f"{marker.label} must be a whole number from "
                                              f"{bounds}; set to missing")
    sentence = "negative value" if kind == NEGATIVE else "not a number"
    return pd.Series(f"{sentence}; set to missing", index=range(len(rows)))


def _ambiguity(numbers: _Numbers, rows: np.ndarray) -> pd.Series:
    """Detail for ambiguous separators: the reading taken, the other one, and why."""
    reason = pd.Series(numbers.ambiguous[rows]).map(numbers.reason)
    return ("read as " + _numbers(numbers.value[rows]) + ", not " + _numbers(numbers.other[rows])
            + " (" + reason + "); set [options] decimal in a mapping file to decide")


def _read_sex(raw: pd.Series, source: ColumnSource) -> tuple[pd.Series, list[pd.DataFrame]]:
    """Sex as "F"/"M" from panel aliases or the mapping's codes; others are issues."""
    text = _text(raw)
    lookup = {**SEX_ALIASES, **source.values}
    sex = text.str.lower().map(lookup).astype("str")
    unknown = np.flatnonzero(sex.isna().to_numpy() & ~_is_missing(text))
    accepted = ", ".join(sorted(lookup))
    detail = pd.Series(f"not a recognised sex code (accepted: {accepted}; add codes under sex "
                       "values in a mapping file); set to missing", index=range(len(unknown)))
    return sex, [_issues(unknown, raw, UNKNOWN_CATEGORY, detail)]


def _read_treatment(raw: pd.Series, source: ColumnSource) -> tuple[pd.Series, list[pd.DataFrame]]:
    """The treatment column with the mapping's codes recoded to arms; a cell that is neither
    a code nor an arm's name (nor missing) is an issue and is kept as it is."""
    text = _text(raw)
    arms = text.str.lower().map(source.values)
    known = arms.notna().to_numpy(bool) | text.map(_arm_word).notna().to_numpy(bool)
    unknown = np.flatnonzero(~known & ~_is_missing(text))
    codes = ", ".join(f"'{code}'" for code in source.values)
    accepted = (f"codes {codes} in the mapping's treatment values, or " if codes else "") + \
        f"an arm: {', '.join(ARMS)}"
    detail = pd.Series(f"not a treatment (accepted: {accepted}); kept as it is",
                       index=range(len(unknown)))
    out = raw.astype(object).where(arms.isna().to_numpy(bool), arms.to_numpy(dtype=object))
    return out, [_issues(unknown, raw, UNKNOWN_CATEGORY, detail)]


def sample_days(values: pd.Series) -> np.ndarray:
    """Sample times as float days: day numbers as they are, timestamps (ISO 8601 or any form
    pandas reads) as days since the epoch; NaN where neither (such a sample is not ordered)."""
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.notna().sum() * 2 >= values.notna().sum():  # mostly day numbers: all are
        return numbers.to_numpy(dtype=float)
    times = pd.to_datetime(values, errors="coerce", utc=True, format="mixed")
    return ((times - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(days=1)).to_numpy(
        dtype=float, na_value=np.nan)


def _read_sample_time(raw: pd.Series) -> pd.DataFrame:
    """Sample times that are neither a day number nor a timestamp: an issue each (the row is
    scored; that sample is left out of the order of its patient's samples)."""
    unreadable = np.flatnonzero(~_is_missing(_text(raw)) & np.isnan(sample_days(raw)))
    return _issues(unreadable, raw, UNPARSEABLE, pd.Series(
        "not a day number or a timestamp (ISO 8601, e.g. 2026-01-05T08:00); this sample is "
        "left out of its patient's order", index=range(len(unreadable))))


def _sample_times(frame: pd.DataFrame, opened: CohortFile) -> pd.Series | None:
    """The block's sample_time cells (the mapped column, or one of that name), if any."""
    source = opened.trial_sources.get(SAMPLE_TIME)
    column = source.column if source is not None else SAMPLE_TIME
    return frame.get(column)


def _read_id(raw: pd.Series, canonical: str, state: _StreamState,
             sample_time: pd.Series | None = None) -> tuple[pd.Series, list[pd.DataFrame]]:
    """An identifier as text; for patient_id, missing and repeated ids are issues (repeats
    of an id in an earlier block too, which `state` remembers). With a `sample_time` column a
    repeat is the same patient sampled at the same time: other samples are no issue."""
    text = _text(raw)
    ids = text.where(~_is_missing(text)).astype("str")
    if canonical != PATIENT_ID:
        return ids, []
    missing = np.flatnonzero(ids.isna().to_numpy())
    keys = ids if sample_time is None else ids.where(
        ids.isna(), ids + "\x1f" + _text(sample_time).fillna("").astype("str"))
    codes, uniques = pd.factorize(keys)  # -1 for missing ids; codes in order of appearance
    positions = np.arange(len(ids)) + state.offset
    first = np.full(len(ids), -1)
    if len(uniques):
        seen_codes, first_index = np.unique(codes, return_index=True)
        first_of_code = _first_rows(state, pd.util.hash_array(uniques.to_numpy(dtype=object)),
                                    positions[first_index[seen_codes >= 0]])
        first = np.where(codes >= 0, first_of_code[np.maximum(codes, 0)], -1)
    duplicate = np.flatnonzero((codes >= 0) & (first != positions))
    return ids, [
        _issues(missing, raw, MISSING_ID,
                pd.Series("patient_id is missing", index=range(len(missing)))),
        _issues(duplicate, raw, DUPLICATE_ID,
                ("same patient_id as row " if sample_time is None else
                 "same patient_id and sample_time as row ")
                + pd.Series(first[duplicate] + 1).astype("str")),
    ]


def _first_rows(state: _StreamState, hashes: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The file row where each id (by hash) first appeared: an earlier block's, else `rows`;
    remembers the new ones."""
    at = np.searchsorted(state.id_hashes, hashes)
    known = at < len(state.id_hashes)
    known[known] = state.id_hashes[at[known]] == hashes[known]
    first = np.where(known, state.id_first_rows[np.minimum(at, len(state.id_hashes) - 1)]
                     if len(state.id_hashes) else rows, rows)
    new = np.flatnonzero(~known)
    order = new[np.argsort(hashes[new], kind="stable")]
    where = np.searchsorted(state.id_hashes, hashes[order])
    state.id_hashes = np.insert(state.id_hashes, where, hashes[order])
    state.id_first_rows = np.insert(state.id_first_rows, where, rows[order])
    return first


def _shown_value(value: pd.Series) -> pd.Series:
    """A cell's text as an issue shows it: cut at `ISSUE_VALUE_CHARS`, saying how long it was
    (a megabyte cell stays in the file, not in every report and manifest)."""
    long = value.str.len() > ISSUE_VALUE_CHARS
    if not long.any():
        return value
    return value.where(~long, value.str.slice(0, ISSUE_VALUE_CHARS) + "... ("
                       + value.str.len().map("{:,}".format) + " characters)")


def _issues(rows: np.ndarray, raw: pd.Series, kind: str, detail: pd.Series) -> pd.DataFrame:
    """Issue rows (0-based positions in, 1-based row numbers out) without column names."""
    return pd.DataFrame({
        "row": rows + 1,
        "value": _shown_value(raw.iloc[rows].astype("str").fillna("").reset_index(drop=True)),
        "kind": kind,
        "detail": detail,
    })


def _collect_issues(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """All issues in row order, then canonical column order (parts carry `column_order`)."""
    parts = [part for part in parts if len(part)]
    if not parts:
        return empty_issues()
    issues = pd.concat(parts, ignore_index=True)
    order = np.lexsort((issues["column_order"].to_numpy(), issues["row"].to_numpy()))
    return issues.iloc[order][list(ISSUE_COLUMNS)].astype({"row": "int64"}).reset_index(
        drop=True)


def _numbers(values: np.ndarray) -> pd.Series:
    """Numbers as short text for issue details (8 significant digits, no separators)."""
    return pd.Series([_number(value) for value in values.tolist()], dtype="str")


def _number(value: float) -> str:
    return f"{value:.8g}"


# --- quality report -------------------------------------------------------------------------


@dataclass(frozen=True)
class ColumnQuality:
    """Missingness and range of one canonical column found in the file (canonical units)."""

    column: str
    source_column: str
    unit: str  # canonical unit ("" for identifiers)
    unit_from: str  # unit the source was in
    n_missing: int
    pct_missing: float
    min: float | None
    median: float | None
    max: float | None


@dataclass(frozen=True)
class IssueCount:
    """How often one kind of issue occurs in one column, with the first example."""

    column: str
    kind: str
    count: int
    example_row: int
    example_value: str


@dataclass(frozen=True)
class QualityReport:
    """Plain-data summary of a cohort's quality, for printing or saving."""

    source: str
    n_rows: int
    n_issues: int
    n_rows_with_issues: int
    columns: tuple[ColumnQuality, ...]
    issues: tuple[IssueCount, ...]
    absent: tuple[str, ...]  # canonical columns the file does not have
    unmapped: dict[str, str]  # file column -> absent canonical column it looks like
    patients: int = 0  # distinct patient ids
    timed: bool = False  # whether rows carry a sample_time (repeated samples of a patient)


def quality_report(cohort: Cohort) -> QualityReport:
    """Summarise rows, issues, and per-column missingness and range of a cohort."""
    data, issues = cohort.data, cohort.issues
    n_rows = len(data)
    columns = []
    for name, source_column in cohort.columns.items():
        series = data[name]
        n_missing = int(series.isna().sum())
        present = series.dropna().to_numpy(dtype=float) if name in NUMERIC_MARKERS else []
        stats = ((float(np.min(present)), float(np.median(present)), float(np.max(present)))
                 if len(present) else (None, None, None))
        unit = PANEL[name].unit if name in PANEL else ""
        columns.append(ColumnQuality(
            name, source_column, unit, cohort.units.get(name, unit), n_missing,
            100.0 * n_missing / n_rows if n_rows else 0.0, *stats))
    grouped = issues.groupby(["column", "kind"], sort=False).agg(
        count=("row", "size"), example_row=("row", "first"), example_value=("value", "first"))
    order = {name: k for k, name in enumerate(CANONICAL_COLUMNS)}
    counts = sorted(
        (IssueCount(column, kind, int(row["count"]), int(row["example_row"]),
                    str(row["example_value"])) for (column, kind), row in grouped.iterrows()),
        key=lambda item: (order.get(item.column, len(order)), ISSUE_KINDS.index(item.kind)))
    absent = tuple(name for name in CANONICAL_COLUMNS if name not in cohort.columns)
    extras = [name for name in data.columns if name not in CANONICAL_COLUMNS]
    suggested = {name: _suggest(name) for name in extras}
    return QualityReport(
        source=cohort.source,
        n_rows=n_rows,
        n_issues=len(issues),
        n_rows_with_issues=int(issues["row"].nunique()),
        columns=tuple(columns),
        issues=tuple(counts),
        absent=absent,
        unmapped={name: canonical for name, canonical in suggested.items()
                  if canonical in absent},
        patients=int(data[PATIENT_ID].nunique()),
        timed=SAMPLE_TIME in data,
    )
