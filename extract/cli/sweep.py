"""``dormant sweep``: calibration, thresholds and the ablation sweep of one model on a task suite."""
from __future__ import annotations

import argparse

from analysis.core.settings import add_settings, settings_from_args
from extract.cli import options


def _sweep(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from analysis.core.io import write_json, write_parquet
    from analysis.core.score_functions import check_score_key, score_keys
    from extract import provenance
    from extract.models.load import load_model
    from extract.sweep import SweepSettings, load_suite, prompt_format, run_sweep

    start = provenance.now()
    s = settings_from_args(SweepSettings, args)
    if not s.tasks:
        raise ValueError("no tasks: give --tasks NAME ... or `tasks` in --config")
    fns = [check_score_key(f) for f in s.score_functions] or list(score_keys())
    model, tok = load_model(args.model, dtype=options.torch_dtype(s.dtype), device=s.device)
    data = load_suite(list(s.tasks), limit=s.limit, seed=s.seed, name=s.task_name)
    run = provenance.run_record("sweep", model, {"model": args.model, **asdict(s)},
                                prompt_format=prompt_format(model, tok, s), start_time=start)
    r = run_sweep(model, tok, data, score_fns=fns, fractions=list(s.fractions), seed=s.seed, k_shot=s.k_shot,
                  batch_tokens=s.batch_tokens, chat_format=s.chat_format, tokenization=s.tokenization,
                  chat_delimiter=s.chat_delimiter,
                  scoring=s.scoring, n_boot=s.n_boot, run_id=run["run_id"])
    out, done = args.out_dir, provenance.finished(run)
    write_parquet(provenance.runs_frame(done), out / "runs.parquet")
    write_parquet(r.calibration, out / "calibration.parquet", run=done)
    write_parquet(r.thresholds, out / "thresholds.parquet", run=done)
    write_json(out / "timing.json", r.timing)
    write_parquet(r.questions, out / "ablation_questions.parquet", run=done)
    write_parquet(r.results, out / "ablation_results.parquet", run=done)  # last: marks the job complete
    base = r.results.filter((r.results["score_fn"] == "random") & (r.results["target_fraction"] == 0))
    print(f"{args.model} on {data.name}: baseline {base['accuracy'][0]:.1f}% over {r.timing['questions']} "
          f"questions; {r.timing['configs']} configs in {r.timing['sweep_s']:.0f} s, cost ratio "
          f"{r.timing['cost_ratio']:.2f}x of (configs x one plain evaluation) -> {out}")
    return 0


def register(sub) -> None:
    from extract.sweep import SweepSettings

    p = sub.add_parser("sweep", help="calibrate, threshold and run the ablation sweep for one model")
    options.add_model(p)
    options.add_out(p, "directory of calibration/thresholds/ablation_results/runs Parquet files and timing.json",
                    flag="--out-dir")
    add_settings(p, SweepSettings, doc="sweep")
    p.set_defaults(func=_sweep)
