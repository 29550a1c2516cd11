"""Prompt text and tokens of the multiple-choice evaluator (definitions §5).

Text. A question's block is ``"{question}\\nA. {a}\\nB. {b}\\n...\\nAnswer:"`` and a shot's answer its letter;
with ``scoring="cloze"`` the block lists no choices (``"{question}\\nAnswer:"``) and the answer is the choice
text. A plain prompt is the task description, each shot's block followed by ``" {answer}\\n\\n"``, then the
question's block. With the tokenizer's chat template (instruct models) the format is one of
:data:`CHAT_FORMATS`:

* ``multiturn`` (the paper's, lm-evaluation-harness ``--apply_chat_template --fewshot_as_multiturn``): the
  description is the system message (none when it is empty, and the template may then write its own), each
  shot is a user turn holding its block and an assistant turn holding its bare answer, the question's block
  is the last user turn, then the template's generation prompt.
* ``single_user``: the plain prompt up to its final ``"Answer:"`` as one user message, and ``"Answer:"``
  after the generation prompt.

Tokens. Choice j is scored as the continuation ``delimiter + answer_j`` of the prompt: the delimiter is
" " (" A", or " {choice}" for cloze) except after a ``multiturn`` chat prompt, where :data:`CHAT_DELIMITERS`
decide: ``none`` (definitions §5: the bare letter "A" right after the assistant's generation prompt, as
lm-evaluation-harness 0.4.7 and later build it) or ``space`` (lm-evaluation-harness 0.4.5's code keeps its
target delimiter " " in chat mode: lm_eval/api/task.py ``construct_requests``). Then tokenized by one of
:data:`TOKENIZATIONS`:

* ``bos_first``: the prompt's tokens with the tokenizer's BOS first (a chat prompt as its template writes
  it, special tokens included), and each continuation tokenized on its own.
* ``lm_eval`` (lm-evaluation-harness 0.4.5, ``HFLM`` with its default ``add_bos_token``): the tokenizer's
  special tokens are added only for models whose ``model_type`` contains "gemma" (the harness forces its BOS
  there), none for the others (llama, qwen2, olmo2: no BOS unless the template writes one); the prompt's
  trailing whitespace moves to the front of each continuation (after a chat generation prompt: its "\\n",
  so a chat model's continuation is "\\nA", or "\\n A" with ``space``, after ``<|im_start|>assistant``), and a
  continuation's tokens are those of prompt + continuation beyond those of the prompt alone.
"""
from __future__ import annotations

from typing import Literal, Sequence, get_args

from extract.data.tasks import LETTERS, Question

ChatFormat = Literal["multiturn", "single_user"]
Tokenization = Literal["bos_first", "lm_eval"]
ChatDelimiter = Literal["none", "space"]
CHAT_FORMATS: tuple[str, ...] = get_args(ChatFormat)
TOKENIZATIONS: tuple[str, ...] = get_args(Tokenization)
CHAT_DELIMITERS: tuple[str, ...] = get_args(ChatDelimiter)


def delimiter(chat: bool, chat_format: str = "multiturn", chat_delimiter: str = "none") -> str:
    """What precedes each answer in the continuation (module doc): "" only after a ``multiturn`` chat prompt
    with ``chat_delimiter="none"``."""
    check_choice("chat_delimiter", chat_delimiter, CHAT_DELIMITERS)
    return "" if chat and chat_format == "multiturn" and chat_delimiter == "none" else " "


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r}; choose one of {tuple(choices)}")
    return value


def answer_text(q: Question, scoring: str = "letter") -> str:
    """A shot's answer: its letter, or for cloze its choice text."""
    return q.choices[q.answer] if scoring == "cloze" else LETTERS[q.answer]


def format_question(q: Question, with_answer: bool = False, scoring: str = "letter") -> str:
    """``"{question}\\nA. ...\\nAnswer:"``, plus ``" {letter}\\n\\n"`` for a shot; cloze: no choices listed,
    a shot ends with ``" {choice}\\n\\n"``."""
    lines = [q.question] + ([] if scoring == "cloze" else [f"{LETTERS[j]}. {c}" for j, c in enumerate(q.choices)])
    text = "\n".join(lines) + "\nAnswer:"
    return text + f" {answer_text(q, scoring)}\n\n" if with_answer else text


def chat_messages(q: Question, shots: Sequence[Question] = (), description: str = "",
                  scoring: str = "letter") -> list[dict[str, str]]:
    """The ``multiturn`` conversation (module doc), before the generation prompt."""
    messages = [{"role": "system", "content": description}] if description else []
    for s in shots:
        messages += [{"role": "user", "content": format_question(s, False, scoring)},
                     {"role": "assistant", "content": answer_text(s, scoring)}]
    return messages + [{"role": "user", "content": format_question(q, False, scoring)}]


def build_prompt(q: Question, shots: Sequence[Question] = (), description: str = "", tokenizer=None,
                 scoring: str = "letter", chat_format: str = "multiturn") -> str:
    """The prompt text of ``q``; with a ``tokenizer``, in its chat template in ``chat_format`` (module doc)."""
    if tokenizer is not None and check_choice("chat_format", chat_format, CHAT_FORMATS) == "multiturn":
        return tokenizer.apply_chat_template(chat_messages(q, shots, description, scoring), tokenize=False,
                                             add_generation_prompt=True)
    body = description + "".join(format_question(s, True, scoring) for s in shots) + format_question(q, False, scoring)
    if tokenizer is None:
        return body
    user = body.removesuffix("Answer:").rstrip("\n")
    chat = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                         add_generation_prompt=True)
    return chat + "Answer:"


def lm_eval_adds_special_tokens(model) -> bool:
    """lm-evaluation-harness 0.4.5: ``add_bos_token`` is False unless the model type contains "gemma"."""
    return "gemma" in (getattr(model.config, "model_type", "") or "")


def encode(tokenizer, prompts: Sequence[str], continuations: Sequence[Sequence[str]], *, chat: bool,
           tokenization: str = "bos_first", special_tokens: bool = False) -> list[tuple[list[int], list[list[int]]]]:
    """(prompt ids, ids of each continuation) per prompt under ``tokenization`` (module doc); ``chat``: the
    prompts are chat texts; ``special_tokens``: the ``lm_eval`` rule's choice (lm_eval_adds_special_tokens)."""
    if check_choice("tokenization", tokenization, TOKENIZATIONS) == "bos_first":
        ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if prompts else []
        bos = tokenizer.bos_token_id
        cache: dict[str, list[int]] = {}
        cont = lambda c: cache.setdefault(c, tokenizer(c, add_special_tokens=False)["input_ids"])
        return [([bos] + p if not chat and bos is not None else p, [cont(c) for c in cs])
                for p, cs in zip(ids, continuations)]
    texts = []
    for p, cs in zip(prompts, continuations):
        n = len(p) - len(p.rstrip())
        context = p[:len(p) - n]
        texts += [context] + [context + p[len(p) - n:] + c for c in cs]
    ids = iter(tokenizer(texts, add_special_tokens=special_tokens)["input_ids"] if texts else [])
    out = []
    for cs in continuations:
        context = next(ids)
        out.append((context, [next(ids)[len(context):] for _ in cs]))
    return out
