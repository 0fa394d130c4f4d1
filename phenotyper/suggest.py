"""One way to answer a misspelt name: the closest allowed one, for every error that lists
choices (experiment keys and values, mapping keys, presets, columns, outcomes)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(value: str, options: Iterable[str]) -> str:
    """` Did you mean 'x'?` for the closest of `options` to `value`, or an empty string."""
    near = difflib.get_close_matches(str(value), [str(option) for option in options], n=1)
    return f" Did you mean '{near[0]}'?" if near else ""

