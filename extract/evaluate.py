"""The multiple-choice evaluator (definitions §5): letter log-likelihoods from batched forward passes.

Prompts and their tokens are built by :mod:`extract.prompts`: plain prompts (the task description, k shots
``"{question}\\nA. {a}\\n...\\nAnswer: {letter}\\n\\n"``, then ``"{question}\\nA. {a}\\n...\\nAnswer:"``), or for
instruct models the chat template in ``chat_format`` ``"multiturn"`` (lm-evaluation-harness
``--apply_chat_template --fewshot_as_multiturn``, the default) or ``"single_user"``; ``tokenization``
``"bos_first"`` (BOS first on plain prompts, the default) or ``"lm_eval"`` (lm-evaluation-harness 0.4.5's).
Prediction: the choice whose letter continuation (" A", " B", ...) has the highest log-likelihood after the
prompt; read at one position when every continuation is one token (after tokens they share, such as the
"\\n" that ``lm_eval`` moves out of a chat generation prompt), else summed over its tokens. Ties go to the
earlier letter.

One forward row per question: the prompt and the tokens all continuations share, then each choice's own
tokens (but its last) packed as a branch that attends to the shared part and to itself only, at the
positions it would have in a row of its own (a prepared causal mask and ``position_ids``); rows longer than
the model's sliding window or attention chunk fall back to one row per choice. Either way the heads' stats
are read on the shared part only (``extract.engine.capture.scoring_positions``): calibration scores a
question on its prompt, and under ablation the mask is decided there, so all choices of a question are
scored by the same ablated model (one row per choice with stats over the whole row would let each choice
ablate different heads). Packing cuts the cloze suite's tokens 3.5x (SmolLM2: 16630 -> 4801).

``scoring="cloze"`` is a documented deviation for models too small to answer in the lettered format: no
choices listed, shots end with ``"Answer: {choice}"`` (multiturn: the assistant turn holds the choice text),
and the prediction is the choice whose continuation ``" {choice}"`` has the highest summed log-likelihood
per character (lm-evaluation-harness ``acc_norm``).

Rows are grouped longest-first under ``batch_tokens`` padded tokens, right-padded, and run through one
forward of the causal LM (``use_cache=False``, logits only at the positions read). Nothing is cached
between calls: inside ``extract.engine.ablation.ablate(...)`` the same call evaluates the ablated model.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import polars as pl
import torch
from tqdm.auto import tqdm

from extract.data.tasks import LETTERS, TaskData, load_task
from extract.engine.capture import scoring_positions
from extract.engine.scores import batches, pad_id, pad_right, recording
from extract.errors import DormantError
from extract.prompts import build_prompt, check_choice, delimiter, encode, lm_eval_adds_special_tokens


@dataclass
class EvalResult:
    """Accuracy and per-question predictions; ``scores`` with ``calibrate=True``."""
    task: str
    model: str
    k_shot: int
    chat_template: bool
    scoring: str  # "letter" (definitions §5) or "cloze"
    predictions: pl.DataFrame  # id, task, sha256, answer, predicted, correct, n_choices, n_tokens (prompt), loglik
    # (+ kl, kl_choices with a reference)
    scores: torch.Tensor | None = None  # (questions, layers, heads, n_scores) float64, score_keys() order
    answer_logp: torch.Tensor | None = None  # (questions, vocab) float32 log-probs at the answer position
    call_questions: list[int] | None = None  # question index of each forward row, in the order they ran
    kl_terms: tuple | None = field(default=None, repr=False, compare=False)  # cache of kl_reference_terms

    @property
    def n_questions(self) -> int:
        return self.predictions.height

    @property
    def accuracy(self) -> float:
        """Micro average over questions (fraction correct)."""
        return float(self.predictions["correct"].mean()) if self.n_questions else float("nan")

    @property
    def chance(self) -> float:
        return float((1.0 / self.predictions["n_choices"]).mean()) if self.n_questions else float("nan")

    def summary(self) -> dict:
        return {"model": self.model, "task": self.task, "k_shot": self.k_shot, "chat_template": self.chat_template,
                "scoring": self.scoring, "n_questions": self.n_questions, "accuracy": self.accuracy,
                "chance": self.chance}


SCORINGS = ("letter", "cloze")


def uses_chat_template(model, tokenizer, chat_template: bool | None) -> bool:
    """None: the paper's default, the chat template for instruct models that have one."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat_template and not has:
        raise DormantError("chat_template=True but the tokenizer has no chat template; pass chat_template=False")
    if chat_template is None:
        from extract.models.load import model_info

        return has and model_info(model)["variant"] == "instruct"
    return bool(chat_template)


