"""definitions §7, the Bigram-Backcopy toy study: task, toy transformer, metrics, training, the run settings
(RunSpec <-> JSON <-> command line <-> workflow), reports and the robustness table."""
from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from scipy import stats

from analysis.toy import CLAIMS, claim_text, claims, early_step, interventions_table, write_toy_report
from extract.engine.scores import score_heads
from extract.toy.data import build_task, corpus_task, load_task, save_task
from extract.toy.metrics import PARTS, RISKS, measure, risks, zeroed
from extract.toy.model import toy_model
from extract.toy.spec import run_settings, seed_variants
from extract.toy.train import METRICS_SCHEMA, RunSpec, checkpoint_steps, train

torch.set_num_threads(1)
TEXT = "the cat ate the hat. a bat sat at the mat; the rat ate a date! " * 30
ROOT = Path(__file__).resolve().parents[2]
MODEL_METRICS = {"loss", "backcopy_risk", "bigram_risk", "train_s"}
LAYER_METRICS = {"attn_bos", "attn_bos_trig", "attn_prev_trig", "attn_self_bos", "delta_logit", "val_bos",
                 "val_ratio", "res_peak", "res_ratio"}


# ------------------------------------------------------------------------------------------ task

def test_bigram_matrix_and_triggers_match_naive_counts():
    task = build_task(TEXT, k=3, min_count=1)
    counts = Counter(TEXT)
    assert task.chars == sorted(counts)
    top3 = [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:3]
    assert sorted(task.chars[i - 1] for i in task.triggers) == sorted(top3)
    pairs = Counter(zip(TEXT, TEXT[1:]))
    for a in "tha ":
        row = {b: n for (x, b), n in pairs.items() if x == a}
        total = sum(row.values())
        for b, n in row.items():
            assert task.P[task.chars.index(a) + 1, task.chars.index(b) + 1].item() == pytest.approx(n / total)
    uni = torch.tensor([0] + [counts[c] for c in task.chars], dtype=torch.float64)
    assert torch.allclose(task.P[0], uni / uni.sum())
    assert task.P[:, 0].abs().sum() == 0  # nothing transitions to <s>
    assert task.first[task.triggers].sum() == 0 and task.first.sum().item() == pytest.approx(1.0)


@pytest.fixture(scope="module")
def news_task():
    return corpus_task("xsum")  # BIG-bench news text


def test_sample_follows_the_rules_and_is_seeded(news_task):
    task = news_task
    x = task.sample(300, 40, torch.Generator().manual_seed(1))
    assert torch.equal(x, task.sample(300, 40, torch.Generator().manual_seed(1)))
    assert (x[:, 0] == 0).all() and not task.is_trigger(x[:, 1]).any()
    trans = Counter()
    for row in x.tolist():
        for n in range(1, len(row) - 1):
            if row[n] in task.triggers:
                assert row[n + 1] == row[n - 1]  # backcopy
            else:
                assert task.P[row[n], row[n + 1]] > 0
                trans[(row[n], row[n + 1])] += 1
    # empirical transitions from the most frequent non-trigger token match P (chi-square, small bins pooled)
    seen = Counter()
    for (a, _), n in trans.items():
        seen[a] += n
    src = max(seen, key=seen.get)
    tot = seen[src]
    exp = task.P[src].numpy() * tot
    obs = np.array([trans.get((src, b), 0) for b in range(task.vocab_size)], float)
    big = exp >= 5
    f_obs = np.append(obs[big], obs[~big].sum())
    f_exp = np.append(exp[big], exp[~big].sum())
    assert big.sum() >= 5 and stats.chisquare(f_obs, f_exp).pvalue > 1e-3


def test_real_corpus_task_and_round_trip(news_task, tmp_path):
    task = news_task
    assert [task.chars[i - 1] for i in task.triggers] == [" ", "e", "t"]
    assert torch.allclose(task.P.sum(-1), torch.ones(task.vocab_size, dtype=torch.float64))
    again = load_task(save_task(task, tmp_path / "task.json"))
    assert again.chars == task.chars and again.triggers == task.triggers and torch.equal(again.P, task.P)


def test_risks_are_exact_kl_divergences():
    task = build_task(TEXT, k=3, min_count=1)
    x = task.sample(4, 30, torch.Generator().manual_seed(0))
    probs, backcopy = task.oracle(x)
    oracle_logits = torch.cat([probs.clamp_min(1e-30).log(), torch.zeros(4, 1, task.vocab_size)], 1)
    r = risks(oracle_logits, x, task)
    assert r["backcopy_risk"] == pytest.approx(0, abs=1e-9) and r["bigram_risk"] == pytest.approx(0, abs=1e-9)
    uniform = torch.zeros(4, 30, task.vocab_size)
    r = risks(uniform, x, task)
    V = task.vocab_size
    assert r["backcopy_risk"] == pytest.approx(math.log(V))  # KL(delta || uniform) = log V
    kl, n = 0.0, 0
    for b in range(4):
        for t in range(1, 29):
            if x[b, t].item() not in task.triggers:
                p = task.P[x[b, t]].numpy()
                kl += sum(pi * (math.log(pi) + math.log(V)) for pi in p if pi > 0)
                n += 1
    assert r["bigram_risk"] == pytest.approx(kl / n)


# ------------------------------------------------------------------------------------------ model

