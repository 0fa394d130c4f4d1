"""The command starts light: help loads no numerical stack, `validate` no modelling stack.

Time is measured in benchmarks/startup.py; what is imported is behaviour, checked here in a
fresh interpreter (this test process has everything imported already).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from phenotyper.simulate import simulate

PROBE = """
import sys
from phenotyper.cli import app
try:
    app(sys.argv[1:])
except SystemExit as done:
    assert done.code in (0, None), done.code
print("HEAVY:" + ",".join(sorted(m for m in {HEAVY} if m in sys.modules)))
"""


def _heavy_imports(*arguments: str, heavy: tuple[str, ...]) -> list[str]:
    done = subprocess.run([sys.executable, "-c", PROBE.replace("{HEAVY}", repr(heavy)),
                           *arguments], capture_output=True, text=True, timeout=120, check=True)
    [line] = [line for line in done.stdout.splitlines() if line.startswith("HEAVY:")]
    return [name for name in line.removeprefix("HEAVY:").split(",") if name]


@pytest.mark.parametrize("arguments", [["--help"], ["simulate", "--help"], ["score", "--help"],
                                       ["benchmark", "--help"]])
def test_help_loads_no_numerical_stack(arguments: list[str]) -> None:
    heavy = ("numpy", "pandas", "pyarrow", "sklearn", "matplotlib", "numba", "xgboost", "mlflow")
    assert _heavy_imports(*arguments, heavy=heavy) == []


def test_validate_loads_no_modelling_stack(tmp_path: Path) -> None:
    path = tmp_path / "cohort.csv"
    simulate("immunosep-screening", 50, seed=0).to_csv(path, index=False)
    heavy = ("sklearn", "matplotlib", "numba", "xgboost", "mlflow", "scipy")
    assert _heavy_imports("validate", str(path), heavy=heavy) == []
