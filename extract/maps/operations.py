"""MAPS operations (definitions §8): the 20 (source, target) pair lists and the single-token filter.

An operation is a list of string pairs. For one tokenizer a pair survives when both sides, given a
leading space, are exactly one token; an operation is used only with at least ``MIN_PAIRS`` survivors.
The data live in ``extract/maps/operations_data/<name>/<name>.json`` (package data) (with source notes and
licences); no torch here.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from extract.errors import DormantError

DATA_DIR = Path(__file__).resolve().parent / "operations_data"  # package data (pyproject.toml)
MIN_PAIRS = 30

CATEGORIES = {
    "general_copying_english_500": "algorithmic", "name_copying": "algorithmic",
    "word_first_letter": "algorithmic", "word_last_letter": "algorithmic", "year_to_following": "algorithmic",
    "country_to_capital_wikidata": "knowledge", "country_to_official_language_wikidata": "knowledge",
    "object_superclass": "knowledge", "product_by_company": "knowledge", "work_location": "knowledge",
    "adj_antonym": "linguistic", "adj_comparative": "linguistic", "adj_superlative": "linguistic",
    "entity_to_pronoun": "linguistic", "verb_past_tense": "linguistic", "word_to_compound": "linguistic",
    "word_to_homophone": "linguistic", "word_to_synonym": "linguistic",
    "english_to_french": "translation", "english_to_spanish": "translation",
}
COPYING = ("general_copying_english_500", "name_copying")


@dataclass(frozen=True)
class Operation:
    """One operation for one tokenizer: surviving pairs as token ids (``src[i] -> tgt[i]``)."""

    name: str
    category: str
    k: int  # top-k of the static / dynamic rule
    src: tuple[int, ...]
    tgt: tuple[int, ...]
    words: tuple[tuple[str, str], ...]  # the surviving pairs as strings (no leading space)
    n_total: int  # pairs in the file
    n_single: int  # pairs surviving the single-token filter (before any cap)


def load_pairs(name: str, root: Path = DATA_DIR) -> list[tuple[str, str]]:
    """The raw (source, target) pairs of operation ``name``."""
    path = Path(root) / name / f"{name}.json"
    if not path.is_file():
        raise DormantError(f"no MAPS operation file {path}; operations: {', '.join(CATEGORIES)} "
                           f"(extract/maps/operations_data/ of the project)")
    return [(str(s), str(t)) for s, t in json.loads(path.read_text(encoding="utf-8"))]


def single_token(tok, word: str) -> int | None:
    """The id of ``" " + word`` if it is exactly one token (no special tokens added), else None."""
    ids = tok(" " + word, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if len(ids) == 1 else None


def filter_pairs(tok, pairs: list[tuple[str, str]]) -> list[tuple[str, str, int, int]]:
    """Pairs whose source and target are single tokens with a leading space, deduplicated, in file order."""
    out, seen = [], set()
    for s, t in pairs:
        si, ti = single_token(tok, s), single_token(tok, t)
        if si is not None and ti is not None and (si, ti) not in seen:
            seen.add((si, ti))
            out.append((s, t, si, ti))
    return out


def prepare(tok, names: list[str] | None = None, *, root: Path = DATA_DIR, k_copy: int = 1, k_other: int = 10,
            max_pairs: int | None = None, seed: int = 0, min_pairs: int = MIN_PAIRS) -> list[Operation]:
    """The operations usable with ``tok`` (≥ ``min_pairs`` single-token pairs), each capped to a seeded
    sample of ``max_pairs`` pairs when given (None: all pairs)."""
    ops = []
    for name in names or list(CATEGORIES):
        if name not in CATEGORIES:
            raise DormantError(f"unknown MAPS operation {name!r}; operations: {', '.join(CATEGORIES)}")
        raw = load_pairs(name, root)
        kept = filter_pairs(tok, raw)
        if len(kept) < min_pairs:
            continue
        use = kept
        if max_pairs is not None and len(kept) > max_pairs:
            idx = sorted(random.Random(f"{seed}:{name}").sample(range(len(kept)), max_pairs))
            use = [kept[i] for i in idx]
        ops.append(Operation(name, CATEGORIES[name], k_copy if name in COPYING else k_other,
                             tuple(p[2] for p in use), tuple(p[3] for p in use),
                             tuple((p[0], p[1]) for p in use), len(raw), len(kept)))
    return ops