def _naive_attention(model, x, layer=0):
    """Explicit A (B, S, S) and block-0 quantities from the state dict, independent of the module code."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    S = x.shape[1]
    h = sd["model.embed_tokens.weight"][x] + sd["model.embed_positions.weight"][:S]
    p = f"model.layers.{layer}."
    hn = torch.nn.functional.layer_norm(h, (h.shape[-1],), sd[p + "input_layernorm.weight"], eps=1e-5)
    q, k, v = (hn @ sd[p + f"self_attn.{n}_proj.weight"].T for n in "qkv")
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    A = torch.zeros_like(s)
    for i in range(S):
        if model.config.attention == "softmax":
            A[:, i, : i + 1] = torch.softmax(s[:, i, : i + 1], -1)
        else:
            A[:, i, : i + 1] = torch.relu(s[:, i, : i + 1]) / (i + 1)
    return A, v, sd, h


@pytest.mark.parametrize("impl", ["sdpa", "eager", "dormant"])
def test_toy_model_is_causal_and_implementations_agree(impl):
    from extract.engine.attention import register

    model = toy_model(20, width=16, layers=2, length=12, seed=0).eval()
    x = torch.randint(1, 20, (2, 12), generator=torch.Generator().manual_seed(0))
    x[:, 0] = 0
    ref = model(x).logits
    model.set_attn_implementation(register() if impl == "dormant" else impl)
    out = model(x).logits
    assert torch.allclose(out, ref, atol=1e-5)
    y = x.clone()
    y[:, 7:] = (y[:, 7:] % 19) + 1  # change the future
    assert torch.allclose(model(y).logits[:, :7], out[:, :7], atol=1e-5)


def test_toy_init_schemes_match_their_distributions():
    """``normal``: every weight N(0, 0.02²); ``torch``: PyTorch's defaults (embeddings N(0, 1), linear weights
    U(±1/√fan_in), so std 1/√(3·fan_in)); LayerNorm weights 1 in both; unknown names are refused."""
    from extract.toy.model import ToyConfig

    for init in ("normal", "torch"):
        model = toy_model(300, width=64, layers=2, length=64, init=init, seed=0)
        assert model.config.init == init
        for name, p in model.named_parameters():
            w = p.detach()
            if "norm" in name:
                assert torch.equal(w, torch.ones_like(w)), name
            elif init == "normal":
                assert abs(w.std().item() - 0.02) < 0.02 * 0.1, name
            elif "embed" in name:
                assert abs(w.std().item() - 1.0) < 0.1 and abs(w.mean().item()) < 0.05, name
            else:
                bound = w.shape[1] ** -0.5
                assert w.abs().max().item() <= bound, name
                assert abs(w.std().item() - bound / math.sqrt(3)) < 0.1 * bound, name
    with pytest.raises(ValueError, match="init="):
        ToyConfig(init="xavier")


def test_score_engine_runs_unchanged_on_the_toy_model():
    model = toy_model(20, width=16, layers=1, length=16, seed=3).eval()
    x = torch.randint(1, 20, (3, 16), generator=torch.Generator().manual_seed(2))
    x[:, 0] = 0
    df = score_heads(model, [r.tolist() for r in x])
    A, v, sd, _ = _naive_attention(model, x)
    awft = A[:, :, 0].mean(1)  # mean over all queries of A[q, 0]
    ent = -(A * A.clamp_min(1e-300).log()).sum(-1).mean(1)
    assert np.allclose(df.sort("example")["awft"].to_numpy(), awft.numpy(), atol=1e-5)
    assert np.allclose(df.sort("example")["aeqd"].to_numpy(), ent.numpy(), atol=1e-4)
    assert np.allclose(df.sort("example")["ftvvn"].to_numpy(), v[:, 0].norm(dim=-1).numpy(), atol=1e-5)


def test_score_engine_refuses_relu_attention():
    model = toy_model(20, width=16, layers=1, length=8, attention="relu").eval()
    from extract.errors import DormantError

    with pytest.raises(DormantError, match="softmax attention only"):
        score_heads(model, [[0, 3, 4, 5]])


def test_relu_attention_matches_naive_and_has_unnormalised_rows():
    model = toy_model(20, width=16, layers=1, length=10, attention="relu", seed=1).eval()
    x = torch.randint(1, 20, (2, 10), generator=torch.Generator().manual_seed(3))
    x[:, 0] = 0
    A_naive, v, sd, h = _naive_attention(model, x)
    _, A, _ = model.model.layers[0].self_attn.weights(model.model.layers[0].input_layernorm(
        model.model.embed_tokens(x) + model.model.embed_positions.weight[:10]))
    assert torch.allclose(A[:, 0].double(), A_naive, atol=1e-6)
    attn_out = (A_naive @ v) @ sd["model.layers.0.self_attn.o_proj.weight"].T
    got = {}
    h0 = model.model.layers[0].self_attn.register_forward_hook(lambda m, a, o: got.setdefault("o", o))
    model(x)
    h0.remove()
    assert torch.allclose(got["o"].double(), attn_out, atol=1e-5)


def test_measure_matches_naive_metrics_and_interventions():
    task = build_task(TEXT, k=3, min_count=1)
    model = toy_model(task.vocab_size, width=16, layers=1, length=24, seed=0).eval()
    x = task.sample(5, 24, torch.Generator().manual_seed(4))
    m = measure(model, task, x)
    A, v, sd, h = _naive_attention(model, x)
    trig = task.is_trigger(x)
    plain = [(b, q) for b in range(5) for q in range(1, 24) if not trig[b, q]]
    trigq = [(b, q) for b in range(5) for q in range(1, 24) if trig[b, q]]
    assert m["attn_bos", 0, None] == pytest.approx(np.mean([A[b, q, 0].item() for b, q in plain]), rel=1e-5)
    assert m["attn_prev_trig", 0, None] == pytest.approx(np.mean([A[b, q, q - 1].item() for b, q in trigq]), rel=1e-5)
    wo_v = (v @ sd["model.layers.0.self_attn.o_proj.weight"].T).norm(dim=-1)
    assert m["val_bos", 0, None] == pytest.approx(wo_v[:, 0].mean().item(), rel=1e-5)
    assert m["attn_self_bos", 0, None] == pytest.approx(A[:, 0, 0].mean().item(), rel=1e-6) == 1.0
    assert m["val_ratio", 0, None] == pytest.approx((wo_v[:, 0].mean() / wo_v[:, 1:].mean()).item(), rel=1e-5)
    assert {k for k in m if k[1] is None} == {("loss", None, None), ("backcopy_risk", None, None),
                                             ("bigram_risk", None, None)}
    assert all(part is None for _, _, part in m)
    # zeroing the attention output = a block without its attention branch
    with zeroed(model, "attn"), torch.no_grad():
        z = model(x).logits
    with torch.no_grad():
        blk = model.model.layers[0]
        hh = h.float()
        hh = hh + blk.mlp(blk.post_attention_layernorm(hh))
        manual = model.lm_head(model.model.norm(hh))
    assert torch.allclose(z, manual, atol=1e-5)


# ------------------------------------------------------------------------------------------ training

def test_checkpoint_steps():
    assert checkpoint_steps(100, 3) == [0, 1, 10, 100]
    assert checkpoint_steps(7, 20) == [0, 1, 2, 3, 4, 5, 6, 7]
    steps = [0, 1, 10, 100, 1000]
    risk = lambda vals: pl.DataFrame([  # noqa: E731
        {"run": "r", "step": s, "metric": m, "layer": None, "part": None, "value": v}
        for s, v in zip(steps, vals) for m in ("backcopy_risk", "bigram_risk")], schema=METRICS_SCHEMA)
    assert early_step(risk([0.01, 1, 1, 1, 1]), "r", 1000) == 100  # never learned: ~10% of steps
    assert early_step(risk([0.01, 1, 0.1, 0.01, 0.01]), "r", 1000) == 10  # first learned
    assert early_step(risk([0.01, 1, 1, 1, 0.01]), "r", 1000) == 100  # learned only at the end
    # an intervention's risks (part set, at the last step) are not the model's: learned at step 10 still
    zero = pl.DataFrame([{"run": "r", "step": 1000, "metric": "bigram_risk", "layer": 0, "part": "attn",
                          "value": 3.0}], schema=METRICS_SCHEMA)
    assert early_step(pl.concat([risk([0.01, 1, 0.1, 0.01, 0.01]), zero]), "r", 1000) == 10


def _check_metrics_frame(df: pl.DataFrame, spec: RunSpec) -> None:
    """The bb_metrics frame of a trained run: its columns and types, one row per (step, metric, layer, part),
    ``layer`` null exactly for the model-level metrics, ``part`` only on the interventions at the last step,
    nothing spelled in a metric's name."""
    assert df.columns == ["run", "step", "metric", "layer", "part", "value", "run_id"]
    assert dict(df.drop("run_id").schema) == METRICS_SCHEMA and df["run_id"].n_unique() == 1  # its job's run
    assert df.select("run", "step", "metric", "layer", "part").is_unique().all() and set(df["run"]) == {spec.name}
    plain = df.filter(pl.col("part").is_null())
    assert set(plain.filter(pl.col("layer").is_null())["metric"]) == MODEL_METRICS
    per_layer = plain.filter(pl.col("layer").is_not_null())
    assert set(per_layer["metric"]) == LAYER_METRICS and set(per_layer["layer"]) == set(range(spec.layers))
    steps = checkpoint_steps(spec.steps, spec.checkpoints)
    assert sorted(set(plain["step"])) == steps
    assert plain.height == len(steps) * (len(MODEL_METRICS) + len(LAYER_METRICS) * spec.layers)
    inter = df.filter(pl.col("part").is_not_null())
    assert set(inter["step"]) == {spec.steps}
    assert sorted(zip(inter["metric"], inter["layer"], inter["part"])) == sorted(
        (r, i, p) for r in RISKS for i in range(spec.layers) for p in PARTS)
    assert not df["metric"].str.contains(r"_l\d|\.").any()


