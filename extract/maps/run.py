"""One MAPS run (definitions §8) for one model: its settings, spelled once, and :func:`run`.

:class:`MapsSettings` is the config's ``maps`` section minus what is not a run setting (``models``, ``join``,
``threads``): the same names, the same nesting (``salient``, ``dynamic``, ``causal``), ``None`` for "all" /
"the whole vocabulary" as in config/schema.yaml. ``dormant maps run --config maps.json`` reads it as JSON; its
override flags are generated from it (``--k-copy``, ``--salient-vocab``, ``--causal-counts``, ...).

:func:`run` writes into ``out_dir``: ``scores.parquet`` (table maps_scores), ``salient.parquet``
(maps_salient), ``dynamic.parquet`` (maps_dynamic), ``correlations.parquet`` (maps_correlations),
``causal.parquet`` (maps_causal) and ``timing.json``, and returns those paths. Torch is imported only when
:func:`run` is called, so the settings (and the command line built from them) stay cheap.
"""
from __future__ import annotations

import dataclasses
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from analysis.core.settings import setting
from extract.maps.operations import CATEGORIES

PARTS = ("scores", "salient", "dynamic", "correlations", "causal")  # the Parquet files, one table each
INPUTS = ("reference", "raw", "residual")  # the E' choices of the layers >= 1 (extract.maps.folding)


def check_inputs(choices) -> tuple[str, ...]:
    """``choices`` as a tuple of distinct :data:`INPUTS` names (at least one), else ValueError."""
    choices = (choices,) if isinstance(choices, str) else tuple(choices)
    if not choices or len(set(choices)) != len(choices) or any(c not in INPUTS for c in choices):
        raise ValueError(f"MAPS setting inputs must list distinct E' choices among {', '.join(INPUTS)} "
                         f"(definitions §8), got {list(choices)}")
    return choices


def _known_operations(names, where: str) -> None:
    if names is None:
        return
    bad = [n for n in names if n not in CATEGORIES]
    if bad:
        raise ValueError(f"MAPS setting {where}: unknown operation(s) {', '.join(bad)}; "
                         f"operations: {', '.join(CATEGORIES)}")


@dataclass(frozen=True)
class SalientSettings:
    """Each head's most salient tokens (``maps.salient``)."""

    vocab: int | None = setting(4096, "saliency candidates: the first N whole-word tokens (none: the whole "
                                       "vocabulary)")
    tokens: int = setting(5, "most salient tokens stored per head")
    targets: int = setting(5, "top targets stored per salient token")

    def __post_init__(self):
        if self.vocab is not None and self.vocab < 1:
            raise ValueError(f"MAPS setting salient.vocab must be at least 1 or None (the whole vocabulary), "
                             f"got {self.vocab}")


@dataclass(frozen=True)
class DynamicSettings:
    """The check against inference from prompts (``maps.dynamic``)."""

    operations: tuple[str, ...] | None = setting(None, "operations of the dynamic check (none: every usable one)")
    pairs: int | None = setting(16, "pairs per operation and template (none: all; 0: no dynamic check)")

    def __post_init__(self):
        _known_operations(self.operations, "dynamic.operations")
        if self.pairs is not None and self.pairs < 0:
            raise ValueError(f"MAPS setting dynamic.pairs must be ≥ 0 or None (all pairs), got {self.pairs}")


@dataclass(frozen=True)
class CausalSettings:
    """The ablation check (``maps.causal``)."""

    operations: tuple[str, ...] = setting((), "operations of the ablation check (skipped where not usable; "
                                               "empty: no check)")
    counts: tuple[int, ...] = setting((1, 2, 4, 8, 16), "numbers of heads ablated")
    draws: int = setting(3, "random head sets per count")
    prompts: int | None = setting(32, "few-shot prompts per operation (none: one per pair)")
    shots: int = setting(3, "demonstrations per prompt")

    def __post_init__(self):
        _known_operations(self.operations, "causal.operations")


@dataclass(frozen=True)
class MapsSettings:
    """Everything a MAPS run depends on besides the model, dtype and device (the config's ``maps``)."""

    seed: int = setting(0, "pair sampling, prompts and random head sets")
    operations: tuple[str, ...] | None = setting(None, "operations scored (none: all 20; each is used only with "
                                                        "≥ 30 single-token pairs)")
    inputs: tuple[str, ...] = setting(("reference",), "E' choices scored (layers ≥ 1): reference (MLP_0(N_mlp,0(E)), "
                                                       "definitions §8), raw (E), residual (E + MLP_0(N_mlp,0(E))); "
                                                       "salient tokens and heatmaps use the first")
    k_copy: int = setting(1, "top-k of the copying operations (definitions §8: 1)")
    k_other: int = setting(10, "top-k of the other operations (definitions §8: 10)")
    max_pairs: int | None = setting(None, "seeded cap on pairs per operation (none: every single-token pair)")
    data_dir: str | None = setting(None, "folder of the operation datasets (none: extract/maps/operations_data/)")
    salient: SalientSettings = field(default_factory=SalientSettings)
    dynamic: DynamicSettings = field(default_factory=DynamicSettings)
    causal: CausalSettings = field(default_factory=CausalSettings)

    def __post_init__(self):
        _known_operations(self.operations, "operations")
        check_inputs(self.inputs)

    def as_dict(self) -> dict:
        """The settings as the JSON object ``--config`` reads (sections nested, tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


@contextmanager
def _one_thread():
    """Small-batch forward passes run faster on one thread than on several contended ones (the big
    vocabulary GEMMs keep every thread)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _empty(table: str):
    """An empty frame of ``table``'s columns (analysis.core.tables)."""
    import polars as pl

    from analysis.core import tables

    return pl.DataFrame(schema=tables.computed_schema(table))


