"""Atomic writes, the one implementation in the project (standard library only).

Every file the project writes goes to a temporary name beside its target and is renamed into place when it
is complete, so a reader (or a rerun after a crash) sees either the old file or the whole new one, never a
half-written one. The temporary name carries the process id, so two writers never share one. A full disk
(or quota) is a :class:`WriteError` naming the file, the previous file kept.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator


class WriteError(OSError):
    """A write that failed for want of space (or quota): the message names the file and the fix; the
    previous file is kept. The command line prints it on one line."""

    def __str__(self) -> str:
        return self.strerror


def _disk_full(e: Exception) -> bool:
    """An OSError ENOSPC/EDQUOT, or a library's own error wrapping one (polars, DuckDB: only the message)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(m in str(e) for m in ("No space left on device", "Disk quota exceeded"))


def _tmp(out: Path) -> Path:
    return out.with_name(f".{out.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_path(out: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``out``; on success it is renamed to ``out``, on failure removed,
    so ``out`` is either the old file or the complete new one."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(out)
    try:
        yield tmp
        os.replace(tmp, out)
    except Exception as e:
        if _disk_full(e) and not isinstance(e, WriteError):
            raise WriteError(errno.ENOSPC, f"no space left on the device of {out} while writing it; free some "
                                           "space and run again (the previous file, if any, is kept)") from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``out``; on success it replaces ``out`` (any old or
    incomplete one is removed first), on failure it is removed, so ``out`` is never half-written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        shutil.rmtree(out, ignore_errors=True)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(out: str | Path, data: bytes | str) -> Path:
    """Write ``data`` (str as UTF-8) to ``out`` atomically; returns ``out``."""
    with atomic_path(out) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(out)


def write_json(out: str | Path, obj: Any, indent: int | None = 1) -> Path:
    """``obj`` as JSON (one trailing newline) to ``out``, atomically."""
    return write_bytes(out, json.dumps(obj, indent=indent) + "\n")


def write_jsonl(out: str | Path, rows: Iterable[dict]) -> Path:
    """One JSON object per line (UTF-8, non-ASCII kept) to ``out``, atomically."""
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return Path(out)


def write_parquet(df, out: str | Path, *, run: dict | None = None, metadata: dict[str, str] | None = None) -> Path:
    """A polars frame to a Parquet file, atomically; returns ``out``. ``run``: the job's ``runs`` row
    (``analysis.core.provenance``), stored as JSON in the file's key-value metadata (key
    ``analysis.core.tables.RUN_KEY``), where building the database finds it; ``metadata``: more such pairs."""
    from analysis.core.tables import RUN_KEY

    kv = dict(metadata or {})
    if run is not None:
        kv[RUN_KEY] = json.dumps(run)
    with atomic_path(out) as tmp:
        df.write_parquet(tmp, metadata=kv or None)
    return Path(out)