def test_training_is_seeded_learns_and_ingests(tmp_path):
    from analysis.database import build, connect, query

    task = build_task(TEXT, k=3, min_count=1)
    spec = RunSpec(name="t", width=16, length=24, batch=8, steps=40, lr=3e-3, checkpoints=4, eval_batch=8)
    a = train(spec, task, tmp_path / "a", progress=False)
    b = train(spec, task, tmp_path / "b", progress=False)
    keep = pl.col("metric") != "train_s"
    assert a.filter(keep).equals(b.filter(keep))
    steps = sorted(set(a["step"]))
    assert steps == checkpoint_steps(40, 4)
    assert sorted(p.name for p in (tmp_path / "a").glob("step-*.safetensors")) == [f"step-{s:06d}.safetensors" for s in steps]
    loss = a.filter(pl.col("metric") == "loss").sort("step")["value"]
    assert loss[-1] < loss[0] - 0.5
    _check_metrics_frame(a, spec)
    db = tmp_path / "x.duckdb"
    build(db, tables={"bb_metrics": [tmp_path / "a" / "metrics.parquet"]})
    con = connect(db, read_only=True)
    got = query(con, "SELECT value FROM bb_metrics WHERE metric = 'loss' AND layer = -1 AND part = '' "
                     "ORDER BY step")["value"].to_list()
    assert got == pytest.approx(loss.to_list())
    # the database holds every row once; NULL layer / part are stored as -1 / '' (its primary key)
    stored = query(con, "SELECT run, step, metric, layer, part, value FROM bb_metrics")
    want = a.with_columns(pl.col("layer").fill_null(-1), pl.col("part").fill_null(""))
    assert stored.height == a.height and sorted(stored.rows()) == sorted(want.drop("run_id").rows())
    # the file's metadata brought its run: every row joins it
    runs = query(con, "SELECT kind, model, run_id, config FROM runs")
    assert runs.select("kind", "model").rows() == [("toy", "toy:t")] and runs["run_id"][0] == a["run_id"][0]
    assert json.loads(runs["config"][0]) == json.loads(json.dumps(asdict(spec)))
    # the saved checkpoint reproduces the final metrics
    from safetensors.torch import load_file

    model = toy_model(task.vocab_size, width=16, length=24)
    model.load_state_dict(load_file(tmp_path / "a" / "step-000040.safetensors"))
    x_eval = task.sample(8, 24, torch.Generator().manual_seed(10_000))
    assert measure(model.eval(), task, x_eval)["loss", None, None] == pytest.approx(loss[-1], rel=1e-5)


