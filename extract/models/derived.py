"""Models derived from a loaded model by a rule, and how they are saved (definitions §6).

:func:`save_derived` writes any derived model (the SFT sibling of ``extract.finetune``, the perturbed copy
below) as a local Hugging Face directory whose ``source.json`` (:func:`derived_source`) names its base and
recipe.

:func:`perturb_attention`, a deliberately perturbed copy: the positive control of the distribution statistics.
Every attention query and key projection weight ``W`` (``q_proj``, ``k_proj`` of each layer) gets seeded
Gaussian noise ``W += scale · rms(W) · N(0, 1)``, with ``rms(W) = ‖W‖_F / sqrt(numel)``, so
``‖ΔW‖_F / ‖W‖_F ≈ scale``. Values, output projections, MLPs, norms and embeddings are untouched, so
only the attention patterns change directly (layer 0's value vectors, for example, stay bit-identical).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from analysis.core.io import atomic_dir
from extract.errors import DormantError

TARGETS = ("q_proj", "k_proj")


@dataclass(frozen=True)
class PerturbSettings:
    """The positive control's noise (the config's ``distributions.perturb`` less ``base`` and ``name``)."""
    scale: float = 0.5  # noise std relative to each weight's rms
    seed: int = 0


def perturb_attention(model, scale: float, seed: int = 0, targets: tuple[str, ...] = TARGETS) -> dict[str, float]:
    """Add the noise in place; returns ``{parameter name: ‖ΔW‖_F / ‖W‖_F}`` (float32 or wider weights)."""
    import torch

    if scale < 0:
        raise DormantError(f"perturbation scale must be >= 0, got {scale}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    done = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            parts = name.split(".")
            if len(parts) < 2 or parts[-2] not in targets or parts[-1] != "weight":
                continue
            w = p.detach().double()
            rms = w.norm() / w.numel() ** 0.5
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64) * (scale * rms)
            p.copy_((w + noise.to(w.device)).to(p.dtype))
            done[name] = float(noise.norm() / w.norm())
    if not done:
        raise DormantError(f"no {'/'.join(targets)} weights found in {type(model).__name__}; "
                           f"the perturbation needs a model with separate q/k projections")
    return done


def save_derived(model, tok, out: str | Path, source: dict) -> Path:
    """Save ``model`` + ``tok`` as a local HF directory with ``source.json`` (written last, atomically).

    ``source["name"]`` becomes the model id; ``sha256`` is filled with the digest of the saved weights.
    """
    out = Path(out)
    with atomic_dir(out) as tmp:
        if hasattr(model.config, "dormant_source"):
            del model.config.dormant_source
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        digest = hashlib.sha256()
        for f in sorted(tmp.glob("*.safetensors")):
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    digest.update(block)
        src = {**source, "sha256": digest.hexdigest()}
        (tmp / "source.json").write_text(json.dumps(src, indent=2) + "\n")
    return out


def derived_source(base_info: dict, name: str, variant: str, recipe: dict) -> dict:
    """Provenance of a model derived from ``base_info`` (an ``extract.models.load.model_info`` dict)."""
    return {"name": name, "upstream": base_info.get("upstream"), "variant": variant,
            "quantisation": base_info.get("quantisation"), "base": base_info.get("model"),
            "base_sha256": base_info.get("source_sha256"), "recipe": recipe}
