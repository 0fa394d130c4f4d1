"""Reading a reference-label column: one vocabulary for training, benchmarks and model cards.

A label cell is read in this order:

1. the mapping file's `[labels]` recode table, if any (keys compared stripped: the exact text
   first, then case-insensitively), e.g. `"1" = "MALS"`, `"Inter" = "unclassified"`;
2. the phenotype words of `contract.LABEL_WORDS`, in any case and around spaces (`MALS`, `mals`,
   ` IMMUNOPARALYSIS `; PROVIDE's `intermediate` is `unclassified`).

An empty cell or `indeterminate` (`contract.NO_LABEL_WORDS`) means "no label". Any other value
is *unreadable*: not an error, but counted, shown (row numbers counting from 1) and left out of
every label metric, with a message that says how to fix it. `rule_agreement` tells whether the
label is, in effect, the ImmunoSep rule's own answer, against which no model can beat the rule.

Pure: numpy and pandas in, plain values out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from phenotyper.contract import INDETERMINATE, LABEL_WORDS, NO_LABEL_WORDS, PHENOTYPES

# A label that agrees with the ImmunoSep rule on at least this share of the patients the rule
# can type (and a label exists), over at least RULE_LABEL_MIN_PATIENTS of them, is taken to be
# the rule's own answer: no model can beat the rule against it, by construction.
RULE_LABEL_AGREEMENT = 0.99
RULE_LABEL_MIN_PATIENTS = 50
MAX_EXAMPLES = 5  # unreadable cells shown in messages

NO_LABEL = -1  # code of a row without a (readable) label
# Words a `[labels]` recode may map to (in any case, around spaces): a phenotype, PROVIDE's
# `intermediate`, or `indeterminate` (no label).
RECODE_TARGETS: tuple[str, ...] = (
    *(target if word == target.lower() else word for word, target in LABEL_WORDS.items()),
    *sorted(NO_LABEL_WORDS - {""}),
)

_CODE_OF = {phenotype: code for code, phenotype in enumerate(PHENOTYPES)}
_UNREADABLE = -2  # internal: neither a label word nor a no-label word


def accepted_words() -> str:
    """The label words phenotyper reads, for messages."""
    words = [f"'{target}'" if word == target.lower() else f"'{word}' (read as '{target}')"
             for word, target in LABEL_WORDS.items()]
    return f"{', '.join(words)}, in any case"


def how_to_fix() -> str:
    """How to make unreadable labels readable, for messages."""
    no_label = " or ".join(f"'{word}'" for word in sorted(NO_LABEL_WORDS) if word)
    return (f"Labels phenotyper reads: {accepted_words()}; an empty cell or {no_label} means no "
            "label. Recode other values with a [labels] table in a mapping file (--mapping), "
            "e.g. [labels] \"1\" = \"MALS\", \"2\" = \"immunoparalysis\", "
            "\"3\" = \"unclassified\", \"?\" = \"indeterminate\".")


def recode_target(word: str) -> str | None:
    """The canonical target of a `[labels]` recode value: a phenotype, or `indeterminate` for
    no label; None if `word` is not one of `RECODE_TARGETS`."""
    key = word.strip().lower() if isinstance(word, str) else None
    if key in LABEL_WORDS:
        return LABEL_WORDS[key]
    if key in NO_LABEL_WORDS and key:
        return INDETERMINATE
    return None


@dataclass(frozen=True, eq=False)
class LabelReading:
    """What a label column says, row by row, and what was left out.

    `codes` index `rules.PHENOTYPES` (-1: no label, or an unreadable value); `labelled` is
    `codes >= 0`. `n_unlabelled` counts empty and `indeterminate` cells (after recoding),
    `n_unreadable` the other values, shown in `unreadable_examples` as (row counting from 1,
    value) pairs, at most `MAX_EXAMPLES`. `n_recoded` counts cells read through the recode.
    """

    column: str
    codes: np.ndarray
    labelled: np.ndarray
    n_unlabelled: int
    n_unreadable: int
    unreadable_examples: tuple[tuple[int, str], ...]
    n_recoded: int = 0
    recode: Mapping[str, str] | None = None

    @property
    def n_rows(self) -> int:
        return len(self.codes)

    @property
    def n_labelled(self) -> int:
        return int(self.labelled.sum())

    @property
    def phenotypes(self) -> np.ndarray:
        """Canonical phenotype word per row (object array), None where there is no label."""
        words = np.array([*PHENOTYPES, None], dtype=object)
        return words[np.where(self.labelled, self.codes, len(PHENOTYPES))]

    def counts(self) -> dict[str, int]:
        """Labelled rows per phenotype, in `PHENOTYPES` order (zeros included)."""
        found = np.bincount(self.codes[self.labelled], minlength=len(PHENOTYPES))
        return {phenotype: int(n) for phenotype, n in zip(PHENOTYPES, found, strict=True)}

    def summary(self) -> str:
        """One paragraph: what was read, what was left out and why, and how to fix it."""
        counts = ", ".join(f"{phenotype} {n:,}" for phenotype, n in self.counts().items())
        parts = [f"label column '{self.column}': {self.n_labelled:,} of {self.n_rows:,} rows "
                 f"labelled ({counts})"]
        if self.n_recoded:
            parts.append(f"{self.n_recoded:,} read through the mapping's [labels]")
        if self.n_unlabelled:
            parts.append(f"{self.n_unlabelled:,} without a label (empty or '{INDETERMINATE}') "
                         "left out")
        if self.n_unreadable:
            shown = ", ".join(f"row {row}: {value!r}" for row, value in self.unreadable_examples)
            more = ", ..." if self.n_unreadable > len(self.unreadable_examples) else ""
            parts.append(f"{self.n_unreadable:,} unreadable value"
                         f"{'s' if self.n_unreadable != 1 else ''} left out ({shown}{more})")
        text = "; ".join(parts) + "."
        if self.n_unreadable or not self.n_labelled:
            text += " " + how_to_fix()
        return text

    def as_dict(self) -> dict[str, Any]:
        """Plain data (JSON-ready) for results, run logs and model cards."""
        return {
            "column": self.column,
            "n_rows": self.n_rows,
            "n_labelled": self.n_labelled,
            "n_unlabelled": self.n_unlabelled,
            "n_unreadable": self.n_unreadable,
            "unreadable_examples": [[row, value] for row, value in self.unreadable_examples],
            "n_recoded": self.n_recoded,
            "recode": dict(self.recode or {}),
            "counts": self.counts(),
            "summary": self.summary(),
        }


def _text(value: Any) -> str | None:
    """One distinct cell value as text (None when missing); whole numbers without '.0'."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float | np.floating):
        if np.isnan(value):
            return None
        if np.isfinite(value) and float(value).is_integer():
            return str(int(value))
    return str(value)