def _key(k) -> tuple:
    """``"loss"`` -> (loss, None, None); ``("attn_bos", 0)`` -> (attn_bos, 0, None); 3-tuples as given."""
    k = (k,) if isinstance(k, str) else tuple(k)
    return k + (None,) * (3 - len(k))


def test_an_old_empty_bb_metrics_table_is_made_again(tmp_path):
    """A database made when bb_metrics was keyed (run, step, metric), as a core database still is: empty, the
    table is made again on a writable open (the final database copies the core one); with rows, an error."""
    import duckdb

    from analysis.database import build, connect

    old = "CREATE TABLE bb_metrics (run VARCHAR, step INTEGER, metric VARCHAR, value DOUBLE, PRIMARY KEY (run, step, metric))"
    for name, rows in (("empty", False), ("full", True)):
        path = tmp_path / f"{name}.duckdb"
        con = duckdb.connect(str(path))
        con.execute(old)
        if rows:
            con.execute("INSERT INTO bb_metrics VALUES ('r', 0, 'attn_bos_l0', 0.5)")
        con.close()
        if rows:
            with pytest.raises(ValueError, match=r"bb_metrics was made before its key column\(s\) layer, part"):
                connect(path)
            continue
        metrics = tmp_path / "m.parquet"
        pl.DataFrame([{"run": "r", "step": 0, "metric": "loss", "layer": None, "part": None, "value": 1.0},
                      {"run": "r", "step": 0, "metric": "attn_bos", "layer": 0, "part": None, "value": 0.5}],
                     schema=METRICS_SCHEMA).write_parquet(metrics)
        counts = build(tmp_path / "final.duckdb", base=path, tables={"bb_metrics": [metrics, metrics]})
        assert counts["bb_metrics"] == 2  # the same file twice: upserted, not duplicated
        con = connect(tmp_path / "final.duckdb", read_only=True)
        assert sorted(con.execute("SELECT metric, layer, part, value FROM bb_metrics").fetchall()) == [
            ("attn_bos", 0, "", 0.5), ("loss", -1, "", 1.0)]
        con.close()


def _fake_run(tmp_path, name, layers, attention, optimizer, series: dict, final: dict, **extra):
    """A run directory: metrics.parquet from ``series`` (key -> {step: value}) and ``final`` (key -> value at
    step 1000), keys as for :func:`_key`; run.json with the given settings."""
    rows = [dict(zip(("metric", "layer", "part"), _key(k)), run=name, step=s, value=float(v))
            for k, vals in series.items() for s, v in vals.items()]
    rows += [dict(zip(("metric", "layer", "part"), _key(k)), run=name, step=1000, value=float(v))
             for k, v in final.items()]
    d = tmp_path / name
    d.mkdir()
    pl.DataFrame(rows, schema=METRICS_SCHEMA).write_parquet(d / "metrics.parquet")
    (d / "run.json").write_text(json.dumps({"name": name, "layers": layers, "attention": attention,
                                            "optimizer": optimizer, "steps": 1000, "width": 8, "length": 8,
                                            "batch": 1, **extra}))
    return d / "metrics.parquet"


