"""MLflow models-from-code entry point: the packaged phenotyper as a pyfunc model.

MLflow executes this file to build the model (no pickle): `load_context` reads the exported
plain-data artifacts, `predict` returns one scored row per input row.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd

from phenotyper.contract import SKIP_ROW
from phenotyper.packaged import PackagedPhenotyper
from phenotyper.packaged.format import ARTIFACT


class PhenotyperModel(mlflow.pyfunc.PythonModel):
    """Phenotype, probabilities (recalibrated in training where out-of-fold calibration was
    off), the ImmunoSep rule and SHAP explanations."""

    def load_context(self, context: Any) -> None:
        self.model = PackagedPhenotyper(context.artifacts[ARTIFACT])

    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> pd.DataFrame:
        params = params or {}
        return self.model.predict(pd.DataFrame(model_input),
                                  explain=params.get("explain", "predicted"),
                                  rejected_values=params.get("rejected_values", SKIP_ROW))


mlflow.models.set_model(PhenotyperModel())
