"""Per-rule time and memory of a workflow run, from Snakemake's ``benchmark:`` files.

Each job writes ``results/benchmarks/<rule>/<wildcards...>.tsv`` (columns ``s`` wall seconds, ``cpu_time``
CPU seconds, ``max_rss`` MiB, ``mean_load`` %). The table sums wall and CPU seconds per rule; on a machine
with other load the wall times include waiting, while CPU seconds are the work done.
"""
from __future__ import annotations

from pathlib import Path

import polars as pl

COLUMNS = ["rule", "jobs", "wall_s", "cpu_s", "max_rss_mib"]


def read_benchmarks(root: str | Path) -> pl.DataFrame:
    """One row per benchmark file: ``rule, job, wall_s, cpu_s, max_rss_mib`` (the last line of each file)."""
    root = Path(root)
    rows = []
    for f in sorted(root.rglob("*.tsv")):
        lines = [ln for ln in f.read_text().splitlines() if ln.strip()]
        if len(lines) < 2:
            continue
        rec = dict(zip(lines[0].split("\t"), lines[-1].split("\t")))

        def num(k):
            try:
                return float(rec.get(k, "nan"))
            except ValueError:
                return float("nan")

        rel = f.relative_to(root)
        rule = rel.parts[0] if len(rel.parts) > 1 else rel.stem  # <rule>/<wildcards>.tsv or <rule>.tsv
        rows.append((rule, str(rel.with_suffix("")), num("s"), num("cpu_time"), num("max_rss")))
    return pl.DataFrame(rows, schema=["rule", "job", "wall_s", "cpu_s", "max_rss_mib"], orient="row")


def rule_timings(jobs: pl.DataFrame) -> pl.DataFrame:
    """Per rule: job count, summed wall and CPU seconds, largest peak RSS; a ``total`` row last."""
    per = (jobs.group_by("rule", maintain_order=True).agg(pl.len().alias("jobs"), pl.col("wall_s").sum(), pl.col("cpu_s").sum(),
                                     pl.col("max_rss_mib").max())
           .sort("wall_s", descending=True))
    total = jobs.select(pl.lit("total").alias("rule"), pl.len().alias("jobs"), pl.col("wall_s").sum(),
                        pl.col("cpu_s").sum(), pl.col("max_rss_mib").max())
    return pl.concat([per, total]).with_columns(pl.col("jobs").cast(pl.Int64)).select(COLUMNS)