@dataclass
class _Row:
    """One forward row: a question's prompt and the continuation tokens its choices share (``shared`` tokens,
    the positions its heads are scored on), then, packed, each choice's remaining tokens but the last as a
    branch that sees the shared part and itself only."""
    ids: list[int]
    question: int
    shared: int
    reads: list[tuple[int, list[int], list[int]]]  # (choice, position predicting each token, its tokens)
    answer: int | None = None  # on a question's first row: the answer position (where its continuations differ)
    branches: list[int] = field(default_factory=list)  # length of each packed branch, in order after ``shared``


def _common_prefix(seqs: list[list[int]]) -> int:
    n = 0
    while all(len(t) > n for t in seqs) and len({t[n] for t in seqs}) == 1:
        n += 1
    return n


def _rows(prompt: list[int], conts: list[list[int]], q: int, pack_limit: int) -> list[_Row]:
    """The rows of one question: one packed row (its length ``<= pack_limit``), else one row per choice.

    Both give every choice the same log-likelihood: a choice's tokens see the prompt, the shared tokens
    and its own earlier tokens at the positions they would have in a row of their own. Heads are scored on
    the shared part in both (``shared``), so under ablation every choice is scored by the same ablated model.
    """
    c = min(_common_prefix(conts), min(len(t) for t in conts) - 1)  # every choice keeps >= 1 token of its own
    shared_ids = prompt + conts[0][:c]
    P = len(shared_ids)
    head = [len(prompt) - 1 + i for i in range(c)]  # positions predicting the shared tokens
    tails = [t[c:] for t in conts]
    if all(len(t) == 1 for t in tails) or P + sum(len(t) - 1 for t in tails) <= pack_limit:
        reads, start = [], P
        for j, (t, tail) in enumerate(zip(conts, tails)):
            reads.append((j, head + [P - 1] + list(range(start, start + len(tail) - 1)), t))
            start += len(tail) - 1
        ids = shared_ids + [tok for tail in tails for tok in tail[:-1]]
        return [_Row(ids, q, P, reads, P - 1, [len(tail) - 1 for tail in tails])]
    return [_Row(shared_ids + tail[:-1], q, P, [(j, head + list(range(P - 1, P - 1 + len(tail))), t)],
                 P - 1 if j == 0 else None) for j, (t, tail) in enumerate(zip(conts, tails))]


def pack_limit(model) -> int:
    """The longest packed row ``model`` scores exactly: a packed row is given as a prepared causal mask, which
    the model then uses for its sliding-window and chunked layers too, so no longer than their window."""
    from extract.engine.hooks import text_config

    cfg = text_config(model)
    limits = [getattr(cfg, k, None) for k in ("sliding_window", "attention_chunk_size")]
    return min([n for n in limits if isinstance(n, int) and n > 0] or [1 << 30])


