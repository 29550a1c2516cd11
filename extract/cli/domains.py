"""``dormant domains candidates|ablate|scatter``: dormant-by-domain heads in real LLMs (SPEC §7)."""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _candidates(args: argparse.Namespace) -> int:
    from analysis.domains import write_domain_report

    paths = write_domain_report(args.db, args.out, score_fn=args.score_fn, top=args.top,
                                fraction=args.fraction, models=args.models)
    print((args.out / "tables" / "domain_heads.md").read_text())
    print(f"wrote {len(paths)} files under {args.out}")
    return 0


def _ablate(args: argparse.Namespace) -> int:
    import polars as pl
    import torch

    from extract.domains import head_loss_changes
    from extract.errors import DormantError
    from extract.models.load import load_model, model_info
    from analysis.core.io import write_parquet

    torch.set_num_threads(args.threads)
    cands = pl.read_parquet(args.candidates).sort("rank")
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    name = model_info(model)["model"]
    mine = cands.filter(pl.col("model") == name).head(args.heads)
    if mine.is_empty():
        raise DormantError(f"{args.candidates} has no candidate heads for {name!r}; run `dormant domains candidates` "
                           "on a database that holds its scores")
    heads = list(zip(mine["layer"].to_list(), mine["head"].to_list()))
    examples = [json.loads(line) for f in args.data for line in open(f, encoding="utf-8") if line.strip()]
    if args.limit:
        by_corpus: dict[str, list[dict]] = {}
        for ex in examples:
            by_corpus.setdefault(ex.get("corpus", ""), []).append(ex)
        examples = [ex for group in by_corpus.values() for ex in group[: args.limit]]
    t0 = time.perf_counter()
    df = head_loss_changes(model, tok, examples, heads, prepend_bos=not args.no_bos, max_tokens=args.max_tokens,
                           mean=args.mean)
    df = df.with_columns(pl.lit(name).alias("model")).select("model", *[c for c in df.columns if c != "model"])
    write_parquet(df, args.out)
    print(f"{name}: heads {', '.join(f'L{l}H{h}' for l, h in heads)} zeroed{' and mean-ablated' * args.mean} "
          f"on {len(examples)} examples "
          f"({time.perf_counter() - t0:.0f} s) -> {args.out}")
    return 0


def _scatter(args: argparse.Namespace) -> int:
    from analysis.domains import write_scatter_report

    paths = write_scatter_report(args.ablation, args.out, args.candidates)
    print((args.out / "tables" / "domain_scatter.md").read_text())
    print(f"wrote {len(paths)} files under {args.out}")
    return 0


def add_domains_parser(subparsers) -> None:
    """``dormant domains candidates`` (no torch), ``ablate`` (one model), ``scatter`` (no torch)."""
    from analysis.core.score_functions import score_keys

    p = subparsers.add_parser("domains", help="heads dormant on one domain and active on another (SPEC §7)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser("candidates", help="per-domain head means, candidate table and figures from the database")
    c.add_argument("--db", type=Path, default=Path("results/db/core.duckdb"))
    c.add_argument("--out", type=Path, default=Path("results"))
    c.add_argument("--score-fn", default="awft", choices=score_keys())
    c.add_argument("--top", type=int, default=5, help="candidate heads per model")
    c.add_argument("--fraction", type=float, default=0.15,
                   help="target fraction p of the SPEC §3 threshold that marks a head dormant on an example")
    c.add_argument("--models", nargs="*", help="models to draw a figure for (default: every model in the database)")
    c.set_defaults(func=_candidates)
    a = sub.add_parser("ablate", help="per-example loss change from zeroing (and mean-ablating) each of a model's "
                       "top candidate heads")
    a.add_argument("--model", required=True, help="zoo name, hub id or local directory")
    a.add_argument("--candidates", type=Path, default=Path("results/domains/candidates.parquet"))
    a.add_argument("--data", nargs="+", required=True, type=Path, help="corpus JSON-lines files")
    a.add_argument("--heads", type=int, default=2, help="top candidate heads to zero, one at a time")
    a.add_argument("--limit", type=int, help="examples per corpus (default all)")
    a.add_argument("--max-tokens", type=int, help="also truncate every example to this many tokens (cost)")
    a.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    a.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    a.add_argument("--no-bos", action="store_true", help="do not prepend the tokenizer's BOS token")
    a.add_argument("--mean", action="store_true",
                   help="also mean-ablate each head (its output set to its mean over every position of every example)")
    a.add_argument("--threads", type=int, default=1, help="torch threads")
    a.add_argument("--out", required=True, type=Path, help="Parquet file to write (atomically)")
    a.set_defaults(func=_ablate)
    s = sub.add_parser("scatter", help="active-dormant scatter figures and summary table from ablate outputs")
    s.add_argument("--ablation", nargs="+", required=True, type=Path, help="Parquet files of `domains ablate`")
    s.add_argument("--candidates", type=Path,
                   help="candidate table of `domains candidates` (awft): adds the split at each model's τ")
    s.add_argument("--out", type=Path, default=Path("results"))
    s.set_defaults(func=_scatter)
