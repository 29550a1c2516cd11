"""One self-contained interactive HTML page to explore head-score distributions (definitions §6).

Pick a model and a score function (drop-downs); the layer × head heatmap shows each head's median over
examples (tooltip: median, mean, 5%/95% quantiles); click a head to draw the ECDF of its scores over
examples (21 quantiles) on the right. The Vega, Vega-Lite and vega-embed JavaScript is inlined from the
vl-convert bundle, so the page works offline; it renders SVG (so a headless browser can check the marks).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from analysis.core.io import atomic_path
from analysis.distributions.score_matrix import ScoreMatrix

QUANTILES = np.linspace(0, 1, 21)
QCOLS = [f"q{int(round(q * 100)):03d}" for q in QUANTILES]
EXPLORER_ID = "dormant-explorer"


def explorer_frame(scores: dict[str, dict[str, ScoreMatrix]]) -> pl.DataFrame:
    """One row per (model, function, layer, head): median, mean, and the 21 per-head quantiles over examples."""
    frames = []
    for model, fns in scores.items():
        for fn, m in fns.items():
            v = m.values
            cols = np.arange(v.shape[1])
            q = np.quantile(v, QUANTILES, axis=0)  # (21, heads)
            frames.append(pl.DataFrame({
                "model": [model] * len(cols), "score_fn": [fn] * len(cols),
                "layer": (cols // m.n_heads).astype(np.int32), "head": (cols % m.n_heads).astype(np.int32),
                "n_examples": np.full(len(cols), v.shape[0], dtype=np.int32),
                "median": np.median(v, 0), "mean": v.mean(0), **{c: q[i] for i, c in enumerate(QCOLS)}}))
    return pl.concat(frames)


def explorer_chart(df: pl.DataFrame, default_fn: str = "ahon_ln"):
    """The altair chart: drop-downs for model and function, heatmap with a click selection, per-head ECDF."""
    import altair as alt

    models = list(dict.fromkeys(df["model"].to_list()))
    fns = list(dict.fromkeys(df["score_fn"].to_list()))
    model = alt.param(name="model", value=models[0], bind=alt.binding_select(options=models, name="model "))
    fn = alt.param(name="fn", value=default_fn if default_fn in fns else fns[0],
                   bind=alt.binding_select(options=fns, name="score function "))
    pick = alt.selection_point(name="pick", fields=["layer", "head"], on="click", value=[{"layer": 0, "head": 0}])
    with alt.data_transformers.disable_max_rows():  # one row per head and function: already aggregated
        base = alt.Chart(df).transform_filter("datum.model == model && datum.score_fn == fn")
    heat = base.mark_rect(stroke="white", strokeWidth=0.3).encode(
        x=alt.X("head:O"), y=alt.Y("layer:O", sort="descending"),
        color=alt.Color("median:Q", scale=alt.Scale(scheme="viridis"), title="median"),
        opacity=alt.condition(pick, alt.value(1.0), alt.value(0.55)),
        tooltip=["model:N", "score_fn:N", "layer:O", "head:O", alt.Tooltip("median:Q", format=".4g"),
                 alt.Tooltip("mean:Q", format=".4g"), alt.Tooltip("q005:Q", title="q05", format=".4g"),
                 alt.Tooltip("q095:Q", title="q95", format=".4g"), "n_examples:Q"],
    ).add_params(pick).properties(width=alt.Step(14), height=alt.Step(10),
                                  title="median score per head (click a head)")
    ecdf = base.transform_filter(pick).transform_fold(QCOLS, as_=["quantile", "score"]).transform_calculate(
        cdf="toNumber(substring(datum.quantile, 1)) / 100"
    ).mark_line(point=True).encode(
        x=alt.X("score:Q", title="score", scale=alt.Scale(zero=False)), y=alt.Y("cdf:Q", title="ECDF over examples"),
        tooltip=[alt.Tooltip("score:Q", format=".4g"), "cdf:Q"],
    ).properties(width=320, height=260, title="ECDF of the selected head")
    return alt.hconcat(heat, ecdf).add_params(model, fn).properties(
        title="Head-score explorer: pick a model and a score function")


def write_explorer(scores: dict[str, dict[str, ScoreMatrix]], out: str | Path) -> Path:
    """Write the explorer for every model of ``scores`` to ``out`` (self-contained HTML, atomically)."""
    from analysis.distributions.figures import finite

    df = explorer_frame(scores)
    df = finite(df.with_columns([pl.col(c).round_sig_figs(5) for c, t in df.schema.items() if t.is_float()]))
    chart = explorer_chart(df)
    out = Path(out)
    with atomic_path(out) as tmp:
        chart.save(str(tmp), format="html", inline=True, embed_options={"renderer": "svg", "actions": False})
    return out
