"""Attention with the per-query statistics the head scores need, behind one small device dispatch.

``attend(q, k, v, ...)`` returns the attention output and, per query, the weight on the first valid key
and the entropy of the attention row, without ever holding a (heads x S x S) tensor:

* ``"flash_cpu"``: ONE pass of :mod:`extract.engine.fused_cpu`, a flash-attention kernel compiled on first use
  whose online softmax also accumulates ``Σ_k A_qk (s_qk - m_q)`` beside ``lse`` (``m_q`` the row max), so
  ``H_q = log l_q - Σ_k A_qk (s_qk - m_q)`` is a sum of non-negative terms: no cancellation, no second pass,
  no exact recomputation (float32 inputs; half precision is computed in float32 and the output rounded back;
  it reads grouped KV heads in place). Where it does not apply (no compiler or BLAS symbol, float64,
  ``DORMANT_FUSED_CPU=0``, or a kernel in :data:`FAST_KERNELS` without a ``stats`` one-pass variant): PyTorch's
  CPU flash kernel returns each row's ``lse``, a second call with the keys as values gives ``A·K``, and
  ``H_q = lse_q - scale * q·(A·K)_q`` (done in float64), with the cancellation handling below.
* ``"efficient_cuda"``: the two calls through the memory-efficient CUDA kernel (its ``lse`` is
  padded to a multiple of 32 queries and cut back here). Its additive bias goes through
  :func:`aligned_bias` first, as ``scaled_dot_product_attention`` does (the raw op refuses, or misreads, a
  bias whose rows are not aligned to ``BIAS_ALIGNMENT`` elements).
  Half-precision inputs: the output comes from the half-precision call, ``lse`` and ``A·K`` from one
  float32 call (a bf16 ``A·K`` would leave entropy errors of ~1e-2 nats).
  Cancellation (both two-call paths): ``lse`` and ``q·(A·K)`` are both about the row's largest logit, so float32
  inputs leave an absolute error of ~1e-6 nats per row. Heads whose mean entropy is below
  ``EXACT_ENTROPY_BELOW`` (the few, nearly one-hot heads where that error would matter relatively) get their
  entropy recomputed with the exact chunked softmax; above it the relative error stays below ~1e-5.
* ``"chunked"``: the portable fallback for any device, dtype or feature (logit soft-capping): explicit
  softmax over query chunks, so extra memory is bounded by ``chunk_size x S`` per head.

Learned attention sinks (one extra softmax outcome per head, no value): :func:`attend_lse` also returns the
keys' log-sum-exp and :func:`with_sinks` folds the sink logits in from it (the sink's weight, the rescaled output
and first-key weight, the entropy with the sink as one outcome), still without rows.

Shapes: q ``(B, H, S, D)``; k, v ``(B, KV, S, D)`` with KV dividing H (grouped-query attention: query head h reads
KV head ``h // (H / KV)``; the paths other than the one-pass kernel repeat them, :func:`repeat_heads`);
``mask`` additive ``(B, 1, S, S)`` in q's dtype (0 = visible, -inf = hidden), None for plain causal, or
:class:`extract.engine.masks.Blocks` (per-row key intervals: every backend then runs query block by query block
on the keys the block can see, extra memory O(B·S) plus one block's mask). A rectangular mask ``(B, 1, S_q,
S_k)`` with ``S_k >= S_q`` aligns the last query with the last key (query i is position ``S_k - S_q + i``).
Outputs: ``out (B, H, S, D)`` in q's dtype; ``p_first, entropy (B, H, S)`` float64 (entropy in nats).
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F

from extract.engine import fused_cpu
from extract.engine.masks import Blocks

BACKENDS = ("flash_cpu", "efficient_cuda", "chunked")
EXACT_ENTROPY_BELOW = 0.05  # nats; heads (per example) under it get the exact entropy
BIAS_ALIGNMENT = 8  # elements: every stride but the last of the efficient kernel's bias (PyTorch's mem_eff_alignment)
Kernel = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (q, k, v, mask, scale) -> (out (B,H,S,D), lse (B,H,S))


def choose_backend(device: torch.device, softcap: float | None) -> str:
    """The fastest exact backend for ``device``; override with env ``DORMANT_ATTN_BACKEND``."""
    forced = os.environ.get("DORMANT_ATTN_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"DORMANT_ATTN_BACKEND={forced!r}; choose one of {BACKENDS}")
        return forced
    if softcap is not None:
        return "chunked"
    if device.type == "cpu":
        return "flash_cpu"
    if device.type == "cuda":
        return "efficient_cuda"
    return "chunked"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
           first: torch.Tensor, *, valid: torch.Tensor | None = None, softcap: float | None = None,
           backend: str | None = None, chunk_size: int = 256, need_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention output, weight on key ``first[b]`` per query, and row entropy (see module doc).

    ``first``: ``(B,)`` long, index of each example's first valid (non-padding) token; ``valid``:
    ``(B, S)`` bool non-padding positions (default all), used to pick heads for the exact entropy.
    ``need_entropy=False`` skips the second pass and returns NaN entropies (ablation by other scores).
    """
    return attend_lse(q, k, v, mask, scale, first, valid=valid, softcap=softcap, backend=backend,
                      chunk_size=chunk_size, need_entropy=need_entropy)[:3]


def attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
               first: torch.Tensor, *, valid: torch.Tensor | None = None, softcap: float | None = None,
               backend: str | None = None, chunk_size: int = 256,
               need_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`attend` plus each row's log-sum-exp ``lse (B, H, S)`` float64 (of the scaled, capped, masked logits)."""
    if isinstance(mask, Blocks):
        return _blockwise(lambda *a: attend_lse(*a[:4], scale, a[4], valid=a[5], softcap=softcap, backend=backend,
                                                chunk_size=chunk_size, need_entropy=need_entropy),
                          q, k, v, mask, first, valid)
    backend = backend or choose_backend(q.device, softcap)
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    fast = backend != "chunked" and softcap is None
    one_pass = getattr(FAST_KERNELS[backend], "stats", None) if fast else None  # flash_cpu: fused_cpu
    res = None if one_pass is None else one_pass(q, k, v, mask, scale, first)
    if res is not None:  # no cancellation in its entropy: no exact recomputation needed
        out, p_first, entropy, lse = res
        return out, p_first, entropy if need_entropy else torch.full_like(lse, float("nan")), lse
    k, v = repeat_heads(k, q.shape[1]), repeat_heads(v, q.shape[1])
    if not fast:
        out, p_first, entropy, lse = _chunked(q, k, v, mask, scale, first, softcap, chunk_size)
        _exact_low_entropy(q, k, v, mask, scale, first, valid, entropy, chunk_size, softcap)
        return out, p_first, entropy, lse
    kernel = FAST_KERNELS[backend]
    out, lse = kernel(q, k, v, mask, scale)
    ak = None
    if q.dtype in (torch.float16, torch.bfloat16):  # half-precision kernels round lse and A·K: redo in float32
        q, k = q.float(), k.float()
        mask = None if mask is None else mask.float()
        ak, lse = kernel(q, k, k, mask, scale)
    lse = lse.double()
    p_first = _weight_on_first(q, k, mask, scale, first, lse)
    if not need_entropy:
        return out, p_first, torch.full_like(lse, float("nan")), lse
    if ak is None:
        ak, _ = kernel(q, k, k, mask, scale)
    entropy = lse - scale * _rowdot(q, ak).double()
    _exact_low_entropy(q, k, v, mask, scale, first, valid, entropy, chunk_size)
    return out, p_first, entropy, lse


def repeat_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, KV, S, D)`` -> ``(B, heads, S, D)``: query head h reads KV head ``h // (heads / KV)`` (no copy when
    ``KV == heads``)."""
    kv = x.shape[1]
    if kv == heads:
        return x
    if heads % kv:
        raise ValueError(f"{heads} query heads cannot share {kv} key/value heads")
    B, _, S, D = x.shape
    return x[:, :, None].expand(B, kv, heads // kv, S, D).reshape(B, heads, S, D)


def _blockwise(run: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: Blocks,
               first: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """``run(q, k, v, add, first, valid)`` on each query block ``[s0, s1)`` with keys ``[k0, s1)`` (``first``
    relative to k0), results (each ``(B, H, rows, ...)``) concatenated; the first key's weight is 0 in the
    blocks whose keys do not include it."""
    S = q.shape[2]
    parts = []
    for s0 in range(0, S, blocks.rows):
        s1 = min(S, s0 + blocks.rows)
        k0, add = blocks(s0, s1, q.dtype)
        inside = ((first >= k0) & (first < s1)).view(-1, 1, 1)
        res = run(q[:, :, s0:s1], k[:, :, k0:s1], v[:, :, k0:s1], add, (first - k0).clamp(0, s1 - k0 - 1),
                  None if valid is None else valid[:, s0:s1])
        parts.append((res[0], torch.where(inside, res[1], torch.zeros_like(res[1])), *res[2:]))
    return tuple(torch.cat(x, 2) for x in zip(*parts))


def with_sinks(out: torch.Tensor, p_first: torch.Tensor, entropy: torch.Tensor, lse: torch.Tensor,
               sinks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The statistics of a softmax over the visible keys plus one learned sink per head (definitions §1).

    Inputs are those of the keys alone (:func:`attend_lse`): ``out (B, H, S, D)``; ``p_first``, ``entropy``
    (nats), ``lse`` ``(B, H, S)``; ``sinks (H,)`` the sink logits. With ``z = lse - sink``, the visible mass is
    ``1 - σ = sigmoid(z)`` and the sink's ``σ = sigmoid(-z)``: the output and the weight on the first key scale
    by ``1 - σ``, and the entropy with the sink as one more outcome is, by the grouping rule,
    ``h(σ) + (1 - σ) H_keys`` with ``h`` the binary entropy (from log-sigmoids: no cancellation, no rows).
    Returns ``(out, p_first, entropy, p_sink)``, the last three float64 ``(B, H, S)``.
    """
    z = lse - sinks.detach().double().to(lse.device)[None, :, None]
    keep, p_sink = torch.sigmoid(z), torch.sigmoid(-z)
    binary = -(keep * F.logsigmoid(z) + p_sink * F.logsigmoid(-z))
    work = torch.promote_types(out.dtype, torch.float32)
    out = (out.to(work) * keep.to(work)[..., None]).to(out.dtype)
    return out, p_first * keep, binary + keep * entropy, p_sink


