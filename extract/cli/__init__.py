"""The ``dormant`` command line (see :mod:`extract.cli.main`)."""
from extract.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
