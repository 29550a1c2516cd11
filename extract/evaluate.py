"""The multiple-choice evaluator (definitions §5): letter log-likelihoods from batched forward passes.

Prompts and their tokens are built by :mod:`extract.prompts`: plain prompts (the task description, k shots
``"{question}\\nA. {a}\\n...\\nAnswer: {letter}\\n\\n"``, then ``"{question}\\nA. {a}\\n...\\nAnswer:"``), or for
instruct models the chat template in ``chat_format`` ``"multiturn"`` (lm-evaluation-harness
``--apply_chat_template --fewshot_as_multiturn``, the default) or ``"single_user"``; ``tokenization``
``"bos_first"`` (BOS first on plain prompts, the default) or ``"lm_eval"`` (lm-evaluation-harness 0.4.5's).
Prediction: the choice whose letter continuation (" A", " B", ...) has the highest log-likelihood after the
prompt; read at one position when every continuation is one token (after tokens they share, such as the
"\\n" that ``lm_eval`` moves out of a chat generation prompt), else summed over its tokens (one row per
choice). Ties go to the earlier letter.

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
from dataclasses import dataclass

import polars as pl
import torch
from tqdm.auto import tqdm

from extract.data.tasks import LETTERS, TaskData, load_task
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
    ids: list[int]
    question: int
    reads: list[tuple[int, int, list[int]]]  # (choice, position predicting the first token, tokens)
    answer: int | None = None  # on a question's first row: the answer position (where its continuations differ)


def _common_prefix(seqs: list[list[int]]) -> int:
    n = 0
    while all(len(t) > n for t in seqs) and len({t[n] for t in seqs}) == 1:
        n += 1
    return n


def _rows(prompt: list[int], letters: list[list[int]], q: int) -> list[_Row]:
    head = letters[0][:-1]  # tokens every continuation starts with (lm_eval's "\n" after a generation prompt)
    answer = len(prompt) - 1 + min(_common_prefix(letters), len(letters[0]) - 1)
    if all(len(t) == len(head) + 1 and t[:-1] == head for t in letters):
        return [_Row(prompt + head, q, [(j, len(prompt) - 1, t) for j, t in enumerate(letters)], answer)]
    return [_Row(prompt + t[:-1], q, [(j, len(prompt) - 1, t)], answer if j == 0 else None)
            for j, t in enumerate(letters)]


def _forward(model, rows: list[_Row], pad_id: int, device,
             answers: bool = False) -> tuple[list[list[float]], list[torch.Tensor | None]]:
    """Summed log-likelihood of each read of each row and, with ``answers``, the log-probs at each row's answer
    position (``(vocab,)`` float32 on the CPU, None on rows without one), from one forward pass."""
    ids, am = pad_right([r.ids for r in rows], pad_id, device)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    for b, r in enumerate(rows):
        for _, p, t in r.reads:
            keep[b, p:p + len(t)] = True
    flat = torch.cumsum(keep.flatten(), 0).view_as(keep) - 1  # row of the kept logits for (b, position)
    logits = model(input_ids=ids, attention_mask=am, use_cache=False, logits_to_keep=keep).logits
    if logits.dim() != 2 or logits.shape[0] != int(keep.sum()):
        raise RuntimeError(f"logits of shape {tuple(logits.shape)}: this transformers version does not keep "
                           f"logits by a boolean mask (logits_to_keep); upgrade transformers")
    logp = torch.log_softmax(logits.float(), -1)
    values = [[float(sum(logp[flat[b, p + i], tok] for i, tok in enumerate(t))) for _, p, t in r.reads]
              for b, r in enumerate(rows)]
    # a copy: an indexed row is a view that would keep the batch's whole (kept positions, vocab) tensor alive
    return values, [None if r.answer is None or not answers else logp[flat[b, r.answer]].clone().cpu()
                    for b, r in enumerate(rows)]


def kl_divergence(logp_ref: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """``KL(ref || other) = Σ p_ref (log p_ref − log p)`` over the last dimension, in float64 (nats); clipped
    at 0, since float32 log-probs of two nearly equal distributions can sum to -1e-7."""
    ref, other = logp_ref.double(), logp.double()
    p = ref.exp()
    return torch.where(p > 0, p * (ref - other), 0.0).sum(-1).clamp_min(0.0)  # 0 · log 0 = 0


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
             keep_distributions: bool = False, reference: EvalResult | None = None,
             progress: bool = True) -> EvalResult:
    """Evaluate ``model`` on a multiple-choice task (a name is loaded with ``limit``, see extract.data.tasks).

    k_shot: shots from the task's held-out pool (the first k). chat_template: None = the chat template for
    instruct models. chat_format ("multiturn", "single_user"), tokenization ("bos_first", "lm_eval") and
    chat_delimiter ("none": the bare letter after a multiturn chat prompt, "space": lm-eval 0.4.5's " A"):
    extract.prompts. batch_tokens: padded tokens per forward pass. calibrate: also record every head's
    scores on each question's prompt, in the same forward passes (``result.scores``; the row read, i.e.
    the prompt and the tokens its continuations share, or with multi-token continuations the row of the
    first choice). scoring: "letter" (definitions §5) or "cloze" (module doc). keep_distributions: keep
    each question's next-token log-probs at its answer position (where its continuations first differ; on
    the row of its first choice) as ``result.answer_logp``. reference: an evaluation of the same questions
    with ``keep_distributions``; adds per question ``kl`` = KL(reference || this) of those distributions and
    ``kl_choices`` = the same over the choices (softmax of their summed log-likelihoods), in nats.
    """
    check_choice("scoring", scoring, SCORINGS)
    from extract.models.load import model_info

    data = load_task(task, limit=limit, progress=progress) if isinstance(task, str) else task
    chat = uses_chat_template(model, tokenizer, chat_template)
    encoded = encode_questions(model, tokenizer, data, k_shot=k_shot, chat=chat, chat_format=chat_format,
                               tokenization=tokenization, chat_delimiter=chat_delimiter, scoring=scoring)
    rows: list[_Row] = [r for i, (prompt, ids) in enumerate(encoded) for r in _rows(prompt, ids, i)]
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
        frame = frame.with_columns(pl.Series("kl", kl_divergence(reference.answer_logp, answer_logp).tolist(),
                                             pl.Float64), pl.Series("kl_choices", kl_choices, pl.Float64))
    return EvalResult(data.name, model_info(model)["model"], k_shot, chat, scoring, frame, scores,
                      answer_logp if keep_distributions else None,
                      [rows[k].question for k in call_order])
