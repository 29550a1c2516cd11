"""The settings of one Bigram-Backcopy toy run (definitions §7), spelled once: :class:`RunSpec`.

Standard library only, so the command line (``dormant toy train --help``) and the workflow (rules/toy.smk,
which writes a run's settings, :func:`run_settings`, as its job's inline ``--config`` JSON) read it without
importing torch. The CLI
takes ``--config run.json`` plus one override flag per field (:func:`extract.cli.add_settings`);
:func:`extract.toy.train.train` writes the instance back as the run's ``run.json``. How it runs (device,
threads, progress bar) is not a setting of the run: those are the command's execution options.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Literal

from analysis.core.settings import setting


@dataclass(frozen=True)
class RunSpec:
    """One training run: its name, the model, the optimiser and schedule, what is measured, and the task.
    ``optimizer``: ``adamw`` (lr, weight_decay, betas) or ``sgd`` (lr, momentum)."""
    name: str = field(metadata={"help": "run name: bb_metrics.run, the run's directory in the workflow"})
    layers: int = setting(1, "transformer blocks (one head each)")
    attention: Literal["softmax", "relu"] = setting("softmax", "softmax, or ReLU(QKᵀ/√d) / i")
    optimizer: Literal["adamw", "sgd"] = setting("adamw", "AdamW (lr, weight decay, betas) or SGD (lr, momentum)")
    width: int = setting(128, "model width (paper: 256)")
    length: int = setting(128, "sequence length (paper: 256)")
    batch: int = setting(32, "sequences per step (paper: 512)")
    steps: int = setting(3000, "optimiser steps")
    lr: float = setting(1e-3, "paper: 3e-4 (AdamW), 0.03 (SGD)")
    weight_decay: float = setting(1e-4, "AdamW only")
    betas: tuple[float, float] = setting((0.9, 0.99), "AdamW only")
    momentum: float = setting(0.9, "SGD only")
    checkpoints: int = setting(20, "log-spaced checkpoints (plus step 0)")
    eval_batch: int = setting(64, "fixed sequences the metrics are measured on")
    seed: int = setting(0, "initialisation, training batches and (offset by 10000) the evaluation batch")
    init: Literal["normal", "torch"] = setting(
        "normal", "normal: N(0, 0.02²) weights; torch: PyTorch's module defaults (the AD authors' code)")
    bos_loss: bool = setting(True, "train on the prediction made at <s> too; --no-bos-loss leaves it out of "
                                    "the loss (a diagnostic)")
    # the task (extract.toy.data.corpus_task): a run trained on another task is another run
    corpus: str = setting("xsum", "corpus whose character bigrams define the task")
    triggers: int = setting(3, "the k most frequent characters trigger backcopy")
    min_count: int = setting(100, "rarer characters are left out of the vocabulary")
    base: str | None = setting(None, "the run this one repeats with another seed (the robustness report "
                                      "pools them); none: the run stands for itself")

    @property
    def base_run(self) -> str:
        """The run whose seeds this one is pooled with: ``base``, else the run itself."""
        return self.base or self.name


TASK_KEYS = ("corpus", "triggers", "min_count")  # keys of ``mechanism.toy`` that are settings of every run


def seed_variants(toy: dict) -> dict[str, tuple[str, int]]:
    """``<run>_seed<n>`` -> ``(run, n)``: every run of the ``all`` set of a ``mechanism.toy`` config section
    again with each extra seed of its ``seeds`` (the workflow's names for them; nothing parses them back)."""
    return {f"{r}_seed{sd}": (r, sd) for r in toy["sets"]["all"] for sd in toy.get("seeds", [])}


def run_settings(toy: dict, run: str) -> dict:
    """Every :class:`RunSpec` field of run ``run`` of a ``mechanism.toy`` config section, as JSON values (what
    the workflow writes as the run's ``--config`` file; :func:`extract.toy.train.train` writes the same as
    ``run.json``): the section's ``defaults``, then the run's entry, its task keys and its name; a seed
    variant (:func:`seed_variants`) takes its base run's entry with its own ``seed`` and ``base``. Only this
    run's settings: adding or changing another run leaves it unchanged."""
    base, seed = seed_variants(toy).get(run, (run, None))
    values = {**toy["defaults"], **toy["runs"][base], **{k: toy[k] for k in TASK_KEYS}, "name": run}
    if seed is not None:
        values.update(seed=seed, base=base)
    known = {f.name for f in fields(RunSpec)}
    if unknown := sorted(set(values) - known):
        raise ValueError(f"toy run {run}: unknown RunSpec setting(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(known))}")
    return json.loads(json.dumps(asdict(RunSpec(**values))))
