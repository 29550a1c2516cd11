"""The paired bootstrap over questions (definitions §5): one set of resampling weights shared by every
configuration that answered the same questions, so a difference between two configurations is resampled
with its pairing intact.

``weights(n, n_boot, seed)`` is ``(n_boot, n)`` int: how often each question is drawn in each replicate
(multinomial, the classic with-replacement resample). A statistic that is a ratio of per-question sums
(accuracy = Σ correct / n, realized fraction = Σ zeroed / Σ triples) is then a matrix product per
replicate. Intervals are percentile intervals (``CI_LEVEL``).

:func:`curves` applies it to the sweep's per-question rows (table ``ablation_questions``): every
(model, function) curve in every replicate, with one weight matrix over the union of the question ids shared
by every configuration and every model; :func:`point_intervals` gives each curve point's CIs (the
``ablation_results`` columns). The rules on whole curves (within budget, AUC ranks) are in
``analysis.sweep.uncertainty``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

N_BOOT = 1000
CI_LEVEL = 0.95


def weights(n: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """``(n_boot, n)`` resampling counts of ``n`` questions (each row sums to ``n``); seeded, deterministic."""
    if n < 1:
        raise ValueError("the bootstrap needs at least one question")
    rng = np.random.default_rng([seed, n, n_boot])
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.int64)


def ratio(w: np.ndarray, num, den=None) -> np.ndarray:
    """Per replicate ``Σ w·num / Σ w·den`` (``den`` = ones: the mean): ``(n_boot,)`` for ``(n,)`` inputs,
    ``(n_boot, k)`` for ``(n, k)`` ones."""
    num = np.asarray(num, dtype=float)
    den = np.ones_like(num) if den is None else np.asarray(den, dtype=float)
    return (w @ num) / (w @ den)


def interval(samples, level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile interval of bootstrap ``samples`` along axis 0 (NaNs ignored)."""
    s = np.asarray(samples, dtype=float)
    lo, hi = np.nanpercentile(s, [50 * (1 - level), 50 * (1 + level)], axis=0)
    return (float(lo), float(hi)) if np.ndim(lo) == 0 else (lo, hi)


def ci_of_replicates(v: np.ndarray) -> tuple[float, float]:
    """The interval of replicates ``v[1:]`` (``v[0]`` is the point estimate); NaNs without replicates."""
    return interval(v[1:]) if len(v) > 1 else (float("nan"), float("nan"))


@dataclass
class Curve:
    """One (model, function) curve in every replicate: row 0 the point estimate, rows 1.. the bootstrap.
    ``x`` realized % zeroed, ``accuracy`` in points, ``kl`` and ``kl_choices`` mean nats; all ``(1 + R, P)``
    over the target fractions ``fractions`` (ascending)."""
    fractions: np.ndarray
    x: np.ndarray
    accuracy: np.ndarray
    kl: np.ndarray
    kl_choices: np.ndarray


def _one_task(questions: pl.DataFrame) -> str:
    tasks = questions["task"].unique().to_list()
    if len(tasks) != 1:
        raise ValueError(f"ablation_questions of {len(tasks)} tasks {sorted(tasks)}: pass one task's rows")
    return tasks[0]


def curves(questions: pl.DataFrame, n_boot: int = N_BOOT, seed: int = 0) -> dict[tuple[str, str], Curve]:
    """Every (model, function) curve of one task under the shared paired bootstrap (module doc)."""
    _one_task(questions)
    ids = sorted(questions["question"].unique().to_list())
    at = {q: i for i, q in enumerate(ids)}
    w_all = np.vstack([np.ones((1, len(ids)), dtype=np.int64), weights(len(ids), n_boot, seed)])
    out = {}
    for (model, fn), g in questions.group_by(["model", "score_fn"], maintain_order=True):
        g = g.sort("target_fraction", "question")
        fractions = np.array(sorted(g["target_fraction"].unique().to_list()))
        n = g.height // len(fractions)
        qs = g["question"].to_list()
        if n * len(fractions) != g.height or any(qs[k * n:(k + 1) * n] != qs[:n] for k in range(len(fractions))):
            raise ValueError(f"{model}/{fn}: every target fraction must answer the same questions")
        w = w_all[:, [at[q] for q in qs[:n]]]

        def col(name):
            return g[name].cast(pl.Float64).to_numpy().reshape(len(fractions), n).T  # (n, P)

        out[(model, fn)] = Curve(fractions, 100 * ratio(w, col("zeroed"), col("triples")),
                                 100 * ratio(w, col("correct")), ratio(w, col("kl")), ratio(w, col("kl_choices")))
    return out


def baseline_replicates(cv: dict, model: str) -> np.ndarray:
    c = cv.get((model, "random"))
    if c is None or c.fractions[0] != 0:
        raise ValueError(f"no baseline for {model}: add the random run at target_fraction 0")
    return c.accuracy[:, 0]


def point_intervals(cv: dict) -> pl.DataFrame:
    """Per curve point: accuracy, its difference from the baseline (paired) and mean KL, each with its 95% CI:
    ``model, score_fn, target_fraction, accuracy_ci_low, accuracy_ci_high, delta_ci_low, delta_ci_high,
    kl_mean, kl_ci_low, kl_ci_high, kl_choices_mean``."""
    rows = []
    for (m, f), c in cv.items():
        base = baseline_replicates(cv, m)
        for k, p in enumerate(c.fractions):
            rows.append((m, f, float(p), *ci_of_replicates(c.accuracy[:, k]),
                         *ci_of_replicates(c.accuracy[:, k] - base), float(c.kl[0, k]),
                         *ci_of_replicates(c.kl[:, k]), float(c.kl_choices[0, k])))
    cols = ["model", "score_fn", "target_fraction", "accuracy_ci_low", "accuracy_ci_high", "delta_ci_low",
            "delta_ci_high", "kl_mean", "kl_ci_low", "kl_ci_high", "kl_choices_mean"]
    return pl.DataFrame(rows, schema=cols, orient="row")
