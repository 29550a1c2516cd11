"""MAPS tables and figures (definitions §8) from the ``dormant maps run`` outputs and the core database (no torch).

Every table is per E' choice (``inputs``: reference, raw, residual; extract/maps/folding.py) where it depends
on one. Tables (results/tables/, CSV + Markdown + LaTeX):
* ``maps_correlations``: per model, E' choice and context, the median (min, max) over operations of the
  Pearson r of static vs dynamic scores over heads × templates.
* ``maps_causal``: per model, E' choice, operation and number of ablated heads, accuracy with the
  top-scoring heads ablated vs the mean over random head sets of the same size.
* ``maps_inputs``: the comparison of the E' choices in the MAPS reference's summary form (median r without /
  with context; median relative accuracy drop, top vs random heads), bootstrap CIs over operations, the MAPS
  paper's own rows beside ours (also a database table); ``maps_inputs_answer.md``: which E' predicts
  inference, with paired differences over (model, operation).
* ``maps_join``: per model, how MAPS "no salient operation" (best static score < ``salient_min``) lines up
  with ``ahon_ln`` inactivity (median over examples < ``inactive_below``), and the Spearman correlation of
  the two per-head numbers (first E' choice).
Figures (results/figures/, PNG + SVG): ``maps_heatmap_<model>`` (layer × head, best static score per
operation category, first E' choice), ``maps_static_vs_inactive`` (best static score vs median ahon_ln, one
panel per model), ``maps_causal`` (accuracy vs ablated heads, top vs random).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from analysis.core.io import write_bytes
from analysis.core.names import model_key
from analysis.database import connect, query
from analysis.render import markdown, write_figure, write_table

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


def first_inputs(scores: pl.DataFrame) -> pl.DataFrame:
    """The rows of each model's first E' choice (the run's ``inputs[0]``: salient tokens, heatmaps, join)."""
    return scores.filter(pl.col("inputs") == pl.col("inputs").first().over("model"))


def correlation_table(corr: pl.DataFrame) -> pl.DataFrame:
    """Median / min / max over operations of Pearson r, per (model, E' choice, context)."""
    if not corr.height:
        return pl.DataFrame({"model": [], "inputs": [], "context": []})
    return (corr.drop_nulls("pearson").filter(pl.col("pearson").is_not_nan())
            .group_by("model", "inputs", "context", maintain_order=True)
            .agg(pl.col("pearson").median().alias("median_r"), pl.col("pearson").min().alias("min_r"),
                 pl.col("pearson").max().alias("max_r"), pl.len().alias("operations"))
            .sort("model", "inputs", "context"))


def causal_table(causal: pl.DataFrame) -> pl.DataFrame:
    """Accuracy with the top-n heads ablated vs random n heads (mean over draws), and the drops."""
    if not causal.height:
        return pl.DataFrame({"model": [], "inputs": [], "operation": []})
    c = causal.filter(pl.col("selection") != "none")
    return (c.group_by("model", "inputs", "operation", "n_heads", maintain_order=True)
            .agg(pl.col("base_accuracy").first().alias("base"),
                 pl.col("accuracy").filter(pl.col("selection") == "top").first().alias("top_heads"),
                 pl.col("accuracy").filter(pl.col("selection") == "random").mean().alias("random_heads"),
                 pl.col("n_prompts").first().alias("prompts"))
            .with_columns((pl.col("base") - pl.col("top_heads")).alias("drop_top"),
                          (pl.col("base") - pl.col("random_heads")).alias("drop_random"))
            .sort("model", "inputs", "operation", "n_heads"))


# The MAPS paper's own summary (Elhelo & Geva, arXiv 2412.11965): median Pearson r of static vs dynamic
# scores over operations without / with context, and the median relative accuracy drop with the top heads
# removed vs random heads.
MAPS_PAPER = (("GPT2-xl", 0.945, 0.736, 0.685, 0.03), ("Pythia-6.9b", 0.906, 0.683, 0.955, 0.0),
              ("Pythia-12b", 0.892, 0.714, 0.785, 0.025), ("Llama-3.1-8B", 0.817, 0.747, 0.5, 0.0))
N_BOOT = 2000


def _median_ci(values, seed: int) -> tuple[float | None, float | None, float | None]:
    """Median of ``values`` and its 95% percentile-bootstrap CI over them (None where undefined)."""
    import numpy as np

    v = np.asarray([x for x in values if x is not None and x == x], dtype=float)
    if not len(v):
        return None, None, None
    if len(v) == 1:
        return float(v[0]), None, None
    boot = np.median(np.random.default_rng(seed).choice(v, (N_BOOT, len(v))), axis=1)
    return float(np.median(v)), float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))


