"""Every option of every `zoo` command that takes several values (`--data`, `--label`, `--option`, ...) takes them
after one flag or with the flag repeated, keeping all of them (argparse's default would keep the last flag only)."""
from __future__ import annotations

import argparse

import pytest

from expertzoo.cli import parser


def list_options() -> list[tuple[str, argparse.Action]]:
    """(command, action) of every option that takes several values."""
    sub = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return [(name, action) for name, command in sub.choices.items() for action in command._actions
            if action.option_strings and action.nargs in ("+", "*")]


def test_the_usual_list_flags_are_there():
    found = {(name, action.option_strings[0]) for name, action in list_options()}
    assert {("eval", "--data"), ("eval", "--label"), ("fit-router", "--data"), ("fit-router", "--option"),
            ("train-expert", "--option"), ("train-router", "--data")} <= found


@pytest.mark.parametrize("name, action", list_options(), ids=lambda v: v if isinstance(v, str) else v.dest)
def test_repeated_flag_keeps_every_value(name, action):
    ns = argparse.Namespace(**{action.dest: action.default})
    command = parser()
    action(command, ns, ["a=1", "b=2"], action.option_strings[0])
    action(command, ns, ["c=3"], action.option_strings[0])
    assert getattr(ns, action.dest) == ["a=1", "b=2", "c=3"], f"zoo {name} {action.option_strings[0]} keeps the last flag only"
