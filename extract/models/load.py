"""Load causal LMs by zoo name, hub id, local HF directory or local ``.gguf`` file; describe them.

A GGUF checkpoint is dequantised once (float32), saved as safetensors + tokenizer under
``models/<sha256[:16]>/`` of the cache with a ``source.json`` of its provenance, and loaded from there
afterwards without network access. The zoo registry is in ``extract.models.zoo``, the download / assembly
code and the cache in ``extract.models.fetch`` (``ZOO``, ``ZooEntry`` and ``fetch`` are re-exported here).
"""
from __future__ import annotations

import json
import re
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from analysis.core.io import atomic_dir
from extract.errors import ChecksumError, DormantError, HubError, UnknownModelError
from extract.models.fetch import converted_dir, fetch, licence_files, local_sha256
from extract.models.zoo import HUB_ID, ZOO, ZooEntry, get_entry, looks_local, model_name_problem, provenance

__all__ = ["ZOO", "ZooEntry", "fetch", "convert", "converted_model_dir", "load_model", "model_info",
           "guess_variant", "DormantError", "ChecksumError", "UnknownModelError", "HubError"]

_INSTRUCT = re.compile(r"instruct|chat|sft|dpo|rlhf|(^|[-_/.])it($|[-_/.])")


def guess_variant(name: str) -> str:
    """"instruct" if the name looks like a tuned checkpoint (instruct, chat, -it, sft, dpo), else "base"."""
    return "instruct" if _INSTRUCT.search(name.lower()) else "base"


def _gguf_quantisation(path: Path) -> tuple[str | None, str | None]:
    """(file type such as "Q4_K_M", general.name) read from a GGUF header; None where absent."""
    import gguf

    fields = gguf.GGUFReader(path).fields
    ftype = fields["general.file_type"].contents() if "general.file_type" in fields else None
    name = fields["general.name"].contents() if "general.name" in fields else None
    try:
        quant = gguf.LlamaFileType(ftype).name.removeprefix("MOSTLY_") if ftype is not None else None
    except ValueError:
        quant = f"file type {ftype}"
    return quant, name


