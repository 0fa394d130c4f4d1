"""A model registered by phenotyper 0.1.0, before the package was reorganised (issue 14), kept
as a fixture: in this process the installed code reads its artifacts; the scoring server, a
fresh process, runs the code bundled in it. Both must score it as it scored when written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from phenotyper.packaged.model import PackagedPhenotyper
from phenotyper.serving import running_server, score
from phenotyper.tracking.registry import load_packaged

FIXTURE = Path(__file__).parents[1] / "fixtures" / "model_0_1_0"
MODEL = FIXTURE / "model"


@pytest.fixture(scope="module")
def patients() -> pd.DataFrame:
    return pd.read_csv(FIXTURE / "input.csv")


@pytest.fixture(scope="module")
def expected() -> pd.DataFrame:
    return pd.DataFrame(json.loads((FIXTURE / "expected.json").read_text()))


def _same(scored: pd.DataFrame, expected: pd.DataFrame) -> None:
    """Every column, every row, in order: text equal, numbers within 1e-9."""
    assert list(scored.columns) == list(expected.columns)
    assert len(scored) == len(expected)
    for column in expected:
        if pd.api.types.is_numeric_dtype(expected[column]):
            np.testing.assert_allclose(scored[column].to_numpy(dtype=float),
                                       expected[column].to_numpy(dtype=float),
                                       rtol=0, atol=1e-9, err_msg=column)
        else:
            assert scored[column].astype(str).tolist() == expected[column].astype(str).tolist()


def test_the_installed_code_scores_an_old_model_as_it_was_scored(patients, expected) -> None:
    _same(PackagedPhenotyper(MODEL / "artifacts" / "phenotyper").predict(patients,
                                                                         explain="all"),
          expected)
    _same(load_packaged(str(MODEL)).predict(patients, explain="all"), expected)


@pytest.mark.slow
def test_the_scoring_server_scores_an_old_model_as_it_was_scored(patients, expected) -> None:
    records = json.loads(patients.to_json(orient="records"))
    with running_server(model=str(MODEL)) as url:
        served = pd.DataFrame(score(url, records, explain="all"))
    _same(served, expected)
