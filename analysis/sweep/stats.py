"""Ablation-sweep analyses (definitions §5): the within-budget rule, normalised AUC, Table 2, AUC ranks,
agreement between models and between functions. Input frames have the ``ablation_results`` columns
``model, task, score_fn, target_fraction, threshold, realized_percent, accuracy, n_questions``
(accuracy in points, 0–100; ``score_fn = 'random'`` is the baseline curve, and random at fraction 0 is the
baseline accuracy)."""
from __future__ import annotations

import numpy as np
import polars as pl

from analysis.core.score_functions import score_keys

BUDGET = 1.0  # accuracy points below baseline


def within_budget(x, y, baseline: float, budget: float = BUDGET) -> float:
    """Largest % of heads zeroed within budget, definitions §5 to the letter.

    Sort the points by x, walk the segments, and return the x of the *last* segment crossing of the line
    ``baseline - budget`` by linear interpolation; a point exactly on the line counts; no crossing -> 0.
    """
    order = np.argsort(np.asarray(x, dtype=float), kind="stable")
    x, y = np.asarray(x, dtype=float)[order], np.asarray(y, dtype=float)[order] - (baseline - budget)
    found = 0.0
    for i in range(len(x) - 1):
        a, b = y[i], y[i + 1]
        if b == 0:  # the segment ends on the line (or runs along it)
            found = x[i + 1]
        elif a == 0:
            found = x[i]
        elif (a < 0) != (b < 0):
            found = x[i] + (x[i + 1] - x[i]) * a / (a - b)
    if len(x) == 1 and y[0] == 0:
        found = x[0]
    return float(found)


def normalised_auc(x, y) -> float:
    """Trapezoid integral of accuracy over realized % divided by (max x - min x). NaN when all x are equal: a
    function that zeroes no head at any fraction (e.g. a layer-normalised value score on a model with one KV
    head per layer, where every head of a layer has the same value vectors) has no curve to rank."""
    order = np.argsort(np.asarray(x, dtype=float), kind="stable")
    x, y = np.asarray(x, dtype=float)[order], np.asarray(y, dtype=float)[order]
    width = x[-1] - x[0]
    if width == 0:
        return float("nan")
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2) / width)


def baselines(results: pl.DataFrame) -> pl.DataFrame:
    """Baseline accuracy per (model, task): random at target fraction 0."""
    base = results.filter((pl.col("score_fn") == "random") & (pl.col("target_fraction") == 0))
    return base.select("model", "task", pl.col("accuracy").alias("baseline")).unique(["model", "task"])


def _curves(results: pl.DataFrame):
    base = {(m, t): b for m, t, b in baselines(results).iter_rows()}
    for (model, task, fn), g in results.group_by(["model", "task", "score_fn"], maintain_order=True):
        if (model, task) not in base:
            raise ValueError(f"no baseline for {model}/{task}: add the random run at target_fraction 0")
        yield model, task, fn, g["realized_percent"].to_numpy(), g["accuracy"].to_numpy(), base[(model, task)]


def budget_table(results: pl.DataFrame) -> pl.DataFrame:
    """``model, task, score_fn, within_budget, auc`` for every curve."""
    rows = [(m, t, f, within_budget(x, y, b), normalised_auc(x, y)) for m, t, f, x, y, b in _curves(results)]
    return pl.DataFrame(rows, schema=["model", "task", "score_fn", "within_budget", "auc"], orient="row")


def _one_task(results: pl.DataFrame, task: str | None) -> pl.DataFrame:
    tasks = results["task"].unique().to_list()
    if task is None and len(tasks) > 1:
        raise ValueError(f"results hold several tasks {sorted(tasks)}; pass task=")
    return results if task is None else results.filter(pl.col("task") == task)


