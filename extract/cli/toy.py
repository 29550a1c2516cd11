"""``dormant toy train|report|robustness``: the Bigram-Backcopy toy models (definitions §7).

``train`` takes the run's settings as ``--config run.json`` (:class:`extract.toy.spec.RunSpec`, what the
workflow passes inline from ``mechanism.toy``) plus override flags generated
from that dataclass; device, threads and the progress bar are execution options, not settings of the run.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from analysis.core.settings import add_settings, settings_from_args
from extract.cli import options


def _train(args: argparse.Namespace) -> int:
    import torch

    from extract.toy.data import load_task, save_task
    from extract.toy.train import RunSpec, task_of, train

    options.set_threads(args.threads)
    spec = settings_from_args(RunSpec, args)
    if args.task_file and args.task_file.is_file():
        task = load_task(args.task_file)
    else:
        task = task_of(spec)
        if args.task_file:
            save_task(task, args.task_file)
    t0 = time.perf_counter()
    df = train(spec, task, args.out_dir, device=args.device, progress=not args.quiet)
    last = {(r["metric"], r["layer"], r["part"]): r["value"]
            for r in df.filter(df["step"] == spec.steps).iter_rows(named=True)}
    print(f"{spec.name}: {spec.steps} steps in {last['train_s', None, None]:.0f} s of training "
          f"({time.perf_counter() - t0:.0f} s wall, {torch.get_num_threads()} threads); vocabulary "
          f"{task.vocab_size}, triggers {[task.chars[i - 1] for i in task.triggers]}; backcopy risk "
          f"{last['backcopy_risk', None, None]:.4f}, bigram risk {last['bigram_risk', None, None]:.4f}, "
          f"Attn_<s> (last layer) {last['attn_bos', spec.layers - 1, None]:.3f} -> {args.out_dir}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from analysis.toy import write_toy_report

    options.print_written(write_toy_report(args.metrics, args.out, args.name), show=(f"{args.name}_claims.md",))
    return 0


def _robustness(args: argparse.Namespace) -> int:
    from analysis.toy import write_robustness_report

    options.print_written(write_robustness_report(args.metrics, args.out, args.name),
                          show=(f"{args.name}_robustness.md",))
    return 0


def register(sub) -> None:
    """``dormant toy train`` (one run: checkpoints + metrics.parquet), ``report`` and ``robustness``."""
    from extract.toy.spec import RunSpec

    p = sub.add_parser("toy", help="Bigram-Backcopy toy transformers: train, report, robustness over seeds "
                              "(definitions §7)")
    cmds = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = cmds.add_parser("train", help="train one toy model; metrics at log-spaced checkpoints")
    t.add_argument("--out-dir", required=True, type=Path, help="checkpoints, config.json, run.json, metrics.parquet")
    t.add_argument("--task-file", type=Path, help="task JSON: read if it exists, else built from the run's corpus, "
                   "triggers and min_count and written")
    options.add_threads(t, default=1)
    options.add_device(t)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    add_settings(t, RunSpec, doc="toy run")
    t.set_defaults(func=_train)
    r = cmds.add_parser("report", help="training-dynamics figures and the claims table from metrics files")
    r.add_argument("--metrics", nargs="+", required=True, type=Path, help="metrics.parquet files (bb_metrics rows)")
    r.add_argument("--out", type=Path, default=Path("results"))
    r.add_argument("--name", default="toy", help="prefix of the written tables and figures")
    r.set_defaults(func=_report)
    b = cmds.add_parser("robustness", help="every claim over the seeds each run was trained with (a run pools with "
                       "the runs whose run.json names it as their base)")
    b.add_argument("--metrics", nargs="+", required=True, type=Path, help="metrics.parquet files (bb_metrics rows)")
    b.add_argument("--out", type=Path, default=Path("results"))
    b.add_argument("--name", default="toy_seeds", help="prefix of the written table")
    b.set_defaults(func=_robustness)