def test_claims_on_hand_made_metrics(tmp_path):
    steps = [0, 1, 10, 100, 1000]
    one = {("val_ratio", 0): dict(zip(steps, [1.0, 1.4, 0.9, 0.4, 0.2])),
           ("res_peak", 0): dict(zip(steps, [1, 1, 1, 1, 1])), "train_s": dict(zip(steps, [0, 1, 2, 3, 4])),
           ("attn_bos", 0): dict(zip(steps, [0.1] * 4 + [0.9])), ("attn_prev_trig", 0): dict(zip(steps, [0.6] * 5)),
           "backcopy_risk": dict(zip(steps, [4, 3, 2, 1, 0.01])), "bigram_risk": dict(zip(steps, [2, 1, 1, 1, 0.06]))}
    final = {("backcopy_risk", 0, "attn"): 3.0, ("bigram_risk", 0, "attn"): 0.07, ("bigram_risk", 0, "mlp"): 1.0,
             ("backcopy_risk", 0, "mlp"): 0.5}
    f1 = _fake_run(tmp_path, "adam_1l", 1, "softmax", "adamw", one, final)
    three = lambda peak, ratio: {("res_peak", i): dict(zip(steps, peak)) for i in range(3)} | {  # noqa: E731
        ("res_ratio", i): dict(zip(steps, [r * (1 + i / 10) for r in ratio])) for i in range(3)} | {
        ("attn_bos", i): dict(zip(steps, [0.1] * 5)) for i in range(3)} | {"train_s": dict(zip(steps, [0] * 5))}
    f2 = _fake_run(tmp_path, "relu_3l", 3, "relu", "adamw", three([1, 2, 2, 2, 2.5], [1, 2, 2, 2, 4]), {})
    f3 = _fake_run(tmp_path, "sgd_3l", 3, "softmax", "sgd", three([1, 2, 2, 2, 2.9], [1, 1, 1, 1, 1.2]), {})
    f4 = _fake_run(tmp_path, "relu_3l_nobos", 3, "relu", "adamw", three([1, 2, 2, 2, 9], [1, 1, 1, 1, 0.8]), {},
                   bos_loss=False)
    from analysis.toy import load_runs

    df, specs = load_runs([f1, f2, f3, f4])
    cl = claims(df, specs)
    assert cl.columns == ["run", "claim_id", "claim", "measured", "target", "pass"]
    c = {(r["run"], r["claim_id"]): (r["measured"], r["pass"]) for r in cl.iter_rows(named=True)}
    text = {(r["run"], r["claim_id"]): r["claim"] for r in cl.iter_rows(named=True)}
    assert c[("adam_1l", "final_bigram_risk")] == (pytest.approx(0.06), False)
    assert c[("adam_1l", "final_backcopy_risk")][1]
    assert c[("adam_1l", "value_rise")] == (pytest.approx(1.4), True)
    assert c[("adam_1l", "value_drain")] == (pytest.approx(0.2 / 1.4), True)
    assert c[("adam_1l", "zero_attn_backcopy")] == (pytest.approx(2.99), True)
    assert c[("adam_1l", "zero_attn_bigram")] == (pytest.approx(0.01), True)
    assert c[("relu_3l", "res_peak_stable")] == (pytest.approx(1.25), True)
    assert c[("sgd_3l", "res_peak_stable")] == (pytest.approx(1.45), False)
    assert text[("sgd_3l", "res_peak_stable")] == "residual peak change (final / step 100)"
    # relative peak: max over layers (layer 2 = 1.2x layer 0), final / early
    assert c[("relu_3l", "res_ratio_stable")] == (pytest.approx(2.0), False)
    assert c[("sgd_3l", "res_ratio_stable")] == (pytest.approx(1.2), True)
    assert c[("relu_3l", "relu_no_sink")] == (pytest.approx(0.1), True)
    # the diagnostic run without the <s> loss: only "is <s> a peak at the end" (max over layers: 0.8 * 1.2)
    assert c[("relu_3l_nobos", "no_peak_without_bos_loss")] == (pytest.approx(0.96), True)
    assert not any(run == "relu_3l_nobos" and claim.startswith("res_") for run, claim in c)
    # ids: unique per run, all declared; the text beside each is its declared text
    assert cl.select("run", "claim_id").is_unique().all() and set(cl["claim_id"]) <= set(CLAIMS)
    assert text[("adam_1l", "sink")] == CLAIMS["sink"][0] == "Attn_<s> on non-trigger queries"
    inter = interventions_table(df.filter(pl.col("run") == "adam_1l"))
    assert inter.filter((pl.col("zeroed") == "attn L0") & (pl.col("risk") == "backcopy_risk"))["value"][0] == 3.0
    assert inter.rows() == [("adam_1l", "attn L0", "backcopy_risk", 3.0), ("adam_1l", "attn L0", "bigram_risk", 0.07),
                            ("adam_1l", "mlp L0", "backcopy_risk", 0.5), ("adam_1l", "mlp L0", "bigram_risk", 1.0),
                            ("adam_1l", "none", "backcopy_risk", 0.01), ("adam_1l", "none", "bigram_risk", 0.06)]
    paths = write_toy_report([f1, f2, f3], tmp_path / "out", "toy_t")
    assert sorted(p.name for p in paths) == sorted(
        [f"toy_t_{t}.{e}" for t in ("claims", "final", "interventions") for e in ("csv", "md", "tex")]
        + [f"toy_t_{f}.{e}" for f in ("dynamics", "compare", "interventions") for e in ("png", "svg")])
    assert all(p.is_file() for p in paths)