def _exact_low_entropy(q, k, v, mask, scale, first, valid, entropy, chunk_size, softcap=None):
    """Recompute in place the entropy of the (example, head) pairs with mean entropy < EXACT_ENTROPY_BELOW."""
    if valid is None:
        mean = entropy.mean(-1)
    else:
        w = valid[:, None, :].to(entropy.dtype)
        mean = (torch.where(valid[:, None, :], entropy, 0.0) * w).sum(-1) / w.sum(-1)
    low = mean < EXACT_ENTROPY_BELOW
    for b in low.any(1).nonzero().flatten().tolist():
        hs = low[b].nonzero().flatten()
        m = None if mask is None else mask[b : b + 1]
        ent = _chunked(q[b : b + 1, hs], k[b : b + 1, hs], v[b : b + 1, hs], m, scale,
                             first[b : b + 1], softcap, chunk_size)[2]
        entropy[b, hs] = ent[0]


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of ``(..., S, D)`` tensors -> ``(..., S)``, accumulated in at least float32."""
    work = torch.promote_types(a.dtype, torch.float32)
    return (a.to(work) * b.to(work)).sum(-1)


def _weight_on_first(q, k, mask, scale, first, lse):
    """``A[q, first] = exp(s_q,first + mask_q,first - lse_q)`` in float64, shape (B, H, S)."""
    idx = first.view(-1, 1, 1, 1).expand(-1, k.shape[1], 1, k.shape[-1])
    k_first = k.gather(2, idx)  # (B, H, 1, D)
    work = torch.promote_types(q.dtype, torch.float32)
    s = scale * torch.matmul(q.to(work), k_first.to(work).transpose(-1, -2)).squeeze(-1).double()
    if mask is not None:
        midx = first.view(-1, 1, 1, 1).expand(-1, 1, mask.shape[2], 1)
        s = s + mask.gather(3, midx).squeeze(-1).double()
    return torch.exp(s - lse)


def flash_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's CPU flash kernel: ``out (B, H, S, D)`` and the rows' log-sum-exp ``lse (B, H, S)`` float32."""
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if mask is None:
        return op(q, k, v, 0.0, True, scale=scale)
    return op(q, k, v, 0.0, False, attn_mask=mask, scale=scale)


