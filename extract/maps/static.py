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


@torch.no_grad()
def top_tokens(y: torch.Tensor, U: torch.Tensor, n: int) -> torch.Tensor:
    """The ids ``(N, n)`` of the ``n`` largest logits of each row ``y[r] · U`` (descending); y ``(N, d)``,
    U ``(d, V)``, the vocabulary in chunks of at most ``CHUNK_ELEMENTS`` logits."""
    N, V = y.shape[0], U.shape[1]
    n = min(n, V)
    top_v = torch.empty(N, 0, device=y.device)
    top_i = torch.empty(N, 0, dtype=torch.long, device=y.device)
    chunk = max(256, CHUNK_ELEMENTS // max(1, N))
    for c0 in range(0, V, chunk):
        v, i = torch.matmul(y.float(), U[:, c0:c0 + chunk]).topk(min(n, U[:, c0:c0 + chunk].shape[1]), dim=-1)
        v, i = torch.cat([top_v, v], -1), torch.cat([top_i, i + c0], -1)
        top_v, sel = v.topk(min(n, v.shape[-1]), dim=-1)
        top_i = i.gather(-1, sel)
    return top_i


@torch.no_grad()
def target_logits(z: torch.Tensor, wo: torch.Tensor, U: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``M_h[p, targets[p]] = z[h, p] · W_O^h · U[:, targets[p]]`` ``(H, P)`` in float64; z ``(H, P, hd)``."""
    H, d = z.shape[0], wo.shape[2]
    step = max(1, CHUNK_ELEMENTS // (4 * H * d))
    wd = wo.double()
    out = [(torch.bmm(z[:, p:p + step].double(), wd) * U.T[targets[p:p + step]].double()).sum(-1)
           for p in range(0, z.shape[1], step)]
    return torch.cat(out, 1) if out else torch.zeros(H, 0, dtype=torch.float64, device=z.device)


def _count(s: torch.Tensor, logit: torch.Tensor, own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``s`` ``(N, c)``: entries strictly greater / strictly smaller than ``logit`` ``(N,)``, the
    row's own target (at column ``own``, -1 where it is not among these columns) left out."""
    g, l = (s > logit[:, None]).sum(-1), (s < logit[:, None]).sum(-1)
    r = (own >= 0).nonzero()[:, 0]
    if len(r):
        v = s[r, own[r]]
        g[r] -= (v > logit[r]).long()
        l[r] -= (v < logit[r]).long()
    return g, l


def slices(V: int, first: int | None = None) -> int:
    """Into how many strided slices (token ids ≡ r mod n) the vocabulary is cut, about ``first`` (default
    :data:`FIRST_COLUMNS`) tokens each."""
    return max(1, -(-V // (FIRST_COLUMNS if first is None else first)))


def _own(targets: torch.Tensor, r: int, n: int) -> torch.Tensor:
    """Each target's column in slice r (-1: not in it)."""
    return torch.where(targets % n == r, targets // n, -1)


@torch.no_grad()
def first_pass(z: torch.Tensor, wo: torch.Tensor, U: torch.Tensor, targets: torch.Tensor, n: int):
    """Per (head, row): the target's logit (float64 -> float32) and the other tokens of slice 0 with a
    strictly greater / smaller logit, through the low-rank ``W_O^h U[:, slice 0]``. z ``(H, P, hd)``;
    returns three ``(H, P)`` tensors (logit, greater, smaller)."""
    H, P, _ = z.shape
    W = U.T  # (V, d): one token per row, so a strided slice of tokens is a view
    z = z.float()
    logit = target_logits(z, wo, U, targets).float()
    greater = torch.zeros(H, P, dtype=torch.long, device=z.device)
    smaller = torch.zeros_like(greater)
    B = torch.matmul(wo, W[0::n].T)  # (H, hd, V / n)
    step = max(1, CHUNK_ELEMENTS // max(1, H * B.shape[2]))
    for p0 in range(0, P, step):
        sl = slice(p0, p0 + step)
        g, l = _count(torch.bmm(z[:, sl], B).flatten(0, 1), logit[:, sl].flatten(), _own(targets[sl], 0, n).repeat(H))
        greater[:, sl], smaller[:, sl] = g.view(H, -1), l.view(H, -1)
    return logit, greater, smaller


@torch.no_grad()
def rest_pass(y: torch.Tensor, U: torch.Tensor, n: int, targets: torch.Tensor, logit: torch.Tensor,
              k: torch.Tensor, need: torch.Tensor, greater: torch.Tensor, smaller: torch.Tensor):
    """The counts of slices 1 … n-1 added to ``greater`` / ``smaller`` (in place) for rows ``y`` ``(N, d)``
    (already through ``W_O^h``), slice by slice, each row dropped once decided: ``k`` others beat its target
    above and, where ``need``, below. All other arguments ``(N,)``."""
    W = U.T
    idx = torch.arange(len(y), device=y.device)
    live = (greater < k) | (need & (smaller < k))
    idx, y, targets, logit, k, need = idx[live], y[live], targets[live], logit[live], k[live], need[live]
    for r in range(1, n):
        if not len(idx):
            break
        dg, dl = _count(torch.matmul(y, W[r::n].T), logit, _own(targets, r, n))
        greater[idx] += dg
        smaller[idx] += dl
        live = (greater[idx] < k) | (need & (smaller[idx] < k))
        if not live.all():
            idx, y, targets, logit, k, need = idx[live], y[live], targets[live], logit[live], k[live], need[live]
    return greater, smaller


def _undecided(z, wo, greater, smaller, k, need):
    """(heads, rows) of the rows that slice 0 left undecided, and their ``y = z W_O^h`` ``(N, d)``."""
    H = z.shape[0]
    kk, nn = k.expand(H, -1), need.expand(H, -1)
    hh, pp = ((greater < kk) | (nn & (smaller < kk))).nonzero(as_tuple=True)
    y = torch.empty(len(hh), wo.shape[2], device=z.device)
    for h in hh.unique().tolist():
        m = hh == h
        y[m] = torch.matmul(z[h, pp[m]].float(), wo[h])
    return hh, pp, y


@torch.no_grad()
def top_k_tests(z: torch.Tensor, wo: torch.Tensor, U: torch.Tensor, targets: torch.Tensor, k: torch.Tensor,
                suppression: torch.Tensor, first: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether the target is in the top-k of row ``M_h[p] = z[h, p] · W_O^h · U`` (fewer than ``k[p]`` other
    tokens with a strictly greater logit; ties count in its favour) and in the top-k of ``-M_h[p]``.

    z ``(H, P, hd)``, wo ``(H, hd, d)``, U ``(d, V)``, targets / k / suppression ``(P,)`` (suppression: whether
    row p needs its ``-M`` answer too; False there reads False). Exact, with early decisions: the vocabulary
    is cut into :func:`slices` strided slices (views of U); every row is tested on slice 0
    (:func:`first_pass`) and the undecided ones go through the others (:func:`rest_pass`). Returns two
    ``(H, P)`` bool tensors. :func:`static_scores` runs the same two passes, pooling the second over layers.
    """
    n = slices(U.shape[1], first)
    logit, greater, smaller = first_pass(z, wo, U, targets, n)
    hh, pp, y = _undecided(z, wo, greater, smaller, k, suppression)
    g, l = rest_pass(y, U, n, targets[pp], logit[hh, pp], k[pp], suppression[pp], greater[hh, pp], smaller[hh, pp])
    greater[hh, pp], smaller[hh, pp] = g, l
    H = z.shape[0]
    return greater < k.expand(H, -1), suppression.expand(H, -1) & (smaller < k.expand(H, -1))


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
    (:data:`extract.maps.run.INPUTS`), and each head's salient tokens under the first choice.

    Saliency of token t for head h: ``‖e'_t W_V^h W_O^h‖ / ‖e'_t‖`` over the word-like candidates
    (:func:`word_like`); the ``salient_tokens`` most salient ones are stored with their ``salient_targets``
    top tokens through U. ``extra = (z (L, H, Rx, head_dim), targets (Rx,), k (Rx,))``: more rows in value
    space (the dynamic check's head outputs), tested in the same passes; they do not depend on E'.
    Per layer the rows go through :func:`first_pass`; the undecided rows of all layers then share one
    :func:`rest_pass`, and the salient tokens of all layers one :func:`top_tokens`.
    """
    choices = check_inputs(inputs)
    cfg = text_config(model)
    L, H = cfg.num_hidden_layers, cfg.num_attention_heads
    U = unembedding(model)
    dev = U.device
    n = slices(U.shape[1])
    g_final = final_scale(model)
    src, rows, tgts, offsets = _pairs_index(ops)
    rows, tgts = rows.to(dev), tgts.to(dev)
    kvec = torch.tensor([o.k for o in ops for _ in o.src], device=dev)
    raw, xs = embedding_inputs(model, src, choices)
    xs["raw"] = raw  # layer 0 reads E under every choice
    cand = word_like(tok, salient_vocab)
    c_raw, cxs = embedding_inputs(model, cand, choices[:1])
    P = len(tgts)
    todo = list(layers) if layers is not None else list(range(L))
    layer_state, pool, sal = {}, [], []
    for layer in tqdm(todo, desc=f"MAPS static {model_name}", disable=not progress):
        wv, wo = head_weights(model, layer)
        wo_u = fold(g_final, wo, dim=-1)  # W_O diag(γ_final): rows through U = diag(γ_final) W_U
        keys = ["raw" if layer == 0 else c for c in choices]
        uniq = list(dict.fromkeys(keys))
        z = torch.cat([torch.matmul(xs[key], wv)[:, rows] for key in uniq], 1)  # (H, n_keys * P, hd)
        tg, kq = tgts.repeat(len(uniq)), kvec.repeat(len(uniq))
        need = torch.ones_like(tg, dtype=torch.bool)
        if extra is not None:  # the dynamic check's rows: top-k only
            xtg, xk = extra[1].to(dev), extra[2].to(dev)
            z, tg, kq = torch.cat([z, extra[0][layer].to(dev)], 1), torch.cat([tg, xtg]), torch.cat([kq, xk])
            need = torch.cat([need, torch.zeros_like(xtg, dtype=torch.bool)])
        logit, greater, smaller = first_pass(z, wo_u, U, tg, n)
        hh, pp, y = _undecided(z, wo_u, greater, smaller, kq, need)
        pool.append((y, tg[pp], logit[hh, pp], kq[pp], need[pp], greater[hh, pp], smaller[hh, pp]))
        layer_state[layer] = (keys, uniq, tg, kq, need, greater, smaller, hh, pp)
        # saliency ‖x W_V W_O‖ / ‖x‖ of the candidates (first choice) via the (hd × hd) Gram matrix of W_O^h
        cx = c_raw if layer == 0 else cxs[choices[0]]
        cz = torch.matmul(cx, wv)  # (H, C, hd)
        gram = torch.bmm(wo, wo.transpose(1, 2))
        sv = (torch.matmul(cz, gram) * cz).sum(-1).clamp_min(0).sqrt() / cx.norm(dim=-1).clamp_min(1e-30)
        sv, si = sv.topk(min(salient_tokens, sv.shape[1]), dim=-1)  # (H, n); n = 0 without candidates
        zs = torch.gather(cz, 1, si[..., None].expand(-1, -1, cz.shape[-1]))
        sal.append((layer, sv, si, torch.bmm(zs, wo_u).flatten(0, 1)))
    y, *rest = (torch.cat(parts) for parts in zip(*pool)) if pool else (torch.zeros(0, U.shape[0]),)
    g_all, s_all = rest_pass(y, U, n, *rest) if pool else (None, None)
    score_rows, o0 = [], 0
    extra_hit = None if extra is None else torch.zeros(extra[0].shape[:3], dtype=torch.bool)
    for layer in todo:
        keys, uniq, tg, kq, need, greater, smaller, hh, pp = layer_state[layer]
        greater[hh, pp], smaller[hh, pp] = g_all[o0:o0 + len(hh)], s_all[o0:o0 + len(hh)]
        o0 += len(hh)
        hit, supp = greater < kq.expand(H, -1), need.expand(H, -1) & (smaller < kq.expand(H, -1))
        if extra is not None:
            extra_hit[layer] = hit[:, len(uniq) * P:].cpu()
        hit, supp = hit.double().cpu(), supp.double().cpu()
        for c, key in zip(choices, keys):
            b0 = uniq.index(key) * P
            for h in range(H):
                for o, a, b in zip(ops, offsets[:-1], offsets[1:]):
                    score_rows.append((model_name, c, layer, h, o.name, o.category, o.k,
                                       float(hit[h, b0 + a:b0 + b].mean()), float(supp[h, b0 + a:b0 + b].mean()), b - a))
    tops = top_tokens(torch.cat([t[3] for t in sal]), U, salient_targets).cpu() if sal else None
    sal_rows, r0 = [], 0
    for layer, sv, si, _ in sal:
        for h in range(H):
            for r in range(si.shape[1]):
                tid = int(cand[int(si[h, r])])
                sal_rows.append((model_name, layer, h, r + 1, tid, tok.decode([tid]), float(sv[h, r]),
                                 "|".join(tok.decode([int(t)]) for t in tops[r0 + h * si.shape[1] + r])))
        r0 += si.numel()
    scores = pl.DataFrame(score_rows, orient="row", schema=tables.computed_schema("maps_scores"))
    salient = pl.DataFrame(sal_rows, orient="row", schema=tables.computed_schema("maps_salient"))
    return StaticResult(scores, salient, extra_hit)
