"""The one attention function every model family runs through, registered as ``"dormant"``.

It is registered with transformers' ``AttentionInterface`` and, under the same name, a mask function
with ``AttentionMaskInterface`` (without the latter a custom attention receives no mask at all): the lazy
:func:`extract.engine.masks.lazy_mask`, so no (S x S) mask is built for a scoring forward (masks are read band by
band into per-row key intervals and the kernels run block by block, :mod:`extract.engine.masks`). Each
family's own attention module computes q, k, v (rotary, q/k norms, scaling, sliding window, soft-capping
are the family's business) and calls this function; nothing of the model classes is patched.

* No capture session active (see :mod:`extract.engine.capture`): plain SDPA (the score kernels when the family
  soft-caps logits or has learned attention sinks, which SDPA cannot do).
* Session active: :func:`extract.engine.kernels.attend` computes the output and per-query statistics in one
  memory-bounded pass (the first forward of a model with a fast backend is checked against the exact
  kernel, :mod:`extract.engine.selfcheck`); the raw per-head stats (means over the valid positions, or over
  :func:`extract.engine.capture.scoring_positions`'s region) go to the session, which may return
  heads to ablate; their output ``O`` (all positions) is zeroed or replaced by a mean before the output
  projection.
* Learned attention sinks (gpt-oss's ``s_aux``: one extra softmax outcome per head, with no value): the kernel
  runs over the keys alone and :func:`extract.engine.kernels.with_sinks` folds the sink in from its
  log-sum-exp (definitions §1).
"""
from __future__ import annotations

import functools
import weakref

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from analysis.core.score_functions import ordered_stats
from extract.engine import capture, fused_cpu, kernels, masks, selfcheck

ATTN_NAME = "dormant"


