"""The head-score functions of definitions §2 as one registry, and the raw per-head statistics they read.

``RAW_STATS`` is the one definition of the raw statistics and of their order: the last axis of every raw-stats
tensor ``(..., heads, len(RAW_STATS))`` (float64, one value per example, layer and head). A
:class:`ScoreFunction` reads one raw stat, optionally normalises it, and names the side of a threshold τ
that means "inactive"; scores are stored raw, the side is metadata. The registry (``SCORE_FUNCTIONS``,
:func:`score_keys`) holds the 16 built-ins in definitions §2 order, then any registered by the user; every consumer
(scoring, thresholds, ablation, database columns and views, reports) loops over it::

    from analysis.core.score_functions import ScoreFunction, register_score_function
    register_score_function(ScoreFunction("aeqd_hn", "Entropy per unit value norm", stat="entropy",
                                          normalisation="head", norm_stat="v_norm", inactive_side="below"))

Register before scoring and before the first writable database connection of the process (it adds the
column). Stdlib only: importable by ``extract`` (torch) and ``analysis`` (no torch) alike.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterator, Mapping, Sequence, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class RawStat:
    """One raw per-head statistic: ``key`` (name), ``doc`` (meaning), ``unit``."""
    key: str
    doc: str
    unit: str


RAW_STATS: tuple[RawStat, ...] = (
    RawStat("p_first", "mean attention weight on the first valid position, over valid queries", "probability"),
    RawStat("entropy", "mean entropy of the attention rows, over valid queries", "nats"),
    RawStat("v_first_norm", "L2 norm of the first valid position's value vector", "activation units"),
    RawStat("v_norm", "mean L2 norm of the value vectors, over valid positions", "activation units"),
    RawStat("o_last_norm", "L2 norm of the head output at the last valid position", "activation units"),
    RawStat("o_norm", "mean L2 norm of the head output, over valid positions", "activation units"),
    RawStat("o_full_norm", "mean L2 norm of the head output after its slice of the output projection "
            "(O[t] W_O^h, no bias; L2 over d_model), over valid positions", "activation units"),
    RawStat("p_sink", "mean attention weight on the head's learned sink (the softmax's extra outcome; 0 in "
            "families without sinks), over valid queries", "probability"),
)
"""Per (example, layer, head); norms over head_dim (``o_full_norm``: over d_model), query head h reading KV head
h // (heads / kv_heads)."""
RAW_STAT_KEYS: tuple[str, ...] = tuple(s.key for s in RAW_STATS)
_RAW = {s.key: s for s in RAW_STATS}


def ordered_stats(values: Mapping[str, T]) -> list[T]:
    """``values`` (raw-stat key -> value, every key once) as a list in ``RAW_STATS`` order."""
    if set(values) != set(RAW_STAT_KEYS):
        raise ValueError(f"raw stats {sorted(values)} != {sorted(RAW_STAT_KEYS)}")
    return [values[k] for k in RAW_STAT_KEYS]


def stats_by_key(values: Sequence[T]) -> dict[str, T]:
    """The inverse of :func:`ordered_stats`: ``values`` in ``RAW_STATS`` order -> dict by key."""
    if len(values) != len(RAW_STATS):
        raise ValueError(f"got {len(values)} raw stats, expected {len(RAW_STATS)} ({', '.join(RAW_STAT_KEYS)})")
    return dict(zip(RAW_STAT_KEYS, values))


NORMALISATIONS = ("none", "layer", "head")
SIDES = ("above", "below")


