"""Dormant-by-domain heads (definitions §7, last point): heads dormant on one domain and active on another.

From the per-example scores in ``head_scores`` joined with each example's domain (``examples.domain``:
news, howto, math, code), per (model, layer, head, domain): the mean of one score function and the
*dormant fraction*, the share of the domain's examples on which the head is inactive under the definitions §3
threshold τ (one scalar per model: the target-fraction quantile of that model's scores pooled over layers,
heads and examples). A head is a candidate when it is dormant on most examples of one domain and on few of
another: its *contrast* is the largest difference of dormant fraction between two domains (dormant on the
argmax domain, active on the argmin domain), ties broken by the difference of mean *dormancy* (the score
oriented so that higher = more dormant). Candidates are the heads with the largest contrast per model.
Ranking by the fraction rather than by the mean alone keeps heads whose scores shift between domains but
stay on the active side of τ everywhere (never dormant) out of the list.

The per-example check (the active-dormant scatter): zero one candidate head (``extract.domains``) and
compare each example's loss change with that head's first-token attention (``awft``) on the example.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from analysis.core.io import write_parquet
from analysis.core.names import model_key
from analysis.core.score_functions import get_score_function
from analysis.core.thresholds import threshold
from analysis.database import connect, query
from analysis.render import write_figure, write_table


def domain_means(con, score_fn: str = "awft", fraction: float = 0.15) -> pl.DataFrame:
    """``model, layer, head, domain, mean, dormant_frac, tau, n_examples``: per head and domain the mean score
    and the fraction of examples inactive under τ (definitions §3, ``fraction`` = target fraction, per model)."""
    fn = get_score_function(score_fn)
    rows = query(con, f"""SELECT s.model, s.layer, s.head, e.domain, s.{score_fn} AS score
                           FROM head_scores s JOIN examples e USING (model, dataset, example)
                           WHERE e.domain IS NOT NULL""")
    if rows.is_empty():
        return pl.DataFrame(schema={"model": pl.String, "layer": pl.Int32, "head": pl.Int32, "domain": pl.String,
                                    "mean": pl.Float64, "dormant_frac": pl.Float64, "tau": pl.Float64,
                                    "n_examples": pl.UInt32})
    taus = pl.DataFrame([{"model": m, "tau": threshold(g["score"].to_numpy(), fraction, score_fn)}
                         for (m,), g in rows.group_by(["model"], maintain_order=True)])
    inactive = fn.is_inactive(pl.col("score"), pl.col("tau"))
    return (rows.join(taus, on="model").group_by("model", "layer", "head", "domain", maintain_order=True)
            .agg(pl.col("score").mean().alias("mean"), inactive.mean().alias("dormant_frac"),
                 pl.col("tau").first(), pl.len().alias("n_examples"))
            .sort("model", "layer", "head", "domain"))


def candidates(means: pl.DataFrame, score_fn: str = "awft", top: int = 5) -> pl.DataFrame:
    """The ``top`` heads per model by domain contrast (module doc), one row each, with the per-domain means
    and dormant fractions. ``means``: the frame of :func:`domain_means`."""
    sign = 1.0 if get_score_function(score_fn).higher_is_inactive else -1.0
    d = means.with_columns((pl.col("mean") * sign).alias("dormancy"))
    keys = ["model", "layer", "head"]
    best = d.sort(["dormant_frac", "dormancy"], descending=True).group_by(keys, maintain_order=True).agg(
        pl.col("domain").first().alias("dormant_domain"), pl.col("dormant_frac").first().alias("hi"),
        pl.col("domain").last().alias("active_domain"), pl.col("dormant_frac").last().alias("lo"),
        (pl.col("dormancy").first() - pl.col("dormancy").last()).alias("mean_contrast"),
        pl.col("tau").first().alias(f"tau_{score_fn}"))
    domains = sorted(set(means["domain"]))
    wide = means.pivot(on="domain", index=keys, values="mean").rename({d: f"{score_fn}_{d}" for d in domains})
    frac = means.pivot(on="domain", index=keys, values="dormant_frac").rename({d: f"dormant_{d}" for d in domains})
    out = (best.with_columns((pl.col("hi") - pl.col("lo")).alias("contrast")).drop("hi", "lo")
           .join(wide, on=keys).join(frac, on=keys)
           .sort(["model", "contrast", "mean_contrast"], descending=[False, True, True])
           .with_columns(pl.int_range(1, pl.len() + 1).over("model").alias("rank")))
    return out.filter(pl.col("rank") <= top).select(
        "model", "rank", "layer", "head", "dormant_domain", "active_domain", "contrast", "mean_contrast",
        *[f"dormant_{d}" for d in domains], *[f"{score_fn}_{d}" for d in domains], f"tau_{score_fn}")


NON_PROSE = ("code", "math")  # domains set against the prose ones (news, howto) in the heads figure


def heads_figure(means: pl.DataFrame, cands: pl.DataFrame, model: str, score_fn: str = "awft"):
    """Every head of ``model``: mean score on prose (the domains other than code and math) vs each of code
    and math, one panel each; candidates labelled. Without prose or without code/math the axes are the
    first two domains; with one domain, a note."""
    import altair as alt

    m = means.filter(pl.col("model") == model)
    domains = sorted(set(m["domain"]))
    prose = [d for d in domains if d not in NON_PROSE]
    others = [d for d in domains if d in NON_PROSE]
    if prose and others:
        pairs = [(prose, [o], "prose (" + ", ".join(prose) + ")", o) for o in others]
    elif len(domains) >= 2:
        pairs = [([domains[0]], [domains[1]], domains[0], domains[1])]
    else:
        return alt.Chart(pl.DataFrame({"t": [f"{model}: scores of one domain only ({', '.join(domains)})"]})
                         ).mark_text().encode(text="t:N")
    ranked = cands.filter(pl.col("model") == model).select("layer", "head", "rank")
    panels = []
    for xs, ys, xt, yt in pairs:
        x = m.filter(pl.col("domain").is_in(xs)).group_by("layer", "head", maintain_order=True).agg(pl.col("mean").mean().alias("x"))
        y = m.filter(pl.col("domain").is_in(ys)).group_by("layer", "head", maintain_order=True).agg(pl.col("mean").mean().alias("y"))
        d = x.join(y, on=["layer", "head"]).join(ranked, on=["layer", "head"], how="left")
        d = d.with_columns(pl.format("L{}H{}", "layer", "head").alias("name"))
        lo, hi = float(min(d["x"].min(), d["y"].min())), float(max(d["x"].max(), d["y"].max()))
        base = alt.Chart(d).encode(x=alt.X("x:Q", title=f"mean {score_fn} on {xt}"),
                                   y=alt.Y("y:Q", title=f"mean {score_fn} on {yt}"))
        pts = base.mark_circle(size=30, opacity=0.7).encode(
            color=alt.Color("layer:Q", scale=alt.Scale(scheme="viridis")), tooltip=["name", "x", "y"])
        lab = base.transform_filter("isValid(datum.rank)").mark_text(dx=12, dy=-6, fontSize=10).encode(text="name:N")
        ring = base.transform_filter("isValid(datum.rank)").mark_point(size=120, color="red")
        diag = alt.Chart(pl.DataFrame({"x": [lo, hi], "y": [lo, hi]})).mark_line(strokeDash=[4, 4], color="gray"
                                                                                   ).encode(x="x:Q", y="y:Q")
        panels.append((diag + pts + ring + lab).properties(width=320, height=300))
    return alt.hconcat(*panels).properties(title=f"{model}: per-head {score_fn} by domain (red: top candidates)")


@dataclass(frozen=True)
class CandidateSettings:
    """How dormant-by-domain candidates are picked (the config's ``mechanism.domains`` score_fn, fraction, top)."""
    score_fn: str = "awft"  # the score whose per-domain means are contrasted
    fraction: float = 0.15  # target fraction p of the definitions §3 threshold that marks a head dormant
    top: int = 5  # candidate heads per model


def write_domain_report(db: Path, out: Path, *, score_fn: str = "awft", top: int = 5, fraction: float = 0.15,
                        models: list[str] | None = None) -> list[Path]:
    """``tables/domain_heads``, ``figures/domain_heads_<model>`` and ``domains/candidates.parquet``."""
    con = connect(db, read_only=True)
    try:
        means = domain_means(con, score_fn, fraction)
    finally:
        con.close()
    if means.is_empty():
        raise ValueError(f"{db}: no head_scores joined with example domains; build the core database first")
    unknown = sorted(set(models or []) - set(means["model"]))
    if unknown:
        raise ValueError(f"--models {' '.join(unknown)}: not in {db} (it has {', '.join(sorted(set(means['model'])))})")
    cands = candidates(means, score_fn, top)
    out = Path(out)
    paths = write_table(cands, out / "tables" / "domain_heads")
    for model in models or sorted(set(means["model"])):
        paths += write_figure(heads_figure(means, cands, model, score_fn), out / "figures" / f"domain_heads_{model_key(model)}")
    write_parquet(cands, out / "domains" / "candidates.parquet")
    return paths + [out / "domains" / "candidates.parquet"]


# ------------------------------------------------------------------------------ per-example scatter

N_PERM = 4000  # permutations of the active-vs-dormant test


def _perm_p(dl: np.ndarray, active: np.ndarray, seed: int = 0) -> float:
    """One-sided permutation p-value that active examples lose more than dormant ones (difference of means)."""
    obs = dl[active].mean() - dl[~active].mean()
    perms = np.random.default_rng(seed).permuted(np.tile(active, (N_PERM, 1)), axis=1)
    diffs = (perms * dl).sum(1) / active.sum() - (~perms * dl).sum(1) / (~active).sum()
    return float((1 + (diffs >= obs - 1e-12).sum()) / (N_PERM + 1))


MIN_SIDE = 3  # fewest examples on each side of a split for the test


def _pattern(dl: np.ndarray, active: np.ndarray) -> dict:
    """Mean loss change ``dl`` on the ``active`` examples and on the others (dormant), the permutation p-value
    and the pattern verdict of :func:`scatter_summary`; no test (NaN, not holding) when a side has fewer than
    ``MIN_SIDE`` examples."""
    n_act, n_dorm = int(active.sum()), int((~active).sum())
    dorm = float(dl[~active].mean()) if n_dorm else float("nan")
    act = float(dl[active].mean()) if n_act else float("nan")
    p = _perm_p(dl, active) if min(n_act, n_dorm) >= MIN_SIDE else float("nan")
    holds = bool(p < 0.05 and act > 0 and abs(dorm) <= act / 2)  # NaN p compares False
    return {"n_active": n_act, "n_dormant": n_dorm, "delta_loss_active": act, "delta_loss_dormant": dorm,
            "p_value": p, "holds": holds}


ABLATIONS = {"delta_loss": "zero", "delta_loss_mean": "mean"}  # ablation-parquet column -> ablation name


def scatter_summary(abl: pl.DataFrame, taus: dict[str, float] | None = None) -> pl.DataFrame:
    """One row per (model, layer, head, ablation, split): the examples split into *active* and *dormant* by the
    head's first-token attention (``awft``), the mean loss change of each side, the one-sided permutation
    p-value of active > dormant, and ``holds``: the active-dormant pattern, i.e. active examples lose more
    (p < 0.05) while dormant ones cost at most half as much (|dormant| <= active / 2).

    Splits: ``median`` (dormant = awft above the head's median over the examples: both sides populated) and,
    for models in ``taus``, ``tau`` (dormant = awft above the model's definitions §3 threshold τ, the definition of
    the candidate table). Ablations: ``zero`` (column ``delta_loss``) and ``mean`` (``delta_loss_mean``, when
    measured). Pearson and Spearman of the loss change with awft over all examples repeat on each split's row.
    """
    rows = []
    taus = taus or {}
    for (model, layer, head), g in abl.group_by(["model", "layer", "head"], maintain_order=True):
        a = g["awft"].to_numpy()
        ra = np.argsort(np.argsort(a))
        splits = {"median": float(np.median(a))} | ({"tau": float(taus[model])} if model in taus else {})
        for col, ablation in ABLATIONS.items():
            if col not in g.columns or g[col].null_count() == g.height:
                continue
            dl = g[col].to_numpy()
            corr = {"pearson": float(np.corrcoef(a, dl)[0, 1]),
                    "spearman": float(np.corrcoef(ra, np.argsort(np.argsort(dl)))[0, 1])}
            for split, cut in splits.items():
                rows.append({"model": model, "layer": layer, "head": head, "ablation": ablation, "split": split,
                             "awft_cut": cut, **_pattern(dl, a <= cut), **corr})
    return pl.DataFrame(rows)


def scatter_figure(abl: pl.DataFrame, model: str, tau: float | None = None):
    """Loss change from ablating one head vs its first-token attention, per example: one column per head,
    one row per ablation (zero; mean, when measured); the split points as vertical rules (dashed: the head's
    median awft; solid: the model's τ, when given)."""
    import altair as alt

    d = abl.filter(pl.col("model") == model).with_columns(pl.format("L{}H{}", "layer", "head").alias("name"))
    kinds = {c: k for c, k in {"delta_loss": "zeroed", "delta_loss_mean": "mean-ablated"}.items()
             if c in d.columns and d[c].null_count() < d.height}
    d = pl.concat([d.select("example", "domain", "name", "awft", pl.col(c).alias("delta"),
                            pl.lit(k).alias("ablation")) for c, k in kinds.items()])
    d = d.with_columns(pl.col("awft").median().over("name").alias("median"), pl.lit(tau).alias("tau"))
    points = alt.Chart().mark_circle(size=40, opacity=0.75).encode(
        x=alt.X("awft:Q", title="first-token attention of the head on the example (awft)"),
        y=alt.Y("delta:Q", title="loss change when the head is ablated (nats/token)"),
        color=alt.Color("domain:N"), tooltip=["example", "domain", "awft", "delta"])
    rules = [alt.Chart().mark_rule(color="gray", strokeDash=[4, 3]).encode(x="mean(median):Q")]
    if tau is not None:
        rules.append(alt.Chart().mark_rule(color="black").encode(x="mean(tau):Q"))
    cuts = "dashed: the head's median awft" + ("; solid: the model's τ" if tau is not None else "")
    return (alt.layer(points, *rules, data=d).properties(width=220, height=190)
            .facet(column=alt.Column("name:N", title=None),
                   row=alt.Row("ablation:N", title=None, sort=list(kinds.values())))
            .resolve_scale(x="independent", y="independent")
            .properties(title=alt.Title(f"{model}: active-dormant scatter (one point per example)", subtitle=cuts)))


def write_scatter_report(files: list[Path], out: Path, cands: Path | None = None) -> list[Path]:
    """``tables/domain_scatter`` and ``figures/domain_scatter_<model>`` from head-ablation Parquet files; with
    the candidate table ``cands`` (ranked by awft, so it carries ``tau_awft``) also the τ split."""
    abl = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
    taus = {}
    if cands is not None:
        c = pl.read_parquet(cands)
        if "tau_awft" not in c.columns:
            raise ValueError(f"{cands} has no tau_awft column: it was ranked by another score or written before "
                             "τ was recorded; rebuild it with `dormant domains candidates --score-fn awft` "
                             "(`snakemake --forcerun domain_candidates`) or leave --candidates out")
        taus = dict(c.select("model", "tau_awft").unique().iter_rows())
    out = Path(out)
    paths = write_table(scatter_summary(abl, taus), out / "tables" / "domain_scatter")
    for model in sorted(set(abl["model"])):
        paths += write_figure(scatter_figure(abl, model, taus.get(model)),
                              out / "figures" / f"domain_scatter_{model_key(model)}")
    return paths
