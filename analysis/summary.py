"""Descriptive summaries of the score database: per-domain score quantiles, ECDF figures, run summary."""
from __future__ import annotations

from pathlib import Path

import polars as pl

from analysis.core.io import write_bytes
from analysis.core.score_functions import check_score_key
from analysis.database import TABLES, connect, query, row_counts
from analysis.render import markdown, write_figure, write_table

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def score_summary(con) -> pl.DataFrame:
    """Per (model, domain, score_fn): examples, (example, layer, head) triples and score quantiles."""
    qs = ", ".join(f"quantile_cont(s.score, {q}) AS q{int(q * 100):02d}" for q in QUANTILES)
    return query(con, f"""
        SELECT s.model, coalesce(e.domain, s.dataset) AS domain, s.score_fn,
               count(DISTINCT s.example) AS n_examples, count(*) AS n_scores, {qs}
        FROM head_scores_long s JOIN examples e USING (model, dataset, example)
        GROUP BY ALL ORDER BY s.model, domain, s.score_fn""")


def ecdf(con, score_fn: str, points: int = 101) -> pl.DataFrame:
    """Quantile function of ``score_fn`` per (model, domain) on a grid of ``points`` probabilities."""
    check_score_key(score_fn)
    grid = ", ".join(f"{i / (points - 1):.4f}" for i in range(points))
    return query(con, f"""
        WITH q AS (SELECT s.model, coalesce(e.domain, s.dataset) AS domain,
                          quantile_cont(s.{score_fn}, [{grid}]) AS v
                   FROM head_scores s JOIN examples e USING (model, dataset, example) GROUP BY ALL)
        SELECT model, domain, unnest(range(0, {points})) / {points - 1} AS cdf, unnest(v) AS score
        FROM q ORDER BY model, domain, cdf""")


def ecdf_chart(df: pl.DataFrame, score_fn: str):
    import altair as alt

    return alt.Chart(df).mark_line().encode(
        x=alt.X("score:Q", title=score_fn), y=alt.Y("cdf:Q", title="fraction of (example, layer, head)"),
        color=alt.Color("model:N"), column=alt.Column("domain:N", title=None),
    ).properties(width=220, height=180, title=f"Empirical CDF of {score_fn} per model and domain")


def run_summary(con, figures: list[str]) -> str:
    counts = row_counts(con)
    models = query(con, "SELECT model, family, variant, quantisation, n_params, n_layers, n_heads, n_kv_heads "
                        "FROM models ORDER BY n_params")
    corpora = query(con, """SELECT model, coalesce(domain, dataset) AS domain, count(*) AS documents,
                            sum(n_tokens) AS tokens, min(n_tokens) AS min_tokens, max(n_tokens) AS max_tokens,
                            avg(bos_first::INT) AS bos_first FROM examples GROUP BY ALL ORDER BY ALL""")
    key = query(con, """SELECT model, score_fn, quantile_cont(score, 0.5) AS median,
                        quantile_cont(score, 0.05) AS q05 FROM head_scores_long
                        WHERE score_fn IN ('awft', 'ahon_ln') GROUP BY ALL ORDER BY ALL""")
    base = query(con, """SELECT model, task, n_questions, accuracy AS baseline, accuracy_ci_low AS ci_low,
                         accuracy_ci_high AS ci_high, chance FROM ablation_results
                         WHERE score_fn = 'random' AND target_fraction = 0 ORDER BY model, task""")
    sweep = [] if base.is_empty() else [
        "## Ablation sweep baselines (accuracy and chance in points, 95% bootstrap CI over questions)", "",
        markdown(base, 3), "Table 2 with CIs: `tables/table2.md`; its KL companion: `tables/table2_kl.md`.", ""]
    parts = ["# Run summary", "", "Row counts: " + ", ".join(f"`{t}` {counts[t]}" for t in TABLES), "",
             "## Models", "", markdown(models), "## Corpora (tokens as each model sees them)", "",
             markdown(corpora), "## Key score functions (pooled over examples, layers, heads)", "", markdown(key),
             *sweep, "## Figures", ""] + [f"- `{f}`" for f in figures] + [""]
    return "\n".join(parts)


def write_reports(db: Path, out: Path) -> list[Path]:
    """Tables, figures and ``summary.md`` under ``out`` from the database at ``db``; returns paths."""
    con = connect(db, read_only=True)
    written = write_table(score_summary(con), out / "tables" / "score_summary")
    figures = []
    for fn in ("ahon_ln", "awft", "aeqd"):
        figures += write_figure(ecdf_chart(ecdf(con, fn), fn), out / "figures" / f"score_ecdf_{fn}")
    summary = out / "summary.md"
    write_bytes(summary, run_summary(con, [str(f.relative_to(out)) for f in figures if f.suffix == ".png"]))
    con.close()
    return written + figures + [summary]
