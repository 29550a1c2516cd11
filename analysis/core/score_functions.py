"""The 13 head-score functions of SPEC §2 as data: key, name, and the direction that means "inactive".

Scores are stored raw; the direction is metadata (``">"``: inactive when score > τ; ``"<"``: score < τ).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScoreFunction:
    key: str
    name: str
    inactive_when: str  # ">" or "<"


SCORE_FUNCTIONS: tuple[ScoreFunction, ...] = (
    ScoreFunction("awft", "Avg Weight of First Token", ">"),
    ScoreFunction("awft_ln", "Avg Weight of First Token (LN)", ">"),
    ScoreFunction("aeqd", "Avg Entropy of Query Distributions", "<"),
    ScoreFunction("aeqd_ln", "Avg Entropy of Query Distributions (LN)", "<"),
    ScoreFunction("ftvvn", "First Token Value Vector Norm", "<"),
    ScoreFunction("ftvvn_ln", "First Token Value Vector Norm (LN)", "<"),
    ScoreFunction("avvn", "Avg Value Vector Norm", "<"),
    ScoreFunction("avvn_ln", "Avg Value Vector Norm (LN)", "<"),
    ScoreFunction("lthon", "Last Token Head Output Norm", "<"),
    ScoreFunction("lthon_ln", "Last Token Head Output Norm (LN)", "<"),
    ScoreFunction("lthon_hn", "Last Token Head Output Norm (head-normalised)", "<"),
    ScoreFunction("ahon", "Avg Head Output Norm", "<"),
    ScoreFunction("ahon_ln", "Avg Head Output Norm (LN)", "<"),
)
SCORE_KEYS: tuple[str, ...] = tuple(f.key for f in SCORE_FUNCTIONS)
INACTIVE_WHEN: dict[str, str] = {f.key: f.inactive_when for f in SCORE_FUNCTIONS}


def check_score_key(key: str, *, allow_random: bool = False) -> str:
    """Return ``key`` if it names a score function (or ``"random"`` when allowed), else raise ValueError."""
    known = SCORE_KEYS + (("random",) if allow_random else ())
    if key not in known:
        raise ValueError(f"unknown score function {key!r}; choose one of: {', '.join(known)}")
    return key
