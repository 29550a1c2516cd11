"""``dormant finetune``, ``dormant perturb`` (derived models) and ``dormant distributions`` (definitions §6)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from analysis.core.settings import add_settings, settings_from_args
from extract.cli import options


def _load_base(name: str, threads: int | None):
    import torch

    from extract.models.load import load_model, model_info

    options.set_threads(threads)
    model, tok = load_model(name, dtype=torch.float32, device="cpu")
    return model, tok, model_info(model)


def _finetune(args: argparse.Namespace) -> int:
    import polars as pl

    from analysis.core.io import write_json
    from extract import provenance
    from extract.finetune import SFTConfig, config_dict, finetune, sft_examples
    from extract.models.derived import derived_source, save_derived

    t0 = time.perf_counter()
    start = provenance.now()
    cfg = settings_from_args(SFTConfig, args)
    model, tok, info = _load_base(args.base, args.threads)
    run = provenance.run_record("finetune", model, {"base": args.base, "name": args.name, **config_dict(cfg)},
                                prompt_format="BIG-bench natural_instructions SFT examples (extract.finetune)",
                                start_time=start)
    train, heldout = sft_examples(tok, cfg)
    res = finetune(model, tok, train, heldout, cfg)
    recipe = {"method": "sft, decoder layers (embeddings frozen), AdamW, one epoch", **config_dict(cfg),
              "heldout_loss_before": res.heldout_before, "heldout_loss_after": res.heldout_after}
    save_derived(model, tok, args.out, derived_source(info, args.name, "instruct", recipe))
    log = res.log.with_columns(pl.lit(args.name).alias("model")).select("model", *res.log.columns)
    summary = {"model": args.name, "base": info["model"], "trainable_params": res.n_trainable, **res.info,
               "heldout_loss_before": res.heldout_before, "heldout_loss_after": res.heldout_after,
               "train_seconds": res.seconds, "total_seconds": time.perf_counter() - t0, "config": config_dict(cfg)}
    write_json(Path(args.out) / "finetune.json", summary)
    provenance.write_with_run(log, args.log, run)  # last: marks the job complete
    print(f"{args.name}: {res.info['steps']} steps over {res.info['train_examples']} examples "
          f"({res.info['train_tokens']} response tokens), held-out loss {res.heldout_before:.3f} -> "
          f"{res.heldout_after:.3f} nats/token; {res.seconds:.0f} s training, "
          f"{time.perf_counter() - t0:.0f} s total -> {args.out}")
    return 0


def _perturb(args: argparse.Namespace) -> int:
    from extract.models.derived import PerturbSettings, derived_source, perturb_attention, save_derived

    st = settings_from_args(PerturbSettings, args)
    model, tok, info = _load_base(args.base, args.threads)
    rel = perturb_attention(model, st.scale, st.seed)
    recipe = {"method": "gaussian noise on q_proj/k_proj weights, std = scale * rms(W)", "scale": st.scale,
              "seed": st.seed, "mean_relative_norm": sum(rel.values()) / len(rel)}
    save_derived(model, tok, args.out, derived_source(info, args.name, "perturbed", recipe))
    print(f"{args.name}: {len(rel)} q/k weights perturbed, mean |dW|/|W| = {recipe['mean_relative_norm']:.3f} "
          f"-> {args.out}")
    return 0


def _distributions(args: argparse.Namespace) -> int:
    from analysis.distributions.report import run
    from analysis.distributions.stats import Settings

    series = [(s[0], s[1:]) for s in args.series or []]
    bad = [s for s in series if len(s[1]) < 2]
    if bad:
        raise ValueError(f"--series {bad[0][0]} needs at least two models (KIND MODEL MODEL ...)")
    st = settings_from_args(Settings, args)
    paths = run(args.db, args.out, series, null_models=args.null, n_boot=st.n_boot, n_perm=st.n_perm,
                depth_bins=st.depth_bins, target_fraction=st.target_fraction, seed=st.seed,
                finetune_logs=args.finetune_log, tests_out=args.tests_out, explorer=args.explorer)
    print("\n".join(str(p) for p in paths))
    return 0


def register(sub) -> None:
    """``dormant finetune``, ``dormant perturb`` and ``dormant distributions``."""
    from analysis.distributions.stats import Settings
    from extract.finetune import SFTConfig
    from extract.models.derived import PerturbSettings

    f = sub.add_parser("finetune", help="supervised finetune on BIG-bench natural_instructions (definitions §6)")
    options.add_model(f, flag="--base")
    f.add_argument("--name", required=True, help="model id of the result (its id in the database)")
    f.add_argument("--out", required=True, type=Path, help="local model directory to write")
    f.add_argument("--log", required=True, type=Path, help="Parquet file of the loss per step (train, held-out)")
    add_settings(f, SFTConfig, doc="finetune")
    options.add_threads(f)
    f.set_defaults(func=_finetune)
    p = sub.add_parser("perturb", help="copy of a model with seeded noise on q/k projections (positive control)")
    options.add_model(p, flag="--base")
    p.add_argument("--name", required=True, help="model id of the result")
    p.add_argument("--out", required=True, type=Path)
    add_settings(p, PerturbSettings, doc="perturbation")
    options.add_threads(p)
    p.set_defaults(func=_perturb)
    s = sub.add_parser("distributions", help="KS / Wasserstein / overlap comparisons, figures, explorer")
    s.add_argument("--db", type=Path, default=Path("results/db/core.duckdb"))
    s.add_argument("--out", type=Path, default=Path("results"), help="root of tables/, figures/, distributions/")
    s.add_argument("--series", nargs="+", action="append", metavar="KIND MODEL",
                   help="KIND MODEL MODEL [...]: consecutive pairs are compared (kinds: finetune, scale, "
                        "cross_family, control); repeatable")
    s.add_argument("--null", nargs="*", default=None, metavar="MODEL",
                   help="models compared with themselves on two halves of the examples (default: every first model)")
    add_settings(s, Settings, doc="distribution statistics")
    s.add_argument("--finetune-log", nargs="*", type=Path, default=[], help="finetune loss Parquet files (figure)")
    s.add_argument("--tests-out", type=Path, help="Parquet file of the distribution_tests rows "
                                                  "(default OUT/distributions/distribution_tests.parquet)")
    s.add_argument("--explorer", type=Path, help="interactive HTML explorer (default OUT/distribution_explorer.html)")
    s.set_defaults(func=_distributions)
