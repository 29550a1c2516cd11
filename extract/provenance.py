"""Provenance of one job (a score shard, a sweep): the ``runs`` row that every result row joins to.

:func:`run_record` builds the row (the columns of ``analysis.core.tables`` table ``runs``): package version and
git commit, Python / torch / transformers versions, device, dtype, attention backend, the model's source sha256,
the prompt format, the job's config (JSON) and its hash, start and end time (UTC, ISO 8601, seconds).

``run_id``: the first 16 hex digits of the sha256 of every field but the two times. It is a content hash, not
a uuid: the same code, libraries, device, model and config give the same ``run_id``, so a rerun of a job (after
a kill, or of a whole workflow) replaces its row instead of adding a second one that looks like another run;
anything that could change a result (a new commit, another torch, another GPU) gives a new one. A score shard
holds the row as JSON in its Parquet key-value metadata (:data:`RUN_KEY`) and ``run_id`` on every row; the sweep
writes it as ``runs.parquet`` beside its tables, whose rows carry ``run_id`` too.
"""
from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from analysis.core import tables

RUN_KEY = tables.RUN_KEY
UNKNOWN = "unknown"
_TIMES = ("start_time", "end_time")


def now() -> str:
    """The current UTC time, ISO 8601 to the second (``2025-01-31T12:00:00Z``)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return UNKNOWN


def git_commit(path: Path = Path(__file__).resolve().parent) -> str:
    """``git rev-parse HEAD`` of the checkout holding this package, ``-dirty`` appended when tracked files differ
    from it; ``"unknown"`` outside a checkout (an installed wheel) or without git."""
    try:
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return UNKNOWN
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return UNKNOWN
    return head.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def attention_backend(model) -> str:
    """The engine's attention backend for ``model`` where it is loaded (``extract.engine.kernels.choose_backend``;
    ``chunked`` under logit soft-capping, as ``extract.engine.attention`` does)."""
    from extract.engine.kernels import choose_backend

    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if getattr(text, "attn_logit_softcapping", None) is not None:
        return "chunked"
    return choose_backend(next(model.parameters()).device, None)


def device_name(model) -> str:
    """``cpu``, or ``cuda:0 (NVIDIA H200)``: the device of the model's weights and, on a GPU, its name."""
    import torch

    dev = next(model.parameters()).device
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return str(dev)


def config_hash(config: dict) -> str:
    """sha256 of the config as canonical JSON (sorted keys, no spaces: the workflow's ``settings_json``)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def run_id(record: dict) -> str:
    """The content hash of a run: every field but ``run_id`` and the times (module doc)."""
    fields = {k: v for k, v in record.items() if k not in ("run_id", *_TIMES)}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def run_record(kind: str, model, config: dict, *, prompt_format: str, start_time: str,
               end_time: str | None = None) -> dict[str, str | None]:
    """The ``runs`` row of one job: ``kind`` the command (``score``, ``sweep``), ``model`` the loaded model,
    ``config`` every setting of the job (JSON-ready), ``prompt_format`` how its text became tokens."""
    from extract.models.load import model_info

    info = model_info(model)
    record = {
        "kind": kind,
        "model": info["model"],
        "package_version": version("dormant-heads"),
        "git_commit": git_commit(),
        "python_version": platform.python_version(),
        "torch_version": version("torch"),
        "transformers_version": version("transformers"),
        "device": device_name(model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "attention_backend": attention_backend(model),
        "model_sha256": info["source_sha256"],
        "prompt_format": prompt_format,
        "config_hash": config_hash(config),
        "config": json.dumps(config, sort_keys=True, separators=(",", ":")),
        "start_time": start_time,
        "end_time": end_time,
    }
    record = {"run_id": run_id(record), **record}
    assert list(record) == tables.column_names("runs"), "extract.provenance and the runs table disagree"
    return record


def finished(record: dict) -> dict:
    """``record`` with its end time now."""
    return {**record, "end_time": now()}


def runs_frame(record: dict):
    """The one-row polars frame of ``record`` (table ``runs``), as the sweep writes it."""
    import polars as pl

    return pl.DataFrame([record], schema=tables.polars_schema("runs"))
