"""The Bigram-Backcopy task (definitions §7): character bigrams of a real corpus, with backcopy after triggers.

Vocabulary: ``<s>`` (id 0) plus every character that occurs at least ``min_count`` times in the corpus
(rarer characters are dropped from the text before counting bigrams). ``P`` is the row-normalised bigram
matrix (``P[<s>]`` = unigram; nothing transitions to ``<s>``). Triggers: the ``k`` most frequent characters.

A sequence: ``x0 = <s>``; ``x1`` from the unigram with triggers removed; for ``n >= 1``, ``x_{n+1} = x_{n-1}``
when ``x_n`` is a trigger (backcopy), else ``x_{n+1} ~ P(.|x_n)``. The oracle next-token distribution of
every position is known exactly, so excess risks are exact KL divergences, not sampled losses.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

BOS = "<s>"


@dataclass
class BigramBackcopy:
    """The task: ``chars[i]`` is token ``i + 1``; ``P`` ``(V, V)`` float64 rows sum to 1 (row 0: unigram);
    ``first`` ``(V,)`` the distribution of ``x1``; ``triggers`` token ids, most frequent first."""
    chars: list[str]
    P: torch.Tensor
    first: torch.Tensor
    triggers: list[int]

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    def is_trigger(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool tensor of ``ids``' shape: which tokens are triggers."""
        return torch.isin(ids, torch.tensor(self.triggers, device=ids.device))

    def sample(self, batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """``(batch, length)`` int64 token ids, ``x0 = <s>`` (fresh, seeded by ``generator``)."""
        if length < 3:
            raise ValueError(f"Bigram-Backcopy sequences need length >= 3, got {length}")
        cdf = self.P.cumsum(-1)
        cdf[:, -1] = 1.0
        trig = self.is_trigger(torch.arange(self.vocab_size))
        x = torch.zeros(batch, length, dtype=torch.long)
        x[:, 1] = torch.multinomial(self.first, batch, replacement=True, generator=generator)
        u = torch.rand(batch, length, generator=generator, dtype=torch.float64)
        for n in range(1, length - 1):
            cur = x[:, n]
            nxt = torch.searchsorted(cdf[cur], u[:, n, None].contiguous()).squeeze(1).clamp_max(self.vocab_size - 1)
            x[:, n + 1] = torch.where(trig[cur], x[:, n - 1], nxt)
        return x

    def oracle(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The true next-token distribution at every position but the last: ``(B, S-1, V)`` float64, and the
        bool ``(B, S-1)`` mask of backcopy positions (``x_n`` a trigger, ``n >= 1``)."""
        probs = self.P[x[:, :-1]].clone()
        probs[:, 0] = self.first
        backcopy = self.is_trigger(x[:, :-1])
        backcopy[:, 0] = False
        prev = x[:, :-2]  # x_{n-1} for n >= 1
        onehot = torch.nn.functional.one_hot(prev, self.vocab_size).double()
        probs[:, 1:] = torch.where(backcopy[:, 1:, None], onehot, probs[:, 1:])
        return probs, backcopy


def build_task(text: str, *, k: int = 3, min_count: int = 100) -> BigramBackcopy:
    """The task from a corpus ``text`` (see module doc); ``k`` triggers."""
    counts = Counter(text)
    chars = sorted(c for c, n in counts.items() if n >= min_count)
    if len(chars) <= k + 1:
        raise ValueError(f"only {len(chars)} characters occur >= {min_count} times; lower min_count or give more text")
    index = {c: i + 1 for i, c in enumerate(chars)}
    ids = torch.tensor([index[c] for c in text if c in index], dtype=torch.long)
    V = len(chars) + 1
    B = torch.zeros(V, V, dtype=torch.float64)
    B.index_put_((ids[:-1], ids[1:]), torch.ones(len(ids) - 1, dtype=torch.float64), accumulate=True)
    uni = torch.bincount(ids, minlength=V).double()
    B[0] = uni
    B[:, 0] = 0.0
    empty = B.sum(-1) == 0  # a character only ever seen last: fall back to the unigram
    B[empty] = uni
    P = B / B.sum(-1, keepdim=True)
    triggers = [int(i) for i in torch.argsort(uni, descending=True, stable=True)[:k]]
    first = uni.clone()
    first[triggers] = 0.0
    return BigramBackcopy(chars, P, first / first.sum(), triggers)


def corpus_task(corpus: str = "xsum", *, k: int = 3, min_count: int = 100) -> BigramBackcopy:
    """The task built from every document of a project corpus (default: BIG-bench XSum news)."""
    from extract.data.corpora import corpus_documents

    text = "\n".join(t for _, t in corpus_documents(corpus, progress=False))
    return build_task(text, k=k, min_count=min_count)


def save_task(task: BigramBackcopy, path: Path) -> Path:
    """Write the task as JSON (characters, P, first, triggers), atomically."""
    from analysis.core.io import atomic_path

    data = {"chars": task.chars, "P": task.P.tolist(), "first": task.first.tolist(), "triggers": task.triggers}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data))
    return Path(path)


def load_task(path: Path) -> BigramBackcopy:
    """A task written by :func:`save_task`."""
    d = json.loads(Path(path).read_text())
    return BigramBackcopy(d["chars"], torch.tensor(d["P"], dtype=torch.float64),
                          torch.tensor(d["first"], dtype=torch.float64), d["triggers"])
