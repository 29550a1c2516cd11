"""Naive, obviously-correct head scores: eager attention with ``output_attentions=True`` plus hooks on
the value projection's output and on the output projection's input, then plain tensor ops per head (the full
head output multiplies ``O_h`` by its columns of ``o_proj.weight``, no Gram matrix).

Learned attention sinks (gpt-oss): the family's own eager attention returns the visible rows (the sink's
column dropped), so the sink's weight is what a row is missing, ``1 - Σ_k A[q,k]`` (float64), and the entropy
takes it as one more outcome."""
from __future__ import annotations

import contextlib

import torch

from analysis.core.score_functions import score_keys


@contextlib.contextmanager
def eager(model):
    old = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(old)


def attention_modules(model):
    from extract.engine.hooks import decoder_layers

    return [layer.self_attn for layer in decoder_layers(model)]


def value_projection(att, KV: int, D: int):
    """(module, slice of its output) holding the value states: ``v_proj``, or the last ``KV * D`` outputs of a
    fused ``qkv_proj`` (phi3: q, k, v concatenated in that order)."""
    if hasattr(att, "v_proj"):
        return att.v_proj, slice(None)
    return att.qkv_proj, slice(att.qkv_proj.out_features - KV * D, None)


def reference_scores(model, ids: list[int]) -> torch.Tensor:
    """The 16 built-in scores ``(layers, heads, 16)`` float64 of one unpadded sequence, definitions §2 literally."""
    cfg = model.config
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    values, o_inputs, hooks = {}, {}, []
    for i, att in enumerate(attention_modules(model)):
        proj, part = value_projection(att, KV, D)
        hooks.append(proj.register_forward_hook(lambda m, a, out, i=i, p=part: values.__setitem__(i, out[..., p])))
        hooks.append(att.o_proj.register_forward_pre_hook(lambda m, a, i=i: o_inputs.__setitem__(i, a[0])))
    try:
        with eager(model), torch.no_grad():
            attn = model(torch.tensor([ids], device=model.device), output_attentions=True, use_cache=False).attentions
    finally:
        for h in hooks:
            h.remove()
    S = len(ids)
    rows = []
    for layer in range(cfg.num_hidden_layers):
        A = attn[layer][0].double().cpu()  # (H, S, S)
        V = values[layer][0].double().cpu().view(S, KV, D)
        O = o_inputs[layer][0].double().cpu().view(S, H, D)
        W = attention_modules(model)[layer].o_proj.weight.detach().double().cpu()  # (d_model, H * D)
        has_sink = hasattr(attention_modules(model)[layer], "sinks")
        a, e, v0, vm, ol, om, fo, sk = [], [], [], [], [], [], [], []  # per head: the quantities §2 names
        for h in range(H):
            Ah = A[h]
            ent = torch.zeros(S, dtype=torch.float64)
            sink = (1 - Ah.sum(-1)) if has_sink else torch.zeros(S, dtype=torch.float64)  # (S,) sink weights
            for q in range(S):
                # -sum p log p, with the largest weight taken as 1 - (sum of the others): a float32 weight
                # stored as 0.9999995 would otherwise carry a 6e-8 error into near-zero entropies
                row = torch.cat([Ah[q, : q + 1], sink[q : q + 1]]) if has_sink else Ah[q, : q + 1]
                i = int(row.argmax())
                others = torch.cat([row[:i], row[i + 1 :]])
                others = others[others > 0]
                rest = others.sum()
                ent[q] = -(others * others.log()).sum() - (1 - rest) * torch.log1p(-rest)
            Vh = V[:, h // (H // KV)]
            Oh = O[:, h]
            a.append(Ah[:, 0].mean())
            sk.append(sink.mean())
            e.append(ent.mean())
            v0.append(Vh[0].norm())
            vm.append(Vh.norm(dim=-1).mean())
            ol.append(Oh[-1].norm())
            om.append(Oh.norm(dim=-1).mean())
            fo.append((Oh @ W[:, h * D : (h + 1) * D].T).norm(dim=-1).mean())  # ‖O_h W_O^h‖ over d_model
        a, e, v0, vm, ol, om, fo, sk = (torch.stack(x) for x in (a, e, v0, vm, ol, om, fo, sk))
        scores = {"awft": a, "awft_ln": a / a.mean(), "aeqd": e, "aeqd_ln": e / e.mean(), "ftvvn": v0,
                  "ftvvn_ln": v0 / v0.mean(), "avvn": vm, "avvn_ln": vm / vm.mean(), "lthon": ol,
                  "lthon_ln": ol / om.mean(), "lthon_hn": ol / om, "ahon": om, "ahon_ln": om / om.mean(),
                  "afhon": fo, "afhon_ln": fo / fo.mean(), "awls": sk}
        rows.append(torch.stack([scores[k] for k in score_keys()], -1))
    return torch.stack(rows)
