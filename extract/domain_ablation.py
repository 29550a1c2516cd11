"""Per-example loss change from zeroing one attention head, with that head's first-token attention.

For every example and every given (layer, head): the mean next-token loss (nats/token over positions
1..P-1) of the unablated model, its 13 head scores from the same forward pass (``recording``), and the
loss with the head's slice of the output projection's input zeroed (SPEC §9: the head's ``O`` at every
position). Examples are encoded as the scorer encodes them (BOS first, truncated to ``max_tokens``).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import polars as pl
import torch
from tqdm.auto import tqdm

from analysis.score_functions import SCORE_KEYS

from .scores import encode_texts, recording


@contextmanager
def zero_head(model, layer: int, head: int) -> Iterator[None]:
    """Zero head ``head`` of layer ``layer``: its slice of the ``o_proj`` input, at every position."""
    attn = model.base_model.layers[layer].self_attn
    H = model.config.num_attention_heads
    if not 0 <= head < H:
        raise ValueError(f"head {head} is outside 0..{H - 1}")

    def pre(mod, args):
        x = args[0]
        D = x.shape[-1] // H
        x = x.clone()
        x[..., head * D:(head + 1) * D] = 0
        return (x,)

    hook = attn.o_proj.register_forward_pre_hook(pre)
    try:
        yield
    finally:
        hook.remove()


def _loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:]))


@torch.inference_mode()
def head_loss_changes(model, tokenizer, examples: Sequence[dict], heads: Sequence[tuple[int, int]], *,
                      prepend_bos: bool = True, max_tokens: int | None = None,
                      progress: bool = True) -> pl.DataFrame:
    """One row per (example, head): ``dataset, example, domain, n_tokens, layer, head, awft, ahon_ln,
    loss_base, loss_ablated, delta_loss`` (losses in nats/token). ``examples``: corpus JSON-lines rows
    (``id, text, domain, corpus, max_tokens``); ``max_tokens`` caps every example's own length."""
    device = next(model.parameters()).device
    rows = []
    for ex in tqdm(examples, desc="head ablation", disable=not progress):
        cap = min(n for n in (ex.get("max_tokens"), max_tokens) if n) if ex.get("max_tokens") or max_tokens else None
        seq = encode_texts(tokenizer, [ex["text"]], prepend_bos=prepend_bos, max_tokens=cap)[0]
        if len(seq) < 2:
            continue
        ids = torch.tensor([seq], device=device)
        with recording(model) as rec:
            base = _loss(model(input_ids=ids, use_cache=False).logits, ids)
        scores = rec.scores()[0]  # (layers, heads, 13)
        for layer, head in heads:
            with zero_head(model, layer, head):
                abl = _loss(model(input_ids=ids, use_cache=False).logits, ids)
            rows.append({"dataset": ex.get("corpus", ""), "example": str(ex["id"]), "domain": ex.get("domain"),
                         "n_tokens": len(seq), "layer": layer, "head": head,
                         "awft": float(scores[layer, head, SCORE_KEYS.index("awft")]),
                         "ahon_ln": float(scores[layer, head, SCORE_KEYS.index("ahon_ln")]),
                         "loss_base": base, "loss_ablated": abl, "delta_loss": abl - base})
    return pl.DataFrame(rows, schema_overrides={"layer": pl.Int32, "head": pl.Int32, "n_tokens": pl.Int32})
