"""Provenance of a job on a loaded model (a score shard, the sweep, MAPS, a domain ablation, a finetune): the
``runs`` row of :mod:`analysis.core.provenance` with the model's fields filled from the model itself (its name,
source sha256, device, dtype and the engine's attention backend). Everything else (``run_id``, the times, how
the row is stored) is documented there.
"""
from __future__ import annotations

from analysis.core.provenance import (RUN_KEY, UNKNOWN, config_hash, finished, git_commit, now, run_id,
                                      runs_frame, stamped, version, write_with_run)
from analysis.core.provenance import run_record as base_record

__all__ = ["RUN_KEY", "UNKNOWN", "attention_backend", "base_record", "config_hash", "device_name", "finished",
           "git_commit", "now", "run_id", "run_record", "runs_frame", "stamped", "version", "write_with_run"]


def attention_backend(model) -> str:
    """The engine's attention backend for ``model`` where it is loaded (``extract.engine.kernels.choose_backend``;
    ``chunked`` under logit soft-capping, as ``extract.engine.attention`` does)."""
    from extract.engine.kernels import choose_backend

    cfg = model.config
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if getattr(text, "attn_logit_softcapping", None) is not None:
        return "chunked"
    return choose_backend(next(model.parameters()).device, None)


def device_name(model) -> str:
    """``cpu``, or ``cuda:0 (NVIDIA H200)``: the device of the model's weights and, on a GPU, its name."""
    import torch

    dev = next(model.parameters()).device
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return str(dev)


def run_record(kind: str, model, config: dict, *, prompt_format: str | None, start_time: str,
               end_time: str | None = None) -> dict[str, str | None]:
    """The ``runs`` row of one job on ``model`` (a loaded model): ``kind`` the command (``score``, ``sweep``,
    ``maps``, ...), ``config`` every setting of the job (JSON-ready), ``prompt_format`` how its text became
    tokens (None: the job reads no text, e.g. parameters only)."""
    from extract.models.load import model_info

    info = model_info(model)
    return base_record(kind, config, model=info["model"], device=device_name(model),
                       dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                       attention_backend=attention_backend(model), model_sha256=info["source_sha256"],
                       prompt_format=prompt_format, start_time=start_time, end_time=end_time)
