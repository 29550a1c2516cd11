"""``dormant toy train|report|robustness``: the Bigram-Backcopy toy models (SPEC §7)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    import torch

    from extract.toy.data import corpus_task, load_task, save_task
    from extract.toy.train import RunSpec, train

    torch.set_num_threads(args.threads)
    spec = RunSpec(name=args.run, layers=args.layers, attention=args.attention, optimizer=args.optimizer,
                   width=args.width, length=args.length, batch=args.batch, steps=args.steps, lr=args.lr,
                   weight_decay=args.weight_decay, betas=tuple(args.betas), momentum=args.momentum,
                   checkpoints=args.checkpoints, eval_batch=args.eval_batch, seed=args.seed,
                   init=args.init, bos_loss=not args.no_bos_loss)
    if args.task_file and args.task_file.is_file():
        task = load_task(args.task_file)
    else:
        task = corpus_task(args.corpus, k=args.triggers, min_count=args.min_count)
        if args.task_file:
            save_task(task, args.task_file)
    t0 = time.perf_counter()
    df = train(spec, task, args.out_dir, device=args.device, progress=not args.quiet)
    last = {r["metric"]: r["value"] for r in df.filter(df["step"] == spec.steps).iter_rows(named=True)}
    print(f"{spec.name}: {spec.steps} steps in {last['train_s']:.0f} s of training ({time.perf_counter() - t0:.0f} s "
          f"wall, {torch.get_num_threads()} threads); vocabulary {task.vocab_size}, triggers "
          f"{[task.chars[i - 1] for i in task.triggers]}; backcopy risk {last['backcopy_risk']:.4f}, bigram risk "
          f"{last['bigram_risk']:.4f}, Attn_<s> (last layer) {last[f'attn_bos_l{spec.layers - 1}']:.3f} "
          f"-> {args.out_dir}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from analysis.toy import write_toy_report

    paths = write_toy_report(args.metrics, args.out, args.name)
    for p in paths:
        if p.suffix == ".md" and p.stem.endswith("claims"):
            print(p.read_text())
    print(f"wrote {len(paths)} files under {args.out}")
    return 0


def _robustness(args: argparse.Namespace) -> int:
    from analysis.toy import write_robustness_report

    paths = write_robustness_report(args.metrics, args.out, args.name)
    print(next(p for p in paths if p.suffix == ".md").read_text())
    print(f"wrote {len(paths)} files under {args.out}")
    return 0


def add_toy_parser(subparsers) -> None:
    """``dormant toy train`` (one run: checkpoints + metrics.parquet), ``report`` and ``robustness``."""
    p = subparsers.add_parser("toy", help="Bigram-Backcopy toy transformers: train, report, robustness over seeds "
                              "(SPEC §7)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = sub.add_parser("train", help="train one toy model; metrics at log-spaced checkpoints")
    t.add_argument("--run", required=True, help="run name (stored in bb_metrics.run)")
    t.add_argument("--out-dir", required=True, type=Path, help="checkpoints, config.json, metrics.parquet")
    t.add_argument("--layers", type=int, default=1)
    t.add_argument("--attention", choices=["softmax", "relu"], default="softmax")
    t.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    t.add_argument("--width", type=int, default=128, help="model width (paper: 256)")
    t.add_argument("--length", type=int, default=128, help="sequence length (paper: 256)")
    t.add_argument("--batch", type=int, default=32, help="sequences per step (paper: 512)")
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--lr", type=float, default=1e-3, help="paper: 3e-4 (AdamW), 0.03 (SGD)")
    t.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW only")
    t.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.99], help="AdamW only")
    t.add_argument("--momentum", type=float, default=0.9, help="SGD only")
    t.add_argument("--checkpoints", type=int, default=20, help="log-spaced checkpoints (plus step 0)")
    t.add_argument("--eval-batch", type=int, default=64, help="fixed sequences the metrics are measured on")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--init", choices=["normal", "torch"], default="normal",
                   help="normal: N(0, 0.02²) weights; torch: PyTorch's module defaults (the AD authors' code)")
    t.add_argument("--no-bos-loss", action="store_true",
                   help="leave the prediction made at <s> (of the first character) out of the loss (diagnostic)")
    t.add_argument("--corpus", default="xsum", help="corpus whose character bigrams define the task")
    t.add_argument("--triggers", type=int, default=3, help="k most frequent characters trigger backcopy")
    t.add_argument("--min-count", type=int, default=100, help="rarer characters are left out of the vocabulary")
    t.add_argument("--task-file", type=Path, help="task JSON: read if it exists, else built from --corpus and written")
    t.add_argument("--threads", type=int, default=1, help="torch threads")
    t.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)
    r = sub.add_parser("report", help="training-dynamics figures and the claims table from metrics files")
    r.add_argument("--metrics", nargs="+", required=True, type=Path, help="metrics.parquet files (bb_metrics rows)")
    r.add_argument("--out", type=Path, default=Path("results"))
    r.add_argument("--name", default="toy", help="prefix of the written tables and figures")
    r.set_defaults(func=_report)
    b = sub.add_parser("robustness", help="every claim over the seeds each run was trained with "
                       "(runs named <run>_seed<n> pool with <run>)")
    b.add_argument("--metrics", nargs="+", required=True, type=Path, help="metrics.parquet files (bb_metrics rows)")
    b.add_argument("--out", type=Path, default=Path("results"))
    b.add_argument("--name", default="toy_seeds", help="prefix of the written table")
    b.set_defaults(func=_robustness)
