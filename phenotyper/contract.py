"""The words, cut-offs and column names every layer shares: phenotypes, the ImmunoSep rule's
thresholds, labels, treatment arms, outcomes.

One fact, one place: the reader, the simulator, the evaluator, training and the reports all read
these names from here, so a cohort written by one is understood by the others. Plain Python
with no imports, so a command that needs only these (`phenotyper --help`, `validate`) loads
none of numpy, pandas or scikit-learn through it.
"""

from __future__ import annotations

MALS = "MALS"
IMMUNOPARALYSIS = "immunoparalysis"
UNCLASSIFIED = "unclassified"
INDETERMINATE = "indeterminate"  # the rule lacks a marker it needs: not the same as unclassified
PHENOTYPES: tuple[str, ...] = (MALS, IMMUNOPARALYSIS, UNCLASSIFIED)
PREDICTED_LABELS: tuple[str, ...] = (*PHENOTYPES, INDETERMINATE)  # what a phenotyper may answer

# The ImmunoSep rule's cut-offs (REFERENCE.md): ferritin > 4420 ng/mL is MALS; otherwise HLA-DR
# < 5000 antibodies per monocyte is immunoparalysis.
FERRITIN_MALS_NG_ML = 4420.0
HLA_DR_IMMUNOPARALYSIS_MAB_PER_CELL = 5000.0
# HLA-DR of about 8000 separates moderate immunoparalysis (Joshi 2023) and is the ImmunoSep
# reversal criterion (> 8000): the looser cut-off users compare against.
HLA_DR_MODERATE_MAB_PER_CELL = 8000.0

# The registered model scoring, serving and explaining use unless told otherwise.
DEFAULT_MODEL_URI = "models:/immunophenotyper@champion"
# Said wherever numbers come from a synthetic cohort (reports, figures, the console).
SYNTHETIC_BANNER = ("SYNTHETIC DATA: these numbers check the software; they are not clinical "
                    "evidence.")
# Said when a model trained on synthetic patients scores an input not marked synthetic.
SYNTHETIC_MODEL_BANNER = ("NOT FOR REAL PATIENTS: this model was trained on synthetic data; its "
                          "phenotypes for these patients are not clinical advice. Train on "
                          "your own labelled or outcome cohort first.")

# A scored row's status: `OK`, or why the row was not scored (the reader's or the model's own
# reason; `MODEL_REJECTED` counts the values the model's range checks refused).
OK = "ok"
NOT_SCORED = "not scored"
MODEL_REJECTED = "rejected_by_model"
# What a rejected value (unparseable, implausible, outside the model's range) does to its row:
# `skip-row` leaves the row unscored (the default for clinical use); `missing` scores the row
# with that value treated as missing, its status saying what was set aside ("scored without
# crp_mg_l=1410 ...", kind VALUE_SET_ASIDE).
SKIP_ROW, AS_MISSING = "skip-row", "missing"
REJECTED_VALUES_MODES = (SKIP_ROW, AS_MISSING)
SET_ASIDE_PREFIX = "scored without "
VALUE_SET_ASIDE = "value_set_aside"
SCORED_KINDS = frozenset({OK, VALUE_SET_ASIDE})  # status kinds of rows the model scored


def is_scored(status: str) -> bool:
    """Whether a row with this status was scored (ok, or with rejected values set aside)."""
    return status == OK or status.startswith(SET_ASIDE_PREFIX)


# A label-free model's latent-class posterior beside the distilled candidate's answer.
LATENT_PROB_PREFIX = "latent_prob_"
LATENT_ENTROPY = "latent_entropy"
# What a scored row explains: the predicted phenotype's logit, every phenotype's, or nothing.
EXPLAIN_MODES = ("predicted", "all", "none")

# Rows per block when a file is streamed (read, scored, written): memory stays flat whatever
# the file's size.
BLOCK_ROWS = 50_000

# Reference labels, matched in any case and around spaces; PROVIDE calls the unclassified
# patients "intermediate". An empty cell or `indeterminate` means "no label" (left out).
LABEL_WORDS: dict[str, str] = {
    **{phenotype.lower(): phenotype for phenotype in PHENOTYPES},
    "intermediate": UNCLASSIFIED,
}
NO_LABEL_WORDS = frozenset({"", INDETERMINATE})

# Treatment arms (ImmunoSep, REFERENCE.md) and the arm each phenotype is treated with.
ANAKINRA, INTERFERON_GAMMA, PLACEBO = "anakinra", "interferon_gamma", "placebo"
ARMS: tuple[str, ...] = (ANAKINRA, INTERFERON_GAMMA, PLACEBO)
ARM_OF: dict[str, str] = {
    MALS: ANAKINRA,
    IMMUNOPARALYSIS: INTERFERON_GAMMA,
    UNCLASSIFIED: PLACEBO,
    INDETERMINATE: PLACEBO,  # the trial did not randomise patients it could not type
}
# Spellings of the arms a trial export may use (compared lower-cased, spaces as "_").
ARM_WORDS: dict[str, str] = {
    ANAKINRA: ANAKINRA,
    INTERFERON_GAMMA: INTERFERON_GAMMA,
    "interferon-gamma": INTERFERON_GAMMA,
    "ifn_gamma": INTERFERON_GAMMA,
    "ifn-gamma": INTERFERON_GAMMA,
    "ifng": INTERFERON_GAMMA,
    "ifn-g": INTERFERON_GAMMA,
    PLACEBO: PLACEBO,
    "control": PLACEBO,
    "standard_care": PLACEBO,
    "usual_care": PLACEBO,
}

# A simulated cohort's latent phenotype: the truth a simulator knows and a hospital does not.
TRUE_PHENOTYPE = "phenotype_true"

# Trial and outcome columns.
TREATMENT = "treatment"  # arm received; empty for patients not randomised
TREATMENT_PROBABILITY = "treatment_probability"  # probability of the arm received
SOFA_RESPONSE = "sofa_response"  # 1: SOFA fell >= 1.4 points from day 1 to days 2-9 mean
DEATH_28D = "death_28d"  # 1: died by day 28
OUTCOME_COLUMNS: tuple[str, ...] = (SOFA_RESPONSE, DEATH_28D)
# Whether a higher outcome is better, for the outcomes phenotyper knows.
HIGHER_IS_BETTER: dict[str, bool] = {SOFA_RESPONSE: True, DEATH_28D: False}


def potential_outcome_column(outcome: str, arm: str) -> str:
    """Column of a simulated patient's true probability of `outcome` under `arm`."""
    return f"{outcome}_probability_{arm}"
