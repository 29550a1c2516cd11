"""Figures of the ablation sweep: Figure 3 (AUC rank heatmap with rank intervals) and Figures 4 / 10
(accuracy curves with 95% CI bands)."""
from __future__ import annotations

import polars as pl

from analysis.sweep.stats import baselines


def figure3(ranks: pl.DataFrame):
    """Heatmap of each function's AUC rank per model (1 = best), functions ordered by mean rank; each cell
    shows the rank and, when ``ranks`` has ``rank_low``/``rank_high``, its 95% bootstrap rank interval."""
    import altair as alt

    order = ranks.group_by("score_fn", maintain_order=True).agg(pl.col("rank").mean()).sort("rank")["score_fn"].to_list()
    ranks = ranks.filter(pl.col("rank").is_not_null())  # a function that zeroes no head has no rank (no curve)
    if "rank_low" in ranks.columns:  # the rank over its interval, on two lines
        ranks = ranks.with_columns(pl.format("{}\n[{}–{}]", "rank", "rank_low", "rank_high").alias("label"))
    else:
        ranks = ranks.with_columns(pl.col("rank").cast(pl.String).alias("label"))
    base = alt.Chart(ranks).encode(x=alt.X("score_fn:N", sort=order, title="score function"),
                                   y=alt.Y("model:N", title=None))
    heat = base.mark_rect().encode(color=alt.Color("rank:Q", scale=alt.Scale(scheme="viridis", reverse=True),
                                                   title="rank"))
    n_fns, n_models = ranks["score_fn"].n_unique(), ranks["model"].n_unique()
    ink = alt.condition(f"datum.rank <= {(n_fns + 1) / 2}", alt.value("black"), alt.value("white"))  # light cells
    text = base.mark_text(fontSize=10, lineBreak="\n").encode(text="label:N", color=ink)
    return (heat + text).properties(
        width=46 * n_fns, height=40 * n_models,
        title="Rank of each score function by normalised AUC (1 = best; below: 95% bootstrap rank interval)")


def accuracy_curves(results: pl.DataFrame, ranks: pl.DataFrame, top: int | None = 3):
    """Accuracy vs realized % of heads zeroed, one panel per model: the ``top`` functions by AUC (``ranks``)
    plus ``random`` (Figure 4), or every function with ``top=None`` (Figure 10); baseline dashed; a 95% CI
    band per curve where ``results`` has ``accuracy_ci_low``/``accuracy_ci_high``."""
    import altair as alt

    keep = ranks if top is None else ranks.filter((pl.col("rank") <= top) | (pl.col("score_fn") == "random"))
    data = (results.join(keep.select("model", "score_fn"), on=["model", "score_fn"])
            .join(baselines(results), on=["model", "task"]).sort("model", "score_fn", "realized_percent"))
    base = alt.Chart().encode(x=alt.X("realized_percent:Q", title="% of heads zeroed (realized)"))
    color = alt.Color("score_fn:N", title="function")
    lines = base.mark_line(point=True).encode(y=alt.Y("accuracy:Q", title="accuracy (%)", scale=alt.Scale(zero=False)),
                                              color=color)
    layers = [lines]
    if "accuracy_ci_low" in results.columns and top is not None:  # bands of 14 curves would hide them
        layers.insert(0, base.mark_area(opacity=0.15).encode(y="accuracy_ci_low:Q", y2="accuracy_ci_high:Q",
                                                             color=color))
    rule = alt.Chart().mark_rule(strokeDash=[5, 4], color="gray").encode(y="mean(baseline):Q")
    title = "Accuracy under dynamic ablation" + ("" if top is None else f" (top {top} by AUC and random; 95% CI bands)")
    return (alt.layer(*layers, rule, data=data).properties(width=260, height=200)
            .facet(facet=alt.Facet("model:N", title=None), columns=2).properties(title=title))
