"""What several commands share, declared once: the common options (model, dtype, device, threads, out) and
how a report's written files are printed. A study's settings reach its command through
:mod:`analysis.core.settings` (a dataclass -> ``--config FILE.json`` plus generated overrides)."""
from __future__ import annotations

import argparse
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16", "float64")
MODEL_HELP = "zoo name, hub id, local directory or .gguf file"


def add_model(p: argparse.ArgumentParser, *, required: bool = True, default: str | None = None,
              flag: str = "--model") -> None:
    p.add_argument(flag, required=required and default is None, default=default, help=MODEL_HELP)


def add_dtype(p: argparse.ArgumentParser, default: str = "float32") -> None:
    p.add_argument("--dtype", default=default, choices=DTYPES, help="weights and activations (default %(default)s)")


def add_device(p: argparse.ArgumentParser, default: str = "cpu") -> None:
    p.add_argument("--device", default=default, help="cpu, cuda, cuda:1, ... (default %(default)s)")


def add_threads(p: argparse.ArgumentParser, default: int | None = None) -> None:
    p.add_argument("--threads", type=int, default=default,
                   help=f"torch CPU threads (default {default})" if default else
                   "torch CPU threads (default: torch's own choice, i.e. all cores)")


def add_out(p: argparse.ArgumentParser, help: str = "file to write (atomically)", *, required: bool = True,
            flag: str = "--out") -> None:
    p.add_argument(flag, required=required, type=Path, help=help)


def set_threads(n: int | None) -> None:
    """Apply ``--threads`` (None leaves torch's default)."""
    if n:
        import torch

        torch.set_num_threads(n)


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def print_written(paths, show: tuple[str, ...] = ()) -> None:
    """Print the files a report returned: first the text of those whose name is in ``show`` (e.g.
    ``"table2.md"``), then one ``wrote PATH`` line each. Reports return their paths; nothing is guessed."""
    paths = [Path(p) for p in paths]
    for p in paths:
        if p.name in show:
            print(p.read_text())
    for p in paths:
        print(f"wrote {p}")
