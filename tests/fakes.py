"""Small stand-ins in the real formats, shared by several test modules: a score shard, the inputs of a
database build, an MMLU directory of the original CSV layout."""
import json

import numpy as np
import polars as pl

from analysis.core.score_functions import score_keys


def fake_shard(path, model="m", dataset="d", n_examples=3, layers=2, heads=3, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for e in range(n_examples):
        for l in range(layers):
            for h in range(heads):
                rows.append({"model": model, "dataset": dataset, "example_id": f"{dataset}/{e}", "example": e,
                             "n_tokens": 10 + e, "bos_first": True, "layer": l, "head": h,
                             **{k: float(rng.random()) for k in score_keys()}})
    df = pl.DataFrame(rows).with_columns(pl.col("layer", "head").cast(pl.Int32))
    df.write_parquet(path)
    return df


def fake_inputs(tmp_path):
    info = tmp_path / "m.json"
    info.write_text(json.dumps({"model": "m", "family": "llama", "variant": "base", "n_params": 10,
                                "n_layers": 2, "n_heads": 3, "n_kv_heads": 1, "head_dim": 4, "d_model": 12}))
    corpus = tmp_path / "d.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d/{e}", "text": "x", "domain": "news", "max_tokens": 50,
                                          "sha256": f"h{e}"}) + "\n" for e in range(3)))
    shard = tmp_path / "s.parquet"
    df = fake_shard(shard)
    return dict(model_jsons=[info], shards=[shard], corpora={"d": corpus}), df


def write_mmlu(root, subjects=("astronomy", "high_school_physics"), n_test=6, n_dev=5):
    for split, n in (("dev", n_dev), ("test", n_test)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for s in subjects:
            rows = [f'"{s} {split} question {i}, with a comma and ""quotes""?",a{i},b{i},"c, {i}",d{i},{"ABCD"[i % 4]}'
                    for i in range(n)]
            (root / split / f"{s}_{split}.csv").write_text("\n".join(rows) + "\n")
    return root
