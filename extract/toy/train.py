"""Train one toy model on Bigram-Backcopy (definitions §7): fresh seeded batches every step, metrics at log-spaced
checkpoints, interventions at the end.

Writes into ``out_dir``: ``config.json`` (model), ``run.json`` (the :class:`RunSpec`, every field),
``step-<n>.safetensors`` (state dict at every checkpoint) and ``metrics.parquet``, the ``bb_metrics`` rows
(:data:`METRICS_SCHEMA`: ``run, step, metric, layer, part, value``): the :mod:`extract.toy.metrics` metrics at
every checkpoint (``layer`` null for the model's own metrics, ``part`` null), ``train_s`` = cumulative
training wall time in seconds without the metric passes, and at the last step the interventions (``part`` =
the zeroed ``attn`` / ``mlp`` of ``layer``).
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import polars as pl
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from analysis.core import provenance
from analysis.core.io import atomic_path, write_json, write_parquet
from extract.toy.data import BigramBackcopy, corpus_task
from extract.toy.metrics import Key, interventions, measure
from extract.toy.model import toy_model
from extract.toy.spec import RunSpec

__all__ = ["METRICS_SCHEMA", "RunSpec", "checkpoint_steps", "loss_labels", "make_optimizer", "task_of", "train"]

# the bb_metrics rows (analysis.database: the table; NULL layer / part are stored there as -1 / '')
METRICS_SCHEMA = {"run": pl.Utf8, "step": pl.Int32, "metric": pl.Utf8, "layer": pl.Int32, "part": pl.Utf8,
                  "value": pl.Float64}


def checkpoint_steps(steps: int, n: int) -> list[int]:
    """Step 0 plus about ``n`` log-spaced steps in [1, steps], always including ``steps``."""
    s = np.unique(np.round(np.logspace(0, np.log10(max(steps, 1)), n)).astype(int))
    return [0] + [int(v) for v in s if 1 <= v <= steps] + ([steps] if steps not in s else [])


def make_optimizer(spec: RunSpec, params) -> torch.optim.Optimizer:
    if spec.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, betas=tuple(spec.betas))
    if spec.optimizer == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum)
    raise ValueError(f"optimizer={spec.optimizer!r}; choose 'adamw' or 'sgd'")


def loss_labels(x: torch.Tensor, bos_loss: bool = True) -> torch.Tensor:
    """Labels ``(B, S)`` for the next-token loss on ``x``: ``x`` itself, or without ``bos_loss`` with position 1
    (the character predicted at ``<s>``) set to -100, which the loss ignores."""
    return x if bos_loss else x.index_fill(1, torch.tensor([1], device=x.device), -100)


def task_of(spec: RunSpec) -> BigramBackcopy:
    """The task ``spec`` names: its corpus's character bigrams, ``triggers`` and ``min_count``."""
    return corpus_task(spec.corpus, k=spec.triggers, min_count=spec.min_count)


def _rows(run: str, step: int, values: dict[Key, float]) -> list[dict]:
    return [{"run": run, "step": step, "metric": m, "layer": layer, "part": part, "value": float(v)}
            for (m, layer, part), v in values.items()]


def train(spec: RunSpec, task: BigramBackcopy | None, out_dir: Path, *, device: str = "cpu",
          progress: bool = True) -> pl.DataFrame:
    """Train ``spec`` on ``task`` (None: :func:`task_of` ``spec``; batches sampled on the CPU, the model on
    ``device``); write the files of the module doc; return the metrics frame."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = provenance.run_record("toy", asdict(spec), model=f"toy:{spec.name}", device=str(torch.device(device)),
                                dtype="float32", attention_backend=f"toy {spec.attention} attention",
                                prompt_format="Bigram-Backcopy sequences (extract.toy.data)",
                                start_time=provenance.now())
    task = task_of(spec) if task is None else task
    model = toy_model(task.vocab_size, width=spec.width, layers=spec.layers, length=spec.length,
                      attention=spec.attention, init=spec.init, seed=spec.seed).to(device)
    model.config.to_json_file(out_dir / "config.json")
    write_json(out_dir / "run.json", asdict(spec))
    opt = make_optimizer(spec, model.parameters())
    gen = torch.Generator().manual_seed(spec.seed)
    x_eval = task.sample(spec.eval_batch, spec.length, torch.Generator().manual_seed(10_000 + spec.seed)).to(device)
    marks = set(checkpoint_steps(spec.steps, spec.checkpoints))
    rows: list[dict] = []
    train_s = 0.0

    def checkpoint(step: int) -> None:
        model.eval()
        with atomic_path(out_dir / f"step-{step:06d}.safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
        rows.extend(_rows(spec.name, step, measure(model, task, x_eval) | {("train_s", None, None): train_s}))
        model.train()

    checkpoint(0)
    bar = tqdm(range(1, spec.steps + 1), desc=spec.name, disable=not progress, mininterval=2.0)
    for step in bar:
        t0 = time.perf_counter()
        x = task.sample(spec.batch, spec.length, gen).to(device)
        loss = model(x, labels=loss_labels(x, spec.bos_loss)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train_s += time.perf_counter() - t0
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{spec.name}: loss is {loss.item()} at step {step}; lower the learning rate")
        if step in marks:
            checkpoint(step)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    rows.extend(_rows(spec.name, spec.steps, interventions(model, task, x_eval)))
    df = provenance.stamped(pl.DataFrame(rows, schema=METRICS_SCHEMA), run)
    write_parquet(df, out_dir / "metrics.parquet", run=provenance.finished(run))
    return df
