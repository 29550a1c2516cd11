"""``dormant score``: the head scores of one corpus shard, to one Parquet file."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from analysis.core.settings import add_settings, settings_from_args
from extract.cli import options


def _score(args: argparse.Namespace) -> int:
    from extract.score import ScoreSettings, score_shard

    t0 = time.perf_counter()
    settings = settings_from_args(ScoreSettings, args)
    df = score_shard(args.model, args.data, args.dataset, args.out, shard=args.shard, num_shards=args.num_shards,
                     settings=settings)
    n_ex = df["example"].n_unique()
    print(f"{args.model} / {args.dataset} shard {args.shard}/{args.num_shards}: {n_ex} examples, "
          f"{df.height} rows -> {args.out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def register(sub) -> None:
    from extract.score import ScoreSettings

    p = sub.add_parser("score", help="score one shard of a JSON-lines text dataset with one model")
    options.add_model(p)
    p.add_argument("--data", required=True, type=Path, help="JSON lines: id, text[, domain, max_tokens]")
    p.add_argument("--dataset", required=True, help="dataset id stored with the rows")
    options.add_out(p, "Parquet file to write (atomically)")
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--num-shards", type=int, default=1)
    add_settings(p, ScoreSettings, doc="scoring")
    p.set_defaults(func=_score)
