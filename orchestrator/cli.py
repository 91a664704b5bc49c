"""The ``ferry`` command line: one subcommand per file in orchestrator/commands/."""

from __future__ import annotations

import argparse
import sys

from orchestrator.commands import fetch_model, generate, replay, serve

COMMANDS = {
    "generate": generate,
    "serve": serve,
    "fetch-model": fetch_model,
    "replay": replay,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferry", description="Ferry: disaggregated LLM inference orchestrator"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        module.add_parser(sub, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