def relative_drops(causal: pl.DataFrame) -> pl.DataFrame:
    """Per (model, E' choice, operation) at the largest number of heads ablated: the relative accuracy drop
    ``(base - ablated) / base`` with the top heads and with random heads (mean over draws); base > 0 only,
    and only where the choice has top heads (some head's static score > 0)."""
    if not causal.height:
        return pl.DataFrame(schema={"model": pl.Utf8, "inputs": pl.Utf8, "operation": pl.Utf8,
                                    "n_heads": pl.Int32, "top": pl.Float64, "random": pl.Float64})
    c = causal.filter((pl.col("selection") != "none") & (pl.col("base_accuracy") > 0)
                      & (pl.col("n_heads") == pl.col("n_heads").max().over("model")))
    rel = (pl.col("base_accuracy") - pl.col("accuracy")) / pl.col("base_accuracy")
    return (c.group_by("model", "inputs", "operation", "n_heads", maintain_order=True)
            .agg(rel.filter(pl.col("selection") == "top").first().alias("top"),
                 rel.filter(pl.col("selection") == "random").mean().alias("random"))
            .drop_nulls("top").sort("model", "inputs", "operation"))


def inputs_table(corr: pl.DataFrame, causal: pl.DataFrame, seed: int = 0) -> pl.DataFrame:
    """Table ``maps_inputs``: per model and E' choice the MAPS reference's summary form (median over operations
    of r without / with context, of the relative drop with top / random heads; bootstrap CIs over
    operations), then the MAPS paper's rows."""
    from analysis.core import tables

    drops = relative_drops(causal)
    rows = []
    keys = (corr.select("model", "inputs").unique(maintain_order=True).rows() if corr.height else []) + \
        [k for k in drops.select("model", "inputs").unique(maintain_order=True).rows()
         if not corr.height or k not in corr.select("model", "inputs").rows()]
    for model, inputs in keys:
        def r(context):
            if not corr.height:
                return [None] * 3, 0, 0
            v = corr.filter((pl.col("model") == model) & (pl.col("inputs") == inputs)
                            & (pl.col("context") == context))["pearson"].to_list()
            ok = [x for x in v if x is not None and x == x]  # undefined where every static score is equal
            return list(_median_ci(ok, seed)), len(ok), len(v) - len(ok)
        (rw, nw, undefined), (rc, _, _) = r("without"), r("with")
        dm = drops.filter((pl.col("model") == model) & (pl.col("inputs") == inputs))
        n_heads = int(dm["n_heads"][0]) if dm.height else None
        top, rnd = _median_ci(dm["top"].to_list(), seed), _median_ci(dm["random"].to_list(), seed)
        rows.append(("this run", model, inputs, *rw, *rc, nw, undefined, n_heads, *top, *rnd, dm.height))
    for name, r_without, r_with, top, rnd in MAPS_PAPER:
        rows.append(("MAPS paper", name, "reference", r_without, None, None, r_with, None, None, None, None, None,
                     top, None, None, rnd, None, None, None))
    return pl.DataFrame(rows, orient="row", schema=tables.computed_schema("maps_inputs"))


