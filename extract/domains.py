"""Per-example loss change from ablating one attention head, with that head's first-token attention.

For every example and every given (layer, head): the mean next-token loss (nats/token over positions
1..P-1) of the unablated model, its head scores from the same forward pass (``recording``), and the
loss with the head's slice of the output projection's input zeroed (definitions §9: the head's ``O`` at every
position). With ``mean=True`` also the loss with that slice replaced, at every position, by its mean over
every position of every given example (mean ablation, definitions §4's option): it keeps the head's average
contribution, so what it costs is the head's example-specific computation only. Examples are encoded as
the scorer encodes them (BOS first, truncated to ``max_tokens``).

:func:`ablate` is one ``dormant domains ablate`` run: a model's top candidates from the candidate table, the
corpus files, one Parquet file; its settings are :class:`DomainAblationSettings` (the config's
``mechanism.domains`` run settings, with ``scoring.prepend_bos``). Torch is imported only when a function runs,
so the settings (and the command line built from them) stay cheap.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import polars as pl
from tqdm.auto import tqdm

from analysis.core import tables
from analysis.core.score_functions import score_keys
from analysis.core.settings import setting
from extract.score import read_examples


@dataclass(frozen=True)
class DomainAblationSettings:
    """How :func:`ablate` ablates a model's candidate heads (``mechanism.domains``: ``heads``, ``limit``,
    ``max_tokens``, ``mean_ablation``; ``prepend_bos`` is ``scoring.prepend_bos``). 0 means "all" / "none" as
    in config/schema.yaml."""

    heads: int = setting(2, "top candidate heads zeroed, one at a time")
    limit: int = setting(0, "examples per corpus (0: all)")
    max_tokens: int = setting(0, "also truncate every example to this many tokens (0: no extra truncation)")
    mean_ablation: bool = setting(False, "also mean-ablate each head (its output set to its mean over every "
                                          "position of every example)")
    prepend_bos: bool = setting(True, "prepend the tokenizer's BOS token, as the scorer does")


def _inference_mode(fn):
    """``torch.inference_mode()`` as a decorator that imports torch only when ``fn`` runs."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch

        with torch.inference_mode():
            return fn(*args, **kwargs)
    return wrapper


def replace_head(model, layer: int, head: int, value: torch.Tensor | None = None):
    """Set head ``head`` of layer ``layer`` (its ``"z"`` output, the slice of the ``o_proj`` input) to ``value``
    ``(head_dim,)`` at every position; ``None`` zeroes it. A context manager."""
    from extract.engine import hooks

    return hooks.replace_heads(model, {layer: [head]}, value)


def zero_head(model, layer: int, head: int):
    """Zero head ``head`` of layer ``layer``: its ``"z"`` output at every position. A context manager."""
    from extract.engine import hooks

    return hooks.replace_heads(model, {layer: [head]})


def _loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    import torch

    return float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:]))


@_inference_mode
def head_loss_changes(model, tokenizer, examples: Sequence[dict], heads: Sequence[tuple[int, int]], *,
                      prepend_bos: bool = True, max_tokens: int | None = None, mean: bool = False,
                      progress: bool = True) -> pl.DataFrame:
    """One row per (example, head): ``dataset, example, domain, n_tokens, layer, head, awft, ahon_ln,
    loss_base, loss_ablated, delta_loss`` (losses in nats/token; ``mean``: also ``loss_mean_ablated,
    delta_loss_mean``). ``examples``: corpus JSON-lines rows (``id, text, domain, corpus, max_tokens``);
    ``max_tokens`` caps every example's own length."""
    import torch

    from extract.engine.ablation import head_output_means
    from extract.engine.scores import encode_texts, recording

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
    # the sweep's mean ablation (definitions §4): each head's output averaged over every position of every example
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
    ints = tables.polars_schema("domain_head_ablation", ("layer", "head", "n_tokens"))
    return pl.DataFrame(rows, schema_overrides=ints)


def ablate(model_name: str, candidates: str | Path, data: Sequence[str | Path], out: str | Path,
           settings: DomainAblationSettings = DomainAblationSettings(), *, dtype: str = "float32",
           device: str = "cpu", progress: bool = True) -> list[Path]:
    """Zero (and with ``mean_ablation`` mean-ablate) each of ``model_name``'s top ``heads`` candidates of the
    candidate table ``candidates`` on the examples of the corpus JSON-lines files ``data`` (the first ``limit``
    per corpus); writes :func:`head_loss_changes`'s rows, with the model id first, to ``out`` and returns
    ``[out]``."""
    import torch

    from analysis.core.io import write_parquet
    from extract.errors import DormantError
    from extract.models.load import load_model, model_info

    s = settings
    cands = pl.read_parquet(candidates).sort("rank")
    model, tok = load_model(model_name, dtype=getattr(torch, dtype), device=device)
    name = model_info(model)["model"]
    mine = cands.filter(pl.col("model") == name).head(s.heads)
    if mine.is_empty():
        raise DormantError(f"{candidates} has no candidate heads for {name!r}; run `dormant domains candidates` "
                           "on a database that holds its scores")
    heads = list(zip(mine["layer"].to_list(), mine["head"].to_list()))
    examples = [ex for f in data for ex in read_examples(f)]  # a bad line: an error naming file:line
    if s.limit:
        by_corpus: dict[str, list[dict]] = {}
        for ex in examples:
            by_corpus.setdefault(ex.get("corpus", ""), []).append(ex)
        examples = [ex for group in by_corpus.values() for ex in group[: s.limit]]
    t0 = time.perf_counter()
    df = head_loss_changes(model, tok, examples, heads, prepend_bos=s.prepend_bos, max_tokens=s.max_tokens or None,
                           mean=s.mean_ablation, progress=progress)
    df = df.with_columns(pl.lit(name).alias("model")).select("model", *[c for c in df.columns if c != "model"])
    path = write_parquet(df, out)
    print(f"{name}: heads {', '.join(f'L{l}H{h}' for l, h in heads)} zeroed{' and mean-ablated' * s.mean_ablation} "
          f"on {len(examples)} examples ({time.perf_counter() - t0:.0f} s) -> {path}")
    return [path]
