"""Naive, obviously-correct head scores: eager attention with ``output_attentions=True`` plus hooks on
the value projection's output and on the output projection's input, then plain tensor ops per head."""
from __future__ import annotations

import contextlib

import torch

from analysis.core.score_functions import SCORE_KEYS


@contextlib.contextmanager
def eager(model):
    old = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield model
    finally:
        model.set_attn_implementation(old)


def attention_modules(model):
    return [layer.self_attn for layer in model.base_model.layers]


def reference_scores(model, ids: list[int]) -> torch.Tensor:
    """Scores ``(layers, heads, 13)`` float64 of one unpadded sequence, SPEC §2 literally."""
    cfg = model.config
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    values, o_inputs, hooks = {}, {}, []
    for i, att in enumerate(attention_modules(model)):
        hooks.append(att.v_proj.register_forward_hook(lambda m, a, out, i=i: values.__setitem__(i, out)))
        hooks.append(att.o_proj.register_forward_pre_hook(lambda m, a, i=i: o_inputs.__setitem__(i, a[0])))
    try:
        with eager(model), torch.no_grad():
            attn = model(torch.tensor([ids]), output_attentions=True, use_cache=False).attentions
    finally:
        for h in hooks:
            h.remove()
    S = len(ids)
    rows = []
    for layer in range(cfg.num_hidden_layers):
        A = attn[layer][0].double()  # (H, S, S)
        V = values[layer][0].double().view(S, KV, D)
        O = o_inputs[layer][0].double().view(S, H, D)
        raw = []
        for h in range(H):
            Ah = A[h]
            ent = torch.zeros(S, dtype=torch.float64)
            for q in range(S):
                # -sum p log p, with the largest weight taken as 1 - (sum of the others): a float32 weight
                # stored as 0.9999995 would otherwise carry a 6e-8 error into near-zero entropies
                row = Ah[q, : q + 1]
                i = int(row.argmax())
                others = torch.cat([row[:i], row[i + 1 :]])
                others = others[others > 0]
                rest = others.sum()
                ent[q] = -(others * others.log()).sum() - (1 - rest) * torch.log1p(-rest)
            Vh = V[:, h // (H // KV)]
            Oh = O[:, h]
            raw.append([Ah[:, 0].mean(), ent.mean(), Vh[0].norm(), Vh.norm(dim=-1).mean(),
                        Oh[-1].norm(), Oh.norm(dim=-1).mean()])
        raw = torch.tensor(raw, dtype=torch.float64)  # (H, 6)
        a, e, v0, vm, ol, om = raw.T
        scores = [a, a / a.mean(), e, e / e.mean(), v0, v0 / v0.mean(), vm, vm / vm.mean(),
                  ol, ol / om.mean(), ol / om, om, om / om.mean()]
        rows.append(torch.stack(scores, -1))
    out = torch.stack(rows)
    assert out.shape[-1] == len(SCORE_KEYS)
    return out