def _packed_inputs(rows: list[_Row], S: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The prepared ``(B, 1, S, S)`` bool mask and the ``(B, S)`` position ids of a batch with packed rows
    (padding sees itself only, so no row is fully masked)."""
    B = len(rows)
    mask = torch.zeros(B, S, S, dtype=torch.bool)
    pos = torch.zeros(B, S, dtype=torch.long)
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    for b, r in enumerate(rows):
        P = len(r.ids) - sum(r.branches)  # the causal trunk (the shared part, or a whole unpacked row)
        mask[b, :P, :P] = causal[:P, :P]
        pos[b, :P] = torch.arange(P)
        start = P
        for n in r.branches:
            mask[b, start:start + n, :P] = True
            mask[b, start:start + n, start:start + n] = causal[:n, :n]
            pos[b, start:start + n] = torch.arange(P, P + n)
            start += n
        mask[b, range(start, S), range(start, S)] = True
    return mask[:, None].to(device), pos.to(device)


def _forward(model, rows: list[_Row], pad_id: int, device,
             answers: bool = False) -> tuple[list[list[float]], list[torch.Tensor | None]]:
    """Summed log-likelihood of each read of each row and, with ``answers``, the log-probs at each row's answer
    position (``(vocab,)`` float32 on the CPU, None on rows without one), from one forward pass."""
    ids, am = pad_right([r.ids for r in rows], pad_id, device)
    S = ids.shape[1]
    inputs = dict(attention_mask=am)
    if any(any(r.branches) for r in rows):
        mask, pos = _packed_inputs(rows, S, device)
        inputs = dict(attention_mask=mask, position_ids=pos)
    region = None
    if any(r.shared < len(r.ids) for r in rows):
        region = torch.arange(S, device=device)[None, :] < torch.tensor([r.shared for r in rows], device=device)[:, None]
    keep = torch.zeros_like(ids, dtype=torch.bool)
    for b, r in enumerate(rows):
        for _, positions, _ in r.reads:
            keep[b, positions] = True
    flat = torch.cumsum(keep.flatten(), 0).view_as(keep) - 1  # row of the kept logits for (b, position)
    with scoring_positions(region):
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep, **inputs).logits
    if logits.dim() != 2 or logits.shape[0] != int(keep.sum()):
        raise RuntimeError(f"logits of shape {tuple(logits.shape)}: this transformers version does not keep "
                           f"logits by a boolean mask (logits_to_keep); upgrade transformers")
    logp = torch.log_softmax(logits.float(), -1)
    values = [[float(sum(logp[flat[b, p], tok] for p, tok in zip(positions, t))) for _, positions, t in r.reads]
              for b, r in enumerate(rows)]
    # a copy: an indexed row is a view that would keep the batch's whole (kept positions, vocab) tensor alive
    return values, [None if r.answer is None or not answers else logp[flat[b, r.answer]].clone().cpu()
                    for b, r in enumerate(rows)]


def kl_divergence(logp_ref: torch.Tensor, logp: torch.Tensor, ref_terms=None) -> torch.Tensor:
    """``KL(ref || other) = Σ p_ref (log p_ref − log p)`` over the last dimension (nats, float64), clipped at 0.
    The difference of the two log-probabilities is taken first, row by row, then summed against ``p_ref`` in
    float64: two nearly equal distributions cancel term by term (exact in float32 for values within a factor
    of two), not in a difference of two sums of ~10 nats, and a row of the vocabulary stays in cache (Gemma's
    262,144 tokens: 2.4x faster than converting the whole batch to float64). ``ref_terms``:
    :func:`kl_reference_terms` of ``logp_ref``, computed once when one reference meets many others."""
    p, neg_entropy = kl_reference_terms(logp_ref) if ref_terms is None else ref_terms
    vocab = logp.shape[-1]
    ref, other, pf = logp_ref.reshape(-1, vocab), logp.reshape(-1, vocab), p.reshape(-1, vocab)
    kl = torch.empty(ref.shape[0], dtype=torch.float64)
    for i in range(ref.shape[0]):
        kl[i] = torch.dot(pf[i], (ref[i] - other[i]).double())
    if not torch.isfinite(kl).all():  # a log p of -inf: 0 · log 0 = 0, not 0 · -inf; as two sums instead
        other = other.double().clamp_min(torch.finfo(torch.float64).min)
        kl = neg_entropy.reshape(-1) - torch.einsum("qv,qv->q", pf, other)
    return kl.clamp_min(0.0).reshape(logp.shape[:-1])


def kl_reference_terms(logp_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p_ref, Σ p_ref log p_ref)`` in float64: the parts of :func:`kl_divergence` that depend on the reference
    only."""
    ref = logp_ref.double()
    p = ref.exp()
    return p, torch.where(p > 0, p * ref, 0.0).sum(-1)


def encode_questions(model, tokenizer, data: TaskData, *, k_shot: int, chat: bool, chat_format: str = "multiturn",
                     tokenization: str = "bos_first", chat_delimiter: str = "none",
                     scoring: str = "letter") -> list[tuple[list[int], list[list[int]]]]:
    """(prompt ids, each choice's continuation ids) per question, as :func:`evaluate` scores them."""
    texts, conts = [], []
    delim = delimiter(chat, chat_format, chat_delimiter)
    for q in data.questions:
        pool = data.shots.get(q.task, [])
        if len(pool) < k_shot:
            raise DormantError(f"{k_shot}-shot asked, but task {q.task!r} has {len(pool)} held-out shots")
        texts.append(build_prompt(q, pool[:k_shot], data.descriptions.get(q.task, ""), tokenizer if chat else None,
                                  scoring, chat_format))
        conts.append([delim + c for c in (LETTERS[:len(q.choices)] if scoring == "letter" else q.choices)])
    return encode(tokenizer, texts, conts, chat=chat, tokenization=tokenization,
                  special_tokens=lm_eval_adds_special_tokens(model))


def evaluate(model, tokenizer, task: TaskData | str, *, k_shot: int = 5, limit: int | None = None,
             chat_template: bool | None = None, chat_format: str = "multiturn", tokenization: str = "bos_first",
             chat_delimiter: str = "none",
             batch_tokens: int = 8192, calibrate: bool = False, scoring: str = "letter",
             keep_distributions: bool = False, reference: EvalResult | None = None, pack: bool = True,
             progress: bool = True) -> EvalResult:
    """Evaluate ``model`` on a multiple-choice task (a name is loaded with ``limit``, see extract.data.tasks).

    k_shot: shots from the task's held-out pool (the first k). chat_template: None = the chat template for
    instruct models. chat_format ("multiturn", "single_user"), tokenization ("bos_first", "lm_eval") and
    chat_delimiter ("none": the bare letter after a multiturn chat prompt, "space": lm-eval 0.4.5's " A"):
    extract.prompts. batch_tokens: padded tokens per forward pass. calibrate: also record every head's
    scores on each question's prompt, in the same forward passes (``result.scores``; read on the
    shared part: the prompt and the tokens its continuations share). scoring: "letter" (definitions §5) or
    "cloze" (module doc). keep_distributions: keep each question's next-token log-probs at its answer position (where its continuations first differ; on
    the row of its first choice) as ``result.answer_logp``. reference: an evaluation of the same questions
    with ``keep_distributions``; adds per question ``kl`` = KL(reference || this) of those distributions and
    ``kl_choices`` = the same over the choices (softmax of their summed log-likelihoods), in nats. pack: a
    question whose choices have several tokens is one packed row (module doc); False: one row per choice
    (the same numbers, the reference layout).
    """
    check_choice("scoring", scoring, SCORINGS)
    from extract.models.load import model_info

    data = load_task(task, limit=limit, progress=progress) if isinstance(task, str) else task
    chat = uses_chat_template(model, tokenizer, chat_template)
    encoded = encode_questions(model, tokenizer, data, k_shot=k_shot, chat=chat, chat_format=chat_format,
                               tokenization=tokenization, chat_delimiter=chat_delimiter, scoring=scoring)
    limit = pack_limit(model) if pack else 0
    rows: list[_Row] = [r for i, (prompt, ids) in enumerate(encoded) for r in _rows(prompt, ids, i, limit)]
    n_tokens = [len(prompt) for prompt, _ in encoded]
    pad = pad_id(model, tokenizer)
    device = next(model.parameters()).device
    groups = batches([len(r.ids) for r in rows], batch_tokens)
    loglik = [[0.0] * len(q.choices) for q in data.questions]
    dists: list[torch.Tensor | None] = [None] * len(data.questions)
    want_dists = keep_distributions or reference is not None
    if reference is not None and (reference.answer_logp is None or reference.n_questions != len(data.questions)):
        raise ValueError("reference= needs an evaluation of the same questions run with keep_distributions=True")
    with (recording(model) if calibrate else nullcontext()) as rec, torch.inference_mode(), \
            tqdm(total=len(rows), unit="prompt", desc=f"eval {data.name}", disable=not progress) as bar:
        for idx in groups:
            values, answer_logp = _forward(model, [rows[k] for k in idx], pad, device, want_dists)
            for k, v_row, d in zip(idx, values, answer_logp):
                for (j, _, _), v in zip(rows[k].reads, v_row):
                    loglik[rows[k].question][j] = v
                if d is not None:
                    dists[rows[k].question] = d
            bar.update(len(idx))
    call_order = [k for idx in groups for k in idx]  # rows in the order they ran
    scores = None
    if calibrate:
        at = {k: n for n, k in enumerate(call_order)}
        first = {}
        for k, r in enumerate(rows):
            first.setdefault(r.question, k)
        scores = rec.scores()[[at[first[i]] for i in range(len(data.questions))]]
    qs = data.questions
    norm = [[1.0] * len(q.choices) if scoring == "letter" else [max(len(c), 1) for c in q.choices] for q in qs]
    predicted = [max(range(len(ll)), key=lambda j: (ll[j] / n[j], -j)) for ll, n in zip(loglik, norm)]
    frame = pl.DataFrame({
        "id": [q.id for q in qs], "task": [q.task for q in qs], "sha256": [q.sha256 for q in qs],
        "answer": [q.answer for q in qs], "predicted": predicted,
        "correct": [p == q.answer for p, q in zip(predicted, qs)], "n_choices": [len(q.choices) for q in qs],
        "n_tokens": n_tokens, "loglik": loglik},
        schema_overrides={"answer": pl.Int32, "predicted": pl.Int32, "n_choices": pl.Int32, "n_tokens": pl.Int64,
                          "loglik": pl.List(pl.Float64)})
    answer_logp = torch.stack(dists) if want_dists and dists else None
    if reference is not None:
        ref_ll = reference.predictions["loglik"].to_list()
        kl_choices = [float(kl_divergence(torch.tensor(a).log_softmax(-1), torch.tensor(b).log_softmax(-1)))
                      for a, b in zip(ref_ll, loglik)]
        if reference.kl_terms is None:  # once per reference: a sweep compares every configuration with it
            reference.kl_terms = kl_reference_terms(reference.answer_logp)
        terms = reference.kl_terms
        frame = frame.with_columns(pl.Series("kl", kl_divergence(reference.answer_logp, answer_logp, terms).tolist(),
                                             pl.Float64), pl.Series("kl_choices", kl_choices, pl.Float64))
    return EvalResult(data.name, model_info(model)["model"], k_shot, chat, scoring, frame, scores,
                      answer_logp if keep_distributions else None,
                      [rows[k].question for k in call_order])
