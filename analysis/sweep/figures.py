"""Figures of the ablation sweep: Figure 3 (AUC rank heatmap) and Figures 4 / 10 (accuracy curves)."""
from __future__ import annotations

import polars as pl

from analysis.sweep.stats import auc_ranks, baselines


def figure3(ranks: pl.DataFrame):
    """Heatmap of each function's AUC rank per model (1 = best), functions ordered by mean rank."""
    import altair as alt

    order = ranks.group_by("score_fn", maintain_order=True).agg(pl.col("rank").mean()).sort("rank")["score_fn"].to_list()
    base = alt.Chart(ranks).encode(x=alt.X("score_fn:N", sort=order, title="score function"),
                                   y=alt.Y("model:N", title=None))
    heat = base.mark_rect().encode(color=alt.Color("rank:Q", scale=alt.Scale(scheme="viridis", reverse=True),
                                                   title="rank"))
    text = base.mark_text(fontSize=10).encode(text="rank:Q", color=alt.value("white"))
    return (heat + text).properties(title="Rank of each score function by normalised AUC (1 = best)")


def accuracy_curves(results: pl.DataFrame, top: int | None = 3):
    """Accuracy vs realized % of heads zeroed, one panel per model: the ``top`` functions by AUC plus
    ``random`` (Figure 4), or every function with ``top=None`` (Figure 10); baseline dashed."""
    import altair as alt

    ranks = auc_ranks(results)
    keep = ranks if top is None else ranks.filter((pl.col("rank") <= top) | (pl.col("score_fn") == "random"))
    data = (results.join(keep.select("model", "score_fn"), on=["model", "score_fn"])
            .join(baselines(results), on=["model", "task"]).sort("model", "score_fn", "realized_percent"))
    base = alt.Chart().encode(x=alt.X("realized_percent:Q", title="% of heads zeroed (realized)"))
    lines = base.mark_line(point=True).encode(y=alt.Y("accuracy:Q", title="accuracy (%)",
                                                      scale=alt.Scale(zero=False)),
                                              color=alt.Color("score_fn:N", title="function"))
    rule = alt.Chart().mark_rule(strokeDash=[5, 4], color="gray").encode(y="mean(baseline):Q")
    title = "Accuracy under dynamic ablation" + ("" if top is None else f" (top {top} by AUC and random)")
    return (alt.layer(lines, rule, data=data).properties(width=260, height=200)
            .facet(facet=alt.Facet("model:N", title=None), columns=2).properties(title=title))
