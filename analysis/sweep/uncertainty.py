"""Uncertainty of the ablation results (definitions §5): the paired bootstrap over questions applied to
every quantity of the sweep's reports.

Input: the curves of ``analysis.core.bootstrap.curves`` (one task's ``ablation_questions`` rows under one
paired bootstrap shared by every configuration and every model), so a difference (the best other function
minus ``awft``, a model average) is resampled with its pairing intact. Each rule (within budget, AUC, rank)
is applied inside every replicate; replicate 0 is the point estimate, equal to the values of
:mod:`analysis.sweep.stats` on ``ablation_results``.
"""
from __future__ import annotations

import numpy as np
import polars as pl

from analysis.core.bootstrap import baseline_replicates, ci_of_replicates
from analysis.sweep.stats import BUDGET, normalised_auc, within_budget

KL_BUDGET = 0.1  # nats: mean KL of the answer-position distribution from the unablated one (definitions §5)
METRICS = ("accuracy", "kl")


def budget_values(cv: dict, model: str, fn: str, metric: str = "accuracy", budget: float | None = None) -> np.ndarray:
    """Largest % zeroed within budget per replicate: ``accuracy`` (points below the replicate's baseline,
    default ``BUDGET``) or ``kl`` (mean KL at most ``budget`` nats, default ``KL_BUDGET``: the same rule on −KL
    with the line at −budget)."""
    c = cv[(model, fn)]
    if metric == "accuracy":
        base, b = baseline_replicates(cv, model), BUDGET if budget is None else budget
        return np.array([within_budget(c.x[r], c.accuracy[r], base[r], b) for r in range(len(base))])
    if metric == "kl":
        b = KL_BUDGET if budget is None else budget
        return np.array([within_budget(c.x[r], -c.kl[r], 0.0, b) for r in range(len(c.x))])
    raise ValueError(f"metric={metric!r}; choose one of {METRICS}")


def auc_values(cv: dict, model: str, fn: str, metric: str = "accuracy") -> np.ndarray:
    """Normalised AUC per replicate (accuracy, or −KL so that higher is better for both)."""
    c = cv[(model, fn)]
    y = c.accuracy if metric == "accuracy" else -c.kl
    return np.array([normalised_auc(c.x[r], y[r]) for r in range(len(c.x))])


def table2(cv: dict, metric: str = "accuracy", budget: float | None = None) -> pl.DataFrame:
    """Table 2 with 95% CIs: per model ``awft``, the best other function (chosen on the point estimate,
    ties by AUC; its CI is that function's), the gain over ``awft`` (paired), the best function overall, and
    ``gain_ci_has_0`` where the gain's interval includes 0; then the ``average`` row (means per replicate)."""
    models = sorted({m for m, _ in cv})
    rows, per_model = [], {}
    for m in models:
        fns = [f for mm, f in cv if mm == m and f != "random"]
        vals = {f: budget_values(cv, m, f, metric, budget) for f in fns}
        auc = {f: auc_values(cv, m, f, metric)[0] for f in fns}
        rank = sorted(fns, key=lambda f: (-vals[f][0], -np.nan_to_num(auc[f], nan=-np.inf), f))  # NaN: no curve
        others = [f for f in rank if f != "awft"]
        aw = vals.get("awft")
        best = vals[others[0]]
        gain = best - aw if aw is not None else None
        per_model[m] = (aw, best, gain)
        rows.append(_row(m, aw, best, others[0], gain, rank[0]))
    if all(v[0] is not None for v in per_model.values()):
        mean = [np.mean([per_model[m][k] for m in models], axis=0) for k in range(3)]
        rows.append(_row("average", *mean[:2], None, mean[2], None))
    return pl.DataFrame(rows, schema=TABLE2_SCHEMA, orient="row")


TABLE2_SCHEMA = {"model": pl.String, "awft": pl.Float64, "awft_ci_low": pl.Float64, "awft_ci_high": pl.Float64,
                 "best_other": pl.Float64, "best_other_ci_low": pl.Float64, "best_other_ci_high": pl.Float64,
                 "gain": pl.Float64, "gain_ci_low": pl.Float64, "gain_ci_high": pl.Float64,
                 "gain_ci_has_0": pl.Boolean, "best_other_fn": pl.String, "best_fn": pl.String}


def _row(model, aw, best, best_fn, gain, best_all):
    nan = (None, None, None)
    a = (aw[0], *ci_of_replicates(aw)) if aw is not None else nan
    g = (gain[0], *ci_of_replicates(gain)) if gain is not None else nan
    has0 = None if gain is None or len(gain) < 2 else bool(g[1] <= 0 <= g[2])
    return (model, *a, best[0], *ci_of_replicates(best), *g, has0, best_fn, best_all)


def auc_ranks(cv: dict, metric: str = "accuracy") -> pl.DataFrame:
    """AUC with its CI and the rank within each model (1 = best; ``random`` included; ties share the
    smaller rank) with the 95% rank interval over replicates: ``model, score_fn, auc, auc_ci_low,
    auc_ci_high, rank, rank_low, rank_high``."""
    rows = []
    for m in sorted({m for m, _ in cv}):
        fns = sorted(f for mm, f in cv if mm == m)
        auc = np.stack([auc_values(cv, m, f, metric) for f in fns], axis=1)  # (1 + R, F); NaN: zeroes no head
        ranks = (np.nan_to_num(auc, nan=-np.inf)[:, None, :] > auc[:, :, None]).sum(-1) + 1  # "min": 1 + # better
        for j, f in enumerate(fns):
            if np.isnan(auc[0, j]):  # no curve to rank (analysis.sweep.stats.normalised_auc)
                rows.append((m, f, None, None, None, None, None, None))
                continue
            lo, hi = ci_of_replicates(ranks[:, j].astype(float))
            rows.append((m, f, float(auc[0, j]), *ci_of_replicates(auc[:, j]), int(ranks[0, j]),
                         None if np.isnan(lo) else int(np.floor(lo)), None if np.isnan(hi) else int(np.ceil(hi))))
    schema = {"model": pl.String, "score_fn": pl.String, "auc": pl.Float64, "auc_ci_low": pl.Float64,
              "auc_ci_high": pl.Float64, "rank": pl.Int64, "rank_low": pl.Int64, "rank_high": pl.Int64}
    return pl.DataFrame(rows, schema=schema, orient="row").sort("model", "rank", "score_fn", nulls_last=True)