def run(model_name: str, settings: MapsSettings, out_dir: str | Path, *, dtype: str = "float32",
        device: str = "cpu", progress: bool = True) -> list[Path]:
    """Static scores, salient tokens, the dynamic check and its correlations, and the causal check of
    ``model_name``; writes the files of :data:`PARTS` and ``timing.json`` into ``out_dir`` and returns their
    paths (in that order)."""
    import polars as pl
    import torch

    from dataclasses import asdict

    from analysis.core.io import write_json
    from extract import provenance
    from extract.errors import DormantError
    from extract.maps.dynamic import causal_check, correlations, dynamic_rows, dynamic_scores
    from extract.maps.operations import DATA_DIR, prepare
    from extract.maps.static import static_scores
    from extract.models.load import load_model

    s = settings
    out = Path(out_dir)
    torch.manual_seed(s.seed)
    t0 = time.perf_counter()
    start = provenance.now()
    model, tok = load_model(model_name, dtype=getattr(torch, dtype), device=device)
    run = provenance.run_record("maps", model, {"model": model_name, **asdict(s), "dtype": dtype},
                                prompt_format="parameters; MAPS operation templates for the dynamic and causal checks",
                                start_time=start)

    def write_parquet(df, path):  # every part carries the run (run_id per row, the row in its metadata)
        return provenance.write_with_run(df, path, run)
    ops = prepare(tok, list(s.operations) if s.operations is not None else None,
                  root=Path(s.data_dir) if s.data_dir else DATA_DIR, k_copy=s.k_copy, k_other=s.k_other,
                  max_pairs=s.max_pairs, seed=s.seed)
    if not ops:
        raise DormantError(f"no MAPS operation keeps ≥ 30 single-token pairs with the tokenizer of {model_name}")
    print(f"{model_name}: {len(ops)} operations, {sum(len(o.src) for o in ops)} pairs "
          f"({', '.join(f'{o.name}={len(o.src)}/{o.n_single}' for o in ops)})", flush=True)
    timing = {"load_s": time.perf_counter() - t0}

    # dynamic check: head outputs from prompts, scanned in the same vocabulary pass as the static rows
    dyn_ops = [o for o in ops if s.dynamic.operations is None or o.name in s.dynamic.operations]
    t = time.perf_counter()
    extra, frame = None, None
    if dyn_ops and s.dynamic.pairs != 0:
        with _one_thread():
            z, tg, ks, frame = dynamic_rows(model, tok, dyn_ops, s.dynamic.pairs, seed=s.seed, progress=progress)
        extra = (z, tg, ks)
    timing["dynamic_forward_s"] = time.perf_counter() - t

    t = time.perf_counter()
    res = static_scores(model, tok, ops, model_name=model_name, salient_vocab=s.salient.vocab,
                        salient_tokens=s.salient.tokens, salient_targets=s.salient.targets, extra=extra,
                        inputs=s.inputs, progress=progress)
    timing["vocabulary_scan_s"] = time.perf_counter() - t
    paths = {"scores": write_parquet(res.scores, out / "scores.parquet"),
             "salient": write_parquet(res.salient, out / "salient.parquet")}
    if frame is not None:
        dyn = dynamic_scores(model_name, frame, res.extra_hit)
    else:
        dyn = _empty("maps_dynamic")
    corr = correlations(res.scores, dyn)
    paths["dynamic"] = write_parquet(dyn, out / "dynamic.parquet")
    paths["correlations"] = write_parquet(corr, out / "correlations.parquet")

    t = time.perf_counter()
    with _one_thread():
        causal = [causal_check(model, tok, o, res.scores, model_name=model_name, counts=list(s.causal.counts),
                               draws=s.causal.draws, prompts=s.causal.prompts, shots=s.causal.shots, seed=s.seed)
                  for o in ops if o.name in s.causal.operations]
    timing["causal_s"] = time.perf_counter() - t
    causal_df = pl.concat(causal) if causal else _empty("maps_causal")
    paths["causal"] = write_parquet(causal_df, out / "causal.parquet")
    timing["total_s"] = time.perf_counter() - t0
    timing["threads"] = torch.get_num_threads()
    timing_path = write_json(out / "timing.json", timing, indent=2)

    with pl.Config(tbl_rows=60, fmt_str_lengths=40, tbl_width_chars=160):
        if corr.height:
            print(corr)
        if causal_df.height:
            print(causal_df.filter(pl.col("selection") != "random"))
    print(f"{model_name}: MAPS done in {timing['total_s']:.0f} s "
          f"({json.dumps({k: round(v, 1) for k, v in timing.items()})})")
    return [paths[p] for p in PARTS] + [timing_path]
