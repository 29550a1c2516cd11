"""BIG-bench task files read straight out of the ``bigbench==1.0.0`` sdist, which is never installed.

Layout under ``cache_dir()``::

    bigbench/bigbench-1.0.0.tar.gz        the sdist as ``pip download`` saved it (+ ``.sha256`` once verified)
    bigbench/tasks-<key>/<path>/task.json members extracted on first use (``<path>``: ``task`` or
                                          ``task/subtask``); ``members.json`` lists every task path of the tar

A ``.tar.gz`` has no member index, so finding a member means decompressing up to the whole 358 MB: every
member still missing is extracted in one pass and kept, later reads only open the small JSON files.
The tar can be replaced by a local one (tests, offline copies) with env ``DORMANT_BIGBENCH_TAR`` or the
``tar`` argument; such a tar is taken as given (no hash check) and gets its own extraction directory.

Downloading an sdist with pip makes pip prepare its metadata (it runs the package's build backend in an
isolated build environment); nothing is installed. pip >= 26.3 refuses bigbench outright because its
metadata declares a direct-URL dependency (bleurt), even with ``--no-deps``; the download then falls back
to pip ``PIP_FALLBACK`` run from its own wheel (``python pip.whl/pip download ...``).
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

from tqdm.auto import tqdm

from analysis.core.io import write_bytes
from extract.errors import ChecksumError, DormantError, DownloadError
from extract.models.fetch import cache_dir, ensure_wheel, is_verified, pip_command, sha256_file, write_sidecar

PACKAGE, VERSION = "bigbench", "1.0.0"
FILENAME = "bigbench-1.0.0.tar.gz"
SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
SIZE = 358_249_635  # bytes
PIP_FALLBACK = "26.2"  # the last pip that downloads sdists declaring direct-URL dependencies
MEMBER = re.compile(r"^[^/]+/bigbench/benchmark_tasks/(.+)/task\.json$")


def bigbench_dir() -> Path:
    return cache_dir() / "bigbench"


def download_sdist(package: str, version: str, dest: Path, progress: bool = True) -> Path:
    """``pip download --no-deps --no-binary :all:`` of ``package==version`` into ``dest``; the saved file."""
    dest.mkdir(parents=True, exist_ok=True)
    args = ["download", "--no-deps", "--no-binary", ":all:", "-d", str(dest), f"{package}=={version}"]
    if not progress:
        args += ["--quiet", "--progress-bar", "off"]
    res = _run_pip(pip_command() + args, progress)
    if res.returncode != 0 and "cannot declare direct URL dependencies" in res.stderr:
        wheel = ensure_wheel("pip", PIP_FALLBACK, progress)
        res = _run_pip([sys.executable, str(wheel / "pip")] + args, progress)
    found = sorted(dest.glob(f"{package}-{version}.*"))
    if res.returncode != 0 or not found:
        last = next((ln.strip() for ln in reversed(res.stderr.splitlines()) if ln.strip()), "")
        raise DownloadError(f"could not download the sdist {package}=={version} with pip (exit {res.returncode}"
                            f"{': ' + last if last else ''}); check network / PyPI access")
    return found[0]


def _run_pip(cmd: list[str], progress: bool) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, stdout=2 if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def verified_sdist(path: Path, sha256: str, size: int | None, progress: bool) -> Path:
    """``path`` once its sha256 matches (recorded in a sidecar); a mismatching file is deleted."""
    if is_verified(path, sha256, size):
        return path
    got = sha256_file(path, progress)
    if got != sha256:
        path.unlink(missing_ok=True)
        raise ChecksumError(f"sha256 mismatch for {path.name}: expected {sha256}, got {got}; "
                            f"the file was deleted, fetch again to re-download it")
    write_sidecar(path, got)
    return path


def fetch(progress: bool = True) -> Path:
    """The verified ``bigbench-1.0.0.tar.gz`` in the cache, downloaded first if missing."""
    target = bigbench_dir() / FILENAME
    if not target.is_file():
        download_sdist(PACKAGE, VERSION, bigbench_dir(), progress)
    return verified_sdist(target, SHA256, SIZE, progress)


def tar_path(tar: Path | str | None = None, progress: bool = True) -> Path:
    """The tar to read: ``tar``, else env ``DORMANT_BIGBENCH_TAR``, else the fetched sdist."""
    override = tar or os.environ.get("DORMANT_BIGBENCH_TAR")
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise DormantError(f"BIG-bench tar {path} not found; unset DORMANT_BIGBENCH_TAR to use the sdist")
        return path
    return fetch(progress)


def _tasks_dir(tar: Path) -> Path:
    if tar.name == FILENAME and tar.parent == bigbench_dir():
        return bigbench_dir() / f"tasks-{VERSION}-{SHA256[:12]}"
    st = tar.stat()
    key = hashlib.sha256(f"{tar.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return bigbench_dir() / f"tasks-local-{key}"


def _extract(tar: Path, wanted: set[str], out: Path, progress: bool) -> None:
    """One pass over ``tar``: write the wanted task.json members under ``out`` and the list of all tasks."""
    names: list[str] = []
    bar = tqdm(total=tar.stat().st_size, unit="B", unit_scale=True, desc=f"scan {tar.name}", disable=not progress)
    try:
        with open(tar, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as tf:
            for m in tf:
                bar.update(raw.tell() - bar.n)
                hit = MEMBER.match(m.name)
                if not (hit and m.isfile()):
                    continue
                names.append(hit.group(1))
                if hit.group(1) in wanted:
                    write_bytes(out / hit.group(1) / "task.json", tf.extractfile(m).read())
    except (tarfile.TarError, zlib.error, EOFError, gzip.BadGzipFile) as e:
        raise DormantError(f"cannot read BIG-bench tar {tar} ({type(e).__name__}: {e}); "
                           f"delete it and run `dormant data fetch` again") from None
    finally:
        bar.close()
    write_bytes(out / "members.json", json.dumps(sorted(names), indent=0).encode())


def task_paths(tar: Path | str | None = None, progress: bool = True) -> list[str]:
    """Every task path of the tar (``task`` or ``task/subtask``), sorted; scans the tar once."""
    path = tar_path(tar, progress)
    out = _tasks_dir(path)
    if not (out / "members.json").is_file():
        _extract(path, set(), out, progress)
    return json.loads((out / "members.json").read_text())


def read_tasks(paths: list[str], tar: Path | str | None = None, progress: bool = True) -> dict[str, dict]:
    """The parsed ``task.json`` of each BIG-bench task path (e.g. ``"gem/xsum"``), in one tar pass at most."""
    path = tar_path(tar, progress)
    out = _tasks_dir(path)
    index = out / "members.json"
    known = set(json.loads(index.read_text())) if index.is_file() else None
    missing = {p for p in paths if not (out / p / "task.json").is_file()}
    if known is not None and missing - known:
        _unknown(missing - known, known)
    if missing:
        _extract(path, missing, out, progress)
        known = set(json.loads(index.read_text()))
        if missing - known:
            _unknown(missing - known, known)
    return {p: json.loads((out / p / "task.json").read_text(encoding="utf-8")) for p in paths}


def _unknown(bad: set[str], known: set[str]) -> None:
    some = ", ".join(sorted(k for k in known if "/" not in k)[:12])
    raise DormantError(f"no BIG-bench task {sorted(bad)[0]!r} in the tar; task paths look like "
                       f"'task' or 'task/subtask', e.g. {some} (`dormant data tasks --all` lists them)")
