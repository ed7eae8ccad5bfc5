"""The command-line error type and flag spelling shared by `validation.py` and `ranges.py`.

A module of its own so that the range table (ranges.py) and the cross-flag checks
(validation.py) can both raise the same error without importing each other.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """An impossible or contradictory command line; the one-line message names the flags at fault."""


def flag(dest: str) -> str:
    """The command-line spelling of an argparse `dest`: `clip_grad` -> `--clip-grad`."""
    return "--" + dest.replace("_", "-")
