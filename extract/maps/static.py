"""MAPS static scores (definitions §8): what each head maps tokens to, read from its parameters alone.

For query head h of layer l, ``M = E' · W_V^h W_O^h · U`` (vocabulary × vocabulary) is never formed. Rows
are taken only for the tokens asked about, in the head's value space: ``z = E'[src] W_V^h`` (``head_dim``).
Whether a pair's target is in the top-k of its row (of ``-M`` for suppression) is decided by counting the
other vocabulary entries whose logit is strictly greater (smaller) than the target's (:func:`top_k_tests`):
the vocabulary is visited in a fixed random order and a row is dropped as soon as k others beat its target,
so most rows never see the whole vocabulary and the answer is still exact.

Conventions (the reference's weight processing, :mod:`extract.maps.folding`): ``W_V^h`` with layer l's
input-norm weight folded in (``diag(γ_in^l) W_V``), ``U = diag(γ_final) W_U`` (``W_U`` = ``lm_head.weight``
transposed, ``E^T`` for tied embeddings; applied here as ``W_O^h diag(γ_final)`` times ``W_U``), ``E`` the
input-embedding module's output (gemma multiplies by sqrt(d_model) there) and ``E'`` one of the choices of
:data:`extract.maps.folding.INPUTS` for layers ≥ 1 (``E`` for layer 0). No biases (qwen2's value bias is
ignored); grouped-query attention: query head h reads KV head ``h // (n_heads // n_kv_heads)``. Arithmetic
in float32; the target's own logit in float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from analysis.core import tables
from extract.engine.hooks import decoder_layers, text_config
from extract.maps.folding import embedding_inputs, final_norm, fold, input_norm, norm_scale
from extract.maps.operations import Operation
from extract.maps.run import check_inputs

CHUNK_ELEMENTS = 1 << 25  # logits per vocabulary chunk (heads × rows × columns), 128 MiB in float32
FIRST_COLUMNS = 2048  # vocabulary columns every row is tested on first (through the low-rank W_O U)


@torch.no_grad()
def head_weights(model, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query head ``diag(γ_in) W_V^h`` ``(H, d_model, head_dim)`` (its KV head's slice, no bias, the
    layer's input-norm weight folded in) and ``W_O^h`` ``(H, head_dim, d_model)`` of ``layer``, float32."""
    block = decoder_layers(model)[layer]
    attn = block.self_attn
    cfg = text_config(model)
    H = cfg.num_attention_heads
    KV = getattr(cfg, "num_key_value_heads", None) or H
    hd = attn.o_proj.in_features // H
    d = attn.o_proj.out_features
    wv = attn.v_proj.weight.float().view(KV, hd, d).transpose(1, 2)  # (KV, d, hd)
    wv = fold(norm_scale(input_norm(block), d), wv[torch.arange(H) // (H // KV)])  # GQA: h reads KV h // (H/KV)
    wo = attn.o_proj.weight.float().view(d, H, hd).permute(1, 2, 0)  # (H, hd, d)
    return wv.contiguous(), wo.contiguous()


@torch.no_grad()
def unembedding(model) -> torch.Tensor:
    """``W_U`` ``(d_model, vocab)`` float32: the output projection, transposed (tied: the embedding matrix),
    without the final norm's weight (see :func:`final_scale`)."""
    return model.get_output_embeddings().weight.float().T


def final_scale(model) -> torch.Tensor:
    """``γ_final`` ``(d_model,)``: the final norm's per-channel factor, ``U = diag(γ_final) W_U``."""
    return norm_scale(final_norm(model), text_config(model).hidden_size)


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
    H, d = z.shape[0], wo.shape[2]
    step = max(1, CHUNK_ELEMENTS // (4 * H * d))
    wd = wo.double()
    out = [(torch.bmm(z[:, rows[p:p + step]].double(), wd) * U.T[targets[p:p + step]].double()).sum(-1)
           for p in range(0, len(rows), step)]
    return torch.cat(out, 1) if out else torch.zeros(H, 0, dtype=torch.float64, device=z.device)


def _count(s: torch.Tensor, cols: torch.Tensor, target: torch.Tensor, logit: torch.Tensor):
    """Per row: columns other than its target with a logit strictly greater / strictly smaller than its
    target's. s ``(..., c)`` logits of ``cols`` ``(c,)``; target, logit ``(...)``."""
    other = cols != target[..., None]
    return ((s > logit[..., None]) & other).sum(-1), ((s < logit[..., None]) & other).sum(-1)


@torch.no_grad()
def top_k_tests(z: torch.Tensor, wo: torch.Tensor, U: torch.Tensor, targets: torch.Tensor, k: torch.Tensor,
                suppression: torch.Tensor, first: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether the target is in the top-k of row ``M_h[p] = z[h, p] · W_O^h · U`` (fewer than ``k[p]`` other
    tokens with a strictly greater logit; ties count in its favour) and in the top-k of ``-M_h[p]``.

    z ``(H, P, hd)``, wo ``(H, hd, d)``, U ``(d, V)``, targets / k / suppression ``(P,)`` (suppression: whether
    row p needs its ``-M`` answer too; False there reads False). Exact: the vocabulary is visited in a seeded
    random order, its first ``first`` (default :data:`FIRST_COLUMNS`) columns for every row through ``W_O^h U[:, cols]``, the rest in chunks
    through ``y = z W_O`` for the rows still undecided only; a row is decided once ``k`` others beat its target
    (on both sides where it needs both). Returns two ``(H, P)`` bool tensors.
    """
    H, P, hd = z.shape
    d, V = U.shape
    dev = U.device
    z = z.float()
    logit = target_logits(z, wo, U, torch.arange(P, device=dev), targets).float()  # (H, P)
    order = torch.randperm(V, generator=torch.Generator().manual_seed(0)).to(dev)
    first = min(FIRST_COLUMNS if first is None else first, V)
    greater = torch.zeros(H, P, dtype=torch.long, device=dev)
    smaller = torch.zeros_like(greater)
    cols = order[:first]
    B = torch.matmul(wo, U[:, cols])  # (H, hd, first)
    step = max(1, CHUNK_ELEMENTS // max(1, H * first))
    for p0 in range(0, P, step):
        sl = slice(p0, p0 + step)
        g, s = _count(torch.bmm(z[:, sl], B), cols, targets[sl].expand(H, -1), logit[:, sl])
        greater[:, sl], smaller[:, sl] = g, s
    kk, need = k.expand(H, -1), suppression.expand(H, -1)
    hh, pp = ((greater < kk) | (need & (smaller < kk))).nonzero(as_tuple=True)
    if len(hh) and first < V:
        y = torch.empty(len(hh), d, device=dev)
        for h in hh.unique().tolist():
            m = hh == h
            y[m] = torch.matmul(z[h, pp[m]], wo[h])
        idx = torch.arange(len(hh), device=dev)
        tgt, lg, kq, nq = targets[pp], logit[hh, pp], k[pp], suppression[pp]
        g, s = greater[hh, pp], smaller[hh, pp]
        c0 = first
        while c0 < V and len(idx):
            c = max(256, min(CHUNK_ELEMENTS // len(idx), CHUNK_ELEMENTS // d))
            cols = order[c0:c0 + c]
            dg, ds = _count(torch.matmul(y, U[:, cols]), cols, tgt, lg)
            g[idx] += dg
            s[idx] += ds
            c0 += c
            live = (g[idx] < kq) | (nq & (s[idx] < kq))
            idx, y, tgt, lg, kq, nq = idx[live], y[live], tgt[live], lg[live], kq[live], nq[live]
        greater[hh, pp], smaller[hh, pp] = g, s
    return greater < kk, need & (smaller < kk)


@dataclass
class StaticResult:
    scores: pl.DataFrame  # model, inputs, layer, head, operation, category, k, score, suppression_score, n_pairs
    salient: pl.DataFrame  # model, layer, head, rank, token_id, token, saliency, top_targets (first E' choice)
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
def static_scores(model, tok, ops: list[Operation], *, model_name: str, inputs=("reference",),
                  salient_vocab: int | None = 4096, salient_tokens: int = 5, salient_targets: int = 5,
                  layers: list[int] | None = None, extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                  progress: bool = True) -> StaticResult:
    """Static and suppression scores of every head for every operation under each E' choice of ``inputs``
    (:data:`extract.maps.folding.INPUTS`), and each head's salient tokens under the first choice.

    Saliency of token t for head h: ``‖e'_t W_V^h W_O^h‖ / ‖e'_t‖`` over the word-like candidates
    (:func:`word_like`); the ``salient_tokens`` most salient ones are stored with their ``salient_targets``
    top tokens through U. ``extra = (z (L, H, Rx, head_dim), targets (Rx,), k (Rx,))``: more rows in value
    space (the dynamic check's head outputs), tested in the same pass; they do not depend on E'.
    """
    choices = check_inputs(inputs)
    cfg = text_config(model)
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    U = unembedding(model)
    dev = U.device
    g_final = final_scale(model)
    src, rows, tgts, offsets = _pairs_index(ops)
    rows, tgts = rows.to(dev), tgts.to(dev)
    kvec = torch.tensor([o.k for o in ops for _ in o.src], device=dev)
    raw, xs = embedding_inputs(model, src, choices)
    xs["raw"] = raw  # layer 0 reads E under every choice
    cand = word_like(tok, salient_vocab)
    c_raw, cxs = embedding_inputs(model, cand, choices[:1])
    score_rows, sal_rows = [], []
    extra_hit = None if extra is None else torch.zeros(extra[0].shape[:3], dtype=torch.bool)
    for layer in tqdm(layers if layers is not None else range(L), desc=f"MAPS static {model_name}",
                      disable=not progress):
        wv, wo = head_weights(model, layer)
        wo_u = fold(g_final, wo, dim=-1)  # W_O diag(γ_final): rows through U = diag(γ_final) W_U
        keys = ["raw" if layer == 0 else c for c in choices]
        uniq = list(dict.fromkeys(keys))
        z = torch.cat([torch.matmul(xs[key], wv)[:, rows] for key in uniq], 1)  # (H, n_keys * P, hd)
        tg, kq = tgts.repeat(len(uniq)), kvec.repeat(len(uniq))
        supp_q = torch.ones_like(tg, dtype=torch.bool)
        if extra is not None:
            zx, xtg, xk = extra[0][layer].to(dev), extra[1].to(dev), extra[2].to(dev)
            z, tg, kq = torch.cat([z, zx], 1), torch.cat([tg, xtg]), torch.cat([kq, xk])
            supp_q = torch.cat([supp_q, torch.zeros_like(xtg, dtype=torch.bool)])
        hit, supp = top_k_tests(z, wo_u, U, tg, kq, supp_q)
        P = len(tgts)
        if extra is not None:
            extra_hit[layer] = hit[:, len(uniq) * P:].cpu()
        hit, supp = hit.double().cpu(), supp.double().cpu()
        for c, key in zip(choices, keys):
            b0 = uniq.index(key) * P
            for h in range(H):
                for o, a, b in zip(ops, offsets[:-1], offsets[1:]):
                    score_rows.append((model_name, c, layer, h, o.name, o.category, o.k,
                                       float(hit[h, b0 + a:b0 + b].mean()), float(supp[h, b0 + a:b0 + b].mean()), b - a))
        # saliency ‖x W_V W_O‖ / ‖x‖ of the candidates (first choice) via the (hd × hd) Gram matrix of W_O^h
        cx = c_raw if layer == 0 else cxs[choices[0]]
        cz = torch.matmul(cx, wv)  # (H, C, hd)
        gram = torch.bmm(wo, wo.transpose(1, 2))
        sal = (torch.matmul(cz, gram) * cz).sum(-1).clamp_min(0).sqrt() / cx.norm(dim=-1).clamp_min(1e-30)
        sv, si = sal.topk(min(salient_tokens, sal.shape[1]), dim=-1)  # (H, n); n = 0 without candidates
        if si.shape[1]:
            zs = torch.gather(cz, 1, si[..., None].expand(-1, -1, cz.shape[-1]))
            tops = scan_vocab(zs, wo_u, U, salient_targets)[1].cpu()
        for h in range(H):
            for r in range(si.shape[1]):
                tid = int(cand[int(si[h, r])])
                sal_rows.append((model_name, layer, h, r + 1, tid, tok.decode([tid]), float(sv[h, r]),
                                 "|".join(tok.decode([int(t)]) for t in tops[h, r])))
    scores = pl.DataFrame(score_rows, orient="row", schema=tables.polars_schema("maps_scores"))
    salient = pl.DataFrame(sal_rows, orient="row", schema=tables.polars_schema("maps_salient"))
    return StaticResult(scores, salient, extra_hit)
