"""Tables and figures of the Bigram-Backcopy toy runs (definitions §7) from their ``bb_metrics`` rows.

Each run's ``metrics.parquet`` (rows ``run, step, metric, layer, part, value``, the ``bb_metrics`` table:
``layer`` null for the model's own metrics, ``part`` the zeroed ``attn`` / ``mlp`` of an intervention, else
null) sits beside its ``run.json`` (the run's settings: layers, attention, optimizer, seed, base, ...), which
gives the run its role in the claims. Every claim has a stable id (:data:`CLAIMS`, the ``claim_id`` column)
beside its text:

* 1-layer softmax AdamW: both excess risks <= 0.05 nats; ``Attn_<s>`` >= 0.85 on non-trigger queries;
  mean weight on the previous token >= 0.5 on trigger queries; ``‖Val_<s>‖`` ratio rises early (its peak
  exceeds the step-0 value), then ends <= 0.25 and <= half its peak; zeroing the attention output raises
  the backcopy risk (by > 0.5 nats) and not the bigram risk (by < 0.05); zeroing the MLP raises the bigram
  risk (by > 0.5).
* 3 layers: residual peak (max over layers of the norm at ``<s>``) grows >= 1.5x from its early value with
  AdamW + softmax, stays within ±30% with SGD and with ReLU attention; the same for the peak relative to
  the other positions (``res_ratio``, max over layers: definitions §7's "vs the mean over other positions"), which
  discounts a growth of every position's norm; ReLU attention has ``Attn_<s>`` <= 0.2
  in every layer. A run trained without the prediction made at ``<s>`` (``bos_loss: false``, a diagnostic)
  is checked only for whether ``<s>`` is a peak at all at the end (``res_ratio`` <= 1).
  The early value is taken when the task is learned: the first checkpoint with both excess risks <= 0.1 nats
  (``LEARNED``; else, or when that is the last checkpoint, the one nearest on a log scale to 10% of the
  steps), so the comparison is about continued training, not about learning the task.

The robustness table pools a run with its seed variants: the runs whose ``run.json`` names it as their
``base`` (the workflow's ``mechanism.toy.seeds``), each with its own ``seed``; nothing is read from run names.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl

from analysis.render import write_figure, write_table

RISK_BUDGET = 0.05
LEARNED = 0.1  # both excess risks below this: the task is learned (start of the residual-peak comparison)
RISKS = ("backcopy_risk", "bigram_risk")
METRIC_COLUMNS = ("run", "step", "metric", "layer", "part", "value")
# run.json fields of runs written before they existed, with the value those runs were trained with
RUN_DEFAULTS = {"init": "normal", "bos_loss": True, "base": None}

# claim id -> (text, target); "{early}" in a text is the early checkpoint ("step 219"; "early" over seeds)
CLAIMS: dict[str, tuple[str, str]] = {
    "final_backcopy_risk": ("final backcopy_risk (nats)", f"<= {RISK_BUDGET}"),
    "final_bigram_risk": ("final bigram_risk (nats)", f"<= {RISK_BUDGET}"),
    "sink": ("Attn_<s> on non-trigger queries", ">= 0.85"),
    "backcopy_attention": ("weight on previous token, trigger queries", ">= 0.5"),
    "value_rise": ("‖Val_<s>‖ ratio: peak over step-0 value", "> 1 (rises early)"),
    "value_final": ("‖Val_<s>‖ ratio: final", "<= 0.25"),
    "value_drain": ("‖Val_<s>‖ ratio: final / peak", "<= 0.5"),
    "zero_attn_backcopy": ("zero attention: backcopy risk increase", "> 0.5"),
    "zero_attn_bigram": ("zero attention: bigram risk increase", "< 0.05"),
    "zero_mlp_bigram": ("zero MLP: bigram risk increase", "> 0.5"),
    "no_peak_without_bos_loss": ("residual peak / other positions, final (no <s> loss)", "<= 1 (no peak)"),
    "res_peak_growth": ("residual peak growth (final / {early})", ">= 1.5"),
    "res_ratio_growth": ("residual peak / other positions growth (final / {early})", ">= 1.5"),
    "res_peak_stable": ("residual peak change (final / {early})", "0.7 .. 1.3"),
    "res_ratio_stable": ("residual peak / other positions change (final / {early})", "0.7 .. 1.3"),
    "relu_no_sink": ("Attn_<s> (max over layers), ReLU attention", "<= 0.2"),
}


def load_runs(metrics: list[Path]) -> tuple[pl.DataFrame, dict[str, dict]]:
    """All ``bb_metrics`` rows of the files, and ``run -> run.json`` (read from beside each file; fields a
    run was written without get :data:`RUN_DEFAULTS`)."""
    frames, specs = [], {}
    for path in metrics:
        df = pl.read_parquet(path)
        missing = [c for c in METRIC_COLUMNS if c not in df.columns]
        if missing:
            raise ValueError(f"{path}: no column(s) {', '.join(missing)}; metrics written before metrics had "
                             "layer and part columns: train the run again with `dormant toy train`")
        spec_file = Path(path).with_name("run.json")
        if not spec_file.is_file():
            raise FileNotFoundError(f"{spec_file} is missing; train the run with `dormant toy train`")
        spec = {**RUN_DEFAULTS, **json.loads(spec_file.read_text())}
        for run in df["run"].unique(maintain_order=True).to_list():
            specs[run] = spec
        frames.append(df.select(METRIC_COLUMNS))
    return pl.concat(frames), specs


def runs_frame(specs: dict[str, dict]) -> pl.DataFrame:
    """One row per run: ``run``, ``base`` (the run it repeats with another seed, else itself) and ``seed``."""
    return pl.DataFrame({"run": list(specs), "base": [s["base"] or r for r, s in specs.items()],
                         "seed": [int(s["seed"]) for s in specs.values()]},
                        schema={"run": pl.Utf8, "base": pl.Utf8, "seed": pl.Int64})


def _is(col: str, value) -> pl.Expr:
    return pl.col(col).is_null() if value is None else pl.col(col) == value


def series(df: pl.DataFrame, run: str, metric: str, layer: int | None = None) -> pl.DataFrame:
    """``step, value`` of ``metric`` of the unmodified model (``part`` null) in ``run``: at ``layer``, or
    (None) the max over layers (a model-level metric: its value)."""
    sel = df.filter((pl.col("run") == run) & (pl.col("metric") == metric) & pl.col("part").is_null())
    if layer is not None:
        sel = sel.filter(pl.col("layer") == layer)
    return sel.group_by("step", maintain_order=True).agg(pl.col("value").max()).sort("step")


def _at(s: pl.DataFrame, step: int) -> float:
    return float(s.filter(pl.col("step") == step)["value"][0])


def early_step(df: pl.DataFrame, run: str, total: int) -> int:
    """The first checkpoint > 0 where both excess risks are <= ``LEARNED``; else (or when that is the last
    checkpoint) the one nearest (log scale) to 10% of the ``total`` steps."""
    d = df.filter((pl.col("run") == run) & (pl.col("step") > 0))
    steps = sorted(set(d["step"]))
    risk = d.filter(pl.col("metric").is_in(RISKS) & pl.col("layer").is_null() & pl.col("part").is_null())
    ok = risk.group_by("step", maintain_order=True).agg(pl.col("value").max()).filter(pl.col("value") <= LEARNED)
    if not ok.is_empty() and int(ok["step"].min()) < steps[-1]:
        return int(ok["step"].min())
    target = math.log(max(total / 10, 1))
    return min(steps, key=lambda s: abs(math.log(s) - target))


def final(df: pl.DataFrame, run: str, metric: str, layer: int | None = None, part: str | None = None) -> float:
    """The value of ``(metric, layer, part)`` at ``run``'s last step."""
    last = df.filter(pl.col("run") == run)["step"].max()
    return float(df.filter((pl.col("run") == run) & (pl.col("step") == last) & (pl.col("metric") == metric)
                           & _is("layer", layer) & _is("part", part))["value"][0])


