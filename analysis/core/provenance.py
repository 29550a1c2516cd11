"""Provenance of one job: the ``runs`` row that every result row joins to (standard library only).

:func:`run_record` builds the row (the columns of ``analysis.core.tables`` table ``runs``): package version and
git commit, Python / torch / transformers versions, device, dtype, attention backend, the model's source sha256,
the prompt format, the job's config (JSON) and its hash, start and end time (UTC, ISO 8601, seconds). A job on
a loaded model fills the model's fields with ``extract.provenance.run_record``; a job without one (a toy model
trained from scratch, a statistics job on the database) leaves them NULL or names what it ran.

``run_id``: the first 16 hex digits of the sha256 of every field but the two times. It is a content hash, not
a uuid: the same code, libraries, device, model and config give the same ``run_id``, so a rerun of a job (after
a kill, or of a whole workflow) replaces its row instead of adding a second one that looks like another run;
anything that could change a result (a new commit, another torch, another GPU) gives a new one.

Where it is stored: every Parquet file a job writes for the database carries ``run_id`` on each row and the row
itself as JSON in its key-value metadata (:data:`RUN_KEY`; ``analysis.core.io.write_parquet(..., run=)``);
building the database upserts those rows into ``runs``. The sweep also writes it as ``runs.parquet``.
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


def config_hash(config: dict) -> str:
    """sha256 of the config as canonical JSON (sorted keys, no spaces: the workflow's ``settings_json``)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def run_id(record: dict) -> str:
    """The content hash of a run: every field but ``run_id`` and the times (module doc)."""
    fields = {k: v for k, v in record.items() if k not in ("run_id", *_TIMES)}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def run_record(kind: str, config: dict, *, model: str | None = None, device: str | None = None,
               dtype: str | None = None, attention_backend: str | None = None, model_sha256: str | None = None,
               prompt_format: str | None = None, start_time: str, end_time: str | None = None) -> dict:
    """The ``runs`` row of one job: ``kind`` the command (``score``, ``sweep``, ``maps``, ``toy``, ...),
    ``config`` every setting of the job (JSON-ready); the other fields as in table ``runs`` (None: NULL)."""
    record = {
        "kind": kind,
        "model": model,
        "package_version": version("dormant-heads"),
        "git_commit": git_commit(),
        "python_version": platform.python_version(),
        "torch_version": version("torch"),
        "transformers_version": version("transformers"),
        "device": device,
        "dtype": dtype,
        "attention_backend": attention_backend,
        "model_sha256": model_sha256,
        "prompt_format": prompt_format,
        "config_hash": config_hash(config),
        "config": json.dumps(config, sort_keys=True, separators=(",", ":")),
        "start_time": start_time,
        "end_time": end_time,
    }
    record = {"run_id": run_id(record), **record}
    assert list(record) == tables.column_names("runs"), "analysis.core.provenance and the runs table disagree"
    return record


def finished(record: dict) -> dict:
    """``record`` with its end time now."""
    return {**record, "end_time": now()}


def runs_frame(record: dict):
    """The one-row polars frame of ``record`` (table ``runs``), as the sweep writes it."""
    import polars as pl

    return pl.DataFrame([record], schema=tables.polars_schema("runs"))


def stamped(df, record: dict):
    """``df`` with a ``run_id`` column (last) holding ``record``'s id: the rows a job writes join its run."""
    import polars as pl

    return df.with_columns(pl.lit(record["run_id"], pl.String).alias("run_id"))


def write_with_run(df, out, record: dict):
    """Write a job's result frame ``df`` to the Parquet file ``out`` (atomically) as the database reads it:
    :func:`stamped` with ``record``'s ``run_id``, and the row itself, ended now, in the file's metadata;
    returns ``out``."""
    from analysis.core.io import write_parquet

    return write_parquet(stamped(df, record), out, run=finished(record))
