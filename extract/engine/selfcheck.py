"""First-use self-check of the fast attention backends against the exact portable kernel.

The first forward pass that a (model, device, dtype, backend) runs inside a capture session also recomputes,
in every attention layer, one sampled (example, head) pair with :func:`extract.engine.kernels.exact` (the
``"chunked"`` backend) and compares the per-query output, weight on the first token and entropy over the
example's valid positions. Later forwards of the same key are not checked again. A disagreement beyond
``TOLERANCES`` stops the job with an error naming the backend and ``DORMANT_ATTN_BACKEND``: a fast kernel
that silently returns wrong numbers for some lengths, masks or dtypes never reaches a score table.

Sample: layer ``l`` of a batch of ``B`` examples and ``H`` heads checks example ``b = l % B`` and head
``(b + l // B) % H``: the first ``B x H`` layers check distinct pairs, every example (padded ones too) and
every head recur. Errors: ``out`` is
``max |o - o_exact| / max |o_exact|`` (dimensionless), ``p_first`` an absolute probability, ``entropy``
absolute nats. :func:`checks` returns the recorded outcomes (the shard writer stores them as provenance);
``DORMANT_SELF_CHECK=0`` turns the check off (benchmarks of the check's own cost).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, fields

import torch

from extract.engine import kernels

ENV = "DORMANT_SELF_CHECK"
# (out relative, p_first absolute, entropy absolute nats) per input dtype; half precision rounds the output
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"out": 1e-6, "p_first": 1e-6, "entropy": 1e-5},
    torch.float32: {"out": 1e-3, "p_first": 1e-4, "entropy": 1e-3},
    torch.bfloat16: {"out": 5e-2, "p_first": 1e-3, "entropy": 1e-3},
    torch.float16: {"out": 1e-2, "p_first": 1e-3, "entropy": 1e-3},
}


@dataclass
class SelfCheck:
    """Outcome of the self-check of one (model, device, dtype, backend); errors are maxima over the pairs."""
    model: str
    device: str
    dtype: str
    backend: str
    tolerance: dict[str, float]
    pairs: list[tuple[int, int, int]] = field(default_factory=list)  # (layer, example, head) checked
    max_error: dict[str, float] = field(default_factory=lambda: {"out": 0.0, "p_first": 0.0, "entropy": 0.0})
    passed: bool = True
    seconds: float = 0.0  # wall time spent in the check (device synchronised)
    config: object = field(default=None, repr=False)  # the attention modules' config (kept: its id stays unique)

    def as_dict(self) -> dict:
        """JSON-ready fields, plus ``layers`` (pairs checked), without the config."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "config"}
        return d | {"pairs": [list(p) for p in self.pairs], "max_error": dict(self.max_error),
                    "tolerance": dict(self.tolerance), "layers": len(self.pairs)}


_CHECKS: dict[tuple, SelfCheck] = {}


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def _model_name(cfg) -> str:
    src = getattr(cfg, "dormant_source", None) or {}
    return src.get("name") or getattr(cfg, "_name_or_path", "") or getattr(cfg, "model_type", "unnamed")


def check(module: torch.nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          scale: float, first: torch.Tensor, valid: torch.Tensor, backend: str,
          result: tuple[torch.Tensor, torch.Tensor, torch.Tensor], chunk_size: int = 256) -> None:
    """Check one layer's fast-kernel ``result`` (out ``(B, H, S, D)``, p_first and entropy ``(B, H, S)``) on
    its sampled pair, unless this (model, device, dtype, backend) already checked ``module.layer_idx``.

    q ``(B, H, S, D)``, k, v ``(B, KV, S, D)`` (query head h reads KV head ``h // (H / KV)``), ``mask`` the
    kernel's mask (additive, Blocks or None), ``valid (B, S)``.
    Raises RuntimeError when an error exceeds its tolerance.
    """
    if backend not in kernels.FAST_KERNELS or not enabled():
        return
    cfg = getattr(module, "config", None)
    key = (id(cfg), str(q.device), q.dtype, backend)
    rec = _CHECKS.get(key)
    layer = int(getattr(module, "layer_idx", 0))
    if rec is None:
        rec = _CHECKS[key] = SelfCheck(_model_name(cfg), str(q.device), str(q.dtype).removeprefix("torch."),
                                       backend, dict(TOLERANCES.get(q.dtype, TOLERANCES[torch.float32])),
                                       config=cfg)
    elif any(p[0] == layer for p in rec.pairs):
        return
    sync = torch.cuda.synchronize if q.device.type == "cuda" else (lambda *a: None)
    sync(q.device)
    t0 = time.perf_counter()
    B, H = q.shape[:2]
    b = layer % B
    h = (b + layer // B) % H
    m = None if mask is None else mask.select(b) if isinstance(mask, kernels.Blocks) else mask[b : b + 1]
    kh = h // (H // k.shape[1])
    ref = kernels.exact(q[b : b + 1, h : h + 1], k[b : b + 1, kh : kh + 1], v[b : b + 1, kh : kh + 1], m, scale,
                        first[b : b + 1], chunk_size=chunk_size)
    sel = valid[b]
    got = [x[b, h][sel].double() for x in result]
    exp = [x[0, 0][sel].double() for x in ref]
    err = {"out": float((got[0] - exp[0]).abs().max() / exp[0].abs().max().clamp_min(1e-30)),
           "p_first": float((got[1] - exp[1]).abs().max())}
    if not bool(torch.isnan(got[2]).all()):  # entropy skipped (need_entropy=False): nothing to compare
        err["entropy"] = float((got[2] - exp[2]).abs().max())
    rec.pairs.append((layer, b, h))
    for name, e in err.items():
        rec.max_error[name] = max(rec.max_error[name], e) if e == e else float("nan")
    bad = {n: e for n, e in err.items() if not e <= rec.tolerance[n]}
    sync(q.device)
    rec.seconds += time.perf_counter() - t0
    if bad:
        rec.passed = False
        native = {"flash_cpu": "cpu", "efficient_cuda": "cuda"}
        others = [n for n in kernels.BACKENDS if n != backend and native.get(n, q.device.type) == q.device.type]
        raise RuntimeError(
            f"self-check failed: attention backend {backend!r} disagrees with the exact kernel on {rec.model} "
            f"({rec.device}, {rec.dtype}), layer {layer}, example {b}, head {h}: "
            + ", ".join(f"{n} error {e:.3g} > {rec.tolerance[n]:.3g}" for n, e in bad.items())
            + f". Its scores would be wrong; force another backend with {_env_hint(others)} and report the case.")


def _env_hint(backends: list[str]) -> str:
    return " or ".join(f"DORMANT_ATTN_BACKEND={n}" for n in backends) + " (chunked: exact on any device)"


def checks(model: torch.nn.Module | None = None) -> list[dict]:
    """The recorded self-checks (all, or those of ``model``'s attention modules) as JSON-ready dicts."""
    ids = None
    if model is not None:
        from extract.engine.hooks import decoder_layers

        ids = {id(getattr(layer.self_attn, "config", None)) for layer in decoder_layers(model)}
    return [rec.as_dict() for rec in _CHECKS.values() if ids is None or id(rec.config) in ids]


def reset() -> None:
    """Forget every recorded check (the next forward of every key is checked again)."""
    _CHECKS.clear()