def claim_text(claim_id: str, early: str = "early") -> str:
    """The text of claim ``claim_id``, its early checkpoint named ``early``."""
    return CLAIMS[claim_id][0].format(early=early)


def claims(df: pl.DataFrame, specs: dict[str, dict]) -> pl.DataFrame:
    """One row per checked claim: run, claim id, claim text, measured value, target, pass."""
    rows = []

    def add(run, claim_id, value, ok, early=""):
        rows.append({"run": run, "claim_id": claim_id, "claim": claim_text(claim_id, early),
                     "measured": float(value), "target": CLAIMS[claim_id][1], "pass": bool(ok)})

    for run, spec in sorted(specs.items()):
        L, attn, opt = spec["layers"], spec["attention"], spec["optimizer"]
        steps = spec["steps"]
        if L == 1 and attn == "softmax" and opt == "adamw":
            for risk in RISKS:
                add(run, f"final_{risk}", final(df, run, risk), final(df, run, risk) <= RISK_BUDGET)
            v = final(df, run, "attn_bos", 0)
            add(run, "sink", v, v >= 0.85)
            v = final(df, run, "attn_prev_trig", 0)
            add(run, "backcopy_attention", v, v >= 0.5)
            s = series(df, run, "val_ratio", 0)
            peak, start, end = float(s["value"].max()), _at(s, 0), final(df, run, "val_ratio", 0)
            add(run, "value_rise", peak / start, peak > start)
            add(run, "value_final", end, end <= 0.25)
            add(run, "value_drain", end / peak, end / peak <= 0.5)
            base_b, base_g = final(df, run, "backcopy_risk"), final(df, run, "bigram_risk")
            d = final(df, run, "backcopy_risk", 0, "attn") - base_b
            add(run, "zero_attn_backcopy", d, d > 0.5)
            d = final(df, run, "bigram_risk", 0, "attn") - base_g
            add(run, "zero_attn_bigram", d, d < 0.05)
            d = final(df, run, "bigram_risk", 0, "mlp") - base_g
            add(run, "zero_mlp_bigram", d, d > 0.5)
        if L > 1 and not spec["bos_loss"]:  # diagnostic: is <s> a peak without its own prediction?
            v = float(series(df, run, "res_ratio")["value"][-1])  # max over layers
            add(run, "no_peak_without_bos_loss", v, v <= 1)
        elif L > 1:
            e = early_step(df, run, steps)
            for metric in ("res_peak", "res_ratio"):
                s = series(df, run, metric)
                growth = float(s["value"][-1]) / _at(s, e)
                if attn == "softmax" and opt == "adamw":
                    add(run, f"{metric}_growth", growth, growth >= 1.5, f"step {e}")
                else:
                    add(run, f"{metric}_stable", growth, 0.7 <= growth <= 1.3, f"step {e}")
        if attn == "relu":
            v = max(final(df, run, "attn_bos", i) for i in range(L))
            add(run, "relu_no_sink", v, v <= 0.2)
    return pl.DataFrame(rows, schema={"run": pl.Utf8, "claim_id": pl.Utf8, "claim": pl.Utf8, "measured": pl.Float64,
                                      "target": pl.Utf8, "pass": pl.Boolean})