def _cell(values, seed: int, signed: bool = False) -> str:
    m, lo, hi = _median_ci(list(values), seed)
    f = "{:+.3f}" if signed else "{:.3f}"
    if m is None:
        return "n/a"
    return f.format(m) + (f" [{f.format(lo)}, {f.format(hi)}]" if lo is not None else "") + f" (n = {len(values)})"


def inputs_answer(table: pl.DataFrame, corr: pl.DataFrame, causal: pl.DataFrame, scores: pl.DataFrame,
                  seed: int = 0) -> str:
    """Which E' predicts inference: per choice, medians over (model, operation) units with 95% bootstrap CIs
    (r where defined, and r with an undefined r, every static score equal, counted as 0 = no prediction; the
    causal gap = relative drop with the top heads minus with random heads), the paired differences against
    ``reference``, and the best static scores of the copying and knowledge operations."""
    ours = table.filter(pl.col("source") == "this run")
    if not ours.height or not corr.height:
        return "# Which E' predicts inference\n\nNo MAPS run with a dynamic check.\n"
    choices = ours["inputs"].unique(maintain_order=True).to_list()
    filled = corr.with_columns(pl.col("pearson").fill_nan(None).fill_null(0.0).alias("r0"),
                               pl.col("pearson").fill_nan(None).alias("pearson"))
    drops = relative_drops(causal).with_columns((pl.col("top") - pl.col("random")).alias("gap"))
    rows = []
    for c in choices:
        f = filled.filter(pl.col("inputs") == c)
        row = [c, int(f.filter(pl.col("context") == "without")["pearson"].is_null().sum())]
        for col in ("pearson", "r0"):
            for context in ("without", "with"):
                row.append(_cell(f.filter(pl.col("context") == context)[col].drop_nulls().to_list(), seed))
        row.append(_cell(drops.filter(pl.col("inputs") == c)["gap"].to_list(), seed))
        rows.append(row)
    lines = ["# Which E' predicts inference", "",
             "Medians over (model, operation) units [95% bootstrap CI] (n units). r: Pearson r of static vs "
             "dynamic scores over heads x templates; undefined where every head has the same static score (then "
             "also shown as 0, no prediction). Causal gap: relative accuracy drop with the top static heads "
             "removed minus with random heads.", "",
             markdown(pl.DataFrame(rows, orient="row", schema=[
                 "inputs", "r undefined", "r without context", "r with context", "r without (undefined = 0)",
                 "r with (undefined = 0)", "causal gap"]))]
    if "reference" in choices:
        lines.append("Paired differences against `reference` over the same units:")
        lines.append("")
        for c in (x for x in choices if x != "reference"):
            cells = []
            for col in ("pearson", "r0"):
                for context in ("without", "with"):
                    w = filled.filter(pl.col("context") == context).pivot(
                        on="inputs", index=["model", "operation"], values=col)
                    cells.append(_cell((w[c] - w["reference"]).drop_nulls().to_list(), seed, signed=True))
            g = drops.pivot(on="inputs", index=["model", "operation"], values="gap")
            gap = _cell((g[c] - g["reference"]).drop_nulls().to_list(), seed, signed=True) \
                if {c, "reference"} <= set(g.columns) else "n/a"
            lines.append(f"- `{c}` - `reference`: r without context {cells[0]}, with context {cells[1]}; "
                         f"undefined as 0: without {cells[2]}, with {cells[3]}; causal gap {gap}.")
        lines.append("")
    best = (scores.filter(pl.col("category").is_in(["algorithmic", "knowledge"])
                          & pl.col("operation").is_in(corr["operation"].unique().to_list()))
            .group_by("model", "inputs", "category").agg(pl.col("score").max().alias("best_static"))
            .pivot(on="inputs", index=["model", "category"], values="best_static").sort("model", "category"))
    if best.height:
        lines += ["Best static score of any head over the dynamic check's copying (algorithmic) and knowledge "
                  "operations:", "", markdown(best.select("model", "category", *[c for c in choices if c in best.columns]))]
    return "\n".join(lines) + "\n"


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

    c = causal.filter(pl.col("selection") != "none")
    c = c.filter((pl.col("selection") == "top") | (pl.col("inputs") == pl.col("inputs").first().over("model")))
    df = (c.with_columns(pl.when(pl.col("selection") == "top").then("top (" + pl.col("inputs") + ")")
                         .otherwise(pl.lit("random")).alias("heads"))
          .group_by("model", "operation", "heads", "n_heads", maintain_order=True).agg(pl.col("accuracy").mean()))
    return alt.Chart(df).mark_line(point=True).encode(
        x=alt.X("n_heads:Q", title="heads ablated", scale=alt.Scale(type="log", base=2)),
        y=alt.Y("accuracy:Q", scale=alt.Scale(domain=[0, 1])), color=alt.Color("heads:N"),
        column=alt.Column("operation:N", title=None), row=alt.Row("model:N", title=None),
    ).properties(width=140, height=110)


