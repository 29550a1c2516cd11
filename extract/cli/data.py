"""``dormant data fetch|corpus|tasks``: text corpora and multiple-choice tasks."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from analysis.core.settings import add_settings, settings_from_args
from extract.cli import options

MB = 1e6  # bytes per MB in printed sizes

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
    from extract.data.corpora import CorpusSettings, sample_corpus

    c = settings_from_args(CorpusSettings, args)
    rows = sample_corpus(args.name, c.n, c.min_tokens, c.max_tokens, c.seed)
    write_jsonl(args.out, rows)
    chars = sum(len(r["text"]) for r in rows)
    print(f"{args.name}: {len(rows)} documents, lengths drawn in [{c.min_tokens}, {c.max_tokens}] "
          f"(seed {c.seed}), {chars / MB:.2f} MB of text -> {args.out}")
    return 0


def _data_tasks(args: argparse.Namespace) -> int:
    from collections import Counter

    from extract.data.tasks import TASKS, load_tasks, mmlu_dir_or_none

    if args.all:
        from extract.data.bigbench import task_paths

        print("\n".join(task_paths()))
        return 0
    names = [n for n, t in TASKS.items() if t.source != "mmlu" or mmlu_dir_or_none(args.mmlu_dir)]
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


def register(sub) -> None:
    from extract.data.corpora import CorpusSettings

    p = sub.add_parser("data", help="text corpora and multiple-choice tasks: fetch, corpus, tasks")
    cmds = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cmds.add_parser("fetch", help="download and verify BIG-bench and the code sdist into the cache"
                   ).set_defaults(func=_data_fetch)
    c = cmds.add_parser("corpus", help="sample a text corpus (paper protocol) into a JSON-lines file")
    c.add_argument("name", metavar="NAME", help="xsum, wikilingua or code")
    options.add_out(c, "JSON-lines file to write (atomically)")
    add_settings(c, CorpusSettings, doc="corpus")
    c.set_defaults(func=_data_corpus)
    t = cmds.add_parser("tasks", help="the multiple-choice task registry with choice and question counts")
    t.add_argument("--mmlu-dir", type=Path, help="local MMLU CSV directory (dev/, test/) to include MMLU")
    t.add_argument("--all", action="store_true", help="list every task path of the BIG-bench tar instead")
    t.set_defaults(func=_data_tasks)
