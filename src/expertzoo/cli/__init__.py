"""The `zoo` command: one sub-command per file. Bad input prints one line and exits with code 2.

Each sub-command's `register` builds its parser from the standard library alone and its `run` imports torch and
transformers, so `zoo --help` and `zoo CMD --help` answer at once."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from ..errors import ZooError
from . import add_expert, build, collab, demo, evaluate, export, fit_router, generate, info, inspect, merge, prune
from . import remove_expert, train_expert, train_router
from .. import __version__
from .common import HelpFormatter

COMMANDS = (build, info, generate, evaluate, demo, train_router, merge, export, inspect, train_expert, collab, prune,
            fit_router, add_expert, remove_expert)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoo", description="Zoo of Experts: mix expert modules into a pretrained LM.",
                                formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    for command_parser in sub.choices.values():
        command_parser.formatter_class = HelpFormatter
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    log = logging.getLogger("expertzoo")  # the zoo's own messages; other libraries log as they would without it
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("zoo: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.WARNING)
    args = parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except ZooError as err:
        print(f"zoo: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zoo: interrupted", file=sys.stderr)
        return 130
