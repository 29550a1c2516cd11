"""Per-example loss change from ablating one attention head, with that head's first-token attention.

For every example and every given (layer, head): the mean next-token loss (nats/token over positions
1..P-1) of the unablated model, its head scores from the same forward pass (``recording``), and the
loss with the head's slice of the output projection's input zeroed (definitions §9: the head's ``O`` at every
position). With ``mean=True`` also the loss with that slice replaced, at every position, by its mean over
every position of every given example (mean ablation, definitions §4's option): it keeps the head's average
contribution, so what it costs is the head's example-specific computation only. Examples are encoded as
the scorer encodes them (BOS first, truncated to ``max_tokens``). The forward passes are batched (padded rows,
each with its own ablated head), start at the ablated layer from the base pass's residual stream and compute the
losses without whole rows of logits (:func:`head_loss_changes`); the numbers are those of one forward pass per
example and head.

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


# the logits _row_losses computes at once, (positions, vocabulary entries): on a CPU a tile that stays in the cache
# and is reused by the allocator, over slices of the vocabulary (Gemma's 262k logits per position: 35% less time
# than whole rows, measured on one thread); elsewhere whole rows, 2**27 logits at a time
_CPU_TILE = (1024, 2048)
_TILE_ELEMENTS = 1 << 27


def _row_losses(model, hidden: torch.Tensor, ids: torch.Tensor, lengths: Sequence[int]) -> list[float]:
    """Per row ``b`` of a right-padded batch: the mean next-token loss (nats/token) over its positions
    ``1..lengths[b]-1``, from the decoder's output ``hidden`` ``(B, S, d_model)``. The logits are computed a tile
    of (row, position) pairs x vocabulary entries at a time (``_CPU_TILE``), never for padding; each position's
    log-sum-exp is combined over the vocabulary's slices."""
    import torch

    from extract.engine.hooks import logits_from_hidden

    dev = hidden.device
    rows = torch.cat([torch.full((n - 1,), b, dtype=torch.long) for b, n in enumerate(lengths)]).to(dev)
    pos = torch.cat([torch.arange(n - 1) for n in lengths]).to(dev)
    x, target = hidden[rows, pos], ids[rows, pos + 1]
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0]
    if dev.type == "cpu" and isinstance(head, torch.nn.Linear):
        n_pos, n_vocab = _CPU_TILE
    else:
        n_pos, n_vocab = max(1, _TILE_ELEMENTS // vocab), vocab
    sums = torch.zeros(len(lengths), dtype=torch.float64, device=dev)
    for p in range(0, len(x), n_pos):
        xs, ts = x[None, p:p + n_pos], target[p:p + n_pos]
        if n_vocab == vocab:
            logits = logits_from_hidden(model, xs)[0].float()
            ce = torch.nn.functional.cross_entropy(logits, ts, reduction="none")
        else:
            lse, picked = [], torch.zeros(len(ts), dtype=torch.float32, device=dev)
            for v in range(0, vocab, n_vocab):
                logits = logits_from_hidden(model, xs, slice(v, v + n_vocab))[0].float()
                lse.append(torch.logsumexp(logits, -1))
                inside = ((ts >= v) & (ts < v + logits.shape[1])).nonzero()[:, 0]
                picked[inside] = logits[inside, ts[inside] - v]
            ce = torch.logsumexp(torch.stack(lse, -1), -1) - picked
        sums.index_add_(0, rows[p:p + n_pos], ce.double())
    return (sums.cpu() / torch.tensor([n - 1 for n in lengths], dtype=torch.float64)).tolist()


@_inference_mode
def head_loss_changes(model, tokenizer, examples: Sequence[dict], heads: Sequence[tuple[int, int]], *,
                      prepend_bos: bool = True, max_tokens: int | None = None, mean: bool = False,
                      batch_tokens: int = 4096, progress: bool = True) -> pl.DataFrame:
    """One row per (example, head): ``dataset, example, domain, n_tokens, layer, head, awft, ahon_ln,
    loss_base, loss_ablated, delta_loss`` (losses in nats/token; ``mean``: also ``loss_mean_ablated,
    delta_loss_mean``). ``examples``: corpus JSON-lines rows (``id, text, domain, corpus, max_tokens``);
    ``max_tokens`` caps every example's own length. ``batch_tokens``: padded tokens per forward pass.

    The same numbers as one forward pass per example and ablated head, computed with less work: examples are
    right-padded into batches (the base pass records the scores); the ablated variants of a batch (head x zero or
    mean) go through one forward pass per ablated layer and ``batch_tokens``, each row with its own head replaced
    (:func:`~extract.engine.hooks.replace_heads_rows`) and starting at the ablated layer from the base pass's
    residual stream (:func:`~extract.engine.hooks.start_at`: the layers before it are the base pass's); each row's
    loss counts its own positions only."""
    import contextlib

    import torch

    from extract.engine import hooks
    from extract.engine.ablation import head_output_means
    from extract.engine.scores import batches, encode_texts, pad_id, pad_right, recording

    device = next(model.parameters()).device
    n_layers, n_heads, _, _ = hooks.head_shape(model)
    heads = [(int(la), int(h)) for la, h in heads]
    for la, h in heads:
        if not (0 <= la < n_layers and 0 <= h < n_heads):
            raise ValueError(f"head {h} of layer {la} is outside this model's {n_layers} layers x {n_heads} heads")
    kept, seqs = [], []
    for ex in examples:
        cap = min(n for n in (ex.get("max_tokens"), max_tokens) if n) if ex.get("max_tokens") or max_tokens else None
        seq = encode_texts(tokenizer, [ex["text"]], prepend_bos=prepend_bos, max_tokens=cap)[0]
        if len(seq) >= 2:
            kept.append(ex)
            seqs.append(seq)
    # the sweep's mean ablation (definitions §4): each head's output averaged over every position of every example
    means = head_output_means(model, seqs).float() if mean and seqs else None
    modes = ("zero", "mean") if mean else ("zero",)
    starts = sorted({la for la, _ in heads})  # one forward pass per ablated layer, from that layer on
    pad, dec = pad_id(model, tokenizer), hooks.decoder(model)
    base: dict[int, float] = {}
    scores: dict[int, torch.Tensor] = {}
    ablated: dict[tuple[int, int, str], float] = {}  # (example, head index, mode) -> loss
    bar = tqdm(total=len(seqs) * (1 + len(heads) * len(modes)), desc="head ablation", unit="pass",
               disable=not progress)
    for group in batches([len(s) for s in seqs], batch_tokens):
        ids, am = pad_right([seqs[i] for i in group], pad, device)
        with recording(model) as rec, hooks.capture(model, "resid_post", [la - 1 for la in starts if la]) as resid:
            out = dec(input_ids=ids, attention_mask=am, use_cache=False).last_hidden_state
        got = rec.scores()  # (rows, layers, heads, n_scores)
        for b, (i, loss) in enumerate(zip(group, _row_losses(model, out, ids, [len(seqs[i]) for i in group]))):
            base[i], scores[i] = loss, got[b]
        bar.update(len(group))
        row_of = {i: b for b, i in enumerate(group)}
        for start in starts:
            variants = [(i, j, mode) for i in group for j, (la, _) in enumerate(heads) if la == start for mode in modes]
            for sub in batches([len(seqs[i]) for i, _, _ in variants], batch_tokens):
                rows = [variants[k] for k in sub]
                lengths = [len(seqs[i]) for i, _, _ in rows]
                ids, am = pad_right([seqs[i] for i, _, _ in rows], pad, device)
                masks = {m: torch.zeros(len(rows), n_layers, n_heads, dtype=torch.bool) for m in modes}
                for b, (i, j, mode) in enumerate(rows):
                    masks[mode][b, start, heads[j][1]] = True
                skip = contextlib.nullcontext()
                if start:
                    prev = resid[start - 1]
                    hidden = prev.new_zeros((len(rows), ids.shape[1], prev.shape[-1]))
                    for b, (i, _, _) in enumerate(rows):
                        hidden[b, :lengths[b]] = prev[row_of[i], :lengths[b]]
                    skip = hooks.start_at(model, start, hidden)
                with contextlib.ExitStack() as stack:
                    stack.enter_context(skip)
                    stack.enter_context(hooks.replace_heads_rows(model, masks["zero"]))
                    if mean:
                        stack.enter_context(hooks.replace_heads_rows(model, masks["mean"], means))
                    out = dec(input_ids=ids, attention_mask=am, use_cache=False).last_hidden_state
                for (i, j, mode), loss in zip(rows, _row_losses(model, out, ids, lengths)):
                    ablated[i, j, mode] = loss
                bar.update(len(rows))
    bar.close()
    rows, keys = [], score_keys()
    awft, ahon = keys.index("awft"), keys.index("ahon_ln")
    for i, ex in enumerate(kept):
        for j, (layer, head) in enumerate(heads):
            abl = ablated[i, j, "zero"]
            row = {"dataset": ex.get("corpus", ""), "example": str(ex["id"]), "domain": ex.get("domain"),
                   "n_tokens": len(seqs[i]), "layer": layer, "head": head,
                   "awft": float(scores[i][layer, head, awft]), "ahon_ln": float(scores[i][layer, head, ahon]),
                   "loss_base": base[i], "loss_ablated": abl, "delta_loss": abl - base[i]}
            if mean:
                m = ablated[i, j, "mean"]
                row |= {"loss_mean_ablated": m, "delta_loss_mean": m - base[i]}
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

    from dataclasses import asdict

    from extract import provenance
    from extract.errors import DormantError
    from extract.models.fetch import sha256_file
    from extract.models.load import load_model, model_info

    s = settings
    start = provenance.now()
    cands = pl.read_parquet(candidates).sort("rank")
    model, tok = load_model(model_name, dtype=getattr(torch, dtype), device=device)
    run = provenance.run_record(
        "domain_ablate", model, {"model": model_name, **asdict(s), "dtype": dtype,
                                 "candidates_sha256": sha256_file(Path(candidates)),
                                 "data_sha256": [sha256_file(Path(f)) for f in data]},
        prompt_format="raw text, " + ("BOS first" if s.prepend_bos else "no BOS added"), start_time=start)
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
    path = provenance.write_with_run(df, out, run)
    print(f"{name}: heads {', '.join(f'L{l}H{h}' for l, h in heads)} zeroed{' and mean-ablated' * s.mean_ablation} "
          f"on {len(examples)} examples ({time.perf_counter() - t0:.0f} s) -> {path}")
    return [path]
