"""definitions §6 report: run the configured comparisons, write ``distribution_tests`` rows, tables and figures.

Comparisons: each series (kind, [m0, m1, ...]) compares consecutive models (m0 vs m1, m1 vs m2, ...);
each null model is compared with itself on two disjoint halves of its examples (the calibration "null").
Outputs under ``out``: ``distributions/distribution_tests.parquet`` (the database table),
``tables/distribution_tests.*`` (key functions, overall), ``tables/distribution_tests_full.*`` (every
function and depth bin), ``figures/dist_*.{png,svg}`` and ``figures/distributions/*`` (per comparison and
per model), and ``distribution_explorer.html``.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from analysis.core.score_functions import score_keys
from analysis.database import connect, query
from analysis.distributions.figures import (ecdf_chart, ecdf_frame, effects_chart, finetune_chart, head_frame,
                                            head_heatmap_chart, paired_diff_chart, paired_diff_frame,
                                            wasserstein_matrix, wasserstein_matrix_chart)
from analysis.distributions.score_matrix import ScoreMatrix, load_scores, split_halves
from analysis.distributions.stats import Settings, compare
from analysis.render import write_figure, write_table

KEY_FUNCTIONS = ("awft", "aeqd", "ahon", "ahon_ln")


def slug(text: str) -> str:
    """A file-name-safe version of a comparison or model name."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")  # no dots: the figure writer appends suffixes


def pairs(series: list[tuple[str, list[str]]]) -> list[tuple[str, str, str]]:
    """(kind, a, b) for consecutive models of each series, without repeats."""
    out = []
    for kind, models in series:
        for a, b in zip(models, models[1:]):
            if (kind, a, b) not in out:
                out.append((kind, a, b))
    return out


def null_name(model: str) -> str:
    return f"{model} half 1 vs half 2"


def run_comparisons(scores: dict[str, dict[str, ScoreMatrix]], series, null_models, settings: Settings,
                    progress: bool = True) -> pl.DataFrame:
    """Every pair of ``series`` and every null split; the long ``distribution_tests`` frame."""
    jobs = [(kind, a, b) for kind, a, b in pairs(series)] + [("null", m, m) for m in null_models]
    frames = []
    for kind, a, b in tqdm(jobs, desc="comparisons", disable=not progress):
        if kind == "null":
            first = scores[a][score_keys()[0]] if score_keys()[0] in scores[a] else next(iter(scores[a].values()))
            h1, h2 = split_halves(first.examples, settings.seed)
            frames.append(compare({fn: m.rows(h1) for fn, m in scores[a].items()},
                                  {fn: m.rows(h2) for fn, m in scores[a].items()},
                                  comparison=null_name(a), kind="null", settings=settings, paired=False))
        else:
            frames.append(compare(scores[a], scores[b], comparison=f"{a} vs {b}", kind=kind, settings=settings))
    return pl.concat(frames)


def _ci(v, lo, hi) -> str:
    if v is None or not np.isfinite(v):
        return ""
    return f"{v:.3g} [{lo:.3g}, {hi:.3g}]" if lo is not None and np.isfinite(lo) else f"{v:.3g}"


def summary_table(tests: pl.DataFrame, fns=KEY_FUNCTIONS, depth_bin: str = "all") -> pl.DataFrame:
    """One row per (comparison, function): the main statistics as 'value [CI]' strings and permutation p."""
    sub = tests.filter(pl.col("depth_bin") == depth_bin)
    if fns is not None:
        sub = sub.filter(pl.col("score_fn").is_in(list(fns)))
    stats = ["ks_d", "wasserstein_sd", "overlap", "spearman_heads", "flip_fraction", "iou_inactive"]
    rows = []
    for (comp, kind, fn), g in sub.group_by(["comparison", "kind", "score_fn"], maintain_order=True):
        d = {r["statistic"]: r for r in g.iter_rows(named=True)}
        row = {"comparison": comp, "kind": kind, "score_fn": fn, "n_examples": g["n_examples"][0]}
        for s in stats:
            r = d.get(s)
            row[s] = _ci(r["value"], r["ci_low"], r["ci_high"]) if r else ""
        w = d.get("wasserstein")
        row["p_perm_w"] = f"{w['p_value']:.3g}" if w and w["p_value"] is not None else ""
        nv = d.get("ks_pvalue_naive")
        row["p_naive_ks"] = f"{nv['value']:.2g}" if nv else ""
        rows.append(row)
    return pl.DataFrame(rows)


