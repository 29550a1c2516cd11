"""MAPS tables and figures (definitions §8) from the ``dormant maps run`` outputs and the core database (no torch).

Tables (results/tables/, CSV + Markdown + LaTeX):
* ``maps_correlations``: per model and context, the median (min, max) over operations of the Pearson r of
  static vs dynamic scores over heads × templates.
* ``maps_causal``: per model, operation and number of ablated heads, accuracy with the top-scoring heads
  ablated vs the mean over random head sets of the same size.
* ``maps_join``: per model, how MAPS "no salient operation" (best static score < ``salient_min``) lines up
  with ``ahon_ln`` inactivity (median over examples < ``inactive_below``), and the Spearman correlation of
  the two per-head numbers.
Figures (results/figures/, PNG + SVG): ``maps_heatmap_<model>`` (layer × head, best static score per
operation category), ``maps_static_vs_inactive`` (best static score vs median ahon_ln, one panel per model),
``maps_causal`` (accuracy vs ablated heads, top vs random).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from analysis.core.names import model_key
from analysis.database import connect, query
from analysis.render import write_figure, write_table

PARTS = ("scores", "salient", "dynamic", "correlations", "causal")


def load(dirs: list[Path]) -> dict[str, pl.DataFrame]:
    """Concatenate each part's Parquet file over the run folders."""
    out = {}
    for part in PARTS:
        frames = [pl.read_parquet(Path(d) / f"{part}.parquet") for d in dirs if (Path(d) / f"{part}.parquet").is_file()]
        frames = [f for f in frames if f.height]
        out[part] = pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame()
    if not out["scores"].height:
        raise FileNotFoundError(f"no MAPS scores.parquet under {', '.join(map(str, dirs))}; run `dormant maps run`")
    return out


def correlation_table(corr: pl.DataFrame) -> pl.DataFrame:
    """Median / min / max over operations of Pearson r, per (model, context)."""
    if not corr.height:
        return pl.DataFrame({"model": [], "context": []})
    return (corr.drop_nulls("pearson").filter(pl.col("pearson").is_not_nan()).group_by("model", "context", maintain_order=True)
            .agg(pl.col("pearson").median().alias("median_r"), pl.col("pearson").min().alias("min_r"),
                 pl.col("pearson").max().alias("max_r"), pl.len().alias("operations"))
            .sort("model", "context"))


def causal_table(causal: pl.DataFrame) -> pl.DataFrame:
    """Accuracy with the top-n heads ablated vs random n heads (mean over draws), and the drops."""
    if not causal.height:
        return pl.DataFrame({"model": [], "operation": []})
    c = causal.filter(pl.col("selection") != "none")
    return (c.group_by("model", "operation", "n_heads", maintain_order=True)
            .agg(pl.col("base_accuracy").first().alias("base"),
                 pl.col("accuracy").filter(pl.col("selection") == "top").first().alias("top_heads"),
                 pl.col("accuracy").filter(pl.col("selection") == "random").mean().alias("random_heads"),
                 pl.col("n_prompts").first().alias("prompts"))
            .with_columns((pl.col("base") - pl.col("top_heads")).alias("drop_top"),
                          (pl.col("base") - pl.col("random_heads")).alias("drop_random"))
            .sort("model", "operation", "n_heads"))


def head_table(scores: pl.DataFrame, con=None) -> pl.DataFrame:
    """Per head: best static score (and its operation) and, when a database is given, median ahon_ln."""
    best = (scores.sort("score", descending=True).group_by("model", "layer", "head", maintain_order=True)
            .agg(pl.col("score").first().alias("max_static"), pl.col("operation").first().alias("best_operation")))
    if con is None:
        return best.with_columns(pl.lit(None, dtype=pl.Float64).alias("median_ahon_ln"))
    ahon = query(con, "SELECT model, layer, head, median(ahon_ln) AS median_ahon_ln FROM head_scores GROUP BY ALL")
    ahon = ahon.with_columns(pl.col("layer").cast(pl.Int32), pl.col("head").cast(pl.Int32))
    return best.join(ahon, on=["model", "layer", "head"], how="left")


def join_table(heads: pl.DataFrame, inactive_below: float, salient_min: float) -> pl.DataFrame:
    """Per model: inactive heads (median ahon_ln < inactive_below) vs heads without a salient operation."""
    h = heads.drop_nulls("median_ahon_ln").with_columns(
        (pl.col("median_ahon_ln") < inactive_below).alias("inactive"),
        (pl.col("max_static") < salient_min).alias("no_salient"))
    if not h.height:
        return pl.DataFrame({"model": []})
    return (h.group_by("model", maintain_order=True)
            .agg(pl.len().alias("heads"), pl.col("inactive").sum().alias("inactive"),
                 pl.col("no_salient").sum().alias("no_salient"),
                 (pl.col("inactive") & pl.col("no_salient")).sum().alias("both"),
                 pl.col("no_salient").filter(pl.col("inactive")).mean().alias("p_no_salient_if_inactive"),
                 pl.col("no_salient").filter(~pl.col("inactive")).mean().alias("p_no_salient_if_active"),
                 pl.corr("max_static", "median_ahon_ln", method="spearman").alias("spearman"))
            .sort("model"))


