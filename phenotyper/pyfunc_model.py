"""MLflow models-from-code entry point: the packaged phenotyper as a pyfunc model.

MLflow executes this file to build the model (no pickle): `load_context` reads the exported
plain-data artifacts, `predict` returns one scored row per input row.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from phenotyper.contract import EXPLAIN_MODES, REJECTED_VALUES_MODES, SKIP_ROW
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
        explain = params.get("explain", "predicted")
        rejected_values = params.get("rejected_values", SKIP_ROW)
        for name, value, allowed in (("explain", explain, EXPLAIN_MODES),
                                     ("rejected_values", rejected_values,
                                      REJECTED_VALUES_MODES)):
            if value not in allowed:  # MLflow answers its own exceptions with their message
                raise MlflowException(
                    f"params.{name} must be one of {', '.join(allowed)}, not {value!r}",
                    error_code=INVALID_PARAMETER_VALUE)
        return self.model.predict(pd.DataFrame(model_input), explain=explain,
                                  rejected_values=rejected_values)


mlflow.models.set_model(PhenotyperModel())
