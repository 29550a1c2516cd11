"""The multiple-choice evaluator (definitions §5): letter log-likelihoods from batched forward passes.

Prompt: the task's description, then k shots ``"{question}\\nA. {a}\\nB. {b}\\n...\\nAnswer: {letter}\\n\\n"``,
then ``"{question}\\nA. {a}\\n...\\nAnswer:"``. With the chat template, everything before the final
``"Answer:"`` is one user message and ``"Answer:"`` follows the assistant's generation prompt, so the letter
is predicted at the same place in both modes. Prediction: the choice whose letter continuation (" A",
" B", ...) has the highest log-likelihood after the prompt; read at one position when every letter is one
token, else summed over the letter's tokens (one row per choice). Ties go to the earlier letter.

``scoring="cloze"`` is a documented deviation for models too small to answer in the lettered format: no
choices listed, shots end with ``"Answer: {choice}"``, and the prediction is the choice whose continuation
``" {choice}"`` has the highest summed log-likelihood per character (lm-evaluation-harness ``acc_norm``).

Rows are grouped longest-first under ``batch_tokens`` padded tokens, right-padded, and run through one
forward of the causal LM (``use_cache=False``, logits only at the positions read). Nothing is cached
between calls: inside ``extract.engine.ablation.ablate(...)`` the same call evaluates the ablated model.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Sequence

import polars as pl
import torch
from tqdm.auto import tqdm

from extract.data.tasks import LETTERS, Question, TaskData, load_task
from extract.engine.scores import batches, pad_id, pad_right, recording
from extract.errors import DormantError


@dataclass
class EvalResult:
    """Accuracy and per-question predictions; ``scores`` with ``calibrate=True``."""
    task: str
    model: str
    k_shot: int
    chat_template: bool
    scoring: str  # "letter" (definitions §5) or "cloze"
    predictions: pl.DataFrame  # id, task, sha256, answer, predicted, correct, n_choices, n_tokens (prompt), loglik
    scores: torch.Tensor | None = None  # (questions, layers, heads, n_scores) float64, score_keys() order

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


def format_question(q: Question, with_answer: bool = False, scoring: str = "letter") -> str:
    """``"{question}\\nA. ...\\nAnswer:"``, plus ``" {letter}\\n\\n"`` for a shot; cloze: no choices listed,
    a shot ends with ``" {choice}\\n\\n"``."""
    if scoring == "cloze":
        return f"{q.question}\nAnswer:" + (f" {q.choices[q.answer]}\n\n" if with_answer else "")
    text = "\n".join([q.question] + [f"{LETTERS[j]}. {c}" for j, c in enumerate(q.choices)]) + "\nAnswer:"
    return text + f" {LETTERS[q.answer]}\n\n" if with_answer else text


def build_prompt(q: Question, shots: Sequence[Question] = (), description: str = "", tokenizer=None,
                 scoring: str = "letter") -> str:
    """The prompt text of ``q``; with a ``tokenizer``, wrapped in its chat template (module doc)."""
    body = description + "".join(format_question(s, True, scoring) for s in shots) + format_question(q, False, scoring)
    if tokenizer is None:
        return body
    user = body.removesuffix("Answer:").rstrip("\n")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)
    return chat + "Answer:"


def uses_chat_template(model, tokenizer, chat_template: bool | None) -> bool:
    """None: the paper's default, the chat template for instruct models that have one."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat_template and not has:
        raise DormantError("chat_template=True but the tokenizer has no chat template; pass chat_template=False")
    if chat_template is None:
        from extract.models.load import model_info

        return has and model_info(model)["variant"] == "instruct"
    return bool(chat_template)


def encode_prompt(tokenizer, text: str, chat: bool, prepend_bos: bool = True) -> list[int]:
    """Token ids of a prompt: a chat text as it is (its template writes its own special tokens), a plain
    one with the tokenizer's BOS first when ``prepend_bos``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos] + ids if not chat and prepend_bos and bos is not None else ids


@dataclass
class _Row:
    ids: list[int]
    question: int
    reads: list[tuple[int, int, list[int]]]  # (choice, position predicting the first token, tokens)


def _rows(prompt: list[int], letters: list[list[int]], q: int) -> list[_Row]:
    if all(len(t) == 1 for t in letters):
        return [_Row(prompt, q, [(j, len(prompt) - 1, t) for j, t in enumerate(letters)])]
    return [_Row(prompt + t[:-1], q, [(j, len(prompt) - 1, t)]) for j, t in enumerate(letters)]


def _forward(model, rows: list[_Row], pad_id: int, device) -> list[list[float]]:
    """Summed log-likelihood of each read of each row, from one forward pass."""
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
    return [[float(sum(logp[flat[b, p + i], tok] for i, tok in enumerate(t))) for _, p, t in r.reads]
            for b, r in enumerate(rows)]


def evaluate(model, tokenizer, task: TaskData | str, *, k_shot: int = 5, limit: int | None = None,
             chat_template: bool | None = None, prepend_bos: bool = True, batch_tokens: int = 8192,
             calibrate: bool = False, scoring: str = "letter", progress: bool = True) -> EvalResult:
    """Evaluate ``model`` on a multiple-choice task (a name is loaded with ``limit``, see extract.data.tasks).

    k_shot: shots from the task's held-out pool (the first k). chat_template: None = the chat template for
    instruct models. batch_tokens: padded tokens per forward pass. calibrate: also record every head's
    scores on each question's prompt, in the same forward passes (``result.scores``; with multi-token
    continuations, the row of the first choice). scoring: "letter" (definitions §5) or "cloze" (module doc).
    """
    if scoring not in SCORINGS:
        raise ValueError(f"scoring={scoring!r}; choose one of {SCORINGS}")
    from extract.models.load import model_info

    data = load_task(task, limit=limit, progress=progress) if isinstance(task, str) else task
    chat = uses_chat_template(model, tokenizer, chat_template)
    letters = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in LETTERS]
    rows: list[_Row] = []
    n_tokens = []
    for i, q in enumerate(data.questions):
        pool = data.shots.get(q.task, [])
        if len(pool) < k_shot:
            raise DormantError(f"{k_shot}-shot asked, but task {q.task!r} has {len(pool)} held-out shots")
        text = build_prompt(q, pool[:k_shot], data.descriptions.get(q.task, ""), tokenizer if chat else None,
                            scoring)
        prompt = encode_prompt(tokenizer, text, chat, prepend_bos)
        n_tokens.append(len(prompt))
        conts = letters[:len(q.choices)] if scoring == "letter" else \
            [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in q.choices]
        rows += _rows(prompt, conts, i)
    pad = pad_id(model, tokenizer)
    device = next(model.parameters()).device
    groups = batches([len(r.ids) for r in rows], batch_tokens)
    loglik = [[0.0] * len(q.choices) for q in data.questions]
    with (recording(model) if calibrate else nullcontext()) as rec, torch.inference_mode(), \
            tqdm(total=len(rows), unit="prompt", desc=f"eval {data.name}", disable=not progress) as bar:
        for idx in groups:
            for k, values in zip(idx, _forward(model, [rows[k] for k in idx], pad, device)):
                for (j, _, _), v in zip(rows[k].reads, values):
                    loglik[rows[k].question][j] = v
            bar.update(len(idx))
    scores = None
    if calibrate:
        call_order = [k for idx in groups for k in idx]
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
    return EvalResult(data.name, model_info(model)["model"], k_shot, chat, scoring, frame, scores)
