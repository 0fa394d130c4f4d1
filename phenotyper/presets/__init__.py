"""The simulator's presets: one TOML file each (`_markers.toml` is the shared marker law).

Listing them needs no numpy, so `phenotyper simulate --help` can name them at once.
"""

from __future__ import annotations

import tomllib
from importlib import resources


def available_presets() -> list[str]:
    """Names of the shipped presets (files here not starting with '_')."""
    return sorted(
        entry.name.removesuffix(".toml")
        for entry in resources.files(__name__).iterdir()
        if entry.name.endswith(".toml") and not entry.name.startswith("_")
    )


def marker_values(parameter: str) -> dict[str, float]:
    """One parameter of the shared marker law for every marker that has it (`_markers.toml`,
    where each value carries its source or is labelled an assumption)."""
    law = tomllib.loads(resources.files(__name__).joinpath("_markers.toml").read_text())
    return {marker: table[parameter]["value"] for marker, table in law.items()
            if isinstance(table, dict) and parameter in table}
