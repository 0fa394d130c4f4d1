"""Where benchmark scripts put their numbers: benchmarks/results/NAME.json."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any


def write_results(name: str, results: dict[str, Any]) -> Path:
    """Write `results` as benchmarks/results/`name`.json and return the path."""
    path = Path(__file__).parent / "results" / f"{name}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def code_version() -> dict[str, Any]:
    """The commit the numbers were measured on, and whether phenotyper/ differed from it (the
    work tree is shared: a result should say which evaluator it judged)."""
    root = Path(__file__).parent.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {"commit": git("rev-parse", "HEAD"),
            "phenotyper_modified": bool(git("status", "--porcelain", "--", "phenotyper"))}
