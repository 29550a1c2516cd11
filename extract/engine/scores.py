"""Per-head, per-example scores (definitions §2) as a by-product of one forward pass.

``score_heads(model, sequences)`` runs the decoder stack (no LM head) under a capture session and turns
the raw stats of every (example, layer, head) into the registered scores (``score_functions``: the 16 of
definitions §2, plus any user-registered). Sequences are sorted by length, batched under a token budget and
right-padded; padding never changes a score.

BOS: the ``awft``/``ftvvn`` scores look at position 0, which is meant to be the BOS token. Token-id
sequences are scored as given (a warning names the sequences not starting with the model's BOS id);
:func:`score_texts` prepends the tokenizer's BOS by default (``prepend_bos=True``), because the paper's
models all see a BOS first and the first-token scores are only comparable across models that way.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from analysis.core.score_functions import RAW_STATS, SCORE_FUNCTIONS, ScoreFunction, score_keys, stats_by_key
from extract.engine import attention, capture, hooks
from extract.errors import InputError


def _ratio(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return torch.where((x == 0) & (d == 0), torch.ones_like(x), x / d)


def _score(by_stat: dict[str, torch.Tensor], fn: ScoreFunction) -> torch.Tensor:
    x = by_stat[fn.stat]
    if fn.normalisation == "none":
        return x
    d = by_stat[fn.norm_stat]
    if fn.normalisation == "layer":  # mean over the heads of the same layer and example
        d = d.mean(-1, keepdim=True).expand_as(x)
    return _ratio(x, d)


def score_from_stats(stats: torch.Tensor, fn: ScoreFunction) -> torch.Tensor:
    """Raw stats ``(..., heads, n_stats)`` -> the score ``fn`` ``(..., heads)`` float64 (see :class:`ScoreFunction`)."""
    return _score(stats_by_key(stats.double().unbind(-1)), fn)


def scores_from_stats(stats: torch.Tensor) -> torch.Tensor:
    """Raw stats ``(..., heads, n_stats)`` -> every registered score ``(..., heads, n_scores)``, ``score_keys()`` order.

    Normalised scores divide by a layer mean (over the heads of the same layer and example) or by another
    stat of the same head; a ratio 0/0 (e.g. every head of the layer exactly zero) is defined as 1.0.
    """
    by_stat = stats_by_key(stats.double().unbind(-1))
    return torch.stack([_score(by_stat, fn) for fn in SCORE_FUNCTIONS.values()], -1)


def _ids(i: int, s) -> list[int]:
    """Sequence ``i`` as a list of ints; a float, bool or str sequence is an error (never cast silently)."""
    if isinstance(s, str):
        raise InputError(f"sequence {i} is a str, not token ids; score texts with score_texts(model, tokenizer, "
                         "texts)")
    if isinstance(s, (int, np.integer)):
        raise InputError(f"sequence {i} is the single int {s}; pass a list of token-id sequences ([ids], not ids)")
    if isinstance(s, (torch.Tensor, np.ndarray)):
        integer = (not s.dtype.is_floating_point and not s.dtype.is_complex and s.dtype != torch.bool
                   if isinstance(s, torch.Tensor) else np.issubdtype(s.dtype, np.integer))
        if not integer:
            raise InputError(f"sequence {i} has dtype {s.dtype}; token ids must be integers: pass the tokenizer's "
                             "input_ids (e.g. torch.long), not embeddings, logits or a mask")
        if s.ndim != 1:
            raise InputError(f"sequence {i} has shape {tuple(s.shape)}; each sequence is 1-D (iterate the rows "
                             "of a batch, or drop padding first)")
        return [int(t) for t in s.tolist()]
    try:
        ids = list(s)
    except TypeError:
        raise InputError(f"sequence {i} is a {type(s).__name__}, not a sequence of token ids; pass lists of ints "
                         "or 1-D integer tensors") from None
    bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, (int, np.integer))), None)
    if bad is not None:
        raise InputError(f"sequence {i} holds {type(bad).__name__} {bad!r}; token ids must be ints: pass the "
                         "tokenizer's input_ids, not embeddings, logits or a mask")
    return [int(t) for t in ids]


def context_length(model) -> int | None:
    """The model's trained context (``max_position_embeddings``), None when its config has none."""
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = getattr(text, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def beyond_context(model, seqs: Sequence[Sequence[int]]) -> list[bool]:
    """Per sequence: longer than the model's trained context (scored anyway, with a warning)."""
    n = context_length(model)
    return [n is not None and len(s) > n for s in seqs]


def check_sequences(model, sequences: Sequence) -> list[list[int]]:
    """``sequences`` as lists of token ids, checked against ``model`` before any forward pass.

    Errors (:class:`InputError`, one line naming the fix): a sequence shorter than 2 tokens, float/bool/str
    sequences (never cast to ids), ids outside the model's vocabulary. A warning: sequences longer than the
    trained context (``max_position_embeddings``) are scored, and :func:`beyond_context` flags them.
    """
    if isinstance(sequences, str) or getattr(sequences, "ndim", 2) < 2:
        raise InputError("sequences must be a list of token-id sequences; wrap one sequence in a list ([ids]), "
                         "or score texts with score_texts(model, tokenizer, texts)")
    out = []
    for i, s in enumerate(sequences):
        ids = _ids(i, s)
        if len(ids) < 2:
            raise InputError(f"sequence {i} has {len(ids)} token(s); head scores need at least 2 "
                             "(a one-token row has no attention choice: drop it or give more text)")
        out.append(ids)
    vocab = model.get_input_embeddings().num_embeddings
    for i, ids in enumerate(out):
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= vocab:
            raise InputError(f"sequence {i} holds token id {lo if lo < 0 else hi}, outside this model's vocabulary "
                             f"(0..{vocab - 1}); encode the text with this model's own tokenizer")
    long = [i for i, b in enumerate(beyond_context(model, out)) if b]
    if long:
        warnings.warn(f"{len(long)} of {len(out)} sequences are longer than the model's trained context "
                      f"({context_length(model)} tokens; first: #{long[0]}, {len(out[long[0]])} tokens); scored "
                      "anyway, flagged per example as beyond_context", stacklevel=4)
    return out


def batches(lengths: Sequence[int], batch_tokens: int, overhead: int = 64) -> list[list[int]]:
    """Indices grouped longest-first into batches with ``len(batch) * longest <= batch_tokens`` (at least
    one each) that minimise the padded tokens plus ``overhead`` tokens per forward pass.

    Groups are contiguous runs of the length-sorted order, chosen by dynamic programming (O(n²)): packing
    greedily up to the budget pads short prompts to the longest one (+68% tokens on the default suite).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of batching order[:j]
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):  # last group order[i:j], its longest is order[i]
            longest = lengths[order[i]]
            if i < j - 1 and (j - i) * longest > batch_tokens:
                break
            cost = best[i] + (j - i) * longest + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[list[int]] = []
    j = n
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def pad_id(model, tokenizer=None) -> int:
    """Token id used for padding: the model's ``pad_token_id``, else the tokenizer's, else 0 (padded
    positions are masked, so any valid id works)."""
    for pad in (getattr(model.config, "pad_token_id", None), getattr(tokenizer, "pad_token_id", None)):
        if isinstance(pad, int):
            return pad
    return 0


def pad_right(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` both ``(B, max_len)``, padding on the right."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    am = torch.zeros((len(seqs), n), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        am[b, : len(s)] = 1
    return ids.to(device), am.to(device)


def raw_head_stats(model, sequences: Sequence, *, batch_tokens: int = 8192, chunk_size: int = 256,
                   progress: bool = False) -> torch.Tensor:
    """Raw stats ``(examples, layers, heads, n_stats)`` float64 (``RAW_STATS`` order), in input order."""
    seqs = check_sequences(model, sequences)
    attention.use(model)
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    if not seqs:  # nothing to score: an empty result of the right shape
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        return torch.empty((0, n_layers, text.num_attention_heads, len(RAW_STATS)), dtype=torch.float64)
    bos = getattr(cfg, "bos_token_id", None)
    no_bos = [i for i, s in enumerate(seqs) if bos is not None and s[0] != bos]
    if no_bos:
        warnings.warn(f"{len(no_bos)} of {len(seqs)} sequences do not start with BOS id {bos} "
                      f"(first: #{no_bos[0]}); first-token scores then refer to their first token", stacklevel=3)
    pad = pad_id(model)
    device = next(model.parameters()).device
    result: torch.Tensor | None = None
    groups = batches([len(s) for s in seqs], batch_tokens)
    bar = tqdm(total=sum(len(s) for s in seqs), unit="tok", desc="scoring", disable=not progress)
    for idx in groups:
        ids, am = pad_right([seqs[i] for i in idx], pad, device)
        cap = capture.Capture.nested(chunk_size=chunk_size)
        with capture.capturing(cap), torch.inference_mode():
            hooks.decoder(model)(input_ids=ids, attention_mask=am, use_cache=False)
            stats = cap.stacked_stats()
        if stats.shape[1] != n_layers:
            raise RuntimeError(f"captured {stats.shape[1]} of {n_layers} layers: this model's attention does "
                               "not go through the registered function")
        if result is None:
            result = torch.empty((len(seqs),) + tuple(stats.shape[1:]), dtype=torch.float64)
        result[idx] = stats
        bar.update(sum(len(seqs[i]) for i in idx))
    bar.close()
    return result


def score_heads(model, sequences: Sequence, *, batch_tokens: int = 8192, chunk_size: int = 256,
                progress: bool = False) -> pl.DataFrame:
    """Every registered score for every (example, layer, head).

    sequences: token-id sequences (lists of ints or 1-D integer tensors) of any lengths >= 2, checked before
    any forward (:func:`check_sequences`: a clear :class:`InputError` for float ids, ids outside the
    vocabulary, a sequence shorter than 2; a warning for sequences beyond the trained context). No
    sequences: an empty frame with the same columns and dtypes.
    batch_tokens: padded tokens per forward pass (memory budget). chunk_size: query chunk of the
    portable kernel. Returns one row per (example, layer, head): ``example`` (index into
    ``sequences``), ``layer``, ``head``, then ``score_keys()`` as float64.
    """
    stats = raw_head_stats(model, sequences, batch_tokens=batch_tokens, chunk_size=chunk_size, progress=progress)
    return scores_frame(scores_from_stats(stats).numpy())


def scores_frame(scores: np.ndarray) -> pl.DataFrame:
    """``(examples, layers, heads, n_scores)`` array -> the long frame of :func:`score_heads`."""
    E, L, H, _ = scores.shape
    ex, la, he = np.meshgrid(np.arange(E), np.arange(L), np.arange(H), indexing="ij")
    cols = {"example": ex.ravel().astype(np.int64), "layer": la.ravel().astype(np.int32),
            "head": he.ravel().astype(np.int32)}
    keys = score_keys()
    flat = scores.reshape(-1, len(keys))
    cols.update({k: flat[:, j].astype(np.float64) for j, k in enumerate(keys)})
    return pl.DataFrame(cols)


def encode_texts(tokenizer, texts: Sequence[str], *, prepend_bos: bool = True,
                 max_tokens: int | None = None) -> list[list[int]]:
    """Token ids of ``texts`` (BOS first when ``prepend_bos`` and the tokenizer has one)."""
    out = []
    for i, t in enumerate(texts):
        if not t or not t.strip():
            raise ValueError(f"text {i} is empty; remove it or give it content")
        ids = tokenizer(t, add_special_tokens=False)["input_ids"]
        if prepend_bos and tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id] + ids
        out.append(ids[:max_tokens] if max_tokens else ids)
    return out


def score_texts(model, tokenizer, texts: Sequence[str], *, prepend_bos: bool = True,
                max_tokens: int | None = None, **options) -> pl.DataFrame:
    """:func:`score_heads` on texts encoded with ``tokenizer`` (see :func:`encode_texts`)."""
    return score_heads(model, encode_texts(tokenizer, texts, prepend_bos=prepend_bos, max_tokens=max_tokens),
                       **options)


class Recording:
    """What :func:`recording` yields: the head scores of every forward pass run inside the block."""

    def __init__(self, cap: capture.Capture):
        self._cap = cap

    def raw_stats(self) -> torch.Tensor:
        """``(examples, layers, heads, n_stats)`` float64, forward passes concatenated in call order."""
        parts = self._cap.all_stats()
        if not parts:
            raise RuntimeError("no forward pass ran inside recording()")
        return torch.cat(parts, 0)

    def scores(self) -> torch.Tensor:
        """``(examples, layers, heads, n_scores)`` float64 in ``score_keys()`` order."""
        return scores_from_stats(self.raw_stats())

    def frame(self) -> pl.DataFrame:
        """The long frame of :func:`score_heads` (``example`` = row in call order)."""
        return scores_frame(self.scores().numpy())


@contextmanager
def recording(model, *, chunk_size: int = 256) -> Iterator[Recording]:
    """Record the scores of every head in every full forward pass run inside the block.

    For calibration: run the evaluation as usual (any forward of ``model`` or its decoder, padded
    batches included) and read ``rec.scores()`` afterwards; rows follow the batches in call order.
    Right or left padding is recognised from the attention mask (left padding needs the usual
    ``position_ids``, as for any HF model). Inside :func:`ablate` the
    ablation keeps applying.
    """
    attention.use(model)
    cap = capture.Capture.nested(chunk_size=chunk_size, keep_stats=True)
    with capture.capturing(cap):
        yield Recording(cap)
