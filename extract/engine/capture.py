"""Capture sessions: what the registered attention function records while a session is active.

A :class:`Capture` lives for one or more forward passes. For every attention layer it receives the
raw per-head statistics (``RAW_STATS``, each ``(batch, heads)`` float64, means over valid positions) and,
when it carries an ablation ``rule``, returns the ``(batch, heads)`` bool mask of heads whose output
``O`` is replaced before the output projection. Outside any session the attention is plain SDPA.

Capture points (named, family-agnostic): ``Capture.stats[layer]`` (raw stats of the current forward),
``Capture.forward_stats`` (one ``(batch, layers, heads, n_stats)`` tensor per finished forward when
``keep_stats``), ``Capture.forward_masks`` (one ``(batch, layers, heads)`` ablation mask per forward).

Scored positions: by default the stats are means over every valid position of a row. Inside
``with scoring_positions(region):`` (``(batch, S)`` bool) they are means over the valid positions in
``region`` only (the last of them is the row's "last" position), while every position is still computed
and an ablated head is still replaced at every position. The evaluator uses it so that a question's heads
are scored, and its ablation decided, on the prompt its choices share, not on the choices' own tokens.
"""
from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from analysis.core.score_functions import RAW_STATS  # noqa: F401  (the one definition of the stats' order)

Rule = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class Capture:
    rule: Rule | None = None  # (layer, stats (B, H, n_stats)) -> bool (B, H): heads to ablate
    mode: str = "zero"  # "zero" or "mean"
    means: torch.Tensor | None = None  # (layers, heads, head_dim) replacement outputs for mode "mean"
    chunk_size: int = 256  # query chunk of the portable kernel
    keep_stats: bool = False  # keep every forward's stats in ``forward_stats`` (calibration runs)
    need_entropy: bool = True  # False: skip the entropy pass (its stat becomes NaN), for ablation by others
    stats_needed: tuple[str, ...] | None = None  # the raw stats to compute (None: all; the others are NaN)
    stats: dict[int, torch.Tensor] = field(default_factory=dict)
    forward_masks: list[torch.Tensor] = field(default_factory=list)
    forward_stats: list[torch.Tensor] = field(default_factory=list)
    _masks: dict[int, torch.Tensor] = field(default_factory=dict)
    _mask_cache: dict[int, tuple] = field(default_factory=dict)

    @classmethod
    def nested(cls, **options) -> "Capture":
        """A capture opened inside the active session (if any), keeping its ablation (rule, mode, means)."""
        outer = current()
        if outer is not None:
            options = dict(rule=outer.rule, mode=outer.mode, means=outer.means) | options
        return cls(**options)

    def record(self, layer: int, stats: torch.Tensor) -> torch.Tensor | None:
        """Store ``stats`` (B, H, n_stats) of ``layer``; return the heads to ablate (B, H) or None."""
        if layer in self.stats:  # a new forward pass started
            self.end_forward()
        self.stats[layer] = stats
        if self.rule is None:
            return None
        mask = self.rule(layer, stats)
        self._masks[layer] = mask
        return mask

    def end_forward(self) -> None:
        if self.keep_stats and self.stats:
            self.forward_stats.append(self.stacked_stats())
        if self._masks:
            self.forward_masks.append(_by_layer(self._masks))
        self._masks = {}
        self.stats = {}
        self._mask_cache = {}

    def stacked_stats(self) -> torch.Tensor:
        """Raw stats of the current forward, ``(B, layers, H, n_stats)`` float64 on CPU."""
        return _by_layer(self.stats)

    def all_stats(self) -> list[torch.Tensor]:
        """Stats of every finished forward (``keep_stats``) and of the one in progress, in call order."""
        return self.forward_stats + ([self.stacked_stats()] if self.stats else [])

    def all_masks(self) -> list[torch.Tensor]:
        """Ablation masks of every finished forward and of the one in progress, in call order."""
        return self.forward_masks + ([_by_layer(self._masks)] if self._masks else [])

    def cached(self, key_obj: object, make: Callable[[], object]) -> object:
        """Per-forward cache keyed by object identity (masks are shared by all layers of one type)."""
        hit = self._mask_cache.get(id(key_obj))
        if hit is None or hit[0] is not key_obj:
            hit = (key_obj, make())
            self._mask_cache[id(key_obj)] = hit
        return hit[1]


def _by_layer(per_layer: dict[int, torch.Tensor]) -> torch.Tensor:
    """``{layer: (B, H, ...)}`` -> ``(B, layers, H, ...)`` on CPU, layers in order."""
    return torch.stack([per_layer[i] for i in sorted(per_layer)], 1).cpu()


_current: contextvars.ContextVar[Capture | None] = contextvars.ContextVar("dormant_capture", default=None)
_region: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("dormant_scored", default=None)


@contextmanager
def scoring_positions(region: torch.Tensor | None) -> Iterator[None]:
    """Stats of the forward passes inside the block average over ``region`` ``(B, S)`` bool (None: every
    valid position), see the module doc."""
    token = _region.set(region)
    try:
        yield
    finally:
        _region.reset(token)


def scored_positions() -> torch.Tensor | None:
    """The ``(B, S)`` bool region of :func:`scoring_positions`, or None."""
    return _region.get()


def current() -> Capture | None:
    """The active capture session, or None."""
    return _current.get()


@contextmanager
def capturing(capture: Capture) -> Iterator[Capture]:
    """Activate ``capture`` for the forward passes run inside the block."""
    token = _current.set(capture)
    try:
        yield capture
    finally:
        _current.reset(token)
        capture.end_forward()