def flash_cpu_stats(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                    first: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """``(out, p_first, entropy, lse)`` from the one-pass kernel of :mod:`extract.engine.fused_cpu` (float32
    statistics; half-precision inputs are computed in float32 and the output rounded back), or None where it
    does not apply (not on CPU, float64, a mask not in q's dtype, inputs that need gradients, or the extension is
    unavailable): then two :func:`flash_cpu` calls."""
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    if mask is not None and mask.dtype != q.dtype:
        return None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None  # no backward: autograd keeps PyTorch's kernel
    if not fused_cpu.available():
        return None
    dtype = q.dtype
    if dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
        mask = None if mask is None else mask.float()
    out, p_first, entropy, lse = fused_cpu.attend_stats(q, k, v, mask, scale, first)
    return out.to(dtype), p_first, entropy, lse


flash_cpu.stats = flash_cpu_stats  # attend_lse's one-pass variant (a replacement kernel without it gets two calls)


def _is_aligned(t: torch.Tensor) -> bool:
    """PyTorch's ``aligned_tensor<BIAS_ALIGNMENT>``: unit last stride, every other stride a multiple."""
    return t.stride(-1) == 1 and all(st % BIAS_ALIGNMENT == 0 for st in t.stride()[:-1])


def aligned_bias(mask: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """The additive mask as the memory-efficient kernel must receive it, ``shape`` = (B, H, S_q, S_k).

    What ``scaled_dot_product_attention`` does before calling the kernel (``preprocess_mask``): a mask whose
    strides are not multiples of ``BIAS_ALIGNMENT`` (any ``(B, 1, S, S)`` mask with ``S % 8 != 0``) is
    copied into storage whose last dimension is padded to the next multiple, and sliced back to ``S_k``
    columns; the result is expanded (stride 0, no copy) over the heads. The padding is never read.
    """
    if not _is_aligned(mask):
        n = mask.shape[-1]
        mask = F.pad(mask, (0, BIAS_ALIGNMENT - n % BIAS_ALIGNMENT))[..., :n]
    return mask.expand(shape)


def efficient_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                   op: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory-efficient CUDA kernel: ``out (B, H, S, D)`` and ``lse (B, H, S)`` float32.

    ``op`` defaults to ``aten._scaled_dot_product_efficient_attention`` (a stand-in with its signature
    lets tests check on CPU what the kernel is given). The kernel's ``lse`` has its query axis padded
    to a multiple of 32; it is cut back to ``S``.
    """
    op = op or torch.ops.aten._scaled_dot_product_efficient_attention
    B, H, S, _ = q.shape
    bias = None if mask is None else aligned_bias(mask, (B, H, S, k.shape[2]))
    out, lse, _, _ = op(q, k, v, bias, True, 0.0, mask is None, scale=scale)
    return out, lse[..., :S]


FAST_KERNELS: dict[str, Kernel] = {"flash_cpu": flash_cpu, "efficient_cuda": efficient_cuda}
"""The backends that return (out, lse); :func:`attend` derives every statistic from those two."""


def exact(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
          first: torch.Tensor, softcap: float | None = None,
          chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact portable computation (backend ``"chunked"``), same shapes and outputs as :func:`attend`."""
    return _exact(q, k, v, mask, scale, first, softcap, chunk_size)[:3]


def _exact(q, k, v, mask, scale, first, softcap, chunk_size):
    """:func:`_chunked` on a dense mask or block by block on :class:`Blocks`; (out, p_first, entropy, lse)."""
    if isinstance(mask, Blocks):
        return _blockwise(lambda q, k, v, m, f, _: _chunked(q, k, v, m, scale, f, softcap, chunk_size),
                          q, k, v, mask, first, None)
    return _chunked(q, k, v, mask, scale, first, softcap, chunk_size)


def _chunked(q, k, v, mask, scale, first, softcap, chunk_size, work=torch.float32):
    """Portable exact path: explicit softmax over query chunks (extra memory chunk_size x S per head).
    Returns ``(out, p_first, entropy, lse)`` (``lse = m + log1p(rest)``, float64).

    The entropy has no cancellation: with m the row max, e = exp(s - m), the max entry (e = 1) dropped
    and rest = sum of the other e, ``H = log1p(rest) - sum_others e (s - m) / (1 + rest)``; every term
    keeps its relative precision in float32 even for nearly one-hot rows.
    """
    work = torch.promote_types(work, q.dtype)
    B, H, S, D = q.shape
    off = k.shape[2] - S  # query i is key position off + i (rectangular masks of query blocks)
    out = torch.empty_like(q)
    p_first = torch.empty(B, H, S, dtype=torch.float64, device=q.device)
    entropy = torch.empty_like(p_first)
    lse = torch.empty_like(p_first)
    rows = torch.arange(B, device=q.device)
    for s0 in range(0, S, chunk_size):
        e = min(S, s0 + chunk_size)
        ke = e + off  # keys [0, ke) can be visible to queries [s0, e)
        s = torch.matmul(q[:, :, s0:e].to(work), k[:, :, :ke].to(work).transpose(-1, -2)) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        if mask is None:
            causal = torch.ones(e - s0, ke, dtype=torch.bool, device=q.device).tril(s0 + off)
            s = s.masked_fill(~causal, float("-inf"))
        else:
            s = s + mask[:, :, s0:e, :ke].to(work)
        m, arg = s.max(-1, keepdim=True)
        d = s - m  # <= 0, -inf where masked
        ex = d.exp()
        ex.scatter_(-1, arg, 0.0)  # drop the max entry
        rest = ex.sum(-1, keepdim=True)
        z = 1 + rest
        p = ex / z
        p.scatter_(-1, arg, 1 / z)
        out[:, :, s0:e] = torch.matmul(p, v[:, :, :ke].to(work)).to(q.dtype)
        ent = torch.log1p(rest) - (ex * d.nan_to_num(neginf=0.0)).sum(-1, keepdim=True) / z
        entropy[:, :, s0:e] = ent.squeeze(-1).double()
        lse[:, :, s0:e] = (m.double() + torch.log1p(rest.double())).squeeze(-1)
        idx = first.clamp(max=ke - 1)
        pf = p[rows, :, :, idx].double()  # (B, H, chunk)
        p_first[:, :, s0:e] = torch.where((first < ke).view(-1, 1, 1), pf, torch.zeros_like(pf))
    return out, p_first, entropy, lse
