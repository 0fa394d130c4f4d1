"""Where benchmark scripts put their numbers: benchmarks/results/NAME.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_results(name: str, results: dict[str, Any]) -> Path:
    """Write `results` as benchmarks/results/`name`.json and return the path."""
    path = Path(__file__).parent / "results" / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path
