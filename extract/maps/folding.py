"""The MAPS reference's weight processing (definitions §8): norm weights folded into the matrices, and E'.

The reference computes on TransformerLens weights processed with its defaults: each norm's weight is folded
into the matrix that reads the norm's output. Here that is ``diag(γ_in^l) W_V`` (layer l's input norm),
``U = diag(γ_final) W_U`` (the final norm) and, inside ``E'``, the first block's pre-MLP norm applied with
its weight. The per-row normalisation of a norm is left out: it scales a whole row of ``M`` and changes no
top-k.

Norms are found by the decoder layers' attribute names (no model classes): a pre-norm block has
``input_layernorm`` before attention and ``pre_feedforward_layernorm`` before the MLP where it has one
(gemma; its ``post_attention_layernorm`` normalises the attention output), else ``post_attention_layernorm``
(llama, qwen2); ``post_feedforward_layernorm`` (gemma) normalises the MLP output; a post-norm block (no
``input_layernorm``, OLMo-2) has no norm before attention or the MLP. The final norm is the decoder's
``norm``. How a norm applies its weight (``w`` or, gemma, ``1 + w``) is read off the module itself:
:func:`norm_scale` runs it on a unit-RMS vector and keeps the convention that reproduces the output.

``E'`` choices (:data:`INPUTS`), for layers ≥ 1 (layer 0 reads raw ``E`` under every choice):

* ``reference``: ``MLP_0(N_mlp,0(E))``, the first block's MLP output on its pre-MLP norm (the reference's
  ``mlp(ln2(x))``; no residual, no post-MLP norm);
* ``raw``: ``E``;
* ``residual``: ``E + MLP_0(N_mlp,0(E))`` as the block adds it to the residual stream (through gemma's
  post-MLP norm), i.e. the first block's output with its attention left out.
"""
from __future__ import annotations

import torch

from extract.engine.hooks import decoder_layers
from extract.maps.run import INPUTS


def _norm(layer, name: str):
    return getattr(layer, name, None)


def input_norm(layer):
    """The norm whose output the attention reads (None in a post-norm block)."""
    return _norm(layer, "input_layernorm")


def pre_mlp_norm(layer):
    """The norm whose output the MLP reads (None in a post-norm block)."""
    if _norm(layer, "pre_feedforward_layernorm") is not None:
        return layer.pre_feedforward_layernorm
    if input_norm(layer) is None:
        if _norm(layer, "post_feedforward_layernorm") is None:
            raise TypeError(f"{type(layer).__name__}: neither a pre-norm block (input_layernorm) nor a post-norm "
                            f"one (post_feedforward_layernorm); children: {', '.join(n for n, _ in layer.named_children())}")
        return None
    return layer.post_attention_layernorm


def post_mlp_norm(layer):
    """The norm applied to the MLP output before the residual add (gemma, OLMo-2), else None."""
    return _norm(layer, "post_feedforward_layernorm")


def final_norm(model):
    """The decoder's final norm (before the unembedding)."""
    norm = getattr(model.get_decoder(), "norm", None)
    if norm is None:
        raise TypeError(f"{type(model).__name__}: no final norm (`norm` of its decoder)")
    return norm


@torch.no_grad()
def norm_scale(norm, d: int) -> torch.Tensor:
    """``γ`` ``(d,)`` float32: the per-channel factor ``norm`` multiplies a unit-RMS input by, from its weight
    ``w`` as ``w`` or ``1 + w`` (gemma), whichever reproduces the module's output; None: ones."""
    if norm is None:
        return torch.ones(d)
    w = norm.weight.detach().float().cpu()
    x = torch.randn(d, generator=torch.Generator().manual_seed(0))
    x = x / x.pow(2).mean().sqrt()
    p = next(norm.parameters())
    out = norm(x.to(p.device, p.dtype)[None]).float().cpu()[0]
    tol = 1e-3 if p.dtype == torch.float32 else 3e-2
    err = {name: ((out - x * g).abs().max() / out.abs().max().clamp_min(1e-30)).item()
           for name, g in (("w", w), ("1 + w", 1 + w))}
    best = min(err, key=err.get)
    if err[best] > tol:
        raise TypeError(f"{type(norm).__name__}: not an RMS norm scaling by w or 1 + w (relative errors {err})")
    return w if best == "w" else 1 + w


def fold(gamma: torch.Tensor, w: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """``diag(γ) W``: ``w`` with its ``dim`` axis (the d_model rows) scaled by ``gamma``."""
    shape = [1] * w.dim()
    shape[dim] = -1
    return w * gamma.to(w.device, w.dtype).view(shape)


@torch.no_grad()
def embedding_inputs(model, ids: torch.Tensor, choices=INPUTS) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``E[ids]`` ``(n, d_model)`` float32 (the embedding module's output) and, per choice, ``E'[ids]`` of the
    layers ≥ 1 (module doc)."""
    emb = model.get_input_embeddings()(ids.to(model.device))
    block = decoder_layers(model)[0]
    out = {}
    if set(choices) & {"reference", "residual"}:
        pre = pre_mlp_norm(block)
        mlp = block.mlp(pre(emb) if pre is not None else emb)
        out["reference"] = mlp.float()
        post = post_mlp_norm(block)
        out["residual"] = (emb + (post(mlp) if post is not None else mlp)).float()
    out["raw"] = emb.float()
    return emb.float(), {c: out[c] for c in choices}
