"""The `phenotyper` command: parses arguments, calls one library function, prints."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)


@app.command()
def simulate() -> None:
    """Write a synthetic cohort drawn from a calibrated preset."""


@app.command()
def validate(path: Path) -> None:
    """Read a cohort file and print its data-quality report."""


if __name__ == "__main__":
    app()
