"""Attention masks that never exist as (S x S) tensors: the mask function registered with the attention function,
and the per-row key intervals the kernels read block by block.

transformers builds every layer type's mask through the mask function registered under the attention's name;
``sdpa_mask`` materialises ``(B, 1, S_q, S_k)`` booleans (at 32k tokens, a GiB per example and layer type). The
registered :func:`lazy_mask` instead returns a :class:`LazyMask`: the same arguments, evaluated by ``sdpa_mask``
itself on a band of query rows when asked (``rows``) or as a whole (``dense``, for plain SDPA outside a capture
session). Where ``sdpa_mask`` would return None (plain causal, no padding) it returns None too.

:func:`intervals` turns a mask into each row's visible keys as an interval ``[lo, hi]``: causal, padding (left
or right), sliding windows and chunked attention all give intervals. Where the mask function is transformers' own
causal / sliding-window / chunked one (``and_masks`` of its primitives, recognised by their code objects) and the
padding is one run of valid tokens per example, the intervals come from the arguments alone in O(B·S)
(:func:`derived_intervals`: window size, chunk size and left padding read from the closures); any other mask
function is evaluated band by band (:func:`banded_intervals`, ``BAND_ELEMENTS`` booleans at a time: O(S²) time). :class:`Blocks` turns them into the additive masks of query blocks,
``(B, 1, C, s1 - k0)`` for queries ``[s0, s1)`` and keys ``[k0, s1)``, so extra memory is O(B·S) plus one block.

FlexAttention (issue #19 §3; ``scripts/flex_attention_bench.py``, PyTorch 2.13, CPU, 1 thread, fp32, B=2, H=4,
D=64, window 512, lengths S and S/2; ratios to SDPA with the dense mask, same run): not adopted. Eager
``flex_attention`` returns the log-sum-exp and is exact (max rel err <= 3e-7 against the chunked kernel) but
builds the S² scores: 15.8x / 25.6x the time and 12x / 13x the memory at 2k / 8k. Compiled (inductor, C++) it is
fast, 0.48x / 0.15x the time and 0.11x / 0.03x the memory, output exact to 4e-7, but on CPU it refuses
``return_lse``, so no first-key weight and no entropy; the blocked flash path here gives all three at 0.99x / 0.28x
the time and 0.35x / 0.07x the memory (two flash calls; per call on a par with compiled flex). Compiled flex with
``return_lse`` (soft-capping as a ``score_mod``, windows and chunks as block masks) is a GPU candidate, unmeasured.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.masking_utils import (_ignore_causal_mask_sdpa, and_masks, causal_mask_function, chunked_overlay,
                                       prepare_padding_mask, sdpa_mask, sliding_window_overlay)

BAND_ELEMENTS = 1 << 22  # mask elements per band when a mask is read row band by row band (4 Mi: ~32 MiB of int64)
BLOCK_ROWS = 512  # query rows per kernel call on the blocked path


@dataclass(eq=False)
class LazyMask:
    """The arguments of one ``sdpa_mask`` call (``B`` = batch_size, ``S_q`` = q_length, ``S_k`` = kv_length)."""
    kwargs: dict[str, Any]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        k = self.kwargs
        return k["batch_size"], 1, k["q_length"], k["kv_length"]

    def rows(self, s0: int, s1: int) -> torch.Tensor:
        """Query rows ``[s0, s1)``: ``(B, 1, s1 - s0, S_k)`` bool, True = visible (padding included)."""
        k = dict(self.kwargs, q_length=s1 - s0, q_offset=self.kwargs.get("q_offset", 0) + s0,
                 allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
        return sdpa_mask(**k).expand(self.shape[0], 1, s1 - s0, self.shape[3])

    def dense(self) -> torch.Tensor | None:
        """The whole mask, as stock ``sdpa_mask`` returns it (for plain SDPA)."""
        return sdpa_mask(**self.kwargs)


def lazy_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
              attention_mask: torch.Tensor | None = None, local_size: int | None = None,
              allow_is_causal_skip: bool = True, **kwargs) -> LazyMask | None:
    """The mask function registered with the attention function: ``sdpa_mask``'s signature, nothing built."""
    if allow_is_causal_skip and _ignore_causal_mask_sdpa(prepare_padding_mask(attention_mask, kv_length, kv_offset),
                                                         q_length, kv_length, q_offset, kv_offset, local_size):
        return None
    full = dict(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
                attention_mask=attention_mask, local_size=local_size, allow_is_causal_skip=allow_is_causal_skip,
                **kwargs)
    if kwargs.get("allow_is_bidirectional_skip") and sdpa_mask(**dict(full, q_length=0)) is None:
        return None
    return LazyMask(full)


Intervals = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def intervals(mask: LazyMask) -> Intervals:
    """Per row of a square mask, all ``(B, S)``: ``lo, hi`` long, the first and last visible key (rows with no
    visible key: ``lo = hi = t``); ``exact`` bool, whether the visible keys are exactly ``[lo, hi]``; ``diagonal``
    bool, whether row t sees key t (t is not padding). From the arguments when they allow it, else band by band."""
    derived = derived_intervals(mask)
    return derived if derived is not None else banded_intervals(mask)


_AND = and_masks(causal_mask_function).__code__
_WINDOW = sliding_window_overlay(1).__code__
_CHUNK = chunked_overlay(1, torch.zeros(1, dtype=torch.long)).__code__


def _closure(f) -> dict[str, Any]:
    return dict(zip(f.__code__.co_freevars, (c.cell_contents for c in f.__closure__ or ())))