@dataclass(frozen=True)
class ScoreFunction:
    """A head score: raw stat ``stat`` (a ``RAW_STATS`` key), normalised, with its inactive side.

    ``normalisation``: ``"none"`` (score = stat, in the stat's unit); ``"layer"`` (stat / mean of ``norm_stat``
    over the heads of the same layer and example; ``norm_stat`` defaults to ``stat``; dimensionless, 1 = layer
    mean); ``"head"`` (stat / ``norm_stat`` of the same head; ``norm_stat`` required; dimensionless). A ratio
    0/0 is 1. ``inactive_side``: ``"above"`` (inactive when score > τ) or ``"below"`` (score < τ).
    """
    key: str
    name: str
    stat: str
    inactive_side: str
    normalisation: str = "none"
    norm_stat: str | None = None

    def __post_init__(self):
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"{self.key}: normalisation={self.normalisation!r}; choose one of {NORMALISATIONS}")
        if self.inactive_side not in SIDES:
            raise ValueError(f"{self.key}: inactive_side={self.inactive_side!r}; choose 'above' or 'below'")
        if self.normalisation == "none" and self.norm_stat is not None:
            raise ValueError(f"{self.key}: norm_stat given without a normalisation")
        if self.normalisation == "head" and self.norm_stat is None:
            raise ValueError(f"{self.key}: normalisation='head' needs norm_stat (the stat to divide by)")
        if self.normalisation == "layer" and self.norm_stat is None:
            object.__setattr__(self, "norm_stat", self.stat)

    @property
    def stats(self) -> tuple[str, ...]:
        """The raw stats this score reads."""
        return tuple(dict.fromkeys((self.stat, self.norm_stat or self.stat)))

    @property
    def needs_entropy(self) -> bool:
        """True iff the score reads the entropy stat (the only one that needs the kernel's second pass)."""
        return "entropy" in self.stats

    @property
    def unit(self) -> str:
        return _RAW[self.stat].unit if self.normalisation == "none" else "ratio"

    @property
    def higher_is_inactive(self) -> bool:
        return self.inactive_side == "above"

    @property
    def inactive_when(self) -> str:
        """``">"`` or ``"<"``: the side as an operator (the ``score_functions`` table's encoding)."""
        return ">" if self.higher_is_inactive else "<"

    def is_inactive(self, score, tau):
        """``score > tau`` or ``score < tau``: floats, NumPy arrays, torch tensors, polars expressions."""
        return score > tau if self.higher_is_inactive else score < tau

    def sql_predicate(self, col: str, tau: str | float) -> str:
        """SQL for "``col`` is inactive at ``tau``" (both SQL expressions or numbers)."""
        return f"{col} {self.inactive_when} {tau}"


_REGISTRY: dict[str, ScoreFunction] = {}
SCORE_FUNCTIONS: Mapping[str, ScoreFunction] = MappingProxyType(_REGISTRY)
"""Live read-only view key -> :class:`ScoreFunction`, in registration order (the database column order)."""


def register_score_function(fn: ScoreFunction) -> ScoreFunction:
    """Add ``fn`` after the registered ones; ValueError on a duplicate or invalid key or an unknown stat."""
    if not isinstance(fn, ScoreFunction):
        raise TypeError(f"expected a ScoreFunction, got {type(fn).__name__}")
    if not fn.key.isidentifier() or fn.key != fn.key.lower() or fn.key == "random":
        raise ValueError(f"score key {fn.key!r}: use a lower-case identifier other than 'random' (it is a column name)")
    if fn.key in _REGISTRY:
        raise ValueError(f"score function {fn.key!r} is already registered")
    for s in fn.stats:
        if s not in _RAW:
            raise ValueError(f"{fn.key}: unknown raw stat {s!r}; choose one of: {', '.join(RAW_STAT_KEYS)}")
    _REGISTRY[fn.key] = fn
    return fn


def unregister_score_function(key: str) -> ScoreFunction:
    """Remove a user-registered function (the built-ins stay); returns it."""
    if key in _BUILTIN:
        raise ValueError(f"{key!r} is a built-in score function")
    return _REGISTRY.pop(check_score_key(key))


@contextmanager
def registered(fn: ScoreFunction) -> Iterator[ScoreFunction]:
    """``fn`` registered for the duration of the block (tests, one-off studies)."""
    register_score_function(fn)
    try:
        yield fn
    finally:
        unregister_score_function(fn.key)