def dormant_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      softcap: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention signature: q ``(B, H, S, D)``, k/v ``(B, KV, S, D)`` -> ``((B, S, H, D), None)``."""
    cap = capture.current()
    sinks = kwargs.pop("s_aux", None)  # learned attention-sink logits (H,), gpt-oss
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    full = query.shape[2] == key.shape[2]
    if cap is None or not full:
        if cap is not None and cap.rule is not None:
            raise RuntimeError("ablate() needs full forward passes: call the model with use_cache=False")
        if softcap is None and sinks is None:
            if isinstance(attention_mask, masks.LazyMask):
                attention_mask = attention_mask.dense()  # plain SDPA gets the stock mask
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, **kwargs)
    if not full:  # cached decoding with soft-capping or sinks (outside a session)
        raise NotImplementedError("cached decoding with logit soft-capping or learned attention sinks is not "
                                  "supported; use use_cache=False")
    B, H, S, D = query.shape
    layout = _mask_layout(attention_mask, B, S, query, cap)
    valid, first, last, add_mask = layout
    backend = "chunked" if softcap is not None else kernels.choose_backend(query.device, softcap)
    chunk = cap.chunk_size if cap else 256
    need_entropy = cap.need_entropy if cap else False
    out, p_first, entropy, lse = kernels.attend_lse(query, key, value, add_mask, scale, first, valid=valid,
                                                    softcap=softcap, backend=backend, chunk_size=chunk,
                                                    need_entropy=need_entropy)
    if cap is not None:  # the fast kernel's own numbers, over the keys alone
        selfcheck.check(module, query, key, value, add_mask, scale, first, valid, backend, (out, p_first, entropy),
                        chunk)
    p_sink = None
    if sinks is not None:
        out, p_first, entropy, p_sink = kernels.with_sinks(out, p_first, entropy, lse, sinks)
    if cap is not None:
        scored, scored_last = _scored(valid, last)
        stats = head_stats(out, value, p_first, entropy, scored, first, scored_last, output_gram(module), p_sink,
                           cap.stats_needed)
        ablated = cap.record(module.layer_idx, stats)
        if ablated is not None and bool(ablated.any()):
            out = _replace(out, ablated.to(out.device), cap, module.layer_idx)
    return out.transpose(1, 2).contiguous(), None


def head_stats(out: torch.Tensor, value: torch.Tensor, p_first: torch.Tensor, entropy: torch.Tensor,
               valid: torch.Tensor, first: torch.Tensor, last: torch.Tensor, gram: torch.Tensor,
               p_sink: torch.Tensor | None = None, needed: tuple[str, ...] | None = None) -> torch.Tensor:
    """The raw stats per (example, query head): ``(B, H, len(RAW_STATS))`` float64, ``RAW_STATS`` order.

    ``p_first``, ``entropy`` and ``p_sink`` (the learned sink's weight; None: no sink, 0) are ``(B, H, S)``.
    ``needed``: the stats to compute (None: all); the others are NaN (an ablation reads one or two).

    ``value`` is ``(B, KV, S, D)``: query head h reads KV head ``h // (H / KV)``. ``gram`` ``(H, D, D)``:
    the output projection's per-head Gram matrices (:func:`output_gram`), ``‖o W_O^h‖² = o G_h oᵀ``.
    """
    H = out.shape[1]
    w = valid.double() / valid.sum(-1, keepdim=True).double()  # (B, S) weights of a mean over valid t
    w = w[:, None, :]

    def mean_t(x):  # x (B, H, S) -> (B, H), padding ignored even if it holds non-finite values
        return torch.where(valid[:, None, :], x * w, torch.zeros((), dtype=x.dtype, device=x.device)).sum(-1)

    def at(x, idx):  # x (B, H, S) -> x[b, :, idx[b]]
        return x.gather(2, idx.view(-1, 1, 1).expand(-1, x.shape[1], 1)).squeeze(2)

    work = torch.promote_types(out.dtype, torch.float32)

    @functools.cache
    def vn():  # (B, H, S) value norms, KV heads repeated
        return torch.linalg.vector_norm(value, dim=-1, dtype=work).double().repeat_interleave(H // value.shape[1], 1)

    @functools.cache
    def one_pass():  # ‖o‖ and sqrt(o G_h oᵀ) in one pass over out (float32 CPU), or None
        return fused_cpu.row_norms(out, gram if needed is None or "o_full_norm" in needed else None)

    @functools.cache
    def on():
        if one_pass() is not None:
            return one_pass()[0].double()
        return torch.linalg.vector_norm(out, dim=-1, dtype=work).double()

    def full():  # o G_h oᵀ, (B, H, S, D) at most
        if one_pass() is not None:
            return mean_t(one_pass()[1].double())
        o = out.to(work)
        return mean_t(((o @ gram.to(work)) * o).sum(-1).clamp_min(0).sqrt().double())

    zeros = torch.zeros(out.shape[:2], dtype=torch.float64, device=out.device)
    make = {"p_first": lambda: mean_t(p_first), "entropy": lambda: mean_t(entropy),
            "v_first_norm": lambda: at(vn(), first), "v_norm": lambda: mean_t(vn()),
            "o_last_norm": lambda: at(on(), last), "o_norm": lambda: mean_t(on()), "o_full_norm": full,
            "p_sink": lambda: zeros if p_sink is None else mean_t(p_sink)}
    nan = torch.full_like(zeros, float("nan"))
    return torch.stack(ordered_stats({k: f() if needed is None or k in needed else nan for k, f in make.items()}), -1)


_GRAMS: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}  # id(weight) -> (weight, its version, gram)


def output_gram(module: torch.nn.Module) -> torch.Tensor:
    """Per-head Gram matrices of the attention module's output projection, ``(H, D, D)`` in at least float32.

    ``o_proj.weight`` is ``(d_model, H * D)``; head h's slice ``W_O^h = weight[:, hD:(h+1)D]ᵀ`` is ``(D, d_model)``
    and ``G_h = W_O^h W_O^hᵀ``, so a head's full output norm needs ``D x D`` numbers per head, not ``d_model``.
    Cached per weight tensor and recomputed when it changes in place (training).
    """
    proj = getattr(module, "o_proj", None)
    weight = getattr(proj, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise NotImplementedError(f"{type(module).__name__}: the score engine needs the attention's output "
                                  "projection as a linear `o_proj` with a 2-D weight (for o_full_norm)")
    hit = _GRAMS.get(id(weight))
    if hit is not None and hit[0]() is weight and hit[1] == weight._version:
        return hit[2]
    H = module.config.num_attention_heads
    w = weight.detach().to(torch.promote_types(weight.dtype, torch.float32))
    w = w.view(w.shape[0], H, -1).transpose(0, 1)  # (H, d_model, D)
    gram = w.transpose(1, 2) @ w  # (H, D, D)
    if hit is None:
        weakref.finalize(weight, _GRAMS.pop, id(weight), None)
    _GRAMS[id(weight)] = (weakref.ref(weight), weight._version, gram)
    return gram


def _mask_layout(attention_mask, B, S, query, cap):
    """Valid positions ``(B, S)``, first/last valid index ``(B,)`` and the kernel's mask.

    A key t is valid (not padding) iff query t may attend to it: the mask's diagonal. When the mask is
    plain causal on every valid query row (right padding, no window) the kernel gets None (causal),
    which changes nothing for valid queries and is twice as fast. A :class:`~extract.engine.masks.LazyMask`
    otherwise becomes :class:`~extract.engine.masks.Blocks` (per-row key intervals, O(B·S)); a dense mask (or
    a lazy one whose rows are not intervals) an additive ``(B, 1, S, S)`` one. Padding rows see their own
    position (the diagonal is opened), so no row is fully masked (they would else turn into NaN).
    """
    dev = query.device
    if attention_mask is None:
        valid = torch.ones(B, S, dtype=torch.bool, device=dev)
        zero = torch.zeros(B, dtype=torch.long, device=dev)
        return valid, zero, zero + S - 1, None

    def make():
        if isinstance(attention_mask, masks.LazyMask):
            lo, hi, exact, valid = masks.intervals(attention_mask)
            t = torch.arange(S, device=dev)
            if bool((exact | ~valid).all()) and bool((hi <= t).all()):
                return _interval_layout(valid, lo, hi, t)
            dense = attention_mask.dense()
        else:
            dense = attention_mask
        return _dense_layout(dense, B, S, query)

    return cap.cached(attention_mask, make) if cap is not None else make()


def _interval_layout(valid, lo, hi, t):
    """The layout of a mask given as per-row key intervals ``lo, hi (B, S)`` (``hi <= t``)."""
    S = valid.shape[1]
    first = valid.int().argmax(-1)
    last = S - 1 - valid.flip(-1).int().argmax(-1)
    if bool(((lo == 0) & (hi == t) | ~valid).all()):
        return valid, first, last, None
    lo = torch.where(valid, lo, t)  # padding rows: their own position only
    hi = torch.where(valid, hi, t)
    return valid, first, last, masks.Blocks(lo, hi, masks.BLOCK_ROWS)


def _dense_layout(attention_mask, B, S, query):
    """The layout of a dense ``(B or 1, 1, S, S)`` mask (bool, or additive with 0 = visible)."""
    dev = query.device
    m = attention_mask[:, 0]
    m = m if m.dtype == torch.bool else m == 0
    m = m.expand(B, S, S)
    valid = torch.diagonal(m, dim1=-2, dim2=-1)
    first = valid.int().argmax(-1)
    last = S - 1 - valid.flip(-1).int().argmax(-1)
    causal = torch.ones(S, S, dtype=torch.bool, device=dev).tril()
    if bool(((m == causal) | ~valid[:, :, None]).all()):
        return valid, first, last, None
    opened = m | torch.eye(S, dtype=torch.bool, device=dev)
    add = torch.zeros(opened.shape, dtype=query.dtype, device=dev).masked_fill_(~opened, float("-inf"))
    return valid, first, last, add[:, None]


def _scored(valid: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions the stats average over ``(B, S)`` and the last of them ``(B,)``: the valid ones, or those
    in :func:`extract.engine.capture.scoring_positions`'s region."""
    region = capture.scored_positions()
    if region is None:
        return valid, last
    scored = valid & region.to(valid.device)
    if not bool(scored.any(-1).all()):
        raise ValueError("scoring_positions: a row has no valid position in the scored region")
    S = scored.shape[1]
    return scored, S - 1 - scored.flip(-1).int().argmax(-1)


def _replace(out, ablated, cap, layer):
    """Zero (or mean-replace) the whole output of the ablated heads: out (B, H, S, D), ablated (B, H)."""
    sel = ablated[:, :, None, None]
    if cap.mode == "mean":
        mean = cap.means[layer].to(out.device, out.dtype)[None, :, None, :]  # (1, H, 1, D)
        return torch.where(sel, mean.expand_as(out), out)
    return out.masked_fill(sel, 0.0)


def register() -> str:
    """Register the attention function and its mask function under ``ATTN_NAME``; returns the name."""
    AttentionInterface.register(ATTN_NAME, dormant_attention)
    AttentionMaskInterface.register(ATTN_NAME, masks.lazy_mask)
    return ATTN_NAME


def check_supported(model: PreTrainedModel) -> None:
    """Raise NotImplementedError naming the family and the feature when the engine cannot score ``model``
    (layers without a ``self_attn``; no linear ``o_proj``), before any forward pass runs."""
    from extract.engine.hooks import decoder_layers, text_config

    family = getattr(text_config(model), "model_type", type(model).__name__)
    for i, layer in enumerate(decoder_layers(model)):
        att = getattr(layer, "self_attn", None)
        if att is None:
            raise NotImplementedError(f"{family}: decoder layer {i} has no self_attn (a recurrent or hybrid "
                                      "layer); the score engine needs softmax attention in every layer")
        weight = getattr(getattr(att, "o_proj", None), "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise NotImplementedError(f"{family}: the attention of layer {i} has no linear o_proj; the score "
                                      "engine's full head output norm and head ablation need one")


def use(model: PreTrainedModel) -> PreTrainedModel:
    """Make ``model`` run its attention through the registered function (idempotent; unsupported families are
    refused by :func:`check_supported`); returns it."""
    check_supported(model)
    register()
    if model.config._attn_implementation != ATTN_NAME:
        model.set_attn_implementation(ATTN_NAME)
    return model