def table2(results: pl.DataFrame, task: str | None = None) -> pl.DataFrame:
    """Table 2: per model the ``awft`` value, the best other function's value and name, and the best
    function overall (``random`` excluded), plus an ``average`` row (means; names left empty)."""
    bt = budget_table(_one_task(results, task)).filter(pl.col("score_fn") != "random")
    rows = []
    for (model,), g in bt.group_by(["model"], maintain_order=True):
        aw = g.filter(pl.col("score_fn") == "awft")["within_budget"]
        g = g.with_columns(pl.col("auc").fill_nan(None))
        others = g.filter(pl.col("score_fn") != "awft").sort(["within_budget", "auc"], descending=True, nulls_last=True)
        best = g.sort(["within_budget", "auc"], descending=True, nulls_last=True)
        rows.append((model, float(aw[0]) if len(aw) else None, float(others["within_budget"][0]),
                     others["score_fn"][0], best["score_fn"][0]))
    out = pl.DataFrame(rows, schema=["model", "awft", "best_other", "best_other_fn", "best_fn"], orient="row")
    out = out.sort("model")
    avg = pl.DataFrame([("average", out["awft"].mean(), out["best_other"].mean(), None, None)],
                       schema=out.schema, orient="row")
    return pl.concat([out, avg])


def auc_ranks(results: pl.DataFrame, task: str | None = None) -> pl.DataFrame:
    """Normalised AUC and its rank within each model (1 = best; ``random`` included; ties share the
    smaller rank): ``model, score_fn, auc, rank``."""
    bt = budget_table(_one_task(results, task)).with_columns(pl.col("auc").fill_nan(None))  # no curve: no rank
    return (bt.with_columns(pl.col("auc").rank("min", descending=True).over("model").cast(pl.Int64).alias("rank"))
            .select("model", "score_fn", "auc", "rank").sort("model", "rank", "score_fn", nulls_last=True))


def rank_correlation(ranks: pl.DataFrame) -> pl.DataFrame:
    """Spearman correlation between models' AUC vectors over the shared functions: ``model_a, model_b, rho``."""
    from scipy.stats import spearmanr

    wide = ranks.pivot(on="model", index="score_fn", values="auc").drop_nulls()
    models = [c for c in wide.columns if c != "score_fn"]
    rows = []
    for i, a in enumerate(models):
        for b in models[i:]:
            rho = 1.0 if a == b else float(spearmanr(wide[a].to_numpy(), wide[b].to_numpy()).statistic)
            rows.append((a, b, rho))
    return pl.DataFrame(rows, schema=["model_a", "model_b", "rho"], orient="row")


def top_k_iou(ranks: pl.DataFrame, k: int = 5) -> pl.DataFrame:
    """IoU between models' top-``k`` functions by AUC (``random`` excluded): ``model_a, model_b, iou``."""
    ranked = ranks.filter((pl.col("score_fn") != "random") & pl.col("auc").is_not_null())  # no curve: not ranked
    top = {m: set(g.sort("auc", descending=True)["score_fn"][:k]) for (m,), g in ranked.group_by(["model"],
                                                                                              maintain_order=True)}
    models = sorted(top)
    rows = [(a, b, len(top[a] & top[b]) / len(top[a] | top[b])) for i, a in enumerate(models) for b in models[i:]]
    return pl.DataFrame(rows, schema=["model_a", "model_b", "iou"], orient="row")


def selection_overlap(selected: pl.DataFrame) -> pl.DataFrame:
    """IoU and precision between the head sets two functions select at the same target fraction.

    selected: ``model, score_fn, target_fraction, example, layer, head`` rows of selected heads.
    Returns ``model, target_fraction, fn_a, fn_b, iou, precision`` with precision = |A ∩ B| / |A|.
    """
    rows = []
    for (model, p), g in selected.group_by(["model", "target_fraction"], maintain_order=True):
        sets = {fn: set(sg.select("example", "layer", "head").iter_rows())
                for (fn,), sg in g.group_by(["score_fn"], maintain_order=True)}
        fns = [f for f in score_keys() if f in sets]
        for a in fns:
            for b in fns:
                if a == b:
                    continue
                inter = len(sets[a] & sets[b])
                union = len(sets[a] | sets[b])
                rows.append((model, p, a, b, inter / union if union else 1.0,
                             inter / len(sets[a]) if sets[a] else float("nan")))
    return pl.DataFrame(rows, schema=["model", "target_fraction", "fn_a", "fn_b", "iou", "precision"], orient="row")