def test_robustness_groups_by_base_run_and_seed(tmp_path, capsys):
    """Seed variants pool with the run their run.json names as ``base``, in ``seed`` order, whatever their
    names; a run named like a variant but without ``base`` stands alone. The claim's early step (which
    differs per seed) leaves its text."""
    from analysis.toy import load_runs, robustness, runs_frame, write_robustness_report

    steps = [0, 1, 10, 100, 1000]
    three = lambda peak, **risk: {("res_peak", i): dict(zip(steps, peak)) for i in range(3)} | {  # noqa: E731
        ("res_ratio", i): dict(zip(steps, [1, 1, 1, 1, 1.2])) for i in range(3)} | risk
    learned_at_10 = {"backcopy_risk": dict(zip(steps, [4, 1, 0.05, 0.01, 0.01])),
                     "bigram_risk": dict(zip(steps, [2, 1, 0.05, 0.01, 0.01]))}
    files = [_fake_run(tmp_path, "sgd_3l", 3, "softmax", "sgd", three([1, 2, 2, 2, 2.2]), {}, seed=0),
             _fake_run(tmp_path, "second", 3, "softmax", "sgd", three([1, 2, 2, 3, 2.4], **learned_at_10), {},
                       seed=2, base="sgd_3l"),
             _fake_run(tmp_path, "sgd_3l_b", 3, "softmax", "sgd", three([1, 2, 2, 2, 2.9]), {}, seed=1,
                       base="sgd_3l"),
             _fake_run(tmp_path, "sgd_3l_seed5", 3, "softmax", "sgd", three([1, 2, 2, 2, 2.0]), {}, seed=5)]
    df, specs = load_runs(files)
    assert runs_frame(specs).rows() == [("sgd_3l", "sgd_3l", 0), ("second", "sgd_3l", 2), ("sgd_3l_b", "sgd_3l", 1),
                                        ("sgd_3l_seed5", "sgd_3l_seed5", 5)]
    cl = claims(df, specs)
    assert set(cl.filter(pl.col("claim_id") == "res_peak_stable")["claim"]) == {
        "residual peak change (final / step 100)", "residual peak change (final / step 10)"}  # seed 2: step 10
    rob = robustness(cl, specs)
    assert rob.columns[:4] == ["run", "claim_id", "claim", "target"]
    r = {(row["run"], row["claim_id"]): row for row in rob.iter_rows(named=True)}
    assert set(r) == {(b, c) for b in ("sgd_3l", "sgd_3l_seed5") for c in ("res_peak_stable", "res_ratio_stable")}
    peak = r["sgd_3l", "res_peak_stable"]
    assert peak["claim"] == "residual peak change (final / early)"
    assert (peak["run"], peak["seeds"], peak["passed"], peak["failing_seeds"]) == ("sgd_3l", 3, 2, "1")
    assert peak["by_seed"] == "1.1 / 1.45 / 1.2"  # seed order; seed 2 compared with its step 10
    assert (peak["measured_min"], peak["measured_median"], peak["measured_max"]) == pytest.approx((1.1, 1.2, 1.45))
    assert r["sgd_3l", "res_ratio_stable"]["passed"] == 3
    assert (r["sgd_3l_seed5", "res_peak_stable"]["seeds"], r["sgd_3l_seed5", "res_peak_stable"]["by_seed"]) == (1, "1")
    paths = write_robustness_report(files, tmp_path / "out")
    assert [p.name for p in paths] == [f"toy_seeds_robustness.{e}" for e in ("csv", "md", "tex")]
    # the command prints the table and the paths the report returned
    args = _toy_parser().parse_args(["toy", "robustness", "--metrics", *map(str, files), "--out", str(tmp_path / "cli")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "| run | claim_id | claim | target |" in out
    assert out.strip().splitlines()[-3:] == [f"wrote {tmp_path / 'cli' / 'tables' / p.name}" for p in paths]


def test_loss_without_bos_prediction_equals_masked_cross_entropy():
    from extract.toy.train import loss_labels

    model = toy_model(12, width=16, layers=1, length=10, seed=0)
    x = torch.randint(1, 12, (3, 10), generator=torch.Generator().manual_seed(0))
    x[:, 0] = 0
    logits = model(x).logits
    want_all = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 12), x[:, 1:].reshape(-1))
    want_nobos = torch.nn.functional.cross_entropy(logits[:, 1:-1].reshape(-1, 12), x[:, 2:].reshape(-1))
    assert torch.allclose(model(x, labels=loss_labels(x)).loss, want_all)
    assert torch.allclose(model(x, labels=loss_labels(x, bos_loss=False)).loss, want_nobos)
    assert not torch.allclose(want_all, want_nobos) and (x[:, 1] != -100).all()  # x itself is left unchanged


def test_claim_ids_are_stable_and_unique():
    """The ids are the claims' names in every table (and what the robustness table groups by): renaming one
    is a change of the tables' contract, so they are spelled out here."""
    assert list(CLAIMS) == [
        "final_backcopy_risk", "final_bigram_risk", "sink", "backcopy_attention", "value_rise", "value_final",
        "value_drain", "zero_attn_backcopy", "zero_attn_bigram", "zero_mlp_bigram", "no_peak_without_bos_loss",
        "res_peak_growth", "res_ratio_growth", "res_peak_stable", "res_ratio_stable", "relu_no_sink"]
    for early in ("early", "step 10"):
        assert len({claim_text(k, early) for k in CLAIMS}) == len(CLAIMS)
    assert claim_text("res_peak_growth", "step 219") == "residual peak growth (final / step 219)"



