"""MAPS checks against inference (definitions §8): dynamic scores from prompts, and a causal ablation check.

Dynamic: each source word X goes into templates such as "This is a document about X"; at the last
position every head's output ``O_h[last]`` (the per-head slice of the input of ``o_proj``) is projected
through ``W_O^h`` and the static score's ``U = diag(γ_final) W_U``, and the same top-k rule as the static
score is applied ("with context"). "Without context" forces the head's attention at the last position onto
the source token, i.e. its output becomes ``V_h[src]`` (the value of the KV head it reads, captured at
``v_proj``'s output); causality makes this exactly the forced-attention output without a second forward pass.

Causal: few-shot prompts "s1: t1\\ns2: t2\\ns3: t3\\ns:" whose answer is the single token " t"; heads are
ablated by zeroing their slice of ``o_proj``'s input at the last position only, so the prompts without their
last token are run once as one left-padded batch (KV cache) and every ablation re-runs just the last token.
"""
from __future__ import annotations

import copy
import random

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from analysis.core import tables
from extract.engine import hooks
from extract.engine.hooks import head_shape
from extract.maps.operations import Operation

TEMPLATES = ("This is a document about{X}", "No{X} means no", "The story of{X} contains",
             "When I think about{X} I think about")


def _bos(tok) -> list[int]:
    return [tok.bos_token_id] if tok.bos_token_id is not None else []


def template_ids(tok, template: str, src: list[int]) -> tuple[torch.Tensor, int]:
    """Prompts ``(n, S)`` of one template for single-token sources (with a leading space) and the source
    position; every prompt has the same length, so no padding is needed."""
    pre, post = template.split("{X}")
    a = _bos(tok) + tok(pre, add_special_tokens=False)["input_ids"]
    b = tok(post, add_special_tokens=False)["input_ids"] if post else []
    return torch.tensor([a + [s] + b for s in src], dtype=torch.long), len(a)


