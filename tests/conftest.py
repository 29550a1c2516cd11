import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import functools

import pytest


@pytest.fixture(scope="session")
def zoo_model():
    """Load a zoo model once per session: ``zoo_model(name) -> (model, tokenizer)``."""
    from extract.models import load_model

    return functools.lru_cache(maxsize=None)(lambda name: load_model(name))
