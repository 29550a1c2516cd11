"""One model's head scores as matrices: ``values (E, L*H)``, a row per example, a column per head.

Column ``c`` is (layer ``c // n_heads``, head ``c % n_heads``); rows are examples ``"dataset/example"`` in
sorted order. Relative depth of a column = layer / n_layers, in [0, 1).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from analysis.core.score_functions import score_keys
from analysis.database import query


@dataclass(frozen=True)
class ScoreMatrix:
    model: str
    score_fn: str
    examples: tuple[str, ...]
    n_layers: int
    n_heads: int
    values: np.ndarray  # (E, n_layers * n_heads) float64

    @property
    def layers(self) -> np.ndarray:
        """Layer of each column, ``(L*H,)``."""
        return np.arange(self.values.shape[1]) // self.n_heads

    def depth_columns(self, lo: float, hi: float) -> np.ndarray:
        """Columns whose relative depth layer / n_layers lies in ``[lo, hi)`` (``hi >= 1`` includes the last)."""
        d = self.layers / self.n_layers
        return np.flatnonzero((d >= lo) & ((d < hi) | (hi >= 1.0)))

    def rows(self, idx) -> "ScoreMatrix":
        idx = np.asarray(idx, dtype=int)
        return ScoreMatrix(self.model, self.score_fn, tuple(self.examples[i] for i in idx), self.n_layers,
                           self.n_heads, self.values[idx])

    def same_architecture(self, other: "ScoreMatrix") -> bool:
        return (self.n_layers, self.n_heads) == (other.n_layers, other.n_heads)


def load_scores(con, model: str, score_fns=None) -> dict[str, ScoreMatrix]:
    """Every ``head_scores`` row of ``model`` as one :class:`ScoreMatrix` per score function (default: all)."""
    score_fns = score_keys() if score_fns is None else score_fns
    shape = query(con, "SELECT n_layers, n_heads FROM models WHERE model = ?", [model])
    if shape.height == 0:
        known = query(con, "SELECT model FROM models ORDER BY model")["model"].to_list()
        raise ValueError(f"model {model!r} is not in the database (models: {', '.join(known)}); "
                         f"add it to the config's `models` (or the distributions' derived models) and rerun")
    L, H = int(shape["n_layers"][0]), int(shape["n_heads"][0])
    cols = ", ".join(score_fns)
    df = query(con, f"""SELECT dataset || '/' || example AS ex, layer, head, {cols} FROM head_scores
                        WHERE model = ? ORDER BY dataset, example, layer, head""", [model])
    examples = tuple(dict.fromkeys(df["ex"].to_list()))
    if df.height != len(examples) * L * H or df.height == 0:
        raise ValueError(f"{model}: {df.height} head_scores rows for {len(examples)} examples, expected "
                         f"{len(examples)} x {L} layers x {H} heads; rebuild the database from complete shards")
    return {fn: ScoreMatrix(model, fn, examples, L, H, df[fn].to_numpy().astype(np.float64).reshape(len(examples), L * H))
            for fn in score_fns}


def split_halves(examples: tuple[str, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of two disjoint halves, balanced within each dataset, by a seeded hash of the example id."""
    by_ds: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        by_ds.setdefault(e.split("/", 1)[0], []).append(i)
    first, second = [], []
    for ds in sorted(by_ds):
        idx = sorted(by_ds[ds], key=lambda i: hashlib.sha256(f"{seed}|{examples[i]}".encode()).hexdigest())
        first += idx[: (len(idx) + 1) // 2]
        second += idx[(len(idx) + 1) // 2:]
    return np.array(sorted(first), dtype=int), np.array(sorted(second), dtype=int)