@torch.no_grad()
def head_io(model, ids: torch.Tensor, src_pos: int, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt, layer and query head: the head output at the last position (``"z"``) and the value vector
    (``"v"``) of the source position. ids ``(n, S)`` -> two ``(n, L, H, head_dim)`` float32 tensors."""
    L, H, KV, hd = head_shape(model)
    outs, vals = [], []
    with hooks.capture(model, "z", select=lambda z: z[:, -1].float()) as z_last, \
            hooks.capture(model, "v", select=lambda v: v[:, src_pos].float()[:, torch.arange(H) // (H // KV)]) as v_src:
        for b0 in range(0, ids.shape[0], batch):
            model.get_decoder()(input_ids=ids[b0:b0 + batch].to(model.device), use_cache=False)
            outs.append(torch.stack([z_last[i] for i in range(L)], 1).cpu())
            vals.append(torch.stack([v_src[i] for i in range(L)], 1).cpu())
    return torch.cat(outs), torch.cat(vals)


def dynamic_rows(model, tok, ops: list[Operation], pairs: int | None, seed: int = 0,
                 templates: tuple[str, ...] = TEMPLATES, progress: bool = True):
    """Rows for the vocabulary scan: ``z`` ``(L, H, R, head_dim)`` (with-context rows, then without-context
    rows), per row its target id and k ``(R,)``, and a frame describing each row (operation, template,
    context, pair)."""
    zs, tg, ks, meta = [], [], [], []
    for op in tqdm(ops, desc="MAPS dynamic prompts", disable=not progress):
        idx = list(range(len(op.src)))
        if pairs is not None and len(idx) > pairs:
            idx = sorted(random.Random(f"{seed}:dynamic:{op.name}").sample(idx, pairs))
        src = [op.src[i] for i in idx]
        for t, template in enumerate(templates):
            ids, pos = template_ids(tok, template, src)
            o, v = head_io(model, ids, pos)
            for context, x in (("with", o), ("without", v)):
                zs.append(x)
                tg += [op.tgt[i] for i in idx]
                ks += [op.k] * len(idx)
                meta += [(op.name, t, context, i) for i in idx]
    z = torch.cat(zs).permute(1, 2, 0, 3).contiguous()  # (L, H, R, hd)
    frame = pl.DataFrame(meta, orient="row", schema={"operation": pl.Utf8, "template": pl.Int32,
                                                     "context": pl.Utf8, "pair": pl.Int32})
    return z, torch.tensor(tg, dtype=torch.long), torch.tensor(ks, dtype=torch.long), frame


def dynamic_scores(model_name: str, frame: pl.DataFrame, hit: torch.Tensor) -> pl.DataFrame:
    """Per (layer, head, operation, template, context): the fraction of prompts whose target is in the top-k.
    hit ``(L, H, R)`` bool, one column per row of ``frame``."""
    L, H, R = hit.shape
    long = pl.DataFrame({
        "layer": np.repeat(np.arange(L), H * R).astype(np.int32),
        "head": np.tile(np.repeat(np.arange(H), R), L).astype(np.int32),
        "row": np.tile(np.arange(R), L * H),
        "hit": hit.reshape(-1).numpy().astype(np.float64)})
    long = long.join(frame.with_row_index("row").with_columns(pl.col("row").cast(pl.Int64)), on="row")
    return (long.group_by("layer", "head", "operation", "template", "context")
            .agg(pl.col("hit").mean().alias("score"), pl.len().cast(pl.Int32).alias("n_prompts"))
            .with_columns(pl.lit(model_name).alias("model"))
            .select("model", "layer", "head", "operation", "template", "context", "score", "n_prompts")
            .sort("layer", "head", "operation", "template", "context"))


def correlations(static: pl.DataFrame, dynamic: pl.DataFrame) -> pl.DataFrame:
    """Pearson r of static vs dynamic scores over heads × templates, per (model, E' choice, operation,
    context)."""
    j = dynamic.join(static.select("model", "inputs", "layer", "head", "operation", pl.col("score").alias("static")),
                     on=["model", "layer", "head", "operation"])
    return (j.group_by("model", "inputs", "operation", "context")
            .agg(pl.corr("static", "score").alias("pearson"), pl.len().cast(pl.Int32).alias("n"),
                 pl.col("static").max().alias("max_static"), pl.col("score").max().alias("max_dynamic"))
            .sort("model", "inputs", "operation", "context"))


# ---- causal check -------------------------------------------------------------------------------------

def fewshot_prompts(tok, op: Operation, n: int | None, shots: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """Few-shot prompts "s1: t1\\n...\\ns:" for up to ``n`` pairs of ``op`` (demonstrations drawn from the
    other pairs, seeded) and their answer token ids (the single-token " t")."""
    rng = random.Random(f"{seed}:causal:{op.name}")
    idx = list(range(len(op.src)))
    chosen = idx if n is None or n >= len(idx) else sorted(rng.sample(idx, n))
    prompts, answers = [], []
    for i in chosen:
        demos = rng.sample([j for j in idx if j != i], shots)
        text = "".join(f"{op.words[j][0]}: {op.words[j][1]}\n" for j in demos) + f"{op.words[i][0]}:"
        prompts.append(_bos(tok) + tok(text, add_special_tokens=False)["input_ids"])
        answers.append(op.tgt[i])
    return prompts, answers


def left_padded(ids: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one batch padded on the left, so that every last token is at position
    -1: ``(input_ids, attention_mask, position_ids)``, each ``(n, S)``; the positions count real tokens only."""
    S = max(map(len, ids))
    x = torch.full((len(ids), S), pad, dtype=torch.long)
    mask = torch.zeros(len(ids), S, dtype=torch.long)
    for i, p in enumerate(ids):
        x[i, S - len(p):] = torch.tensor(p)
        mask[i, S - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return x.to(device), mask.to(device), pos.to(device)


def ablate_last(model, heads: list[tuple[int, int]]):
    """Zero the listed (layer, head) outputs (``"z"``) at the last position. A context manager."""
    by_layer: dict[int, list[int]] = {}
    for layer, h in heads:
        by_layer.setdefault(layer, []).append(h)
    return hooks.replace_heads(model, by_layer, positions=-1)


@torch.no_grad()
def causal_check(model, tok, op: Operation, static: pl.DataFrame, *, model_name: str, counts: list[int],
                 draws: int, prompts: int | None, shots: int, seed: int) -> pl.DataFrame:
    """Accuracy (answer token = argmax at the last position) with no ablation, with the ``n`` top-scoring
    heads of ``op`` ablated, and with ``draws`` seeded random sets of ``n`` heads, for n in ``counts``; the
    top heads per E' choice of ``static`` (its ``inputs`` column; equal scores in a seeded random order, no
    "top" rows where every head scores 0), each choice's rows with the same no-ablation and random-set
    accuracies."""
    L, H, _, _ = head_shape(model)
    every = [(la, h) for la in range(L) for h in range(H)]
    choices = static["inputs"].unique(maintain_order=True).to_list()
    configs = [("none", 0, 0, [])]  # (selection, n, draw, heads); "top" once per choice
    for n in counts:
        for d in range(draws):
            configs.append(("random", n, d, random.Random(f"{seed}:{op.name}:{n}:{d}").sample(every, n)))
    top_of = {}
    order = random.Random(f"{seed}:{op.name}:ties").sample(every, len(every))
    tie = pl.DataFrame({"layer": [la for la, _ in order], "head": [h for _, h in order],
                        "tie": list(range(len(order)))}, schema={"layer": pl.Int32, "head": pl.Int32, "tie": pl.Int64})
    for c in choices:
        ranked = static.filter((pl.col("operation") == op.name) & (pl.col("inputs") == c))
        if not ranked.height or ranked["score"].max() <= 0:
            continue  # no head scores: no top heads (equal scores go in the seeded random order `tie`)
        ranked = ranked.join(tie, on=["layer", "head"]).sort(["score", "tie"], descending=[True, False])
        top = list(zip(ranked["layer"].to_list(), ranked["head"].to_list()))
        for n in counts:
            top_of[c, n] = len(configs)
            configs.append(("top", n, 0, top[:n]))
    ids, answers = fewshot_prompts(tok, op, prompts, shots, seed)
    correct = np.zeros((len(configs), len(ids)))
    x, mask, pos = left_padded(ids, tok.pad_token_id if tok.pad_token_id is not None else 0, model.device)
    ans = torch.tensor(answers, device=model.device)
    head = model.get_output_embeddings()
    dec = model.get_decoder()
    past = dec(input_ids=x[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1],
               use_cache=True).past_key_values
    done: dict[tuple, int] = {}  # a head set already run (the top heads of two choices may agree)
    for c, (_, _, _, heads) in enumerate(configs):
        key = tuple(sorted(heads))
        if key in done:
            correct[c] = correct[done[key]]
            continue
        done[key] = c
        with ablate_last(model, heads):  # on a copy of the cache (a sliding-window cache cannot be cropped back)
            hidden = dec(input_ids=x[:, -1:], attention_mask=mask, position_ids=pos[:, -1:],
                         past_key_values=copy.deepcopy(past), use_cache=True).last_hidden_state
        correct[c] = (head(hidden[:, -1]).argmax(-1) == ans).cpu().numpy()
    base = float(correct[0].mean())
    rows = []
    for ch in choices:
        picks = [0]  # none, then per count: top (where some head scores), random draws
        for n in counts:
            picks += ([top_of[ch, n]] if (ch, n) in top_of else []) + [
                j for j, cf in enumerate(configs) if cf[0] == "random" and cf[1] == n]
        rows += [(model_name, ch, op.name, configs[c][0], configs[c][1], configs[c][2], float(correct[c].mean()),
                  base, len(ids)) for c in picks]
    return pl.DataFrame(rows, orient="row", schema=tables.computed_schema("maps_causal"))
