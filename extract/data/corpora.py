"""Text corpora as a registry of specs (in the style of lm-evaluation-harness; score distributions, definitions §6).

One domain each: ``xsum`` (news), ``wikilingua`` (how-to prose), both BIG-bench task files, ``math``
(BIG-bench's elementary-math word problems with their formula and answer, 16 consecutive problems per
document, like a worksheet: single problems are too short for the length protocol), and ``code`` (the
``.py`` files of the networkx 3.6.1 sdist, the version pinned in constraints.txt). :func:`sample_corpus`
applies the paper's protocol: N documents, each with a length L drawn uniformly from [min_tokens, max_tokens]
(seeded; stored as ``max_tokens``, the scorer truncates the model's own tokenisation to it, so the file does
not depend on a tokenizer); documents are matched to lengths by :func:`assign_documents` (seeded, preferring
documents long enough for their length). Every document has a stable id and a content sha256.

The multiple-choice tasks are in :mod:`extract.data.tasks`.
"""
from __future__ import annotations

import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from extract.data import bigbench
from extract.data.common import seeded_rng, sha256_text
from extract.errors import DormantError
from extract.models.fetch import cache_dir

CHARS_PER_TOKEN = 6.0  # a document "fits" length L if it has >= 6 L characters (all zoo tokenizers: <= 5.5)


@dataclass(frozen=True)
class CorpusSpec:
    """A text corpus: ``path`` is a BIG-bench task path (source "bigbench") or ``package==version``
    (source "sdist": its ``.py`` files, sdist verified against ``sha256``). ``page`` > 0: a document is
    ``page`` consecutive examples, each ``"{input}\nAnswer: {correct target}"``, joined by blank lines."""
    name: str
    domain: str
    source: str
    path: str
    sha256: str = ""
    note: str = ""
    page: int = 0


CORPORA: dict[str, CorpusSpec] = {c.name: c for c in [
    CorpusSpec("xsum", "news", "bigbench", "gem/xsum", note="BBC articles, inputs of GEM XSum (1001)"),
    CorpusSpec("wikilingua", "howto", "bigbench", "gem/wikilingua_en",
               note="WikiHow articles, inputs of GEM WikiLingua English (1001)"),
    CorpusSpec("math", "math", "bigbench", "elementary_math_qa/question_with_mathematical_hint", page=16,
               note="math word problems with formula and answer (BIG-bench elementary_math_qa, 7688), 16 per document"),
    CorpusSpec("code", "code", "sdist", "networkx==3.6.1",
               sha256="26b7c357accc0c8cde558ad486283728b65b6a95d85ee1cd66bafab4c8168509",
               note="the 671 .py files of the networkx 3.6.1 sdist (pure Python, pinned in constraints.txt)"),
]}


def get_corpus(name: str) -> CorpusSpec:
    if name not in CORPORA:
        raise DormantError(f"unknown corpus {name!r}; corpora: {', '.join(CORPORA)}")
    return CORPORA[name]


def sdist_path(spec: CorpusSpec, progress: bool = True) -> Path:
    """The verified sdist of a "sdist" corpus in ``cache_dir()/sdists``, downloaded first if missing."""
    package, version = spec.path.split("==")
    dest = cache_dir() / "sdists"
    found = sorted(dest.glob(f"{package}-{version}.tar.gz")) if dest.is_dir() else []
    path = found[0] if found else bigbench.download_sdist(package, version, dest, progress)
    return bigbench.verified_sdist(path, spec.sha256, None, progress)


