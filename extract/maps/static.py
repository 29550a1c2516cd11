"""MAPS static scores (definitions §8): what each head maps tokens to, read from its parameters alone.

For query head h of layer l, ``M = E' · W_V^h W_O^h · U`` (vocabulary × vocabulary) is never formed. Rows
are taken only for the tokens asked about, in the head's value space: ``z = E'[src] W_V^h`` (``head_dim``),
and the vocabulary is scanned in chunks, per chunk either through ``B = W_O^h U[:, chunk]`` (low rank,
``head_dim × chunk``) or through ``y = z W_O^h`` (d_model), whichever costs fewer multiply-adds for the
layer. Per (row, target) the scan counts the vocabulary entries whose logit is strictly greater (smaller)
than the target's; the target is in the top-k of ``M[src]`` (of ``-M[src]``) iff that count is < k.

Conventions: ``E`` is the model's input-embedding module output (gemma multiplies by sqrt(d_model) there),
``E' = MLP_0(E)`` (the first layer's MLP output only, no norm, no residual) for layers ≥ 1 and ``E`` for
layer 0; ``U`` is ``lm_head.weight`` transposed (``E^T`` for tied embeddings); no LayerNorm, no biases
(qwen2's value bias is ignored); grouped-query attention: query head h reads KV head
``h // (n_heads // n_kv_heads)``. Arithmetic in float32; the target's own logit in float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from analysis.core import tables
from extract.engine.hooks import decoder_layers, text_config
from extract.maps.operations import Operation

CHUNK_ELEMENTS = 1 << 25  # logits per vocabulary chunk (heads × rows × columns), 128 MiB in float32


@torch.no_grad()
def head_weights(model, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query head ``W_V^h`` ``(H, d_model, head_dim)`` (its KV head's slice, no bias) and ``W_O^h``
    ``(H, head_dim, d_model)`` of ``layer``, float32."""
    attn = decoder_layers(model)[layer].self_attn
    cfg = text_config(model)
    H = cfg.num_attention_heads
    KV = getattr(cfg, "num_key_value_heads", None) or H
    hd = attn.o_proj.in_features // H
    d = attn.o_proj.out_features
    wv = attn.v_proj.weight.float().view(KV, hd, d).transpose(1, 2)  # (KV, d, hd)
    wv = wv[torch.arange(H) // (H // KV)]  # GQA: query head h reads KV head h // (H / KV)
    wo = attn.o_proj.weight.float().view(d, H, hd).permute(1, 2, 0)  # (H, hd, d)
    return wv.contiguous(), wo.contiguous()


@torch.no_grad()
def unembedding(model) -> torch.Tensor:
    """``U`` ``(d_model, vocab)`` float32: the output projection, transposed (tied: the embedding matrix)."""
    return model.get_output_embeddings().weight.float().T


@torch.no_grad()
def embedding_inputs(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(E[ids], E'[ids])`` ``(n, d_model)`` float32: the embedding module's output and the first
    layer's MLP applied to it (MLP output only)."""
    emb = model.get_input_embeddings()(ids.to(model.device)).float()
    mlp = decoder_layers(model)[0].mlp
    dtype = next(mlp.parameters()).dtype
    return emb, mlp(emb.to(dtype)).float()


def use_low_rank(H: int, rows: int, head_dim: int, d_model: int) -> bool:
    """True when scanning through ``B = W_O U`` costs fewer multiply-adds per vocabulary column than ``y U``."""
    return H * head_dim * d_model + H * rows * head_dim < H * rows * d_model


@torch.no_grad()
def scan_vocab(z: torch.Tensor, wo: torch.Tensor, U: torch.Tensor, n: int, *, low_rank: bool | None = None,
               progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``n`` largest and ``n`` smallest logits of every row ``M_h[r] = z[h, r] · W_O^h · U``.

    z ``(H, R, head_dim)``, wo ``(H, head_dim, d)``, U ``(d, V)``; the vocabulary is scanned in chunks
    (at most ``CHUNK_ELEMENTS`` logits at a time). Returns ``(top_values, top_ids, bottom_values,
    bottom_ids)``, each ``(H, R, n)``, values float32 in descending / ascending order.
    """
    H, R, hd = z.shape
    d, V = U.shape
    z = z.float()
    low_rank = use_low_rank(H, R, hd, d) if low_rank is None else low_rank
    y = None if low_rank else torch.bmm(z, wo)  # (H, R, d)
    n = min(n, V)
    top_v = bot_v = torch.empty(H, R, 0, device=z.device)
    top_i = bot_i = torch.empty(H, R, 0, dtype=torch.long, device=z.device)
    chunk = max(256, CHUNK_ELEMENTS // max(1, H * R))
    for c0 in tqdm(range(0, V, chunk), desc="vocabulary", leave=False, disable=not progress):
        Uc = U[:, c0:c0 + chunk]
        s = torch.bmm(z, torch.matmul(wo, Uc)) if low_rank else torch.matmul(y, Uc)  # (H, R, c)
        m = min(n, s.shape[2])
        for largest in (True, False):
            v, i = s.topk(m, dim=-1, largest=largest)
            pv, pi = (top_v, top_i) if largest else (bot_v, bot_i)
            v, i = torch.cat([pv, v], -1), torch.cat([pi, i + c0], -1)
            v, sel = v.topk(min(n, v.shape[-1]), dim=-1, largest=largest)
            if largest:
                top_v, top_i = v, i.gather(-1, sel)
            else:
                bot_v, bot_i = v, i.gather(-1, sel)
    return top_v, top_i, bot_v, bot_i


@torch.no_grad()
def target_logits(z: torch.Tensor, wo: torch.Tensor, U: torch.Tensor, rows: torch.Tensor,
                  targets: torch.Tensor) -> torch.Tensor:
    """``M_h[rows[p], targets[p]]`` ``(H, P)`` in float64; z ``(H, R, hd)``, rows/targets ``(P,)`` long."""
    y = torch.bmm(z[:, rows].double(), wo.double())  # (H, P, d)
    return (y * U.T[targets].double()).sum(-1)


def in_top_k(values: torch.Tensor, ids: torch.Tensor, target: torch.Tensor, logit: torch.Tensor,
             k: torch.Tensor, largest: bool = True) -> torch.Tensor:
    """Whether fewer than ``k`` tokens other than ``target`` have a logit strictly greater (``largest``)
    or strictly smaller than ``logit``. values/ids ``(..., n)``: a row's n extreme logits (n > max k),
    target/logit/k ``(...)``. Ties with the target count in its favour."""
    other = torch.where(ids == target[..., None], torch.tensor(-torch.inf if largest else torch.inf), values)
    other = other.sort(-1, descending=largest).values
    kth = other.gather(-1, (k - 1).clamp_min(0)[..., None]).squeeze(-1)
    return kth <= logit if largest else kth >= logit


@dataclass
class StaticResult:
    scores: pl.DataFrame  # model, layer, head, operation, category, k, score, suppression_score, n_pairs
    salient: pl.DataFrame  # model, layer, head, rank, token_id, token, saliency, top_targets
    extra_hit: torch.Tensor | None = None  # (L, H, Rx) bool: target of each extra row in its top-k


def _pairs_index(ops: list[Operation]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Unique source ids, per pair its row in them, its target id, and the op boundaries (offsets)."""
    src = [s for o in ops for s in o.src]
    uniq = sorted(set(src))
    pos = {s: i for i, s in enumerate(uniq)}
    offsets = list(np.cumsum([0] + [len(o.src) for o in ops]))
    rows = torch.tensor([pos[s] for s in src], dtype=torch.long)
    tgts = torch.tensor([t for o in ops for t in o.tgt], dtype=torch.long)
    return torch.tensor(uniq, dtype=torch.long), rows, tgts, offsets


def word_like(tok, limit: int | None) -> torch.Tensor:
    """Candidate tokens for saliency: the first ``limit`` ids (None: all) that are a whole word of two or
    more ASCII letters with a leading space, i.e. ``tok(" " + word) == [id]`` (skips byte pieces, word
    fragments, unused and special tokens)."""
    from extract.maps.operations import single_token

    keep = []
    for i in range(len(tok)):
        word = tok.decode([i]).strip()
        if len(word) >= 2 and word.isascii() and word.isalpha() and single_token(tok, word) == i:
            keep.append(i)
            if limit is not None and len(keep) >= limit:
                break
    return torch.tensor(keep, dtype=torch.long)


@torch.no_grad()
def static_scores(model, tok, ops: list[Operation], *, model_name: str, salient_vocab: int | None = 4096,
                  salient_tokens: int = 5, salient_targets: int = 5, layers: list[int] | None = None,
                  extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                  inputs: str = "mlp", progress: bool = True) -> StaticResult:
    """Static and suppression scores of every head for every operation, and each head's salient tokens.

    Saliency of token t for head h: ``‖e'_t W_V^h W_O^h‖ / ‖e'_t‖`` over the word-like candidates
    (:func:`word_like`); the ``salient_tokens`` most salient ones are stored with their
    ``salient_targets`` top tokens through U. ``extra = (z (L, H, Rx, head_dim), targets (Rx,), k (Rx,))``:
    more rows in value space (the dynamic check's head outputs) scanned in the same vocabulary pass.
    ``inputs``: "mlp" (definitions §8: ``E' = MLP_0(E)`` for layers ≥ 1) or "raw" (a named deviation: ``E`` for
    every layer).
    """
    if inputs not in ("mlp", "raw"):
        raise ValueError(f"inputs must be 'mlp' (definitions §8) or 'raw', got {inputs!r}")
    cfg = text_config(model)
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    U = unembedding(model)
    dev = U.device
    src, rows, tgts, offsets = _pairs_index(ops)
    rows, tgts = rows.to(dev), tgts.to(dev)
    kvec = torch.tensor([o.k for o in ops for _ in o.src], device=dev)
    raw, mlp = embedding_inputs(model, src)
    cand = word_like(tok, salient_vocab)
    c_raw, c_mlp = embedding_inputs(model, cand)
    score_rows, sal_rows = [], []
    extra_hit = None if extra is None else torch.zeros(extra[0].shape[:3], dtype=torch.bool)
    kmax = int(max(kvec.max(), extra[2].max() if extra is not None else 0))
    for layer in tqdm(layers if layers is not None else range(L), desc=f"MAPS static {model_name}",
                      disable=not progress):
        wv, wo = head_weights(model, layer)
        x, cx = (raw, c_raw) if layer == 0 or inputs == "raw" else (mlp, c_mlp)
        z = torch.matmul(x, wv)  # (H, R, hd)
        # saliency ‖x W_V W_O‖ / ‖x‖ of the candidates via the (hd × hd) Gram matrix of W_O^h
        cz = torch.matmul(cx, wv)  # (H, C, hd)
        gram = torch.bmm(wo, wo.transpose(1, 2))
        sal = (torch.matmul(cz, gram) * cz).sum(-1).clamp_min(0).sqrt() / cx.norm(dim=-1).clamp_min(1e-30)
        sv, si = sal.topk(min(salient_tokens, sal.shape[1]), dim=-1)  # (H, n); n = 0 without candidates
        zs = torch.gather(cz, 1, si[..., None].expand(-1, -1, cz.shape[-1]))
        zx = extra[0][layer].to(dev) if extra is not None else z[:, :0]
        zall = torch.cat([z, zx, zs], 1)
        n = max(kmax + 1, salient_targets)
        tv, ti, bv, bi = scan_vocab(zall, wo, U, n)
        st = target_logits(z, wo, U, rows, tgts).float()  # (H, P)
        r = rows.expand(H, -1)
        pick = lambda x: x.gather(1, r[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
        t, k = tgts.expand(H, -1), kvec.expand(H, -1)
        hit = in_top_k(pick(tv), pick(ti), t, st, k).double().cpu()
        supp = in_top_k(pick(bv), pick(bi), t, st, k, largest=False).double().cpu()
        if extra is not None:
            R0, Rx = z.shape[1], zx.shape[1]
            xtg, xk = extra[1].to(dev), extra[2].to(dev)
            xt = target_logits(zx, wo, U, torch.arange(Rx, device=dev), xtg).float()
            extra_hit[layer] = in_top_k(tv[:, R0:R0 + Rx], ti[:, R0:R0 + Rx], xtg.expand(H, -1), xt,
                                        xk.expand(H, -1)).cpu()
        for h in range(H):
            for o, a, b in zip(ops, offsets[:-1], offsets[1:]):
                score_rows.append((model_name, layer, h, o.name, o.category, o.k, float(hit[h, a:b].mean()),
                                   float(supp[h, a:b].mean()), b - a))
            tops = ti[h, zall.shape[1] - zs.shape[1]:, :salient_targets].cpu()
            for r in range(si.shape[1]):
                tid = int(cand[int(si[h, r])])
                sal_rows.append((model_name, layer, h, r + 1, tid, tok.decode([tid]), float(sv[h, r]),
                                 "|".join(tok.decode([int(t)]) for t in tops[r])))
    scores = pl.DataFrame(score_rows, orient="row", schema=tables.polars_schema("maps_scores"))
    salient = pl.DataFrame(sal_rows, orient="row", schema=tables.polars_schema("maps_salient"))
    return StaticResult(scores, salient, extra_hit)
