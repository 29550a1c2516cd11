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
every study uses (zero, or set to a given vector, chosen heads at chosen positions); :func:`replace_heads_rows`
does it per batch row. :func:`start_at` skips the layers before a given one (their output given), and
:func:`logits_from_hidden` runs only the LM head part of a causal LM's forward.
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
def replace_heads_rows(model, mask: torch.Tensor, value: torch.Tensor | None = None) -> Iterator[None]:
    """Per batch row :func:`replace_heads`: where ``mask[b, layer, head]`` (bool ``(B, layers, heads)``), row ``b``'s
    ``"z"`` output of that head is replaced at every position by zero, or by ``value``: ``(layers, heads,
    head_dim)`` for every row, or ``(B, layers, heads, head_dim)`` per row. Every forward pass in the block must
    have ``B`` rows; rows, heads and layers outside the mask are untouched. Nested blocks apply in turn (e.g. one
    zeroing some rows, one mean-replacing others)."""
    L, H, _, D = head_shape(model)
    mask = torch.as_tensor(mask, dtype=torch.bool)
    if mask.dim() != 3 or tuple(mask.shape[1:]) != (L, H):
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected (rows, {L}, {H}) (rows, layers, heads)")
    if value is not None and tuple(value.shape) not in ((L, H, D), (mask.shape[0], L, H, D)):
        raise ValueError(f"value has shape {tuple(value.shape)}; expected ({L}, {H}, {D}) or "
                         f"({mask.shape[0]}, {L}, {H}, {D})")

    def fn(layer, z):  # z (B, S, H, D)
        if z.shape[0] != mask.shape[0]:
            raise ValueError(f"a forward pass of {z.shape[0]} rows inside replace_heads_rows for {mask.shape[0]}")
        sel = mask[:, layer].to(z.device)[:, None, :, None]  # (B, 1, H, 1)
        if value is None:
            return z.masked_fill(sel, 0)
        v = (value[layer][None] if value.dim() == 3 else value[:, layer]).to(z.device, z.dtype)  # (B or 1, H, D)
        return torch.where(sel, v[:, None], z)

    with hooked(model, "z", fn, [la for la in range(L) if bool(mask[:, la].any())]):
        yield


@contextmanager
def start_at(model, layer: int, hidden: torch.Tensor) -> Iterator[None]:
    """Skip decoder layers ``0..layer-1`` in the forward passes of the block: decoder layer ``layer`` gets
    ``hidden`` ``(B, S, d_model)`` as its input, e.g. the ``"resid_post"`` of layer ``layer - 1`` recorded in a
    forward pass of the same inputs (which it then reproduces from layer ``layer`` on, whatever is changed there).
    The decoder still embeds its inputs and builds its masks and position embeddings; hooks on skipped layers do
    not run. ``layer`` 0 skips nothing. Family-independent: only the skipped layers' ``forward`` is replaced, for
    the duration of the block."""
    blocks = list(decoder_layers(model))
    if not 0 <= layer < len(blocks):
        raise ValueError(f"layer {layer} is outside 0..{len(blocks) - 1}")

    def skipped(*args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        if tuple(x.shape[:2]) != tuple(hidden.shape[:2]):
            raise ValueError(f"start_at: hidden has {tuple(hidden.shape[:2])} (rows, positions), the forward pass "
                             f"{tuple(x.shape[:2])}")
        return hidden

    with _forwards_replaced([(block, skipped) for block in blocks[:layer]]):
        yield


@contextmanager
def _forwards_replaced(pairs: Sequence[tuple[torch.nn.Module, Callable]]) -> Iterator[None]:
    """Each module's ``forward`` replaced by its function for the duration of the block (instance attributes
    only: the model classes are untouched), then restored."""
    saved = [(mod, mod.__dict__.get("forward")) for mod, _ in pairs]
    try:
        for mod, fwd in pairs:
            mod.forward = fwd
        yield
    finally:
        for mod, fwd in saved:
            if fwd is None:
                del mod.forward
            else:
                mod.forward = fwd


class _DecoderOutput:
    """A decoder's output holding only ``last_hidden_state`` (and ``[0]``); every other field (past key values,
    router logits, ...) is None."""

    def __init__(self, hidden: torch.Tensor):
        self.last_hidden_state = hidden

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return None

    def __getitem__(self, i):
        if i in (0, "last_hidden_state"):
            return self.last_hidden_state
        raise IndexError(i)


def logits_from_hidden(model, hidden: torch.Tensor, vocab: slice | None = None) -> torch.Tensor:
    """The logits ``(B, S, vocab)`` of a causal LM for decoder outputs ``hidden`` ``(B, S, d_model)`` (the decoder's
    ``last_hidden_state``, final norm applied): ``model``'s own forward from there on (its LM head and any
    element-wise logit post-processing, e.g. Gemma's final soft-capping), without running the decoder. ``vocab``
    (a slice of the vocabulary, for a linear LM head): only those tokens' logits."""
    base, head = decoder(model), model.get_output_embeddings()
    if base is model or head is None:
        raise TypeError(f"{type(model).__name__} is a decoder without an LM head")
    if vocab is not None and not isinstance(head, torch.nn.Linear):
        raise TypeError(f"{type(head).__name__}: a vocabulary slice needs a linear LM head")
    out = _DecoderOutput(hidden)
    patched = [(base, lambda *args, **kwargs: out)]
    if vocab is not None:
        w, b = head.weight[vocab], None if head.bias is None else head.bias[vocab]
        patched.append((head, lambda x: torch.nn.functional.linear(x, w, b)))
    with _forwards_replaced(patched):
        ids = torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        return model(input_ids=ids, use_cache=False).logits


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


__all__ = ["POINTS", "capture", "decoder", "decoder_layers", "head_shape", "hooked", "logits_from_hidden", "on_inputs",
           "replace_heads", "replace_heads_rows", "start_at", "text_config"]
