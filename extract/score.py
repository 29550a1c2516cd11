"""Score one shard of a text dataset with one model and write it as a Parquet file, atomically.

Input: a JSON-lines file, one example per line with ``id`` (str) and ``text`` (str), optionally ``domain``
and ``max_tokens`` (per-example truncation, e.g. the paper's uniform length draw). Shard ``i`` of ``n`` is
the examples whose line index ``k`` has ``k % n == i``. Output: one row per (example, layer, head) with
``model, dataset, example_id, example`` (line index), ``n_tokens, bos_first, layer, head``, the
scores (``score_keys()``), ``beyond_context`` (the example is longer than the model's trained context) and
``run_id``; written to a temporary name beside ``out`` and renamed, so a killed job leaves no partial file.
Provenance, in the Parquet key-value metadata: ``SELF_CHECK_KEY`` holds the engine's first-use self-checks of
the model (JSON list, :func:`extract.engine.selfcheck.checks`), ``extract.provenance.RUN_KEY`` the job's
``runs`` row (JSON object, :func:`extract.provenance.run_record`; ``run_id`` is its key).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl

from analysis.core.io import atomic_path
from analysis.core.score_functions import score_keys
from extract import provenance
from extract.errors import InputError

SELF_CHECK_KEY = "dormant_heads.self_checks"


def read_examples(path: Path) -> list[dict]:
    """The examples of a JSON-lines dataset file, validated (``id`` and non-empty ``text``); a bad line is an
    :class:`InputError` naming ``file:line``."""
    rows = []
    if not Path(path).is_file():
        raise FileNotFoundError(f"dataset file {path} not found; write it first (one JSON object per line)")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = Path(path).read_bytes()[:e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 text ({e.reason}); re-save the file as UTF-8") from None
    for k, line in enumerate(text.split("\n")):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{k + 1}: not valid JSON ({e.msg} at column {e.colno}); fix or delete "
                             "that line (one JSON object per line)") from None
        if not isinstance(row, dict):
            raise InputError(f"{path}:{k + 1}: a JSON {type(row).__name__}, not an object; write one "
                             '{"id": ..., "text": ...} object per line')
        if "id" not in row or not str(row.get("text", "")).strip():
            raise InputError(f"{path}:{k + 1}: each line needs an 'id' and a non-empty 'text'")
        rows.append(row)
    if not rows:
        raise InputError(f"{path} holds no examples; write one JSON object per line")
    return rows


@dataclass(frozen=True)
class ScoreSettings:
    """How a corpus is scored (the config's ``scoring`` section minus the shard count)."""
    batch_tokens: int = 8192  # padded tokens per forward pass (memory budget)
    dtype: str = "float32"  # weights and activations
    device: str = "cpu"
    prepend_bos: bool = True  # BOS first, so the first-token scores look at a sink token (README: BOS)


def score_shard(model_name: str, data: Path, dataset: str, out: Path, *, shard: int = 0, num_shards: int = 1,
                settings: ScoreSettings = ScoreSettings(), progress: bool = True) -> pl.DataFrame:
    """Score shard ``shard`` of ``num_shards`` of ``data`` with ``model_name``; write ``out``; return the frame."""
    import torch

    from extract.engine.scores import beyond_context, encode_texts, score_heads
    from extract.engine.selfcheck import checks
    from extract.models.load import load_model, model_info

    start = provenance.now()
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is outside 0..{num_shards - 1}")
    examples = read_examples(data)
    picked = [(k, ex) for k, ex in enumerate(examples) if k % num_shards == shard]
    model, tok = load_model(model_name, dtype=getattr(torch, settings.dtype), device=settings.device)
    info = model_info(model)
    config = {"model": model_name, "dataset": dataset, "shard": shard, "num_shards": num_shards,
              "data_sha256": hashlib.sha256(Path(data).read_bytes()).hexdigest(), **asdict(settings)}
    run = provenance.run_record("score", model, config, start_time=start, prompt_format=(
        "raw text, " + ("BOS first" if settings.prepend_bos else "no BOS added")))
    seqs = []
    for k, ex in picked:
        ids = encode_texts(tok, [ex["text"]], prepend_bos=settings.prepend_bos, max_tokens=ex.get("max_tokens"))[0]
        if len(ids) < 2:
            raise ValueError(f"{data}: example {ex['id']!r} has {len(ids)} token(s); scores need at least 2")
        seqs.append(ids)
    df = score_heads(model, seqs, batch_tokens=settings.batch_tokens, progress=progress) if seqs else None
    bos = tok.bos_token_id
    meta = pl.DataFrame({
        "example": list(range(len(picked))),
        "example_index": [k for k, _ in picked],
        "example_id": [str(ex["id"]) for _, ex in picked],
        "n_tokens": [len(s) for s in seqs],
        "bos_first": [bos is not None and s[0] == bos for s in seqs],
        "beyond_context": beyond_context(model, seqs),
    }, schema_overrides={"example": pl.Int64, "example_index": pl.Int64, "n_tokens": pl.Int64})
    if df is None:
        df = pl.DataFrame(schema={"example": pl.Int64, "layer": pl.Int32, "head": pl.Int32,
                                  **{k: pl.Float64 for k in score_keys()}})
    df = df.join(meta, on="example", how="left").with_columns(
        pl.lit(info["model"]).alias("model"), pl.lit(dataset).alias("dataset"), pl.lit(run["run_id"]).alias("run_id"))
    df = df.drop("example").rename({"example_index": "example"}).select(
        "model", "dataset", "example_id", "example", "n_tokens", "bos_first", "layer", "head", *score_keys(),
        "beyond_context", "run_id")
    with atomic_path(out) as tmp:
        df.write_parquet(tmp, metadata={SELF_CHECK_KEY: json.dumps(checks(model)),
                                        provenance.RUN_KEY: json.dumps(provenance.finished(run))})
    return df