FINAL_METRICS = ("backcopy_risk", "bigram_risk", "attn_bos", "attn_prev_trig", "val_ratio", "res_peak", "res_ratio",
                 "delta_logit")


def final_table(df: pl.DataFrame, specs: dict[str, dict]) -> pl.DataFrame:
    """Per run: its settings, training wall time and the final metrics (per-layer ones: max over layers)."""
    rows = []
    for run, spec in sorted(specs.items()):
        row = {"run": run, "layers": spec["layers"], "attention": spec["attention"], "optimizer": spec["optimizer"],
               "width": spec["width"], "length": spec["length"], "batch": spec["batch"], "steps": spec["steps"],
               "init": spec["init"], "bos_loss": spec["bos_loss"], "train_s": final(df, run, "train_s")}
        for m in FINAL_METRICS:
            v = series(df, run, m)["value"]
            row[m] = float(v[-1]) if len(v) else None
        rows.append(row)
    return pl.DataFrame(rows)


def _long(df: pl.DataFrame, specs: dict[str, dict]) -> pl.DataFrame:
    """Plot rows of the unmodified model at steps > 0: ``quantity`` (the metric) and ``layer`` ("-" for a
    model-level metric)."""
    return df.filter((pl.col("step") > 0) & pl.col("part").is_null()).select(
        "run", "step", pl.col("metric").alias("quantity"),
        pl.col("layer").cast(pl.Utf8).fill_null("-").alias("layer"), "value")


