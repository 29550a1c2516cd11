"""Per-example loss change from ablating one attention head, with that head's first-token attention.

For every example and every given (layer, head): the mean next-token loss (nats/token over positions
1..P-1) of the unablated model, its head scores from the same forward pass (``recording``), and the
loss with the head's slice of the output projection's input zeroed (SPEC §9: the head's ``O`` at every
position). With ``mean=True`` also the loss with that slice replaced, at every position, by its mean over
every position of every given example (mean ablation, SPEC §4's option): it keeps the head's average
contribution, so what it costs is the head's example-specific computation only. Examples are encoded as
the scorer encodes them (BOS first, truncated to ``max_tokens``).
"""
from __future__ import annotations

from typing import Sequence

import polars as pl
import torch
from tqdm.auto import tqdm

from analysis.core import tables
from analysis.core.score_functions import score_keys

from extract.engine import hooks
from extract.engine.ablation import head_output_means
from extract.engine.scores import encode_texts, recording


def replace_head(model, layer: int, head: int, value: torch.Tensor | None = None):
    """Set head ``head`` of layer ``layer`` (its ``"z"`` output, the slice of the ``o_proj`` input) to ``value``
    ``(head_dim,)`` at every position; ``None`` zeroes it. A context manager."""
    return hooks.replace_heads(model, {layer: [head]}, value)


def zero_head(model, layer: int, head: int):
    """Zero head ``head`` of layer ``layer``: its ``"z"`` output at every position. A context manager."""
    return hooks.replace_heads(model, {layer: [head]})


def _loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:]))


@torch.inference_mode()
def head_loss_changes(model, tokenizer, examples: Sequence[dict], heads: Sequence[tuple[int, int]], *,
                      prepend_bos: bool = True, max_tokens: int | None = None, mean: bool = False,
                      progress: bool = True) -> pl.DataFrame:
    """One row per (example, head): ``dataset, example, domain, n_tokens, layer, head, awft, ahon_ln,
    loss_base, loss_ablated, delta_loss`` (losses in nats/token; ``mean``: also ``loss_mean_ablated,
    delta_loss_mean``). ``examples``: corpus JSON-lines rows (``id, text, domain, corpus, max_tokens``);
    ``max_tokens`` caps every example's own length."""
    device = next(model.parameters()).device
    runs = []  # base loss and scores per example
    for ex in tqdm(examples, desc="base pass", disable=not progress):
        cap = min(n for n in (ex.get("max_tokens"), max_tokens) if n) if ex.get("max_tokens") or max_tokens else None
        seq = encode_texts(tokenizer, [ex["text"]], prepend_bos=prepend_bos, max_tokens=cap)[0]
        if len(seq) < 2:
            continue
        ids = torch.tensor([seq], device=device)
        with recording(model) as rec:
            base = _loss(model(input_ids=ids, use_cache=False).logits, ids)
        runs.append((ex, ids, base, rec.scores()[0]))  # scores: (layers, heads, n_scores)
    # the sweep's mean ablation (SPEC §4): each head's output averaged over every position of every example
    means = head_output_means(model, [ids[0] for _, ids, _, _ in runs]).float() if mean and runs else None
    rows, keys = [], score_keys()
    for ex, ids, base, scores in tqdm(runs, desc="head ablation", disable=not progress):
        for layer, head in heads:
            with zero_head(model, layer, head):
                abl = _loss(model(input_ids=ids, use_cache=False).logits, ids)
            row = {"dataset": ex.get("corpus", ""), "example": str(ex["id"]), "domain": ex.get("domain"),
                   "n_tokens": ids.shape[1], "layer": layer, "head": head,
                   "awft": float(scores[layer, head, keys.index("awft")]),
                   "ahon_ln": float(scores[layer, head, keys.index("ahon_ln")]),
                   "loss_base": base, "loss_ablated": abl, "delta_loss": abl - base}
            if mean:
                with replace_head(model, layer, head, means[layer, head]):
                    m = _loss(model(input_ids=ids, use_cache=False).logits, ids)
                row |= {"loss_mean_ablated": m, "delta_loss_mean": m - base}
            rows.append(row)
    return pl.DataFrame(rows, schema_overrides=tables.polars_schema("domain_head_ablation", ("layer", "head", "n_tokens")))