def score_keys() -> tuple[str, ...]:
    """Keys of the registered functions, in order (16 built-ins first)."""
    return tuple(_REGISTRY)


PLUGINS_ENV = "DORMANT_PLUGINS"


def load_plugins(names: str | None = None) -> tuple[str, ...]:
    """Import the modules named in ``names`` (default: the ``DORMANT_PLUGINS`` environment variable,
    comma-separated), so that the score functions they register exist in this process too: the ``dormant``
    command and the workflow call this first, so a function registered by a plugin is scored, thresholded,
    swept and stored by every job. Returns the modules imported; a module that cannot be imported is an error
    naming it."""
    import importlib
    import os

    names = os.environ.get(PLUGINS_ENV, "") if names is None else names
    mods = tuple(n.strip() for n in names.split(",") if n.strip())
    for name in mods:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ImportError(f"{PLUGINS_ENV}: cannot import score-function plugin {name!r} ({e}); "
                              "put it on PYTHONPATH or fix the name") from e
    return mods


def check_score_key(key: str, *, allow_random: bool = False) -> str:
    """Return ``key`` if it names a score function (or ``"random"`` when allowed), else raise ValueError."""
    known = score_keys() + (("random",) if allow_random else ())
    if key not in known:
        raise ValueError(f"unknown score function {key!r}; choose one of: {', '.join(known)}")
    return key


def get_score_function(key: str) -> ScoreFunction:
    """The registered function ``key`` (ValueError naming the known keys otherwise)."""
    return _REGISTRY[check_score_key(key)]


for _fn in (
    ScoreFunction("awft", "Avg Weight of First Token", "p_first", "above"),
    ScoreFunction("awft_ln", "Avg Weight of First Token (LN)", "p_first", "above", "layer"),
    ScoreFunction("aeqd", "Avg Entropy of Query Distributions", "entropy", "below"),
    ScoreFunction("aeqd_ln", "Avg Entropy of Query Distributions (LN)", "entropy", "below", "layer"),
    ScoreFunction("ftvvn", "First Token Value Vector Norm", "v_first_norm", "below"),
    ScoreFunction("ftvvn_ln", "First Token Value Vector Norm (LN)", "v_first_norm", "below", "layer"),
    ScoreFunction("avvn", "Avg Value Vector Norm", "v_norm", "below"),
    ScoreFunction("avvn_ln", "Avg Value Vector Norm (LN)", "v_norm", "below", "layer"),
    ScoreFunction("lthon", "Last Token Head Output Norm", "o_last_norm", "below"),
    # lthon_ln: o_last_norm / (mean over the layer's heads of o_norm), as in the paper
    ScoreFunction("lthon_ln", "Last Token Head Output Norm (LN)", "o_last_norm", "below", "layer", "o_norm"),
    ScoreFunction("lthon_hn", "Last Token Head Output Norm (head-normalised)", "o_last_norm", "below", "head",
                  "o_norm"),
    ScoreFunction("ahon", "Avg Head Output Norm", "o_norm", "below"),
    ScoreFunction("ahon_ln", "Avg Head Output Norm (LN)", "o_norm", "below", "layer"),
    # IH's FullHeadOutput / FullHeadOutputNormalized: the output after the head's slice of o_proj
    ScoreFunction("afhon", "Avg Full Head Output Norm", "o_full_norm", "below"),
    ScoreFunction("afhon_ln", "Avg Full Head Output Norm (LN)", "o_full_norm", "below", "layer"),
    # learned attention sinks (gpt-oss): a head that sends its mass to the sink is that family's dormant pattern
    ScoreFunction("awls", "Avg Weight of the Learned Sink", "p_sink", "above"),
):
    register_score_function(_fn)
_BUILTIN = frozenset(_REGISTRY)
del _fn


def __getattr__(name: str):
    if name in ("SCORE_KEYS", "INACTIVE_WHEN"):
        raise AttributeError(f"{name} was removed (a constant goes stale when a function is registered): use "
                             "score_keys() / get_score_function(key).inactive_side")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
