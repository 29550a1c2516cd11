"""A score function registered by a plugin module ($DORMANT_PLUGINS) reaches every process of a run: the
``dormant`` command scores it into the shard, ``dormant db build`` stores it, and the workflow's config check
accepts it (and refuses it, naming the key, without the plugin)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import torch
from tiny import tiny_model
from tiny_tokenizer import tiny_tokenizer

from extract.engine.scores import encode_texts, raw_head_stats

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = '''from analysis.core.score_functions import ScoreFunction, register_score_function
register_score_function(ScoreFunction("aeqd_hn", "entropy over the head's mean value norm", stat="entropy",
                                      inactive_side="below", normalisation="head", norm_stat="v_norm"))
'''


def _env(tmp_path, plugin=True):
    (tmp_path / "my_scores.py").write_text(PLUGIN)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    env.pop("DORMANT_PLUGINS", None)
    if plugin:
        env["DORMANT_PLUGINS"] = "my_scores"
    return env


def test_plugin_function_is_scored_and_stored(tmp_path):
    model_dir = tmp_path / "tiny"
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    texts = ["The cat sat on the mat.", "def f(x):\n    return x + 1"]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": f"e{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    env = _env(tmp_path)
    shard = tmp_path / "s.parquet"
    run = lambda *a: subprocess.run([sys.executable, "-m", "extract.cli", *a], env=env, cwd=tmp_path,
                                    capture_output=True, text=True)
    r = run("score", "--model", str(model_dir), "--data", str(data), "--dataset", "d", "--out", str(shard))
    assert r.returncode == 0, r.stderr
    df = pl.read_parquet(shard).sort("example", "layer", "head")
    stats = raw_head_stats(model, encode_texts(tok, texts))  # (examples, layers, heads, 6): independent
    want = (stats[..., 1] / stats[..., 3]).reshape(-1).numpy()  # entropy / mean value norm
    np.testing.assert_allclose(df["aeqd_hn"].to_numpy(), want, rtol=1e-6)
    db = tmp_path / "x.duckdb"
    r = run("db", "build", "--db", str(db), "--shards", str(shard))
    assert r.returncode == 0, r.stderr
    con = duckdb.connect(str(db), read_only=True)
    assert con.execute("SELECT inactive_when FROM score_functions WHERE score_fn = 'aeqd_hn'").fetchone() == ("<",)
    got = np.array([v for v, in con.execute("SELECT aeqd_hn FROM head_scores ORDER BY example, layer, head").fetchall()])
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_workflow_config_check_knows_plugin_functions(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("evaluation:\n  models: [smollm2-135m-instruct]\n  tasks: [physics]\n  task_name: t\n  limit: 2\n"
                   "  k_shot: 0\n  seed: 0\n  score_functions: [awft, aeqd_hn]\n  fractions: [0, 0.1]\n"
                   "  batch_tokens: 64\n")
    cmd = [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", "config/smoke.yaml", str(cfg)]
    without = subprocess.run(cmd, env=_env(tmp_path, plugin=False), cwd=ROOT, capture_output=True, text=True)
    assert without.returncode != 0 and "evaluation.score_functions[1]" in without.stdout + without.stderr
    with_plugin = subprocess.run(cmd, env=_env(tmp_path), cwd=ROOT, capture_output=True, text=True)
    assert with_plugin.returncode == 0, with_plugin.stdout[-2000:] + with_plugin.stderr[-2000:]
