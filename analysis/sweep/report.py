"""All ablation outputs from the database: Table 2 and its KL companion (with paired-bootstrap CIs over the
questions), AUC ranks with rank intervals, Figures 3/4/10, agreement between models, overlap between
functions' head sets, threshold stability, and the sweep's cost."""
from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from analysis.core.bootstrap import N_BOOT, curves
from analysis.core.score_functions import SCORE_FUNCTIONS
from analysis.core.thresholds import stability
from analysis.database import connect, query
from analysis.render import with_ci, write_figure, write_table
from analysis.sweep import uncertainty
from analysis.sweep.figures import accuracy_curves, figure3
from analysis.sweep.stats import rank_correlation, selection_overlap, top_k_iou


def selected_heads(con, task: str, fraction: float) -> pl.DataFrame:
    """(model, score_fn, example, layer, head) that each function's τ at ``fraction`` selects on the
    calibration scores (the undisturbed forward pass) of ``task``."""
    parts = []
    for fn in SCORE_FUNCTIONS.values():
        parts.append(f"""SELECT c.model, '{fn.key}' AS score_fn, t.target_fraction, c.question AS example, c.layer, c.head
            FROM calibration_scores c JOIN thresholds t ON t.model = c.model AND t.task = c.task
            WHERE t.score_fn = '{fn.key}' AND t.target_fraction = {fraction} AND c.task = '{task}'
              AND {fn.sql_predicate(f"c.{fn.key}", "t.threshold")}""")
    return query(con, " UNION ALL ".join(parts))


def with_baselines(t2: pl.DataFrame, results: pl.DataFrame) -> pl.DataFrame:
    """Table 2 with each model's baseline accuracy (and its CI), chance and question count in front."""
    base = (results.filter((pl.col("score_fn") == "random") & (pl.col("target_fraction") == 0))
            .select("model", pl.col("accuracy").alias("baseline"), pl.col("accuracy_ci_low").alias("baseline_ci_low"),
                    pl.col("accuracy_ci_high").alias("baseline_ci_high"), "chance", "n_questions"))
    return t2.join(base, on="model", how="left", maintain_order="left").select(
        "model", "baseline", "baseline_ci_low", "baseline_ci_high", "chance", "n_questions",
        *[c for c in t2.columns if c != "model"])


def table2_display(t2: pl.DataFrame) -> pl.DataFrame:
    """Table 2 for reading: ``value [95% CI]`` cells; a gain whose interval includes 0 is marked ``(ns)``."""
    def cell(r, c):
        return with_ci(r[c], r.get(f"{c}_ci_low"), r.get(f"{c}_ci_high"))

    rows = []
    for r in t2.iter_rows(named=True):
        row = {"model": r["model"]}
        if "baseline" in r:
            row |= {"baseline": cell(r, "baseline"), "chance": with_ci(r["chance"], None, None),
                    "questions": "" if r["n_questions"] is None else str(r["n_questions"])}
        row |= {"awft": cell(r, "awft"), "best other": cell(r, "best_other"),
                "gain": cell(r, "gain") + (" (ns)" if r["gain_ci_has_0"] else ""),
                "best other fn": r["best_other_fn"] or "", "best fn": r["best_fn"] or ""}
        rows.append(row)
    return pl.DataFrame(rows)


def write_ablation_reports(db: Path, out: Path, timings: list[Path] = (), overlap_fraction: float = 0.15,
                           n_boot: int = N_BOOT, seed: int = 0, kl_budget: float = uncertainty.KL_BUDGET) -> list[Path]:
    """Every ablation table and figure of the database's sweeps (module doc); CIs from ``n_boot`` paired
    bootstrap replicates over questions (``seed``), the KL companion of Table 2 under ``kl_budget`` nats."""
    con = connect(db, read_only=True)
    results = query(con, "SELECT * FROM ablation_results ORDER BY model, task, score_fn, target_fraction")
    if results.is_empty():
        raise ValueError(f"{db} has no ablation_results; run the sweep first")
    tables, figures = out / "tables", out / "figures"
    written = []
    tasks = results["task"].unique().sort().to_list()
    for task in tasks:
        sfx = "" if len(tasks) == 1 else f"_{task}"
        r = results.filter(pl.col("task") == task)
        qs = query(con, "SELECT * FROM ablation_questions WHERE task = ? ORDER BY model, score_fn, target_fraction, "
                        "question", [task])
        if qs.is_empty():
            raise ValueError(f"{db} has no ablation_questions for {task}: rerun the sweep (the bootstrap needs them)")
        cv = curves(qs, n_boot, seed)
        t2 = with_baselines(uncertainty.table2(cv), r)
        written += write_table(t2, tables / f"table2{sfx}", digits=2, display=table2_display(t2))
        t2kl = uncertainty.table2(cv, "kl", kl_budget)
        written += write_table(t2kl.with_columns(pl.lit(kl_budget).alias("kl_budget")), tables / f"table2_kl{sfx}",
                               digits=2, display=table2_display(t2kl))
        ranks = uncertainty.auc_ranks(cv)
        written += write_table(ranks, tables / f"auc_ranks{sfx}")
        written += write_figure(figure3(ranks), figures / f"figure3_auc_ranks{sfx}")
        written += write_figure(accuracy_curves(r, ranks, top=3), figures / f"figure4_top3{sfx}")
        written += write_figure(accuracy_curves(r, ranks, top=None), figures / f"figure10_all{sfx}")
        written += write_table(rank_correlation(ranks), tables / f"auc_rank_correlation{sfx}", digits=3)
        written += write_table(top_k_iou(ranks, 5), tables / f"top5_iou{sfx}", digits=3)
        sel = selected_heads(con, task, overlap_fraction)
        ov = selection_overlap(sel)
        if not ov.is_empty():
            summary = (ov.group_by("model", maintain_order=True).agg(pl.col("iou").max().alias("max_iou"),
                                                pl.col("precision").max().alias("max_precision")).sort("model"))
            written += write_table(summary, tables / f"function_overlap_max{sfx}", digits=3)
            written += write_table(ov.sort("model", "fn_a", "fn_b"), tables / f"function_overlap{sfx}", digits=3)
    th = query(con, "SELECT * FROM thresholds")
    st = stability(th.filter(~pl.col("task").is_in(tasks)), 0.15)  # across the suite's single tasks
    written += write_table(st, tables / "threshold_stability", digits=3)
    if timings:
        rows = [{"model": Path(t).parent.name, **json.loads(Path(t).read_text())} for t in timings]
        written += write_table(pl.DataFrame(rows).select("model", "questions", "configs", "plain_eval_s",
                                                         "sweep_s", "cost_ratio"), tables / "sweep_cost", digits=3)
    con.close()
    return written
