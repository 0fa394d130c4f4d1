"""The simulator's presets: one TOML file each (`_markers.toml` is the shared marker law).

Listing them needs no numpy, so `phenotyper simulate --help` can name them at once.
"""

from __future__ import annotations

from importlib import resources


def available_presets() -> list[str]:
    """Names of the shipped presets (files here not starting with '_')."""
    return sorted(
        entry.name.removesuffix(".toml")
        for entry in resources.files(__name__).iterdir()
        if entry.name.endswith(".toml") and not entry.name.startswith("_")
    )