# ------------------------------------------------------------------------------------------ run settings

def _toy_parser():
    import argparse

    from extract.cli.toy import register

    p = argparse.ArgumentParser(prog="dormant")
    register(p.add_subparsers(dest="group", required=True))
    return p


def _spec_from(tmp_path, settings: dict, *flags: str) -> RunSpec:
    from analysis.core.settings import settings_from_args
    
    f = tmp_path / "settings.json"
    f.write_text(json.dumps(settings))
    args = _toy_parser().parse_args(["toy", "train", "--config", str(f), "--out-dir", str(tmp_path), *flags])
    return settings_from_args(RunSpec, args)


def test_run_settings_from_json_plus_override_flags(tmp_path):
    """Dataclass defaults, then the JSON, then the flags; run.json (asdict) reads back as the same spec."""
    given = {"name": "r", "layers": 3, "attention": "relu", "betas": [0.8, 0.95], "steps": 50, "bos_loss": False,
             "corpus": "math"}
    spec = _spec_from(tmp_path, given, "--steps", "7", "--lr", "0.01", "--seed", "3", "--min-count", "5")
    assert spec == RunSpec(name="r", layers=3, attention="relu", betas=(0.8, 0.95), steps=7, lr=0.01, seed=3,
                           bos_loss=False, corpus="math", min_count=5)
    assert _spec_from(tmp_path, given, "--bos-loss", "--betas", "0.5", "0.6").bos_loss is True
    assert _spec_from(tmp_path, given, "--betas", "0.5", "0.6").betas == (0.5, 0.6)
    assert _spec_from(tmp_path, {"name": "r"}) == RunSpec(name="r")  # every other field: its default
    assert _spec_from(tmp_path, json.loads(json.dumps(asdict(spec)))) == spec  # a run.json is a --config
    assert _spec_from(tmp_path, {"name": "r"}, "--base", "q").base_run == "q"
    assert RunSpec(name="r").base_run == "r"


@pytest.mark.parametrize("settings, flags, message", [
    ({"name": "r", "widht": 3}, (), r"unknown RunSpec setting\(s\) widht; known: .*\bwidth\b"),
    ({"name": "r", "attention": "linear"}, (), r"attention = 'linear'; choose one of 'softmax', 'relu'"),
    ({"layers": 2}, (), r"name must be given"),
    ({"name": "r", "seed": None}, (), r"seed cannot be None"),
])
def test_run_settings_errors_name_the_key(tmp_path, settings, flags, message):
    with pytest.raises(ValueError, match=message):
        _spec_from(tmp_path, settings, *flags)


@pytest.mark.parametrize("flags", [("--attention", "linear"), ("--betas", "0.9"), ("--optimizer", "adam")])
def test_run_settings_flags_are_checked_by_the_parser(tmp_path, flags):
    with pytest.raises(SystemExit):
        _spec_from(tmp_path, {"name": "r"}, *flags)


def test_toy_train_command_writes_its_spec_and_structured_metrics(tmp_path, capsys):
    """``dormant toy train --config run.json --seed 4``: run.json holds every setting, the metrics frame has
    the bb_metrics columns (two layers: per-layer rows for both)."""
    save_task(build_task(TEXT, k=3, min_count=1), tmp_path / "task.json")
    given = {"name": "cli", "layers": 2, "width": 16, "length": 16, "batch": 4, "steps": 3, "checkpoints": 2,
             "eval_batch": 4}
    (tmp_path / "run_in.json").write_text(json.dumps(given))
    out = tmp_path / "out"
    args = _toy_parser().parse_args(["toy", "train", "--config", str(tmp_path / "run_in.json"), "--seed", "4",
                                     "--out-dir", str(out), "--task-file", str(tmp_path / "task.json"), "--quiet"])
    assert args.func(args) == 0
    spec = RunSpec(**given, seed=4)
    assert json.loads((out / "run.json").read_text()) == json.loads(json.dumps(asdict(spec)))
    _check_metrics_frame(pl.read_parquet(out / "metrics.parquet"), spec)
    assert capsys.readouterr().out.startswith("cli: 3 steps")


def _toy_config(profile: str = "default") -> dict:
    return yaml.safe_load((ROOT / "config" / f"{profile}.yaml").read_text())["mechanism"]["toy"]


