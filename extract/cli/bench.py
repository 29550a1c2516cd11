"""``dormant bench``: the score engine against plain sdpa forwards and the naive eager approach, in one run."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from extract.cli import options


def _bench(args: argparse.Namespace) -> int:
    from analysis.core.io import write_json
    from extract import bench

    if args.worker:  # one (method set, length) in a fresh process: its peak memory is its own
        print(json.dumps(bench.worker(args.model, args.methods, args.lengths[0], args.repeats, args.device)))
        return 0
    rows = bench.run_all(args.model, args.lengths, args.repeats, args.methods, args.device)
    if args.json:
        write_json(args.json, rows)
    print(f"model {args.model} on {args.device}, {rows[0]['threads']} threads, median of {args.repeats} runs "
          "after a warm-up")
    print(bench.table(rows))
    return 0


def register(sub) -> None:
    from extract.bench import METHODS

    p = sub.add_parser("bench", help="benchmark the score engine (times and peak memory, ratios in one run)")
    options.add_model(p, default="smollm2-135m-instruct")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096], help="tokens per sequence")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per method (median reported)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    options.add_device(p)
    p.add_argument("--json", type=Path, help="also write the raw rows here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=_bench)
