"""Frames and altair charts of the definitions §6 report (every frame is aggregated well below 5000 rows per chart
except the per-head heatmaps of large models, which are already one row per head and function)."""
from __future__ import annotations

import numpy as np
import polars as pl

from analysis.distributions.score_matrix import ScoreMatrix

FACETS = 5  # facet columns of the score-function panels


def finite(df: pl.DataFrame) -> pl.DataFrame:
    """NaN and ±inf in float columns -> null (Vega-Lite specs are JSON, which has no NaN)."""
    return df.with_columns([pl.when(pl.col(c).is_finite()).then(pl.col(c)).otherwise(None).alias(c)
                            for c, t in df.schema.items() if t.is_float()])


def ecdf_frame(models: dict[str, dict[str, ScoreMatrix]], points: int = 101) -> pl.DataFrame:
    """Quantile function of every score function per model label on ``points`` probabilities (pooled scores)."""
    grid = np.linspace(0, 1, points)
    rows = []
    for label, fns in models.items():
        for fn, m in fns.items():
            q = np.quantile(m.values.ravel(), grid)
            rows += [(label, fn, float(c), float(v)) for c, v in zip(grid, q)]
    return pl.DataFrame(rows, schema={"model": pl.String, "score_fn": pl.String, "cdf": pl.Float64,
                                      "score": pl.Float64}, orient="row")


def ecdf_chart(df: pl.DataFrame, title: str):
    import altair as alt

    base = alt.Chart(finite(df)).mark_line().encode(
        x=alt.X("score:Q", title=None), y=alt.Y("cdf:Q", title="ECDF"),
        color=alt.Color("model:N", legend=alt.Legend(orient="top", title=None)),
        strokeDash=alt.StrokeDash("model:N", legend=None))
    return base.properties(width=150, height=110).facet(
        facet=alt.Facet("score_fn:N", title=None), columns=FACETS
    ).resolve_scale(x="independent").properties(title=f"Pooled score ECDFs: {title}")


def effects_chart(tests: pl.DataFrame, statistic: str = "wasserstein_sd"):
    """Forest plot: ``statistic`` with its bootstrap CI per comparison, one panel per score function."""
    import altair as alt

    df = tests.filter((pl.col("depth_bin") == "all") & (pl.col("statistic") == statistic)).select(
        "comparison", "kind", "score_fn", "value", "ci_low", "ci_high")
    x = alt.X("value:Q", title=f"{statistic} (95% bootstrap CI)", scale=alt.Scale(type="symlog", constant=0.003),
              axis=alt.Axis(values=[0, 0.01, 0.03, 0.1, 0.3, 1, 3], format="~g"))
    y = alt.Y("comparison:N", title=None, sort=alt.EncodingSortField("kind"), axis=alt.Axis(labelLimit=320))
    points = alt.Chart().mark_point(filled=True).encode(x=x, y=y, color=alt.Color("kind:N"))
    bars = alt.Chart().mark_rule().encode(x="ci_low:Q", x2="ci_high:Q", y=y, color="kind:N")
    return alt.layer(bars, points, data=finite(df)).properties(width=180, height=alt.Step(14)).facet(
        facet=alt.Facet("score_fn:N", title=None), columns=4
    ).properties(title="Distance between score distributions (Wasserstein-1 / sd of the first model)")


def wasserstein_matrix(scores: dict[str, dict[str, ScoreMatrix]]) -> pl.DataFrame:
    """Wasserstein-1 between the pooled scores of every two models, per function, raw and divided by the
    standard deviation of both models' scores pooled (``w_sd``)."""
    from scipy.stats import wasserstein_distance

    models = list(scores)
    rows = []
    for fn in next(iter(scores.values())):
        flat = {m: scores[m][fn].values.ravel() for m in models}
        for a in models:
            for b in models:
                w = 0.0 if a == b else wasserstein_distance(flat[a], flat[b])
                sd = np.concatenate([flat[a], flat[b]]).std()
                rows.append((fn, a, b, float(w), float(w / sd) if sd > 0 else 0.0))
    return pl.DataFrame(rows, schema={"score_fn": pl.String, "model_a": pl.String, "model_b": pl.String,
                                      "w": pl.Float64, "w_sd": pl.Float64}, orient="row")