def test_a_runs_settings_change_only_with_its_own_config():
    """run_settings (what rules/toy.smk writes per run): every RunSpec field; adding a run or changing another
    run's entry leaves a run's settings as they were; a task key is every run's; a seed variant is its base
    run with its own seed and base."""
    cfg = _toy_config()
    runs = list(cfg["runs"]) + list(seed_variants(cfg))
    before = {r: run_settings(cfg, r) for r in runs}
    for r, s in before.items():
        assert list(s) == [f.name for f in fields(RunSpec)] and s["name"] == r
    assert before["sgd_3l_seed1"] == {**before["sgd_3l"], "name": "sgd_3l_seed1", "seed": 1, "base": "sgd_3l"}
    changed = copy.deepcopy(cfg)
    changed["runs"]["new"] = {"layers": 2}
    changed["sets"]["all"].append("new")
    changed["runs"]["sgd_3l"]["steps"] = 5
    after = {r: run_settings(changed, r) for r in runs + ["new", "new_seed1"]}
    moved = {"sgd_3l", "sgd_3l_seed1", "sgd_3l_seed2"}
    assert {r for r in runs if after[r] != before[r]} == moved
    assert after["sgd_3l_seed2"]["steps"] == 5 and after["new_seed1"]["base"] == "new"
    changed["corpus"] = "math"
    assert all(run_settings(changed, r) != after[r] for r in runs)
    # every key a profile may give a run (config/schema.yaml) is a RunSpec field; unknown ones are refused
    schema = yaml.safe_load((ROOT / "config" / "schema.yaml").read_text())
    assert set(schema["$defs"]["toy_run"]["properties"]) <= {f.name for f in fields(RunSpec)}
    changed["runs"]["bad"] = {"widht": 3}
    with pytest.raises(ValueError, match=r"toy run bad: unknown RunSpec setting\(s\) widht"):
        run_settings(changed, "bad")


def _workflow_copy(tmp_path) -> Path:
    for item in ("Snakefile", "config", "rules"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp_path / item)
    (tmp_path / "results" / "data").mkdir(parents=True)
    (tmp_path / "results" / "data" / "sources.txt").write_text("cached\n")  # BIG-bench is in the cache
    return tmp_path


def _snakemake(d: Path, *args: str, configs: tuple[str, ...] = ("config/smoke.yaml",)) -> subprocess.CompletedProcess:
    """``snakemake ARGS --cores 1 --configfile CONFIGS`` in ``d`` (targets before the config files, which
    take every word after them)."""
    cmd = [sys.executable, "-m", "snakemake", *args, "--cores", "1", "--configfile", *configs]
    return subprocess.run(cmd, cwd=d, capture_output=True, text=True)


def _train_configs(res: subprocess.CompletedProcess) -> dict[str, dict]:
    """run name -> the inline --config JSON of its toy_train job, from a ``snakemake -n -p`` plan."""
    out = {}
    for line in res.stdout.splitlines():
        if " toy train --config " in line:
            cfg = json.loads(line.split(" toy train --config '", 1)[1].split("'", 1)[0])
            out[cfg["name"]] = cfg
    return out


def test_workflow_passes_each_run_only_its_own_settings(tmp_path):
    """Each toy_train job gets its run's settings as inline JSON (a params value, so Snakemake reruns a job
    when, and only when, its own settings change): changing one run changes that run's and its seed
    variants' JSON and no other."""
    d = _workflow_copy(tmp_path)
    res = _snakemake(d, "-n", "-p", "toy_all", "toy_seeds")
    assert res.returncode == 0, res.stderr[-3000:]
    before = _train_configs(res)
    assert {"adam_1l", "relu_1l", "adam_1l_seed1"} <= set(before) and before["relu_1l"]["attention"] == "relu"
    (d / "extra.yaml").write_text("mechanism:\n  toy:\n    runs:\n      relu_1l: {steps: 7}\n")
    res = _snakemake(d, "-n", "-p", "toy_all", "toy_seeds", configs=("config/smoke.yaml", "extra.yaml"))
    assert res.returncode == 0, res.stderr[-3000:]
    after = _train_configs(res)
    assert {n for n in before if after[n] != before[n]} == {"relu_1l", "relu_1l_seed1", "relu_1l_seed2"}
    assert after["relu_1l"]["steps"] == 7
    assert not (d / "results" / "config").exists()  # nothing written at DAG time


@pytest.mark.slow
def test_smoke_toy_target_through_snakemake(tmp_path):
    """The smoke profile's toy rules end to end in a copy of the workflow: the claims table and figures exist
    and hold the trained run's final metrics; the run's run.json is its settings file; a second dry run has
    nothing to train."""
    d = _workflow_copy(tmp_path)
    targets = ["results/tables/toy_core_claims.csv", "results/figures/toy_core_dynamics.png"]
    res = _snakemake(d, *targets)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = pl.read_parquet(d / "results" / "toy" / "adam_1l" / "metrics.parquet")
    spec = RunSpec(**json.loads((d / "results" / "toy" / "adam_1l" / "run.json").read_text()))
    _check_metrics_frame(metrics, spec)
    plan = _train_configs(_snakemake(d, "-n", "-p", *targets, "--forcerun", "toy_train"))
    assert json.loads((d / "results" / "toy" / "adam_1l" / "run.json").read_text()) == plan["adam_1l"]
    final = pl.read_csv(d / "results" / "tables" / "toy_core_final.csv")
    last = metrics.filter((pl.col("step") == 100) & (pl.col("metric") == "bigram_risk")
                          & pl.col("part").is_null())["value"][0]
    assert final["bigram_risk"][0] == pytest.approx(last)
    cl = pl.read_csv(d / "results" / "tables" / "toy_core_claims.csv")
    assert cl.columns[:3] == ["run", "claim_id", "claim"] and set(cl["claim_id"]) <= set(CLAIMS)
    assert (d / "results" / "figures" / "toy_core_dynamics.png").stat().st_size > 1000
    again = _snakemake(d, "-n", *targets)
    assert again.returncode == 0 and "toy_train" not in again.stdout, again.stdout[-3000:]
