"""Every script's --help explains every flag (issue 2): no option without help text."""

from __future__ import annotations

import argparse
import importlib

import pytest

SCRIPTS = ("bench", "convert_tokenizer", "demo", "evaluate_pipeline", "evaluate_tokenizer",
           "extract_codes", "make_pipeline", "prepare_emoji", "sample", "train_prior",
           "train_scorer", "train_tokenizer")  # fmt: skip


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_flag_has_help(name, monkeypatch):
    module = importlib.import_module(name)

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    with pytest.raises(_Captured) as caught:
        module.parse_args([])
    parser = caught.value.parser
    assert parser.description, f"{name}.py has no description"
    actions = [action for action in parser._actions if not isinstance(action, argparse._HelpAction)]
    assert actions, f"{name}.py declares no flags"
    missing = [action.dest for action in actions if not (action.help or "").strip()]
    assert not missing, f"{name}.py: flags without help: {missing}"
