"""``dormant db build``, ``sql``, ``report``, ``ablation-report``, ``paper``, ``timings``: the analysis side (no torch)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from extract.cli import options


def _db_build(args: argparse.Namespace) -> int:
    from analysis.database import build

    corpora = {}
    for item in args.corpus or []:
        name, _, path = item.partition("=")
        if not path:
            raise ValueError(f"--corpus wants NAME=FILE.jsonl, got {item!r}")
        corpora[name] = Path(path)
    tables: dict[str, list[Path]] = {}
    for item in args.table or []:
        name, _, path = item.partition("=")
        if not path:
            raise ValueError(f"--table wants TABLE=FILE.parquet, got {item!r}")
        tables.setdefault(name, []).append(Path(path))
    counts = build(args.db, base=args.base, model_jsons=args.models or [], shards=args.shards or [], corpora=corpora, tables=tables)
    print(f"{args.db}: " + ", ".join(f"{t} {n}" for t, n in counts.items()))
    return 0


def _sql(args: argparse.Namespace) -> int:
    import duckdb

    from analysis.database import connect
    from analysis.database import query as db_query

    query = args.query if args.query != "-" else sys.stdin.read()
    con = connect(args.db, read_only=True)
    try:
        df = db_query(con, query)
    except duckdb.Error as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.csv:
        sys.stdout.write(df.write_csv())
    else:
        import polars as pl

        with pl.Config(tbl_rows=args.max_rows, tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=200):
            print(df)
    return 0


def add_db_parser(subparsers) -> None:
    """``dormant db build`` and ``dormant sql``."""
    p = subparsers.add_parser("db", help="build the score database from Parquet shards")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    b = sub.add_parser("build", help="write a fresh database (atomically) from model infos and score shards")
    b.add_argument("--db", required=True, type=Path)
    b.add_argument("--base", type=Path, help="start from a copy of this database (left unchanged)")
    b.add_argument("--models", nargs="*", type=Path, help="model_info JSON files")
    b.add_argument("--shards", nargs="*", type=Path, help="score shard Parquet files")
    b.add_argument("--corpus", nargs="*", metavar="NAME=FILE", help="corpus JSON-lines files (domains, hashes)")
    b.add_argument("--table", nargs="+", action="extend", metavar="TABLE=FILE",
                   help="Parquet files to upsert into TABLE (repeatable)")
    b.set_defaults(func=_db_build)
    q = subparsers.add_parser("sql", help="run a read-only SQL query on the score database")
    q.add_argument("query", help="SQL text, or - to read it from stdin")
    q.add_argument("--db", type=Path, default=Path("results/scores.duckdb"))
    q.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    q.add_argument("--max-rows", type=int, default=40)
    q.set_defaults(func=_sql)


def _report(args: argparse.Namespace) -> int:
    from analysis.summary import write_reports

    options.print_written(write_reports(args.db, args.out), show=("summary.md",))
    return 0


def add_report_parser(subparsers) -> None:
    """``dormant report``: tables, figures and the run summary from the database."""
    p = subparsers.add_parser("report", help="write summary tables, figures and summary.md from the database")
    p.add_argument("--db", type=Path, default=Path("results/scores.duckdb"))
    p.add_argument("--out", type=Path, default=Path("results"))
    p.set_defaults(func=_report)


def add_paper_parser(subparsers) -> None:
    """``dormant paper``: build the manuscript from the generated tables and figures."""
    p = subparsers.add_parser("paper", help="build paper/main.tex with latexmk (skips when no TeX engine)")
    p.add_argument("--tex", type=Path, default=Path("paper/main.tex"))
    p.add_argument("--out", type=Path, default=Path("results/paper"))

    def run(args):
        from analysis.paper import build_paper

        print(build_paper(args.tex, args.out))
        return 0

    p.set_defaults(func=run)


def add_ablation_report_parser(subparsers) -> None:
    """``dormant ablation-report``: Table 2, Figures 3/4/10 and the agreement analyses."""
    p = subparsers.add_parser("ablation-report", help="Table 2, AUC ranks, Figures 3/4/10 from the database")
    p.add_argument("--db", type=Path, default=Path("results/scores.duckdb"))
    p.add_argument("--out", type=Path, default=Path("results"))
    p.add_argument("--timings", nargs="*", type=Path, default=[], help="sweep timing.json files")
    from analysis.core.bootstrap import N_BOOT
    from analysis.sweep.uncertainty import KL_BUDGET

    p.add_argument("--n-boot", type=int, default=N_BOOT, help="paired bootstrap replicates over questions")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (the sweep's)")
    p.add_argument("--kl-budget", type=float, default=KL_BUDGET,
                   help="nats: the KL companion of Table 2 (largest %% zeroed with mean KL at most this)")

    def run(args):
        from analysis.sweep.report import write_ablation_reports

        options.print_written(write_ablation_reports(args.db, args.out, args.timings, n_boot=args.n_boot,
                                                     seed=args.seed, kl_budget=args.kl_budget),
                              show=("table2.md", "table2_kl.md", "sweep_cost.md"))
        return 0

    p.set_defaults(func=run)


def add_task_candidates_parser(subparsers) -> None:
    """``dormant task-candidates``: the table of candidate offline tasks from ``dormant eval`` predictions."""
    p = subparsers.add_parser("task-candidates", help="accuracy vs chance per model, task and scoring, with CIs")
    p.add_argument("--predictions", nargs="+", type=Path, required=True, help="dormant eval --out Parquet files")
    p.add_argument("--out", type=Path, default=Path("results/tables/task_candidates"), help="table stem")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")

    def run(args):
        from analysis.sweep.candidates import write

        options.print_written(write(args.predictions, args.out, seed=args.seed), show=("task_candidates_wide.md",))
        return 0

    p.set_defaults(func=run)


def add_timings_parser(subparsers) -> None:
    """``dormant timings``: per-rule wall/CPU seconds and memory of a run (Snakemake benchmark files)."""
    p = subparsers.add_parser("timings", help="per-rule time and memory of a workflow run")
    p.add_argument("--benchmarks", type=Path, default=Path("results/benchmarks"))
    p.add_argument("--out", type=Path, default=Path("results/tables/run_timings"), help="table stem")

    def run(args):
        from analysis.render import markdown, write_table
        from analysis.timings import read_benchmarks, rule_timings

        jobs = read_benchmarks(args.benchmarks)
        if jobs.is_empty():
            print(f"no benchmark files under {args.benchmarks}")
            return 0
        table = rule_timings(jobs)
        write_table(table, args.out, digits=1)
        print(markdown(table, 1))
        return 0

    p.set_defaults(func=run)


def register(sub) -> None:
    for add in (add_db_parser, add_report_parser, add_ablation_report_parser, add_task_candidates_parser, add_paper_parser,
                add_timings_parser):
        add(sub)
