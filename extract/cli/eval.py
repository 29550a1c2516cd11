"""``dormant eval``: multiple-choice accuracy of one model (optionally with the calibration scores)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from extract.cli import options


def _eval(args: argparse.Namespace) -> int:
    import polars as pl

    from analysis.core.io import write_parquet
    from extract.data.tasks import DEFAULT_SUITE, load_tasks
    from extract.engine.scores import scores_frame
    from extract.evaluate import evaluate
    from extract.models.load import load_model

    names = [n for t in args.task for n in (DEFAULT_SUITE if t == "suite" else [t])]
    tasks = load_tasks(names, limit=args.limit, seed=args.seed, mmlu_dir=args.mmlu_dir)
    model, tok = load_model(args.model, dtype=options.torch_dtype(args.dtype), device=args.device)
    chat = {"auto": None, "yes": True, "no": False}[args.chat_template]
    preds, calib = [], []
    print(f"{'task':<22} {'n':>5} {'accuracy':>8} {'chance':>7}")
    for task in tasks:
        t0 = time.perf_counter()
        res = evaluate(model, tok, task, k_shot=args.k_shot, chat_template=chat, chat_format=args.chat_format,
                       tokenization=args.tokenization, chat_delimiter=args.chat_delimiter, batch_tokens=args.batch_tokens,
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


def register(sub) -> None:
    from extract.prompts import CHAT_DELIMITERS, CHAT_FORMATS, TOKENIZATIONS

    p = sub.add_parser("eval", help="multiple-choice accuracy of one model (letter log-likelihoods)")
    options.add_model(p)
    options.add_dtype(p)
    options.add_device(p)
    p.add_argument("--task", required=True, action="append",
                   help="registry task, bigbench:<path>, mmlu:<subject>, or 'suite' (the default suite); repeatable")
    p.add_argument("--k-shot", type=int, default=5, help="few-shot examples (paper: 5 for MMLU)")
    p.add_argument("--limit", type=int, help="questions per task (per subject for MMLU); default all")
    p.add_argument("--seed", type=int, default=0, help="question selection and choice order")
    p.add_argument("--chat-template", choices=["auto", "yes", "no"], default="auto",
                   help="auto: instruct models use their chat template (paper)")
    p.add_argument("--chat-format", choices=CHAT_FORMATS, default="multiturn",
                   help="multiturn: lm-evaluation-harness --fewshot_as_multiturn (paper); single_user: one user "
                        "message (definitions §5)")
    p.add_argument("--tokenization", choices=TOKENIZATIONS, default="bos_first",
                   help="bos_first: BOS first on plain prompts; lm_eval: lm-evaluation-harness 0.4.5's (paper "
                        "profile; definitions §5)")
    p.add_argument("--chat-delimiter", choices=CHAT_DELIMITERS, default="none",
                   help="after a multiturn chat prompt: none = the bare letter (definitions §5), space = lm-eval "
                        "0.4.5's ' A'")
    p.add_argument("--batch-tokens", type=int, default=8192, help="padded tokens per forward pass")
    p.add_argument("--scoring", choices=["letter", "cloze"], default="letter",
                   help="letter: definitions §5 (paper); cloze: per-character log-likelihood of each choice's text")
    p.add_argument("--mmlu-dir", type=Path, help="local MMLU CSV directory instead of the hub")
    p.add_argument("--out", type=Path, help="Parquet file of per-question predictions")
    p.add_argument("--calibrate-out", type=Path,
                   help="also record every registered head score per question (definitions §3 calibration) to this Parquet file")
    p.set_defaults(func=_eval)
