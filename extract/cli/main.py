"""The ``dormant`` command line: ``dormant <command> ...``, one module of :mod:`extract.cli` per command group.

Every module has ``register(subparsers)``, which adds its commands with ``set_defaults(func=handler)``; the
options several commands share are declared once in :mod:`extract.cli.options`. Handlers import torch /
transformers lazily, so ``dormant --help`` stays fast. A ``DormantError`` (or ValueError, FileNotFoundError, a
full disk's ``WriteError``) is printed as ``error: <message>`` on stderr with exit status 2 (``DORMANT_DEBUG=1``
shows the traceback).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from analysis.core.io import WriteError
from analysis.core.score_functions import load_plugins
from extract.errors import DormantError

# command groups in the order of `dormant --help`: the pipeline first, then the studies, then the analysis side
GROUPS = ("models", "data", "score", "eval", "sweep", "bench", "distributions", "toy", "domains", "maps", "analysis")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dormant", description="Find dormant attention heads in causal LMs.")
    sub = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")
    for name in GROUPS:
        importlib.import_module(f"extract.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    load_plugins()  # score functions registered by $DORMANT_PLUGINS modules exist in every command
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        return args.func(args) or 0
    except (DormantError, ValueError, FileNotFoundError, WriteError) as e:
        if os.environ.get("DORMANT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
