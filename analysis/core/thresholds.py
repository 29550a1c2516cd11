"""Dynamic thresholds (definitions §3) and their stability across tasks.

One empirical distribution per (model, task, score function), pooled over layers, heads and examples of a
calibration run; τ is its p-quantile (the (1-p)-quantile for the functions inactive above τ, e.g.
``awft``/``awft_ln``), linearly interpolated (NumPy's default "linear" method). One scalar per (model, task, fn, p).
"""
from __future__ import annotations

import numpy as np
import polars as pl

from analysis.core import tables
from analysis.core.score_functions import get_score_function, score_keys

TARGET_FRACTIONS = (0.0, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30)
COLUMNS = [c for c in tables.column_names("thresholds") if c != "run_id"]  # run_id: the sweep adds its run's


def threshold(scores: np.ndarray, p: float, score_fn: str) -> float:
    """τ for target fraction ``p`` of pooled ``scores`` (1-D) of ``score_fn``."""
    q = 1.0 - p if get_score_function(score_fn).higher_is_inactive else p
    return float(np.quantile(np.asarray(scores, dtype=np.float64), q))


def thresholds(scores: pl.DataFrame, fractions=TARGET_FRACTIONS, score_fns=None) -> pl.DataFrame:
    """Thresholds table from a wide calibration frame.

    scores: columns ``model, task`` and the score columns (one row per example, layer, head).
    score_fns: the functions to threshold (default: every registered one, ``score_keys()``).
    Returns ``model, task, score_fn, target_fraction, threshold, n_scores``.
    """
    score_fns = score_keys() if score_fns is None else score_fns
    rows = []
    for (model, task), g in scores.group_by(["model", "task"], maintain_order=True):
        for fn in score_fns:
            v = g[fn].drop_nulls().to_numpy()
            if not np.isfinite(v).all():
                raise ValueError(f"non-finite {fn} scores for {model}/{task}")
            rows += [(model, task, fn, float(p), threshold(v, p, fn), len(v)) for p in fractions]
    return pl.DataFrame(rows, schema=tables.polars_schema("thresholds", COLUMNS), orient="row")


def stability(th: pl.DataFrame, p: float = 0.15) -> pl.DataFrame:
    """How much τ varies across tasks per (model, fn) at target fraction ``p``.

    Returns ``model, score_fn, n_tasks, min, max, ratio`` (max/min of |τ|) and ``rel_spread``
    ((max - min) / |mean|); the paper saw a 3.4x ratio for ``awft`` and under 9% spread for ``ahon_ln``.
    """
    sub = th.filter(pl.col("target_fraction") == p)
    return (sub.group_by(["model", "score_fn"], maintain_order=True)
            .agg(pl.len().alias("n_tasks"), pl.col("threshold").min().alias("min"),
                 pl.col("threshold").max().alias("max"), pl.col("threshold").mean().alias("mean"))
            .with_columns((pl.col("max").abs() / pl.col("min").abs()).alias("ratio"),
                          ((pl.col("max") - pl.col("min")) / pl.col("mean").abs()).alias("rel_spread"))
            .drop("mean").sort("model", "score_fn"))
