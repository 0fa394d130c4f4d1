"""The packaged model's files: their names, the format version, and the models-from-code entry
point MLflow runs. Plain constants, so the writer (training.export) and the reader agree."""

from __future__ import annotations

from pathlib import Path

SPEC_FILE, BOOSTER_FILE = "phenotyper.json", "booster.ubj"
# The format this code writes, and every format it reads. A writer that adds keys keeps the
# version (readers ignore keys they do not know); one that changes a key's meaning adds a
# version, and the loader keeps reading the old ones.
FORMAT_VERSION = 1
READABLE_FORMAT_VERSIONS = (1,)
# The pyfunc artifact holding the exported folder, and the file MLflow executes to build the
# model (no pickle); its path is passed to MLflow, never imported here (importing it registers
# the model with MLflow).
ARTIFACT = "phenotyper"
PYFUNC_ENTRY = Path(__file__).resolve().parents[1] / "pyfunc_model.py"