def run(db: Path, out: Path, series: list[tuple[str, list[str]]], *, null_models: list[str] | None = None,
        n_boot: int = 200, n_perm: int = 200, depth_bins: int = 3, target_fraction: float = 0.15, seed: int = 0,
        finetune_logs: list[Path] = (), tests_out: Path | None = None, explorer: Path | None = None,
        progress: bool = True) -> list[Path]:
    """Compute the comparisons on the database at ``db`` and write every output; returns the paths."""
    from dataclasses import asdict

    from analysis.core import provenance
    from analysis.distributions.explorer import write_explorer

    t0 = time.perf_counter()
    start = provenance.now()
    out = Path(out)
    settings = Settings(n_boot=n_boot, n_perm=n_perm, depth_bins=depth_bins, target_fraction=target_fraction,
                        seed=seed)
    if null_models is None:
        null_models = list(dict.fromkeys(a for _, a, _ in pairs(series)))
    run = provenance.run_record("distributions", {**asdict(settings), "series": [[k, list(ms)] for k, ms in series],
                                                  "null_models": list(null_models)}, device="cpu",
                                start_time=start)
    con = connect(db, read_only=True)
    all_models = query(con, "SELECT model FROM models ORDER BY n_params, model")["model"].to_list()
    wanted = list(dict.fromkeys([m for _, ms in series for m in ms] + list(null_models)))
    missing = [m for m in wanted if m not in all_models]
    if missing:
        raise ValueError(f"model {missing[0]!r} of the comparisons is not in {db} (models: {', '.join(all_models)}); "
                         f"fix the config's distributions section or score that model")
    scores = {m: load_scores(con, m) for m in tqdm(all_models, desc="load scores", disable=not progress)}
    con.close()
    t_load = time.perf_counter()
    tests = run_comparisons(scores, series, null_models, settings, progress)
    t_stats = time.perf_counter()
    written = []
    tests_out = Path(tests_out) if tests_out else out / "distributions" / "distribution_tests.parquet"
    written.append(provenance.write_with_run(tests, tests_out, run))
    written += write_table(summary_table(tests), out / "tables" / "distribution_tests")
    written += write_table(tests.drop("model_a", "model_b"), out / "tables" / "distribution_tests_full")
    figs = out / "figures"
    written += write_figure(effects_chart(tests), figs / "dist_effects")
    written += write_figure(wasserstein_matrix_chart(wasserstein_matrix(scores)), figs / "dist_wasserstein_matrix")
    logs = [pl.read_parquet(p) for p in finetune_logs]
    if logs:
        written += write_figure(finetune_chart(pl.concat(logs)), figs / "finetune_loss")
    sub = figs / "distributions"
    for kind, a, b in pairs(series) + [("null", m, m) for m in null_models]:
        name = null_name(a) if kind == "null" else f"{a} vs {b}"
        if kind == "null":
            h1, h2 = split_halves(scores[a][score_keys()[0]].examples, seed)
            sa = {fn: m.rows(h1) for fn, m in scores[a].items()}
            sb = {fn: m.rows(h2) for fn, m in scores[a].items()}
            la, lb = f"{a} (half 1)", f"{a} (half 2)"
        else:
            sa, sb, la, lb = scores[a], scores[b], a, b
        written += write_figure(ecdf_chart(ecdf_frame({la: sa, lb: sb}), name), sub / f"ecdf_{slug(name)}")
        if next(iter(sa.values())).same_architecture(next(iter(sb.values()))):
            written += write_figure(paired_diff_chart(paired_diff_frame(sa, sb), name), sub / f"paired_diff_{slug(name)}")
    for m in all_models:
        written += write_figure(head_heatmap_chart(head_frame(scores[m]), m), sub / f"heatmap_{slug(m)}")
    explorer = Path(explorer) if explorer else out / "distribution_explorer.html"
    written.append(write_explorer(scores, explorer))
    if progress:
        print(f"distributions: load {t_load - t0:.1f} s, statistics {t_stats - t_load:.1f} s "
              f"({len(pairs(series))} pairs + {len(null_models)} null splits, {n_boot} bootstrap, {n_perm} "
              f"permutations), outputs {time.perf_counter() - t_stats:.1f} s")
        with pl.Config(tbl_rows=200, tbl_cols=-1, fmt_str_lengths=40, tbl_width_chars=250):
            print(summary_table(tests))
    return written
