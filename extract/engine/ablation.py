"""Dynamic head ablation (definitions §4) as a context manager.

Inside ``with ablate(model, "ahon_ln", threshold=tau) as ab:`` every full forward pass computes, layer by
layer, the heads' scores on the current input and replaces the output ``O`` (all positions, before the
output projection) of each head that is inactive for that example: score ``> τ`` for ``awft``/``awft_ln``,
``< τ`` otherwise. Later layers see the residual stream already changed by earlier ablations, so the
realized fraction differs from any target; ``ab.mask`` is ``(examples, layers, heads)`` bool, stacked
over the forward passes in call order, and ``ab.zeroed_fraction`` its mean.

``score_fn="random"`` selects each (example, layer, head) independently with probability ``p``; the draw
is seeded per example from ``seed`` and the example's tokens, so it does not depend on batching.
``mode="mean"`` replaces an ablated head's output by ``means[layer, head]`` (``(layers, heads, head_dim)``,
e.g. from :func:`head_output_means`) instead of zero.
"""
from __future__ import annotations

import contextlib
import hashlib
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch

from analysis.core.score_functions import check_score_key, get_score_function
from extract.engine import attention, capture, hooks
from extract.engine.scores import pad_id, pad_right, score_from_stats


class Ablation:
    """What :func:`ablate` yields: the realized masks of the forward passes run inside the block."""

    def __init__(self, cap: capture.Capture):
        self._cap = cap

    @property
    def mask(self) -> np.ndarray:
        """Bool ``(examples, layers, heads)``: which head outputs were replaced, per forward pass example."""
        masks = self._cap.all_masks()
        if not masks:
            return np.zeros((0, 0, 0), dtype=bool)
        return torch.cat(masks, 0).numpy()

    @property
    def zeroed_fraction(self) -> float:
        """Replaced (example, layer, head) triples / all triples (0.0 before any forward pass)."""
        m = self.mask
        return float(m.mean()) if m.size else 0.0


def _threshold_rule(key: str, tau: float):
    fn = get_score_function(key)

    def rule(layer: int, stats: torch.Tensor) -> torch.Tensor:  # stats (B, H, n_stats) -> inactive (B, H)
        return fn.is_inactive(score_from_stats(stats, fn), tau)

    return rule


class _RandomRule:
    """Bernoulli(p) per (example, layer, head), seeded by (seed, example tokens, layer)."""

    def __init__(self, p: float, seed: int):
        self.p, self.seed, self.example_keys = p, seed, None

    def __call__(self, layer: int, stats: torch.Tensor) -> torch.Tensor:
        B, H = stats.shape[:2]
        keys = self.example_keys or [f"batch-row-{b}" for b in range(B)]
        out = torch.empty(B, H, dtype=torch.bool)
        for b in range(B):
            digest = hashlib.sha256(f"{self.seed}|{layer}|{keys[b]}".encode()).digest()
            g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
            out[b] = torch.rand(H, generator=g) < self.p
        return out.to(stats.device)


def _example_keys(rule: _RandomRule):
    """Before each forward pass: the sha256 of every row's scored tokens (its unpadded tokens, or those in
    ``capture.scoring_positions``'s region), the key of its random draw."""
    def read(ids, am):
        if ids is None:
            rule.example_keys = None
            return
        if am is not None and am.dim() == 4:  # a prepared (B, 1, S, S) mask: a position is valid if it sees itself
            am = torch.diagonal(am[:, 0] if am.dtype == torch.bool else am[:, 0] == 0, dim1=-2, dim2=-1)
        region = capture.scored_positions()
        if region is not None:
            am = region if am is None else am.bool() & region
        rows = [ids[b] if am is None else ids[b][am[b].bool()] for b in range(ids.shape[0])]
        rule.example_keys = [hashlib.sha256(r.cpu().numpy().astype(np.int64).tobytes()).hexdigest() for r in rows]

    return read


@contextmanager
def ablate(model, score_fn: str, *, threshold: float | None = None, p: float | None = None, seed: int = 0,
           mode: str = "zero", means: torch.Tensor | None = None) -> Iterator[Ablation]:
    """Ablate inactive heads in every forward pass run inside the block (see module doc)."""
    check_score_key(score_fn, allow_random=True)
    if mode not in ("zero", "mean"):
        raise ValueError(f"mode={mode!r}; choose 'zero' or 'mean'")
    if mode == "mean" and means is None:
        raise ValueError("mode='mean' needs means=(layers, heads, head_dim); compute them with head_output_means()")
    attention.use(model)
    inputs = contextlib.nullcontext()
    if score_fn == "random":
        if p is None or not 0.0 <= p <= 1.0:
            raise ValueError(f"score_fn='random' needs p in [0, 1], got {p!r}")
        rule = _RandomRule(p, seed)
        inputs = hooks.on_inputs(model, _example_keys(rule))
    else:
        if threshold is None:
            raise ValueError(f"score_fn={score_fn!r} needs a threshold (see definitions §3 / analysis.core.thresholds)")
        rule = _threshold_rule(score_fn, float(threshold))
    # only the stats the rule reads are computed (the entropy scores alone need the kernel's entropy)
    needed = () if score_fn == "random" else get_score_function(score_fn).stats
    cap = capture.Capture(rule=rule, mode=mode, means=means, need_entropy="entropy" in needed, stats_needed=needed)
    with inputs, capture.capturing(cap):
        yield Ablation(cap)


def head_output_means(model, sequences: Sequence, *, batch_tokens: int = 8192) -> torch.Tensor:
    """Mean head output ``O`` over all valid positions of ``sequences``: ``(layers, heads, head_dim)``.

    Read at the ``"z"`` capture point (the input of each layer's output projection, per head).
    """
    from extract.engine.scores import batches, check_sequences
    from extract.errors import InputError

    seqs = check_sequences(model, sequences)
    if not seqs:
        raise InputError("head_output_means needs at least one sequence (the means average over their positions)")
    attention.use(model)
    sums: dict[int, torch.Tensor] = {}
    valid: dict[str, torch.Tensor] = {}
    count = 0

    def add(layer, z):  # z (B, S, H, D)
        s = (z * valid["mask"][..., None, None].to(z.dtype)).sum((0, 1)).double()
        sums[layer] = sums.get(layer, 0) + s

    device = next(model.parameters()).device
    with hooks.hooked(model, "z", add):
        for idx in batches([len(s) for s in seqs], batch_tokens):
            ids, am = pad_right([seqs[j] for j in idx], pad_id(model), device)
            valid["mask"] = am.bool()
            with torch.inference_mode():
                hooks.decoder(model)(input_ids=ids, attention_mask=am, use_cache=False)
            count += int(am.sum())
    return torch.stack([sums[i] for i in range(len(sums))]) / count
