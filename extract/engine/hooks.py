"""Named capture points of a decoder: the one place that finds a model's decoder layers and reads or replaces
what flows through them (TransformerLens-style names; users never need a model's class).

Points, per decoder layer ``l``, for a batch of ``B`` sequences of ``S`` tokens:

* ``"z"``: the heads' outputs before the output projection, ``(B, S, H, head_dim)`` (the input of
  ``o_proj``, one slice per query head). Zeroing head ``h`` here is definitions §9's ablation.
* ``"v"``: the value vectors, ``(B, S, KV, head_dim)`` (the output of ``v_proj``, one slice per KV head).
* ``"attn_in"``: the attention module's input ``(B, S, d_model)`` (after the pre-attention norm).
* ``"mlp_out"``: the MLP's output ``(B, S, d_model)``.
* ``"resid_post"``: the decoder layer's output, the residual stream after the layer ``(B, S, d_model)``.

A hook is ``fn(layer, x)``: it returns None to only read ``x``, or a tensor of ``x``'s shape that replaces it.
:func:`hooked` installs hooks for the duration of a ``with`` block; :func:`replace_heads` is the ablation
every study uses (zero, or set to a given vector, chosen heads at chosen positions).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import torch

Hook = Callable[[int, torch.Tensor], "torch.Tensor | None"]
POINTS = ("z", "v", "attn_in", "mlp_out", "resid_post")


def text_config(model):
    """The text model's config (multimodal configs nest it; plain ones are it)."""
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def decoder(model) -> torch.nn.Module:
    """The decoder stack of ``model`` (a causal LM or its decoder): the module holding ``.layers``, without the LM
    head. Tried in order: ``get_decoder()``, ``base_model``, ``.model`` (Llama4ForCausalLM's ``base_model`` is
    the LM itself: its ``base_model_prefix`` names no attribute)."""
    for base in (model.get_decoder() if hasattr(model, "get_decoder") else None, getattr(model, "base_model", None),
                 getattr(model, "model", None), model):
        if isinstance(getattr(base, "layers", None), torch.nn.ModuleList):
            return base
    raise TypeError(f"{type(model).__name__}: no decoder layers found (expected `.layers` on its decoder)")


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks of ``model`` (a causal LM or its decoder), in order."""
    return decoder(model).layers


def head_shape(model) -> tuple[int, int, int, int]:
    """``(layers, query heads, KV heads, head_dim)``."""
    cfg = text_config(model)
    H = cfg.num_attention_heads
    KV = getattr(cfg, "num_key_value_heads", None) or H
    return len(decoder_layers(model)), H, KV, decoder_layers(model)[0].self_attn.o_proj.in_features // H


def _register(model, point: str, layer: int, fn: Hook):
    block = decoder_layers(model)[layer]
    _, H, KV, D = head_shape(model)
    if point == "z":
        def pre(mod, args):
            x = args[0]
            new = fn(layer, x.view(*x.shape[:-1], H, D))
            return None if new is None else (new.reshape(x.shape),) + tuple(args[1:])
        return block.self_attn.o_proj.register_forward_pre_hook(pre)
    if point == "v":
        if not hasattr(block.self_attn, "v_proj"):
            raise NotImplementedError(f"{text_config(model).model_type}: capture point 'v' needs a separate v_proj "
                                      "(this family fuses q, k and v into one projection)")

        def post(mod, args, out):
            new = fn(layer, out.view(*out.shape[:-1], KV, D))
            return None if new is None else new.reshape(out.shape)
        return block.self_attn.v_proj.register_forward_hook(post)
    if point == "attn_in":
        def pre_kw(mod, args, kwargs):
            if args:
                new = fn(layer, args[0])
                return None if new is None else ((new,) + tuple(args[1:]), kwargs)
            new = fn(layer, kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})
        return block.self_attn.register_forward_pre_hook(pre_kw, with_kwargs=True)
    if point in ("mlp_out", "resid_post"):
        def out_hook(mod, args, out):
            x = out[0] if isinstance(out, tuple) else out
            new = fn(layer, x)
            if new is None:
                return None
            return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new
        return (block.mlp if point == "mlp_out" else block).register_forward_hook(out_hook)
    raise ValueError(f"unknown capture point {point!r}; choose one of: {', '.join(POINTS)}")


@contextmanager
def hooked(model, point: str, fn: Hook, layers: Sequence[int] | None = None) -> Iterator[None]:
    """Run ``fn(layer, x)`` at ``point`` of ``layers`` (default: every layer) in the forward passes of the
    block (see the module doc); the hooks are removed on exit."""
    if point not in POINTS:
        raise ValueError(f"unknown capture point {point!r}; choose one of: {', '.join(POINTS)}")
    handles = []
    try:
        for layer in range(len(decoder_layers(model))) if layers is None else layers:
            handles.append(_register(model, point, layer, fn))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture(model, point: str, layers: Sequence[int] | None = None,
            select: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[dict[int, torch.Tensor]]:
    """Record ``point`` per layer: yields ``{layer: x}`` filled by each forward pass (the last pass wins;
    ``select(x)`` keeps a part of it, e.g. ``lambda z: z[:, -1]``)."""
    got: dict[int, torch.Tensor] = {}

    def keep(layer, x):
        got[layer] = x if select is None else select(x)

    with hooked(model, point, keep, layers):
        yield got


@contextmanager
def replace_heads(model, heads: Mapping[int, Sequence[int]], value: torch.Tensor | None = None,
                  positions: slice | int = slice(None)) -> Iterator[None]:
    """Replace the ``"z"`` output of ``heads`` (``{layer: [head, ...]}``) at ``positions`` (default: every
    position) by zero, or by ``value``: ``(head_dim,)`` for every listed head, or ``(heads, head_dim)``
    indexed by head. Other heads and positions are untouched."""
    _, H, _, _ = head_shape(model)
    for layer, hs in heads.items():
        bad = [h for h in hs if not 0 <= h < H]
        if bad:
            raise ValueError(f"head {bad[0]} of layer {layer} is outside 0..{H - 1}")

    def fn(layer, z):
        z = z.clone()
        for h in heads[layer]:
            if value is None:
                z[:, positions, h] = 0
            else:
                v = value if value.dim() == 1 else value[h]
                z[:, positions, h] = v.to(z.dtype)
        return z

    with hooked(model, "z", fn, [la for la, hs in heads.items() if hs]):
        yield


@contextmanager
def on_inputs(model, fn: Callable[[torch.Tensor | None, torch.Tensor | None], None]) -> Iterator[None]:
    """Call ``fn(input_ids, attention_mask)`` before every forward pass of the decoder (either may be None)."""
    base = decoder(model)

    def pre(mod, args, kwargs):
        fn(kwargs.get("input_ids", args[0] if args else None), kwargs.get("attention_mask"))

    h = base.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        h.remove()


__all__ = ["POINTS", "capture", "decoder", "decoder_layers", "head_shape", "hooked", "on_inputs", "replace_heads",
           "text_config"]