def dynamics_figure(df: pl.DataFrame, specs: dict[str, dict]):
    """Risks, Attn_<s>, ‖Val_<s>‖ ratio, residual peak vs step (log x), one line per run and layer."""
    import altair as alt

    keep = ["backcopy_risk", "bigram_risk", "attn_bos", "attn_prev_trig", "val_ratio", "res_peak"]
    d = _long(df, specs).filter(pl.col("quantity").is_in(keep))
    return (alt.Chart(d).mark_line(point=alt.OverlayMarkDef(size=12)).encode(
        x=alt.X("step:Q", scale=alt.Scale(type="log"), title="training step"),
        y=alt.Y("value:Q", title=None, scale=alt.Scale(zero=False)),
        color=alt.Color("run:N"), strokeDash=alt.StrokeDash("layer:N"),
    ).properties(width=220, height=150)
        .facet(facet=alt.Facet("quantity:N", sort=keep, title=None), columns=3)
        .resolve_scale(y="independent")
        .properties(title="Bigram-Backcopy training dynamics (per-layer metrics: one dash style per layer)"))


def compare_figure(df: pl.DataFrame, specs: dict[str, dict]):
    """Adam vs SGD vs ReLU attention: residual peak (max over layers, over its early value) and Attn_<s>; one
    dash style per initialisation."""
    import altair as alt

    parts = []
    for run, spec in specs.items():
        rp = series(df, run, "res_peak")
        e = early_step(df, run, spec["steps"])
        rp = rp.with_columns((pl.col("value") / _at(rp, e)).alias("value"), pl.lit("residual peak / early").alias("quantity"))
        ab = series(df, run, "attn_bos").with_columns(pl.lit("Attn_<s> (max over layers)").alias("quantity"))
        label = f"{spec['optimizer']}, {spec['attention']}" + ("" if spec["bos_loss"] else ", no <s> loss")
        for part in (rp, ab):
            parts.append(part.with_columns(pl.lit(run).alias("run"), pl.lit(label).alias("variant"),
                                           pl.lit(spec["init"]).alias("init"),
                                           pl.lit(f"{spec['layers']} layer(s)").alias("depth")))
    d = pl.concat(parts).filter(pl.col("step") > 0)
    return (alt.Chart(d).mark_line(strokeWidth=1.5).encode(
        x=alt.X("step:Q", scale=alt.Scale(type="log"), title="training step"),
        y=alt.Y("value:Q", title=None), color=alt.Color("variant:N", title="optimizer, attention"),
        strokeDash=alt.StrokeDash("init:N", title="initialisation"),
        detail="run:N",
    ).properties(width=240, height=170)
        .facet(row=alt.Row("quantity:N", title=None), column=alt.Column("depth:N", title=None))
        .resolve_scale(y="independent")
        .properties(title="AdamW vs SGD vs ReLU attention"))


