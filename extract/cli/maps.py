"""``dormant maps run|report``: MAPS static scores, dynamic and causal checks for one model; tables and figures.

``run`` writes into ``--out-dir``: ``scores.parquet`` (table maps_scores), ``salient.parquet``
(maps_salient), ``dynamic.parquet`` (maps_dynamic), ``correlations.parquet`` (maps_correlations),
``causal.parquet`` (maps_causal) and ``timing.json``.
"""
from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def _one_thread():
    """Small-batch forward passes run faster on one thread than on several contended ones (the big
    vocabulary GEMMs keep every thread)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _run(args: argparse.Namespace) -> int:
    import polars as pl
    import torch

    from analysis.core.io import atomic_path
    from extract.maps.static import static_scores
    from extract.maps.operations import DATA_DIR, prepare
    from extract.maps.dynamic import causal_check, correlations, dynamic_rows, dynamic_scores
    from extract.models.load import load_model
    from analysis.core.io import write_parquet

    torch.manual_seed(args.seed)
    for name in ("dynamic_pairs", "causal_prompts"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            setattr(args, name, None)  # all pairs
    args.salient_vocab = args.salient_vocab or None
    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    ops = prepare(tok, args.operations, root=args.data_dir or DATA_DIR, k_copy=args.k_copy, k_other=args.k_other,
                  max_pairs=args.max_pairs, seed=args.seed)
    if not ops:
        from extract.errors import DormantError

        raise DormantError(f"no MAPS operation keeps ≥ 30 single-token pairs with the tokenizer of {args.model}")
    print(f"{args.model}: {len(ops)} operations, {sum(len(o.src) for o in ops)} pairs "
          f"({', '.join(f'{o.name}={len(o.src)}/{o.n_single}' for o in ops)})", flush=True)
    timing = {"load_s": time.perf_counter() - t0}
    dyn_ops = [o for o in ops if args.dynamic_operations is None or o.name in args.dynamic_operations]
    t = time.perf_counter()
    extra, frame = None, None
    if dyn_ops and args.dynamic_pairs != 0:
        with _one_thread():
            z, tg, ks, frame = dynamic_rows(model, tok, dyn_ops, args.dynamic_pairs, seed=args.seed)
        extra = (z, tg, ks)
    timing["dynamic_forward_s"] = time.perf_counter() - t
    t = time.perf_counter()
    res = static_scores(model, tok, ops, model_name=args.model, salient_vocab=args.salient_vocab,
                        salient_tokens=args.salient_tokens, salient_targets=args.salient_targets, extra=extra,
                        inputs=args.inputs)
    timing["vocabulary_scan_s"] = time.perf_counter() - t
    out = args.out_dir
    write_parquet(res.scores, out / "scores.parquet")
    write_parquet(res.salient, out / "salient.parquet")
    if frame is not None:
        dyn = dynamic_scores(args.model, frame, res.extra_hit)
        corr = correlations(res.scores, dyn)
    else:
        dyn = pl.DataFrame(schema={"model": pl.Utf8, "layer": pl.Int32, "head": pl.Int32, "operation": pl.Utf8,
                                   "template": pl.Int32, "context": pl.Utf8, "score": pl.Float64,
                                   "n_prompts": pl.Int32})
        corr = correlations(res.scores, dyn)
    write_parquet(dyn, out / "dynamic.parquet")
    write_parquet(corr, out / "correlations.parquet")
    t = time.perf_counter()
    with _one_thread():
        causal = [causal_check(model, tok, o, res.scores, model_name=args.model, counts=args.causal_counts,
                               draws=args.causal_draws, prompts=args.causal_prompts, shots=args.causal_shots,
                               seed=args.seed)
                  for o in ops if o.name in (args.causal_operations or [])]
    timing["causal_s"] = time.perf_counter() - t
    causal_df = pl.concat(causal) if causal else pl.DataFrame(schema={
        "model": pl.Utf8, "operation": pl.Utf8, "selection": pl.Utf8, "n_heads": pl.Int32, "draw": pl.Int32,
        "accuracy": pl.Float64, "base_accuracy": pl.Float64, "n_prompts": pl.Int32})
    write_parquet(causal_df, out / "causal.parquet")
    timing["total_s"] = time.perf_counter() - t0
    timing["threads"] = torch.get_num_threads()
    with atomic_path(out / "timing.json") as tmp:
        tmp.write_text(json.dumps(timing, indent=2) + "\n")
    with pl.Config(tbl_rows=60, fmt_str_lengths=40, tbl_width_chars=160):
        if corr.height:
            print(corr)
        if causal_df.height:
            print(causal_df.filter(pl.col("selection") != "random"))
    print(f"{args.model}: MAPS done in {timing['total_s']:.0f} s ({json.dumps({k: round(v, 1) for k, v in timing.items()})})")
    return 0


def _report(args: argparse.Namespace) -> int:
    from analysis.maps import write_maps_reports

    paths = write_maps_reports(args.maps_dirs, args.core_db, args.out, inactive_below=args.inactive_below,
                               salient_min=args.salient_min)
    for p in paths:
        if p.suffix == ".md":
            print(f"## {p.stem}\n{p.read_text()}")
    print(f"wrote {len(paths)} files under {args.out}")
    return 0


def add_maps_parser(subparsers) -> None:
    """``dormant maps run`` (one model, torch) and ``dormant maps report`` (tables and figures, no torch)."""
    from extract.maps.operations import CATEGORIES

    p = subparsers.add_parser("maps", help="MAPS: head functions from parameters, checked against inference")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = sub.add_parser("run", help="static, dynamic and causal MAPS analysis of one model (Parquet files)")
    r.add_argument("--model", required=True, help="zoo name, hub id, local directory or .gguf file")
    r.add_argument("--out-dir", required=True, type=Path)
    r.add_argument("--data-dir", type=Path, help="operation datasets (default: extract/maps/operations_data/)")
    r.add_argument("--operations", nargs="+", choices=list(CATEGORIES), help="default: all 20")
    r.add_argument("--k-copy", type=int, default=1, help="top-k for the copying operations (SPEC: 1)")
    r.add_argument("--k-other", type=int, default=10, help="top-k for the other operations (SPEC: 10)")
    r.add_argument("--inputs", choices=["mlp", "raw"], default="mlp",
                   help="rows of E' for layers ≥ 1: the first layer's MLP output (SPEC) or raw embeddings")
    r.add_argument("--max-pairs", type=int, help="seeded cap on pairs per operation (default: all pairs)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--salient-vocab", type=int, default=4096,
                   help="candidate tokens for saliency: the first N whole-word tokens (0: all)")
    r.add_argument("--salient-tokens", type=int, default=5, help="most salient tokens stored per head")
    r.add_argument("--salient-targets", type=int, default=5, help="top targets stored per salient token")
    r.add_argument("--dynamic-operations", nargs="+", choices=list(CATEGORIES), help="default: all used")
    r.add_argument("--dynamic-pairs", type=int, default=16,
                   help="pairs per operation and template for the dynamic check (0: skip; -1: all)")
    r.add_argument("--causal-operations", nargs="*", default=[], choices=list(CATEGORIES))
    r.add_argument("--causal-counts", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    r.add_argument("--causal-draws", type=int, default=3, help="random head sets per count")
    r.add_argument("--causal-prompts", type=int, default=32, help="prompts per operation (-1: all pairs)")
    r.add_argument("--causal-shots", type=int, default=3)
    r.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    r.add_argument("--device", default="cpu")
    r.set_defaults(func=_run)
    q = sub.add_parser("report", help="MAPS tables and figures from the run outputs and the core database")
    q.add_argument("--maps-dirs", nargs="+", required=True, type=Path, help="output folders of `maps run`")
    q.add_argument("--core-db", type=Path, help="database with head_scores (for the join with ahon_ln)")
    q.add_argument("--out", type=Path, default=Path("results"))
    q.add_argument("--inactive-below", type=float, default=0.5,
                   help="a head is inactive when its median ahon_ln is below this")
    q.add_argument("--salient-min", type=float, default=0.2,
                   help="a head has a salient operation when its best static score reaches this")
    q.set_defaults(func=_report)
