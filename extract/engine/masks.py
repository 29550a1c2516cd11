"""Attention masks that never exist as (S x S) tensors: the mask function registered with the attention function,
and the per-row key intervals the kernels read block by block.

transformers builds every layer type's mask through the mask function registered under the attention's name;
``sdpa_mask`` materialises ``(B, 1, S_q, S_k)`` booleans (at 32k tokens, a GiB per example and layer type). The
registered :func:`lazy_mask` instead returns a :class:`LazyMask`: the same arguments, evaluated by ``sdpa_mask``
itself on a band of query rows when asked (``rows``) or as a whole (``dense``, for plain SDPA outside a capture
session). Where ``sdpa_mask`` would return None (plain causal, no padding) it returns None too.

:func:`intervals` reads a mask once per forward, band by band (``BAND_ELEMENTS`` booleans at a time), into
each row's visible keys as an interval ``[lo, hi]``: causal, padding (left or right), sliding windows and
chunked attention all give intervals. :class:`Blocks` turns them into the additive masks of query blocks,
``(B, 1, C, s1 - k0)`` for queries ``[s0, s1)`` and keys ``[k0, s1)``, so extra memory is O(B·S) plus one block.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.masking_utils import _ignore_causal_mask_sdpa, prepare_padding_mask, sdpa_mask

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


def intervals(mask: LazyMask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of a square mask, all ``(B, S)``: ``lo, hi`` long, the first and last visible key (rows with no
    visible key: ``lo = hi = t``); ``exact`` bool, whether the visible keys are exactly ``[lo, hi]``; ``diagonal``
    bool, whether row t sees key t (t is not padding)."""
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
