"""The marker panel as data: canonical columns, units, unit conversions, plausible ranges.

Everything that knows what a lab column means reads it from here, so the reader, the simulator
and the models agree on one contract. Canonical columns carry their unit in the name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

PATIENT_ID = "patient_id"
SITE_ID = "site_id"
# Optional: when a patient was sampled (a timestamp or a day number) and in which encounter.
# A patient may have several samples; patient_id and sample_time together name one.
SAMPLE_TIME = "sample_time"
ENCOUNTER_ID = "encounter_id"
SEX_VALUES = ("F", "M")
SEX_CODE: dict[str, float] = {"F": 0.0, "M": 1.0}  # sex on the models' scale

# Spellings a lab export may use for sex; anything else is a row-level issue.
SEX_ALIASES: dict[str, str] = {
    "f": "F", "female": "F", "w": "F", "woman": "F", "fem": "F",
    "m": "M", "male": "M", "man": "M", "masc": "M",
}


def normalise_unit(unit: str) -> str:
    """Fold the spellings of one unit together: case, spaces, micro signs, powers, 'per'."""
    text = unit.strip().lower().replace("µ", "u").replace("μ", "u")
    text = text.replace("\u00d7", "x").replace("**", "^").replace(" per ", "/")
    text = re.sub(r"\s+", "", text)
    return text.replace("iu/", "u/").replace("mcg", "ug")


@dataclass(frozen=True)
class Marker:
    """One panel column.

    `units` maps each accepted unit spelling to the factor that converts a value in that unit
    to the canonical unit (canonical = value * factor). `low`/`high` bound physiologically
    plausible values in the canonical unit; outside them a value is not believed.
    """

    column: str
    label: str
    unit: str
    units: dict[str, float]
    low: float
    high: float
    decimals: int
    kind: str = "numeric"
    note: str = ""
    _lookup: dict[str, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lookup = {normalise_unit(name): factor for name, factor in self.units.items()}
        lookup.setdefault(normalise_unit(self.unit), 1.0)
        object.__setattr__(self, "_lookup", lookup)

    @property
    def is_numeric(self) -> bool:
        return self.kind == "numeric"

    def factor(self, unit: str) -> float | None:
        """Factor from `unit` to the canonical unit, or None if the unit is not known."""
        return self._lookup.get(normalise_unit(unit))


# Conversion factors. Molar masses and equivalences used:
#   ferritin 1 ng/mL = 2.247 pmol/L; CRP 1 mg/dL = 10 mg/L; bilirubin 17.1 umol/L per mg/dL;
#   triglycerides 88.57 mg/dL per mmol/L; lactate 9.01 mg/dL per mmol/L;
#   creatinine 88.42 umol/L per mg/dL; enzymes 1 ukat/L = 60 U/L; D-dimer DDU ~ FEU / 2.
_CELL_COUNT_UNITS = {
    "10^9/L": 1.0, "10e9/L": 1.0, "x10^9/L": 1.0, "G/L": 1.0, "10*9/L": 1.0,
    "10^3/uL": 1.0, "x10^3/uL": 1.0, "K/uL": 1.0, "10^3/mm3": 1.0, "thou/uL": 1.0,
    "/uL": 1e-3, "cells/uL": 1e-3, "/mm3": 1e-3, "cells/mm3": 1e-3,
}
_PG_ML_UNITS = {"pg/mL": 1.0, "ng/L": 1.0, "ng/mL": 1000.0}
_ENZYME_UNITS = {"U/L": 1.0, "IU/L": 1.0, "ukat/L": 60.0}

MARKERS: tuple[Marker, ...] = (
    Marker("ferritin_ng_ml", "Ferritin", "ng/mL",
           {"ng/mL": 1.0, "ug/L": 1.0, "mg/L": 1000.0, "pmol/L": 1 / 2.247},
           low=1, high=500_000, decimals=0,
           note="ImmunoSep MALS criterion: > 4420 ng/mL"),
    Marker("hla_dr_mab_per_cell", "HLA-DR on CD14 monocytes", "antibodies/cell",
           {"antibodies/cell": 1.0, "mAb/cell": 1.0, "AB/c": 1.0, "ABC": 1.0,
            "mAb/monocyte": 1.0, "antibodies bound per cell": 1.0},
           low=50, high=150_000, decimals=0,
           note="ImmunoSep immunoparalysis criterion: < 5000 (QuantiBRITE flow cytometry)"),
    Marker("crp_mg_l", "C-reactive protein", "mg/L",
           {"mg/L": 1.0, "ug/mL": 1.0, "mg/dL": 10.0}, low=0, high=1000, decimals=1),
    Marker("pct_ng_ml", "Procalcitonin", "ng/mL",
           {"ng/mL": 1.0, "ug/L": 1.0, "pg/mL": 1e-3}, low=0, high=2000, decimals=2),
    Marker("il6_pg_ml", "Interleukin-6", "pg/mL", _PG_ML_UNITS, low=0, high=1_000_000, decimals=1),
    Marker("il10_pg_ml", "Interleukin-10", "pg/mL", _PG_ML_UNITS, low=0, high=100_000, decimals=1),
    Marker("lymphocytes_10e9_l", "Lymphocytes", "10^9/L", _CELL_COUNT_UNITS,
           low=0, high=500, decimals=2),
    Marker("neutrophils_10e9_l", "Neutrophils", "10^9/L", _CELL_COUNT_UNITS,
           low=0, high=300, decimals=2),
    Marker("monocytes_10e9_l", "Monocytes", "10^9/L", _CELL_COUNT_UNITS,
           low=0, high=200, decimals=2),
    Marker("platelets_10e9_l", "Platelets", "10^9/L", _CELL_COUNT_UNITS,
           low=0, high=3000, decimals=0),
    Marker("fibrinogen_g_l", "Fibrinogen", "g/L",
           {"g/L": 1.0, "mg/dL": 0.01, "mg/L": 1e-3}, low=0, high=20, decimals=2),
    Marker("d_dimer_mg_l", "D-dimer (FEU)", "mg/L FEU",
           {"mg/L FEU": 1.0, "mg/L": 1.0, "ug/mL": 1.0, "ug/mL FEU": 1.0,
            "ng/mL": 1e-3, "ng/mL FEU": 1e-3, "ug/L": 1e-3, "ug/L FEU": 1e-3,
            "mg/L DDU": 2.0, "ng/mL DDU": 2e-3, "ug/L DDU": 2e-3},
           low=0, high=500, decimals=2,
           note="DDU converted to FEU with the conventional factor 2 (approximate)"),
    Marker("ast_u_l", "Aspartate aminotransferase", "U/L", _ENZYME_UNITS,
           low=0, high=100_000, decimals=0),
    Marker("alt_u_l", "Alanine aminotransferase", "U/L", _ENZYME_UNITS,
           low=0, high=100_000, decimals=0),
    Marker("bilirubin_mg_dl", "Total bilirubin", "mg/dL",
           {"mg/dL": 1.0, "umol/L": 1 / 17.1}, low=0, high=100, decimals=2),
    Marker("triglycerides_mg_dl", "Triglycerides", "mg/dL",
           {"mg/dL": 1.0, "mmol/L": 88.57}, low=0, high=20_000, decimals=0),
    Marker("lactate_mmol_l", "Lactate", "mmol/L",
           {"mmol/L": 1.0, "mEq/L": 1.0, "mg/dL": 1 / 9.01}, low=0, high=50, decimals=1),
    Marker("creatinine_mg_dl", "Creatinine", "mg/dL",
           {"mg/dL": 1.0, "umol/L": 1 / 88.42, "mmol/L": 1000 / 88.42},
           low=0.05, high=40, decimals=2),
    Marker("sofa", "SOFA score", "points", {"points": 1.0, "score": 1.0},
           low=0, high=24, decimals=0),
    Marker("age_years", "Age", "years", {"years": 1.0, "y": 1.0, "yr": 1.0, "months": 1 / 12},
           low=0, high=120, decimals=0),
    Marker("sex", "Sex", "F/M", {}, low=0, high=0, decimals=0, kind="category"),
)

PANEL: dict[str, Marker] = {marker.column: marker for marker in MARKERS}
NUMERIC_MARKERS: tuple[str, ...] = tuple(m.column for m in MARKERS if m.is_numeric)
# Columns the reader recognises without a mapping: markers plus identifiers.
CANONICAL_COLUMNS: tuple[str, ...] = (PATIENT_ID, SITE_ID, *PANEL)

# The model scale: lab markers are modelled (and simulated) on log scale, their distributions
# being log-normal-like and their effects multiplicative; SOFA and age stay linear. Training
# and the packaged model both take it from here, so their features cannot drift apart.
LINEAR_SCALE_MARKERS = frozenset({"sofa", "age_years"})
LOG_FLOOR = 1e-3  # log(x + floor): zero is a valid result for many lab tests


def to_log_scale(values: np.ndarray) -> np.ndarray:
    """A lab marker's values on the models' log scale (negative values clipped to zero)."""
    return np.log(np.clip(values, 0, None) + LOG_FLOOR)


def sex_code(values: Iterable[object]) -> np.ndarray:
    """Canonical sex ("F"/"M", as the reader gives it) as the models' 0/1; anything else,
    a missing value included, NaN."""
    return np.array([SEX_CODE.get(value, np.nan) if isinstance(value, str) else np.nan
                     for value in values], dtype=float)

# Where SOFA and age are centred in outcome models: the simulator's outcome law and the
# evaluator's adjusted models, so their coefficients read alike.
SOFA_REFERENCE, AGE_REFERENCE_YEARS = 9.0, 70.0