def convert(gguf_path: Path, source: dict[str, Any], licences: Sequence[Path] = ()) -> Path:
    """Dequantise ``gguf_path`` (float32) into ``models/<sha256[:16]>/`` once; returns that directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from extract.engine.attention import ATTN_NAME, register

    final = converted_dir(source["sha256"])
    if (final / "source.json").is_file():
        return final
    register()
    kw = dict(gguf_file=gguf_path.name)
    try:
        with atomic_dir(final) as tmp:  # replaces an incomplete one (no source.json)
            tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
            model = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, **kw, dtype=torch.float32, attn_implementation=ATTN_NAME,
                quantization_config=GgufConfig(gguf_file=gguf_path.name, dequantize=True))
            if getattr(model, "hf_quantizer", None) is not None:  # weights are dense float32 now
                model.hf_quantizer.remove_quantization_config(model)
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            for lic in licences:
                (tmp / "licences").mkdir(exist_ok=True)
                shutil.copy2(lic, tmp / "licences" / lic.name)
            (tmp / "source.json").write_text(json.dumps(source, indent=2) + "\n")
    except Exception as e:
        if (final / "source.json").is_file():  # another process converted it meanwhile
            return final
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DormantError(f"could not convert {gguf_path} with transformers ({type(e).__name__}: {msg}); "
                           f"the architecture may be unsupported or the file damaged") from e
    return final


def _zoo_dir(entry: ZooEntry, progress: bool) -> Path:
    """The converted directory of a zoo model, fetching and converting it first if needed."""
    if (converted_dir(entry.sha256) / "source.json").is_file():
        return converted_dir(entry.sha256)
    path = fetch(entry, progress)
    return convert(path, provenance(entry), licence_files(entry))


def converted_model_dir(name: str, progress: bool = True) -> Path:
    """Fetch (if needed) and convert (once) the zoo model ``name``; returns its converted directory."""
    return _zoo_dir(get_entry(name), progress)


def _gguf_dir(path: Path, progress: bool) -> Path:
    """The converted directory of a local .gguf file (keyed by its sha256)."""
    sha = local_sha256(path, progress)
    if (converted_dir(sha) / "source.json").is_file():
        return converted_dir(sha)
    quant, general_name = _gguf_quantisation(path)
    source = dict(name=str(path), upstream=general_name, variant=guess_variant(path.name),
                  quantisation=quant, sha256=sha, gguf_file=path.name, packages=[])
    return convert(path, source)


def _from_pretrained(where: str | Path, dtype: torch.dtype, local: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from extract.engine.attention import ATTN_NAME, register

    register()
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, attn_implementation=ATTN_NAME,
                                                 local_files_only=local)
    return model, AutoTokenizer.from_pretrained(where, local_files_only=local)


def load_model(name_or_path: str | Path, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", progress: bool = True):
    """(model, tokenizer) for a zoo name, a local ``.gguf`` file, a local HF directory or a hub id.

    The model is in eval mode on ``device`` in ``dtype`` and runs attention through ``extract.engine.attention``;
    ``model.config.dormant_source`` holds its provenance (read by ``model_info``).
    """
    spec = str(name_or_path)
    path = Path(spec).expanduser()
    source: dict[str, Any] = {"name": spec, "upstream": None, "variant": guess_variant(spec),
                              "quantisation": None, "sha256": None}
    if spec in ZOO:
        path = _zoo_dir(get_entry(spec), progress)
    elif spec.endswith(".gguf"):
        if not path.is_file():
            raise DormantError(f"GGUF file not found: {path}; check the path, or use a zoo name "
                               f"({', '.join(ZOO)})")
        path = _gguf_dir(path, progress)
    elif path.exists():
        if not (path / "config.json").is_file():
            raise DormantError(f"{path} is not a model directory (no config.json); pass a directory written by "
                               f"save_pretrained, a .gguf file, a hub id or a zoo name")
    elif looks_local(spec):
        raise UnknownModelError(f"model {spec!r}: {model_name_problem(spec)}")
    elif HUB_ID.match(spec):
        source["upstream"] = spec
        try:
            model, tok = _from_pretrained(spec, dtype, local=False)
        except OSError as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise HubError(f"cannot load {spec!r} from the Hugging Face hub ({reason}); the hub cannot be reached "
                           f"or has no such model: download it elsewhere and pass its local directory, or use a "
                           f"zoo name ({', '.join(ZOO)})") from None
        return _finish(model, tok, source, device)
    else:
        raise UnknownModelError(f"unknown model {spec!r}: not a zoo name, an existing path or a hub id "
                                f"(org/name); zoo models: {', '.join(ZOO)}")
    if (path / "source.json").is_file():
        source.update(json.loads((path / "source.json").read_text()))
    model, tok = _from_pretrained(path, dtype, local=True)
    return _finish(model, tok, source, device)


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True if this CPU computes bf16 natively (``amx_bf16`` or ``avx512_bf16`` in /proc/cpuinfo); elsewhere bf16
    matmuls are emulated, 4-9x slower than float32 (docs/bf16.md). False when /proc/cpuinfo is unreadable."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = set(cpuinfo.split())
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def _finish(model, tok, source: dict[str, Any], device):
    if torch.device(device).type == "cpu" and model.dtype == torch.bfloat16 and not cpu_has_native_bf16():
        warnings.warn("bfloat16 on a CPU without AMX/AVX512-BF16 runs several times slower than float32; "
                      "set scoring.dtype: float32 (or pass --dtype float32)", stacklevel=3)
    model.eval().to(device)
    keys = ("name", "upstream", "variant", "quantisation", "sha256")
    model.config.dormant_source = {k: source.get(k) for k in keys}
    return model, tok


def model_info(model) -> dict[str, Any]:
    """Name, provenance and shape of a loaded model (works without provenance, e.g. tiny random models)."""
    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    src = dict(getattr(cfg, "dormant_source", None) or {})
    name = src.get("name") or getattr(cfg, "name_or_path", "") or "unnamed"
    entry = ZOO.get(name)
    n_heads = text.num_attention_heads
    dtype = next(model.parameters()).dtype
    return {
        "model": name,
        "upstream": src.get("upstream") or (entry.upstream if entry else None),
        "family": text.model_type,
        "variant": entry.variant if entry else src.get("variant") or guess_variant(name),
        "quantisation": src.get("quantisation") or f"none ({str(dtype).removeprefix('torch.')})",
        "n_params": sum(p.numel() for p in model.parameters()),
        "n_layers": text.num_hidden_layers,
        "n_heads": n_heads,
        "n_kv_heads": getattr(text, "num_key_value_heads", None) or n_heads,
        "head_dim": getattr(text, "head_dim", None) or text.hidden_size // n_heads,
        "d_model": text.hidden_size,
        "source_sha256": src.get("sha256"),
    }