def _terms(f) -> list | None:
    """The mask functions ``f`` intersects (``and_masks`` flattened), or None where one is not recognised."""
    if getattr(f, "__code__", None) is not _AND:
        return [f] if f is causal_mask_function or getattr(f, "__code__", None) in (_WINDOW, _CHUNK) else None
    out = []
    for g in _closure(f)["mask_functions"]:
        sub = _terms(g)
        if sub is None:
            return None
        out += sub
    return out


def derived_intervals(mask: LazyMask) -> Intervals | None:
    """:func:`intervals` in O(B·S) from the ``sdpa_mask`` arguments of a causal, sliding-window or chunked mask
    function (any intersection of them) with padding that is one run of valid tokens per example; None otherwise.

    With query position ``q``: causal keeps keys ``<= q``, a window ``w`` keys ``> q - w``, chunks of ``c`` with
    ``p`` left-padding tokens the keys of q's chunk ``[p + c·floor((q - p) / c), + c)``; padding cuts the
    interval to the example's valid run.
    """
    k = mask.kwargs
    B, _, S, S_k = mask.shape
    terms = _terms(k.get("mask_function", causal_mask_function))
    if terms is None or S != S_k:
        return None
    dev = k.get("device") or torch.get_default_device()
    q = torch.arange(S, device=dev) + k.get("q_offset", 0)
    kv0 = k.get("kv_offset", 0)
    lo = torch.full((B, S), kv0, dtype=torch.long, device=dev)
    hi = torch.full((B, S), kv0 + S - 1, dtype=torch.long, device=dev)
    for f in terms:
        if f is causal_mask_function:
            hi = torch.minimum(hi, q)
        elif f.__code__ is _WINDOW:
            lo = torch.maximum(lo, q - _closure(f)["sliding_window"] + 1)
        else:
            c = _closure(f)
            size, pad = c["chunk_size"], c["left_padding"].to(dev).view(-1, 1)
            start = pad + torch.div(q - pad, size, rounding_mode="floor") * size
            lo, hi = torch.maximum(lo, start), torch.minimum(hi, start + size - 1)
    lo, hi = lo - kv0, hi - kv0
    padding = prepare_padding_mask(k.get("attention_mask"), S, kv0)
    if padding is not None:
        if padding.dtype != torch.bool:
            return None
        keys = padding[:, kv0 : kv0 + S].to(dev).expand(B, S)
        count = keys.sum(-1, keepdim=True)
        first = keys.int().argmax(-1, keepdim=True)
        last = S - 1 - keys.flip(-1).int().argmax(-1, keepdim=True)
        if not bool(((count == 0) | (count == last - first + 1)).all()):
            return None  # holes in the padding: not intervals
        lo = torch.maximum(lo, torch.where(count > 0, first, S))
        hi = torch.minimum(hi, torch.where(count > 0, last, -1))
    lo, hi = lo.clamp_min(0), hi.clamp_max(S - 1)
    t = torch.arange(S, device=dev).expand(B, S)
    seen = lo <= hi
    diagonal = seen & (lo <= t) & (t <= hi)
    return torch.where(seen, lo, t), torch.where(seen, hi, t), torch.ones_like(seen), diagonal


def banded_intervals(mask: LazyMask) -> Intervals:
    """:func:`intervals` by evaluating the mask function band by band (any mask function; O(S²) time)."""
    B, _, S, _ = mask.shape
    band = max(1, BAND_ELEMENTS // max(1, B * S))
    lo, hi, exact, diagonal = [], [], [], []
    for s0 in range(0, S, band):
        m = mask.rows(s0, min(S, s0 + band))[:, 0]  # (B, rows, S)
        count = m.sum(-1)
        t = torch.arange(s0, s0 + m.shape[1], device=m.device).expand(B, -1)
        first = torch.where(count > 0, m.int().argmax(-1), t)
        last = torch.where(count > 0, S - 1 - m.flip(-1).int().argmax(-1), t)
        lo.append(first)
        hi.append(last)
        exact.append((count == 0) | (count == last - first + 1))
        diagonal.append(torch.diagonal(m, offset=s0, dim1=1, dim2=2).clone())  # a view would keep m alive
    return torch.cat(lo, 1), torch.cat(hi, 1), torch.cat(exact, 1), torch.cat(diagonal, 1)


@dataclass(eq=False)
class Blocks:
    """Additive masks of query blocks from per-row key intervals ``lo, hi (B, S)`` (``hi <= t``: causal).

    ``blocks(s0, s1, dtype)`` -> ``(k0, add)``: keys ``[k0, s1)`` (k0 the block's smallest ``lo``) and
    ``add (B, 1, s1 - s0, s1 - k0)`` (0 visible, -inf hidden). ``rows``: the query block size.
    """
    lo: torch.Tensor
    hi: torch.Tensor
    rows: int = BLOCK_ROWS

    @property
    def shape(self) -> tuple[int, int, int, int]:
        B, S = self.lo.shape
        return B, 1, S, S

    def __call__(self, s0: int, s1: int, dtype: torch.dtype) -> tuple[int, torch.Tensor]:
        lo, hi = self.lo[:, s0:s1], self.hi[:, s0:s1]
        k0 = int(lo.min())
        keys = torch.arange(k0, s1, device=lo.device)
        seen = (keys >= lo[..., None]) & (keys <= hi[..., None])  # (B, rows, keys)
        add = torch.zeros(seen.shape, dtype=dtype, device=lo.device).masked_fill_(~seen, float("-inf"))
        return k0, add[:, None]

    def select(self, b: int) -> "Blocks":
        """The blocks of example ``b`` alone (batch of one)."""
        return Blocks(self.lo[b : b + 1], self.hi[b : b + 1], self.rows)