def corpus_documents(name: str, *, tar: Path | str | None = None, progress: bool = True) -> list[tuple[str, str]]:
    """Every candidate document of a corpus as ``(id, text)``, in source order, empty ones left out.

    Ids: ``<corpus>/<index of the (first) example in the task file>``, or
    ``code/<package-version>/<file path>``.
    """
    spec = get_corpus(name)
    if spec.source == "bigbench":
        examples = bigbench.read_tasks([spec.path], tar, progress)[spec.path]["examples"]
        items = [(i, ex) for i, ex in enumerate(examples) if ex["input"].strip()]
        if not spec.page:
            return [(f"{name}/{i}", ex["input"].strip()) for i, ex in items]
        return [(f"{name}/{items[j][0]}", "\n\n".join(f"{ex['input'].strip()}\nAnswer: {correct_target(ex)}"
                                                      for _, ex in items[j:j + spec.page]))
                for j in range(0, len(items), spec.page)]
    docs = []
    with tarfile.open(sdist_path(spec, progress)) as tf:
        for m in sorted((m for m in tf if m.isfile() and m.name.endswith(".py")), key=lambda m: m.name):
            try:
                text = tf.extractfile(m).read().decode("utf-8")
            except UnicodeDecodeError:
                continue
            if text.strip():
                docs.append((f"{name}/{m.name}", text))
    return docs


def correct_target(example: dict) -> str:
    """A BIG-bench example's answer: its ``target`` (the first of a list), else its best-scored choice."""
    t = example.get("target")
    if isinstance(t, list):
        t = t[0] if t else None
    if t is not None:
        return str(t)
    scores = example.get("target_scores") or {}
    if not scores:
        raise DormantError(f"BIG-bench example without target or target_scores: {example.get('input', '')[:60]!r}")
    return max(scores, key=lambda k: scores[k])


def draw_lengths(n: int, min_tokens: int, max_tokens: int, seed: int) -> list[int]:
    """N lengths uniform in [min_tokens, max_tokens] (inclusive); the same for every corpus at one seed."""
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"need 1 <= min_tokens <= max_tokens, got [{min_tokens}, {max_tokens}]")
    rng = seeded_rng(seed, "lengths", n, min_tokens, max_tokens)
    return [rng.randint(min_tokens, max_tokens) for _ in range(n)]


def assign_documents(chars: Sequence[int], lengths: Sequence[int], rng: random.Random) -> list[int]:
    """Which document (index into ``chars``) each length slot gets, each document at most once.

    Documents are shuffled with ``rng``; slots are served longest first, each taking the first unused
    document (shuffled order) with at least ``CHARS_PER_TOKEN * length`` characters, or, when none is left,
    the longest unused one (its text may then hold fewer tokens than the slot's length).
    """
    if len(lengths) > len(chars):
        raise ValueError(f"{len(lengths)} documents asked for, the corpus has {len(chars)}")
    order = list(range(len(chars)))
    rng.shuffle(order)
    free = dict.fromkeys(order)  # insertion-ordered set
    picked = [0] * len(lengths)
    for slot in sorted(range(len(lengths)), key=lambda s: (-lengths[s], s)):
        need = CHARS_PER_TOKEN * lengths[slot]
        doc = next((d for d in free if chars[d] >= need), None)
        if doc is None:
            doc = max(free, key=lambda d: chars[d])
        del free[doc]
        picked[slot] = doc
    return picked


@dataclass(frozen=True)
class CorpusSettings:
    """The sampling protocol of a corpus (the config's ``corpora`` section less ``names``; paper: 100, 10, 3000)."""
    n: int = 100  # documents
    min_tokens: int = 10  # shortest drawn length (tokens of each model's own tokenisation)
    max_tokens: int = 3000  # longest drawn length
    seed: int = 0

    def __post_init__(self):
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) > max_tokens ({self.max_tokens})")


def sample_corpus(name: str, n: int, min_tokens: int, max_tokens: int, seed: int = 0, *,
                  tar: Path | str | None = None, progress: bool = True) -> list[dict]:
    """N examples of a corpus under the truncation protocol (module doc), as JSON-lines rows.

    Row keys: ``id``, ``text`` (the whole document), ``domain``, ``corpus``, ``max_tokens`` (the drawn
    length) and ``sha256`` (of ``text``).
    """
    spec = get_corpus(name)
    docs = corpus_documents(name, tar=tar, progress=progress)
    lengths = draw_lengths(n, min_tokens, max_tokens, seed)
    picked = assign_documents([len(t) for _, t in docs], lengths, seeded_rng(seed, "documents", name))
    return [{"id": docs[d][0], "text": docs[d][1], "domain": spec.domain, "corpus": name, "max_tokens": L,
             "sha256": sha256_text(docs[d][1])} for d, L in zip(picked, lengths)]