def interventions_table(df: pl.DataFrame) -> pl.DataFrame:
    """Final excess risks per run: none, and each layer's attention or MLP zeroed (``zeroed``: "attn L0")."""
    last = df.group_by("run", maintain_order=True).agg(pl.col("step").max().alias("last"))
    d = df.join(last, on="run").filter(pl.col("step") == pl.col("last"))
    base = d.filter(pl.col("metric").is_in(RISKS) & pl.col("layer").is_null() & pl.col("part").is_null()
                    ).with_columns(pl.lit("none").alias("zeroed"))
    zero = d.filter(pl.col("part").is_not_null()).with_columns(
        pl.concat_str(pl.col("part"), pl.lit(" L"), pl.col("layer").cast(pl.Utf8)).alias("zeroed"))
    return (pl.concat([base, zero]).select("run", "zeroed", pl.col("metric").alias("risk"), "value")
            .sort("run", "zeroed", "risk"))


def interventions_figure(table: pl.DataFrame):
    import altair as alt

    order = ["none"] + sorted(z for z in set(table["zeroed"]) if z != "none")
    return (alt.Chart(table).mark_bar().encode(
        x=alt.X("risk:N", title=None, axis=None), y=alt.Y("value:Q", title="excess risk (nats)"),
        color=alt.Color("risk:N", title="excess risk"),
        column=alt.Column("zeroed:N", title="zeroed part", sort=order), row=alt.Row("run:N", title=None),
    ).properties(width=50, height=110, title="Interventions on the trained models"))


def robustness(cl: pl.DataFrame, specs: dict[str, dict]) -> pl.DataFrame:
    """Per base run (a run and the runs that name it as their ``base``) and claim, over their seeds: how many
    pass, the measured value's min / median / max, each seed's value (in seed order) and the failing seeds.
    ``cl``: the frame of :func:`claims`; grouped by claim id, so the early step in a claim's text ("final /
    step 219"), which differs between seeds, becomes "final / early"."""
    runs = runs_frame(specs)
    d = cl.with_columns(pl.col("run").replace_strict(runs["run"], runs["base"]).alias("base"),
                        pl.col("run").replace_strict(runs["run"], runs["seed"]).alias("seed"),
                        pl.col("claim_id").replace_strict({k: claim_text(k) for k in CLAIMS}).alias("claim"))
    return (d.sort("seed").group_by("base", "claim_id", "claim", "target", maintain_order=True).agg(
        pl.len().alias("seeds"), pl.col("pass").sum().alias("passed"),
        pl.col("measured").min().alias("measured_min"), pl.col("measured").median().alias("measured_median"),
        pl.col("measured").max().alias("measured_max"),
        pl.col("measured").alias("by_seed"),
        pl.col("seed").filter(~pl.col("pass")).cast(pl.String).str.join(", ").alias("failing_seeds"))
        .with_columns(pl.col("by_seed").map_elements(lambda v: " / ".join(f"{x:.3g}" for x in v),
                                                     return_dtype=pl.String))
        .rename({"base": "run"}).sort("run", maintain_order=True))


def write_robustness_report(metrics: list[Path], out: Path, name: str = "toy_seeds") -> list[Path]:
    """``tables/<name>_robustness``: every claim of every run over the seeds it was trained with; returns the
    paths written."""
    df, specs = load_runs([Path(m) for m in metrics])
    return write_table(robustness(claims(df, specs), specs), Path(out) / "tables" / f"{name}_robustness")


def write_toy_report(metrics: list[Path], out: Path, name: str = "toy") -> list[Path]:
    """``tables/<name>_{claims,final,interventions}`` and ``figures/<name>_{dynamics,compare,interventions}``;
    returns the paths written."""
    df, specs = load_runs([Path(m) for m in metrics])
    out = Path(out)
    inter = interventions_table(df)
    paths = []
    paths += write_table(claims(df, specs), out / "tables" / f"{name}_claims")
    paths += write_table(final_table(df, specs), out / "tables" / f"{name}_final")
    paths += write_table(inter, out / "tables" / f"{name}_interventions")
    paths += write_figure(dynamics_figure(df, specs), out / "figures" / f"{name}_dynamics")
    paths += write_figure(compare_figure(df, specs), out / "figures" / f"{name}_compare")
    paths += write_figure(interventions_figure(inter), out / "figures" / f"{name}_interventions")
    return paths
