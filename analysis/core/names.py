"""File-name-safe keys, one rule for every study (standard library only)."""
from __future__ import annotations

import re
from pathlib import Path


def model_key(model: str) -> str:
    """The key of a model in file and directory names: a local path's last component, else the name, with
    every run of characters other than letters, digits, ``_`` and ``-`` replaced by ``_`` (hub ids contain
    ``/``; dots would be taken for a file suffix by the figure writer and by LaTeX)."""
    name = Path(model).name if Path(model).expanduser().exists() else model
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "model"