def wasserstein_matrix_chart(df: pl.DataFrame):
    import altair as alt

    base = alt.Chart().encode(x=alt.X("model_b:N", title=None), y=alt.Y("model_a:N", title=None))
    rect = base.mark_rect().encode(color=alt.Color("w_sd:Q", title="W1 / sd", scale=alt.Scale(scheme="viridis")),
                                   tooltip=["model_a", "model_b", "score_fn", "w", "w_sd"])
    text = base.mark_text(fontSize=7).encode(text=alt.Text("w_sd:Q", format=".2f"),
                                             color=alt.value("white"))
    return alt.layer(rect, text, data=finite(df)).properties(width=alt.Step(22), height=alt.Step(22)).facet(
        facet=alt.Facet("score_fn:N", title=None), columns=FACETS
    ).properties(title="Wasserstein-1 between models' pooled scores (divided by the pooled sd)")


def head_frame(scores: dict[str, ScoreMatrix]) -> pl.DataFrame:
    """Per (score function, layer, head): median, mean, 5% and 95% quantiles over examples."""
    frames = []
    for fn, m in scores.items():
        v = m.values
        cols = np.arange(v.shape[1])
        frames.append(pl.DataFrame({
            "score_fn": [fn] * len(cols), "layer": (cols // m.n_heads).astype(np.int32),
            "head": (cols % m.n_heads).astype(np.int32), "median": np.median(v, 0), "mean": v.mean(0),
            "q05": np.quantile(v, 0.05, axis=0), "q95": np.quantile(v, 0.95, axis=0)}))
    return pl.concat(frames)


def head_heatmap_chart(df: pl.DataFrame, model: str):
    import altair as alt

    with alt.data_transformers.disable_max_rows():  # one row per head and function: already aggregated
        return alt.Chart(finite(df)).mark_rect().encode(
            x=alt.X("head:O"), y=alt.Y("layer:O", sort="descending"),
            color=alt.Color("median:Q", title=None, scale=alt.Scale(scheme="viridis")),
            tooltip=["score_fn", "layer", "head", "median", "q05", "q95"],
        ).properties(width=alt.Step(9), height=alt.Step(6)).facet(
            facet=alt.Facet("score_fn:N", title=None), columns=FACETS
        ).resolve_scale(color="independent").properties(title=f"Median score per layer and head: {model}")


def paired_diff_frame(a: dict[str, ScoreMatrix], b: dict[str, ScoreMatrix]) -> pl.DataFrame:
    """Per (function, layer, head) of two models with one architecture: mean over examples of A and B and
    ``diff`` = mean_B − mean_A (same examples when both saw them; otherwise each its own)."""
    frames = []
    for fn in a:
        ma, mb = a[fn].values.mean(0), b[fn].values.mean(0)
        cols = np.arange(len(ma))
        frames.append(pl.DataFrame({"score_fn": [fn] * len(cols), "layer": (cols // a[fn].n_heads).astype(np.int32),
                                    "head": (cols % a[fn].n_heads).astype(np.int32), "mean_a": ma, "mean_b": mb,
                                    "diff": mb - ma}))
    return pl.concat(frames)


def paired_diff_chart(df: pl.DataFrame, title: str):
    import altair as alt

    with alt.data_transformers.disable_max_rows():
        return alt.Chart(finite(df)).mark_rect().encode(
            x=alt.X("head:O"), y=alt.Y("layer:O", sort="descending"),
            color=alt.Color("diff:Q", title=None, scale=alt.Scale(scheme="redblue", domainMid=0, reverse=True)),
            tooltip=["score_fn", "layer", "head", "mean_a", "mean_b", "diff"],
        ).properties(width=alt.Step(9), height=alt.Step(6)).facet(
            facet=alt.Facet("score_fn:N", title=None), columns=FACETS
        ).resolve_scale(color="independent").properties(title=f"Per-head mean difference (second − first): {title}")


def finetune_chart(log: pl.DataFrame):
    """Training loss per step (line) and held-out loss (points), nats per response token."""
    import altair as alt

    base = alt.Chart(finite(log)).encode(x=alt.X("step:Q"), y=alt.Y("loss:Q", title="cross-entropy (nats / response token)"),
                                 color=alt.Color("split:N"), detail="model:N")
    return (base.transform_filter("datum.split == 'train'").mark_line()
            + base.transform_filter("datum.split == 'heldout'").mark_line(point=True)).properties(
        width=360, height=220, title="Supervised finetune: training and held-out loss")
