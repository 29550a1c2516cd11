"""A deliberately perturbed copy of a model: the positive control of the distribution statistics (SPEC §6).

Every attention query and key projection weight ``W`` (``q_proj``, ``k_proj`` of each layer) gets seeded
Gaussian noise ``W += scale · rms(W) · N(0, 1)``, with ``rms(W) = ‖W‖_F / sqrt(numel)``, so
``‖ΔW‖_F / ‖W‖_F ≈ scale``. Values, output projections, MLPs, norms and embeddings are untouched, so
only the attention patterns change directly (layer 0's value vectors, for example, stay bit-identical).
"""
from __future__ import annotations

import torch

from extract.errors import DormantError

TARGETS = ("q_proj", "k_proj")


def perturb_attention(model, scale: float, seed: int = 0, targets: tuple[str, ...] = TARGETS) -> dict[str, float]:
    """Add the noise in place; returns ``{parameter name: ‖ΔW‖_F / ‖W‖_F}`` (float32 or wider weights)."""
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
