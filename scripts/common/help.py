"""One --help style for every job: the module docstring's layout kept, and each flag's default
shown when it is set and its help text does not state it already."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the module docstring's layout and shows each default that is set."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False  # (0 == False: use `is`)
        stated = "default" in text or action.required
        if not unset and not stated and action.default != argparse.SUPPRESS:
            text += " (default: %(default)s)"
        return text
