"""Small helpers shared by the data registries (:mod:`.corpora`, :mod:`.tasks`): content hashes and seeded
generators, so that every document, question and draw is stable across runs and platforms."""
from __future__ import annotations

import hashlib
import random


def sha256_text(text: str) -> str:
    """Hex sha256 of ``text`` (UTF-8): the content hash stored with every document and question."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seeded_rng(seed: int, *parts: object) -> random.Random:
    """A generator seeded by a string (hashed with sha512 by ``random``: stable across runs and platforms)."""
    return random.Random("|".join(str(p) for p in (seed, *parts)))