@dataclass(frozen=True)
class JoinSettings:
    """The join of MAPS functions with inactivity (the config's ``maps.join``)."""
    inactive_below: float = 0.5  # a head is inactive when its median ahon_ln is below this
    salient_min: float = 0.2  # a head has a salient operation when its best static score reaches this


def write_maps_reports(dirs: list[Path], core_db: Path | None, out: Path, *, inactive_below: float = 0.5,
                       salient_min: float = 0.2, inputs_parquet: Path | None = None) -> list[Path]:
    """All MAPS tables and figures under ``out``/tables and ``out``/figures (and the ``maps_inputs`` table as
    Parquet at ``inputs_parquet`` for the database); returns the paths."""
    from analysis.core import provenance

    out = Path(out)
    start = provenance.now()
    d = load(dirs)
    paths: list[Path] = []
    inputs = inputs_table(d["correlations"], d["causal"])
    paths += write_table(inputs, out / "tables" / "maps_inputs", digits=3)
    if inputs_parquet is not None:
        runs = sorted(set(d["scores"]["run_id"].drop_nulls())) if "run_id" in d["scores"].columns else []
        run = provenance.run_record("maps_report", {"inactive_below": inactive_below, "salient_min": salient_min,
                                                    "maps_runs": runs}, start_time=start)
        paths.append(provenance.write_with_run(inputs, inputs_parquet, run))
    paths.append(write_bytes(out / "tables" / "maps_inputs_answer.md",
                             inputs_answer(inputs, d["correlations"], d["causal"], d["scores"])))
    paths += write_table(correlation_table(d["correlations"]), out / "tables" / "maps_correlations")
    if d["correlations"].height:
        by_op = d["correlations"].drop("run_id", strict=False)
        paths += write_table(by_op, out / "tables" / "maps_correlations_by_operation")
    paths += write_table(causal_table(d["causal"]), out / "tables" / "maps_causal")
    con = connect(core_db, read_only=True) if core_db is not None and Path(core_db).is_file() else None
    heads = head_table(first_inputs(d["scores"]), con)
    if con is not None:
        con.close()
    paths += write_table(join_table(heads, inactive_below, salient_min), out / "tables" / "maps_join")
    best = (d["scores"].group_by("model", "inputs", "operation", "category", maintain_order=True)
            .agg(pl.col("score").max().alias("best_static"), pl.col("suppression_score").max().alias("best_suppression"),
                 pl.col("n_pairs").first()).sort("model", "inputs", "category", "operation"))
    paths += write_table(best, out / "tables" / "maps_best_by_operation")
    for model in d["scores"]["model"].unique().sort():
        paths += write_figure(heatmap(first_inputs(d["scores"]), model),
                              out / "figures" / f"maps_heatmap_{model_key(model)}")
    if heads["median_ahon_ln"].drop_nulls().len():
        paths += write_figure(join_chart(heads, inactive_below), out / "figures" / "maps_static_vs_inactive")
    if d["causal"].height:
        paths += write_figure(causal_chart(d["causal"]), out / "figures" / "maps_causal")
    return paths
