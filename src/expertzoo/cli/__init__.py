"""The `zoo` command: one sub-command per file. Bad input prints one line and exits with code 2."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from ..errors import ZooError
from . import build, collab, demo, evaluate, export, generate, info, inspect, merge, prune, train_expert, train_router
from . import fit_router

COMMANDS = (build, info, generate, evaluate, demo, train_router, merge, export, inspect, train_expert, collab, prune, fit_router)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoo", description="Zoo of Experts: mix expert modules into a pretrained LM.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="zoo: %(message)s")
    args = parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except ZooError as err:
        print(f"zoo: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zoo: interrupted", file=sys.stderr)
        return 130