def _matcher(recode: Mapping[str, str] | None):
    """A function from stripped cell text to (code, recoded)."""
    exact: dict[str, str] = {}
    folded: dict[str, str] = {}
    for key, target in (recode or {}).items():
        stripped = str(key).strip()
        exact.setdefault(stripped, target)
        folded.setdefault(stripped.lower(), target)

    def word_code(word: str) -> int:
        key = word.strip().lower()
        if key in LABEL_WORDS:
            return _CODE_OF[LABEL_WORDS[key]]
        return NO_LABEL if key in NO_LABEL_WORDS else _UNREADABLE

    def match(text: str) -> tuple[int, bool]:
        target = exact.get(text, folded.get(text.lower()))
        if target is not None:
            code = word_code(target)
            if code == _UNREADABLE:
                raise ValueError(f"[labels] recode of {text!r} to {target!r}: the target must "
                                 f"be one of {', '.join(map(repr, RECODE_TARGETS))}")
            return code, True
        return word_code(text), False

    return match


def read_labels(values: Any, column: str,
                recode: Mapping[str, str] | None = None) -> LabelReading:
    """Read a label column (any array-like of cells) into phenotype codes; see the module doc.

    `recode` maps cell texts (compared stripped; exact text first, then case-insensitively) to
    a word of `RECODE_TARGETS`; a target outside them is a ValueError (a mapping file's
    `[labels]` is validated when the mapping is read, so this only guards direct calls).
    """
    series = values if isinstance(values, pd.Series) else pd.Series(values, dtype=object)
    distinct_codes, uniques = pd.factorize(series.reset_index(drop=True), use_na_sentinel=True)
    match = _matcher(recode)
    unique_codes = np.empty(len(uniques) + 1, dtype=np.int64)
    unique_recoded = np.zeros(len(uniques) + 1, dtype=bool)
    unique_codes[-1] = NO_LABEL  # the NA sentinel (-1) indexes the last slot
    for position, value in enumerate(uniques):
        text = _text(value)
        code, recoded = (NO_LABEL, False) if text is None else match(text.strip())
        unique_codes[position], unique_recoded[position] = code, recoded
    raw = unique_codes[distinct_codes]
    recoded_rows = unique_recoded[distinct_codes]
    unreadable = np.flatnonzero(raw == _UNREADABLE)
    examples = tuple((int(row) + 1, _text(series.iloc[row]) or "")
                     for row in unreadable[:MAX_EXAMPLES])
    codes = np.where(raw == _UNREADABLE, NO_LABEL, raw)
    return LabelReading(
        column=column,
        codes=codes,
        labelled=codes >= 0,
        n_unlabelled=int((raw == NO_LABEL).sum()),
        n_unreadable=len(unreadable),
        unreadable_examples=examples,
        n_recoded=int(recoded_rows.sum()),
        recode=dict(recode) if recode else None,
    )


def missing_phenotypes(reading: LabelReading) -> tuple[str, ...]:
    """Phenotypes no labelled row holds, in `PHENOTYPES` order."""
    return tuple(phenotype for phenotype, n in reading.counts().items() if n == 0)


def rule_agreement(reading: LabelReading, rule_labels: Any) -> tuple[float, int]:
    """Share of patients whose label is the ImmunoSep rule's answer, and how many were compared:
    those with a label where the rule is determinate (not `indeterminate`). NaN if none."""
    rule = pd.Series(np.asarray(rule_labels, dtype=object)).map(_CODE_OF)
    rule_codes = rule.fillna(NO_LABEL).to_numpy(dtype=np.int64)
    if len(rule_codes) != len(reading.codes):
        raise ValueError(f"{len(rule_codes)} rule answers for {len(reading.codes)} labels")
    compared = reading.labelled & (rule_codes >= 0)
    n = int(compared.sum())
    if not n:
        return float("nan"), 0
    return float((reading.codes[compared] == rule_codes[compared]).mean()), n


def rule_derived_warning(reading: LabelReading, rule_labels: Any) -> str | None:
    """A warning when the label is (almost) the ImmunoSep rule's own answer, else None."""
    share, n = rule_agreement(reading, rule_labels)
    if n < RULE_LABEL_MIN_PATIENTS or not share >= RULE_LABEL_AGREEMENT:
        return None
    return (f"label column '{reading.column}' agrees with the ImmunoSep rule on {share:.1%} of "
            f"the {n:,} patients the rule can type: the label is the ImmunoSep rule's own "
            "answer, so no model can beat the rule against it, by construction. Judge such a "
            "model with the 'agreement' gate mode (compare its Cohen's kappa with the rule's own "
            "re-measurement kappa) or against outcomes, not by accuracy against this label.")