def heatmap(scores: pl.DataFrame, model: str):
    import altair as alt

    df = (scores.filter(pl.col("model") == model).group_by("layer", "head", "category", maintain_order=True)
          .agg(pl.col("score").max().alias("max_static")))
    return alt.Chart(df).mark_rect().encode(
        x=alt.X("head:O", title="head"), y=alt.Y("layer:O", title="layer", sort="descending"),
        color=alt.Color("max_static:Q", title="best static score", scale=alt.Scale(domain=[0, 1], scheme="viridis")),
        column=alt.Column("category:N", title=None),
    ).properties(title=f"MAPS static scores: {model}", width=120, height=200)


def join_chart(heads: pl.DataFrame, inactive_below: float):
    import altair as alt

    df = heads.drop_nulls("median_ahon_ln").select("model", "layer", "head", "max_static", "median_ahon_ln",
                                                   "best_operation")
    points = alt.Chart().mark_circle(size=18, opacity=0.6).encode(
        x=alt.X("median_ahon_ln:Q", title="median ahon_ln over examples"),
        y=alt.Y("max_static:Q", title="best MAPS static score"),
        color=alt.Color("layer:Q", scale=alt.Scale(scheme="plasma")),
        tooltip=["layer", "head", "best_operation", "max_static", "median_ahon_ln"])
    rule = alt.Chart().mark_rule(strokeDash=[4, 4]).encode(x=alt.datum(inactive_below))
    return alt.layer(points, rule, data=df).properties(width=220, height=200).facet(
        facet=alt.Facet("model:N", title=None), columns=2)


def causal_chart(causal: pl.DataFrame):
    import altair as alt

    df = (causal.filter(pl.col("selection") != "none").group_by("model", "operation", "selection", "n_heads", maintain_order=True)
          .agg(pl.col("accuracy").mean()))
    return alt.Chart(df).mark_line(point=True).encode(
        x=alt.X("n_heads:Q", title="heads ablated", scale=alt.Scale(type="log", base=2)),
        y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1])), color=alt.Color("selection:N"),
        column=alt.Column("operation:N", title=None), row=alt.Row("model:N", title=None),
    ).properties(width=140, height=110)


@dataclass(frozen=True)
class JoinSettings:
    """The join of MAPS functions with inactivity (the config's ``maps.join``)."""
    inactive_below: float = 0.5  # a head is inactive when its median ahon_ln is below this
    salient_min: float = 0.2  # a head has a salient operation when its best static score reaches this


def write_maps_reports(dirs: list[Path], core_db: Path | None, out: Path, *, inactive_below: float = 0.5,
                       salient_min: float = 0.2) -> list[Path]:
    """All MAPS tables and figures under ``out``/tables and ``out``/figures; returns the paths."""
    out = Path(out)
    d = load(dirs)
    paths: list[Path] = []
    paths += write_table(correlation_table(d["correlations"]), out / "tables" / "maps_correlations")
    if d["correlations"].height:
        paths += write_table(d["correlations"], out / "tables" / "maps_correlations_by_operation")
    paths += write_table(causal_table(d["causal"]), out / "tables" / "maps_causal")
    con = connect(core_db, read_only=True) if core_db is not None and Path(core_db).is_file() else None
    heads = head_table(d["scores"], con)
    if con is not None:
        con.close()
    paths += write_table(join_table(heads, inactive_below, salient_min), out / "tables" / "maps_join")
    best = (d["scores"].group_by("model", "operation", "category", maintain_order=True)
            .agg(pl.col("score").max().alias("best_static"), pl.col("suppression_score").max().alias("best_suppression"),
                 pl.col("n_pairs").first()).sort("model", "category", "operation"))
    paths += write_table(best, out / "tables" / "maps_best_by_operation")
    for model in d["scores"]["model"].unique().sort():
        paths += write_figure(heatmap(d["scores"], model), out / "figures" / f"maps_heatmap_{model_key(model)}")
    if heads["median_ahon_ln"].drop_nulls().len():
        paths += write_figure(join_chart(heads, inactive_below), out / "figures" / "maps_static_vs_inactive")
    if d["causal"].height:
        paths += write_figure(causal_chart(d["causal"]), out / "figures" / "maps_causal")
    return paths
