"""The table of candidate offline tasks (definitions §5): each model's accuracy per task and scoring mode,
with a 95% bootstrap CI over the task's questions, against chance, to choose a sweep suite the models can
actually do (a suite that leaves a model at chance measures noise under ablation).

Input: the per-question predictions of ``dormant eval --out`` (``model, dataset, task, scoring, k_shot,
correct, n_choices``). A task ``qualifies`` when the lower CI bound of (accuracy − chance) is at least
``MARGIN`` points.
"""
from __future__ import annotations

import polars as pl

from analysis.core.bootstrap import N_BOOT, interval, ratio, weights

MARGIN = 15.0  # points above chance a sweep task needs (its CI's lower bound)


def candidates_table(predictions: pl.DataFrame, n_boot: int = N_BOOT, seed: int = 0,
                     margin: float = MARGIN) -> pl.DataFrame:
    """``model, task, scoring, k_shot, n_questions, accuracy, ci_low, ci_high, chance, above_chance,
    above_ci_low, qualifies`` (points), one row per (model, task, scoring, k_shot), sorted."""
    rows = []
    keys = ["model", "task", "scoring", "k_shot"]
    for (model, task, scoring, k), g in predictions.group_by(keys, maintain_order=True):
        correct = g["correct"].cast(pl.Float64).to_numpy()
        chance = 1.0 / g["n_choices"].cast(pl.Float64).to_numpy()
        w = weights(len(correct), n_boot, seed)
        acc_r, above_r = 100 * ratio(w, correct), 100 * ratio(w, correct - chance)
        acc, above = 100 * correct.mean(), 100 * (correct - chance).mean()
        lo, hi = interval(acc_r)
        rows.append((model, task, scoring, int(k), len(correct), acc, lo, hi, 100 * chance.mean(), above,
                     interval(above_r)[0], bool(interval(above_r)[0] >= margin)))
    cols = [*keys, "n_questions", "accuracy", "ci_low", "ci_high", "chance", "above_chance", "above_ci_low",
            "qualifies"]
    return pl.DataFrame(rows, schema=cols, orient="row").sort(keys)


def wide(table: pl.DataFrame) -> pl.DataFrame:
    """One row per (task, scoring, k_shot), one ``accuracy [lo, hi]`` column per model (qualifying cells marked ✓)."""
    cell = table.with_columns(pl.format("{} [{}, {}]{}", pl.col("accuracy").round(0).cast(pl.Int64),
                                        pl.col("ci_low").round(0).cast(pl.Int64),
                                        pl.col("ci_high").round(0).cast(pl.Int64),
                                        pl.when("qualifies").then(pl.lit(" ✓")).otherwise(pl.lit(""))).alias("cell"))
    out = cell.pivot(on="model", index=["task", "scoring", "k_shot", "chance"], values="cell")
    return out.with_columns(pl.col("chance").round(1)).sort("scoring", "task")


def write(predictions: list, stem, n_boot: int = N_BOOT, seed: int = 0) -> list:
    """Read ``dormant eval`` prediction files and write the long and wide candidate tables."""
    from pathlib import Path

    from analysis.render import write_table

    frame = pl.concat([pl.read_parquet(p).select("model", "task", "scoring", "k_shot", "correct", "n_choices")
                       for p in predictions])
    table = candidates_table(frame, n_boot, seed)
    stem = Path(stem)
    return write_table(table, stem, digits=1) + write_table(wide(table), stem.with_name(stem.name + "_wide"))
