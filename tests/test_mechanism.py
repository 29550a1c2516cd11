"""SPEC §7: Bigram-Backcopy task, toy transformer, metrics, training, reports; dormant-by-domain heads."""
from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import polars as pl
import pytest
import torch
from scipy import stats

from analysis.domains import candidates, scatter_summary
from analysis.toy import claims, early_step, interventions_table, write_toy_report
from extract.domains import head_loss_changes, replace_head, zero_head
from extract.engine.scores import score_heads
from extract.toy.data import BigramBackcopy, build_task, corpus_task, load_task, save_task
from extract.toy.metrics import measure, risks, zeroed
from extract.toy.model import toy_model
from extract.toy.train import RunSpec, checkpoint_steps, train

torch.set_num_threads(1)
TEXT = "the cat ate the hat. a bat sat at the mat; the rat ate a date! " * 30


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
    assert m["attn_bos_l0"] == pytest.approx(np.mean([A[b, q, 0].item() for b, q in plain]), rel=1e-5)
    assert m["attn_prev_trig_l0"] == pytest.approx(np.mean([A[b, q, q - 1].item() for b, q in trigq]), rel=1e-5)
    wo_v = (v @ sd["model.layers.0.self_attn.o_proj.weight"].T).norm(dim=-1)
    assert m["val_bos_l0"] == pytest.approx(wo_v[:, 0].mean().item(), rel=1e-5)
    assert m["attn_self_bos_l0"] == pytest.approx(A[:, 0, 0].mean().item(), rel=1e-6) == 1.0
    assert m["val_ratio_l0"] == pytest.approx((wo_v[:, 0].mean() / wo_v[:, 1:].mean()).item(), rel=1e-5)
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
    risk = lambda vals: [{"run": "r", "step": s, "metric": m, "value": v}  # noqa: E731
                         for s, v in zip(steps, vals) for m in ("backcopy_risk", "bigram_risk")]
    assert early_step(pl.DataFrame(risk([0.01, 1, 1, 1, 1])), "r", 1000) == 100  # never learned: ~10% of steps
    assert early_step(pl.DataFrame(risk([0.01, 1, 0.1, 0.01, 0.01])), "r", 1000) == 10  # first learned
    assert early_step(pl.DataFrame(risk([0.01, 1, 1, 1, 0.01])), "r", 1000) == 100  # learned only at the end


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
    assert {"zero_attn_l0.backcopy_risk", "zero_mlp_l0.bigram_risk"} <= set(a["metric"])
    db = tmp_path / "x.duckdb"
    build(db, tables={"bb_metrics": [tmp_path / "a" / "metrics.parquet"]})
    con = connect(db, read_only=True)
    got = query(con, "SELECT value FROM bb_metrics WHERE metric = 'loss' ORDER BY step")["value"].to_list()
    assert got == pytest.approx(loss.to_list())
    # the saved checkpoint reproduces the final metrics
    from safetensors.torch import load_file

    model = toy_model(task.vocab_size, width=16, length=24)
    model.load_state_dict(load_file(tmp_path / "a" / "step-000040.safetensors"))
    x_eval = task.sample(8, 24, torch.Generator().manual_seed(10_000))
    assert measure(model.eval(), task, x_eval)["loss"] == pytest.approx(loss[-1], rel=1e-5)


def _fake_run(tmp_path, name, layers, attention, optimizer, series: dict, final: dict, **extra):
    rows = [{"run": name, "step": s, "metric": m, "value": float(v)} for m, vals in series.items()
            for s, v in vals.items()]
    rows += [{"run": name, "step": 1000, "metric": m, "value": float(v)} for m, v in final.items()]
    d = tmp_path / name
    d.mkdir()
    pl.DataFrame(rows).write_parquet(d / "metrics.parquet")
    (d / "run.json").write_text(json.dumps({"name": name, "layers": layers, "attention": attention,
                                            "optimizer": optimizer, "steps": 1000, "width": 8, "length": 8,
                                            "batch": 1, **extra}))
    return d / "metrics.parquet"


def test_claims_on_hand_made_metrics(tmp_path):
    steps = [0, 1, 10, 100, 1000]
    one = {"val_ratio_l0": dict(zip(steps, [1.0, 1.4, 0.9, 0.4, 0.2])),
           "res_peak_l0": dict(zip(steps, [1, 1, 1, 1, 1])), "train_s": dict(zip(steps, [0, 1, 2, 3, 4])),
           "attn_bos_l0": dict(zip(steps, [0.1] * 4 + [0.9])), "attn_prev_trig_l0": dict(zip(steps, [0.6] * 5)),
           "backcopy_risk": dict(zip(steps, [4, 3, 2, 1, 0.01])), "bigram_risk": dict(zip(steps, [2, 1, 1, 1, 0.06]))}
    final = {"zero_attn_l0.backcopy_risk": 3.0, "zero_attn_l0.bigram_risk": 0.07, "zero_mlp_l0.bigram_risk": 1.0,
             "zero_mlp_l0.backcopy_risk": 0.5}
    f1 = _fake_run(tmp_path, "adam_1l", 1, "softmax", "adamw", one, final)
    three = lambda peak, ratio: {f"res_peak_l{i}": dict(zip(steps, peak)) for i in range(3)} | {  # noqa: E731
        f"res_ratio_l{i}": dict(zip(steps, [r * (1 + i / 10) for r in ratio])) for i in range(3)} | {
        f"attn_bos_l{i}": dict(zip(steps, [0.1] * 5)) for i in range(3)} | {"train_s": dict(zip(steps, [0] * 5))}
    f2 = _fake_run(tmp_path, "relu_3l", 3, "relu", "adamw", three([1, 2, 2, 2, 2.5], [1, 2, 2, 2, 4]), {})
    f3 = _fake_run(tmp_path, "sgd_3l", 3, "softmax", "sgd", three([1, 2, 2, 2, 2.9], [1, 1, 1, 1, 1.2]), {})
    f4 = _fake_run(tmp_path, "relu_3l_nobos", 3, "relu", "adamw", three([1, 2, 2, 2, 9], [1, 1, 1, 1, 0.8]), {},
                   bos_loss=False)
    from analysis.toy import load_runs

    df, specs = load_runs([f1, f2, f3, f4])
    c = {(r["run"], r["claim"]): (r["measured"], r["pass"]) for r in claims(df, specs).iter_rows(named=True)}
    assert c[("adam_1l", "final bigram_risk (nats)")] == (pytest.approx(0.06), False)
    assert c[("adam_1l", "final backcopy_risk (nats)")][1]
    assert c[("adam_1l", "‖Val_<s>‖ ratio: peak over step-0 value")] == (pytest.approx(1.4), True)
    assert c[("adam_1l", "‖Val_<s>‖ ratio: final / peak")] == (pytest.approx(0.2 / 1.4), True)
    assert c[("adam_1l", "zero attention: backcopy risk increase")] == (pytest.approx(2.99), True)
    assert c[("adam_1l", "zero attention: bigram risk increase")] == (pytest.approx(0.01), True)
    assert c[("relu_3l", "residual peak change (final / step 100)")] == (pytest.approx(1.25), True)
    assert c[("sgd_3l", "residual peak change (final / step 100)")] == (pytest.approx(1.45), False)
    # relative peak: max over layers (layer 2 = 1.2x layer 0), final / early
    assert c[("relu_3l", "residual peak / other positions change (final / step 100)")] == (pytest.approx(2.0), False)
    assert c[("sgd_3l", "residual peak / other positions change (final / step 100)")] == (pytest.approx(1.2), True)
    assert c[("relu_3l", "Attn_<s> (max over layers), ReLU attention")] == (pytest.approx(0.1), True)
    # the diagnostic run without the <s> loss: only "is <s> a peak at the end" (max over layers: 0.8 * 1.2)
    assert c[("relu_3l_nobos", "residual peak / other positions, final (no <s> loss)")] == (pytest.approx(0.96), True)
    assert not any(run == "relu_3l_nobos" and "change" in claim for run, claim in c)
    inter = interventions_table(df.filter(pl.col("run") == "adam_1l"))
    assert inter.filter((pl.col("zeroed") == "attn L0") & (pl.col("risk") == "backcopy_risk"))["value"][0] == 3.0
    paths = write_toy_report([f1, f2, f3], tmp_path / "out", "toy_t")
    assert {p.name for p in paths} >= {"toy_t_claims.csv", "toy_t_dynamics.png", "toy_t_interventions.svg"}


def test_robustness_pools_seed_variants(tmp_path):
    """<run>_seed<n> pools with <run>; the claim's early step (which differs per seed) leaves its name."""
    from analysis.toy import robustness, write_robustness_report

    steps = [0, 1, 10, 100, 1000]
    three = lambda peak, **risk: {f"res_peak_l{i}": dict(zip(steps, peak)) for i in range(3)} | {  # noqa: E731
        f"res_ratio_l{i}": dict(zip(steps, [1, 1, 1, 1, 1.2])) for i in range(3)} | risk
    learned_at_10 = {"backcopy_risk": dict(zip(steps, [4, 1, 0.05, 0.01, 0.01])),
                     "bigram_risk": dict(zip(steps, [2, 1, 0.05, 0.01, 0.01]))}
    files = [_fake_run(tmp_path, "sgd_3l", 3, "softmax", "sgd", three([1, 2, 2, 2, 2.2]), {}, seed=0),
             _fake_run(tmp_path, "sgd_3l_seed2", 3, "softmax", "sgd", three([1, 2, 2, 3, 2.4], **learned_at_10), {},
                       seed=2),
             _fake_run(tmp_path, "sgd_3l_seed1", 3, "softmax", "sgd", three([1, 2, 2, 2, 2.9]), {}, seed=1)]
    from analysis.toy import load_runs

    df, specs = load_runs(files)
    r = {row["claim"]: row for row in robustness(claims(df, specs), specs).iter_rows(named=True)}
    assert set(r) == {"residual peak change (final / early)", "residual peak / other positions change (final / early)"}
    peak = r["residual peak change (final / early)"]
    assert (peak["run"], peak["seeds"], peak["passed"], peak["failing_seeds"]) == ("sgd_3l", 3, 2, "1")
    assert peak["by_seed"] == "1.1 / 1.45 / 1.2"  # seed order; seed 2 compared with its step 10
    assert (peak["measured_min"], peak["measured_median"], peak["measured_max"]) == pytest.approx((1.1, 1.2, 1.45))
    assert r["residual peak / other positions change (final / early)"]["passed"] == 3
    paths = write_robustness_report(files, tmp_path / "out")
    assert [p.name for p in paths] == [f"toy_seeds_robustness.{e}" for e in ("csv", "md", "tex")]


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


# ------------------------------------------------------------------------------------------ domains

def test_domain_candidates_orientation_and_contrast():
    rows = []
    # (layer, head, news mean, code mean, news dormant fraction, code dormant fraction)
    for layer, head, news, code, fn, fc in [(0, 0, 0.9, 0.2, 0.9, 0.0), (0, 1, 0.5, 0.5, 0.2, 0.2),
                                            (1, 0, 0.1, 0.6, 0.0, 0.6), (1, 1, 0.7, 0.1, 0.0, 0.0)]:
        rows += [{"model": "m", "layer": layer, "head": head, "domain": "news", "mean": news, "dormant_frac": fn,
                  "tau": 0.4},
                 {"model": "m", "layer": layer, "head": head, "domain": "code", "mean": code, "dormant_frac": fc,
                  "tau": 0.4}]
    means = pl.DataFrame(rows)
    c = candidates(means, "awft", top=3)  # awft: high = dormant
    # ranked by dormant-fraction contrast; L1H1 shifts its mean by 0.6 but is never dormant: last
    assert list(zip(c["layer"], c["head"])) == [(0, 0), (1, 0), (1, 1)]
    assert c["contrast"].to_list() == pytest.approx([0.9, 0.6, 0.0])
    assert c["mean_contrast"].to_list()[:2] == pytest.approx([0.7, 0.5])
    assert c.row(0, named=True)["dormant_domain"] == "news" and c.row(1, named=True)["dormant_domain"] == "code"
    assert c.row(0, named=True)["dormant_news"] == 0.9 and c.row(0, named=True)["awft_code"] == 0.2
    assert c["tau_awft"].to_list() == [0.4] * 3  # the model's τ, for the scatter's τ split
    low = means.with_columns(pl.col("mean") * -1)  # ahon_ln: low = dormant; fractions as given
    c = candidates(low, "ahon_ln", top=1)
    assert c.row(0, named=True)["dormant_domain"] == "news" and c.row(0, named=True)["mean_contrast"] == pytest.approx(0.7)


def test_domain_means_dormant_fraction_against_numpy(tmp_path):
    """τ is the SPEC §3 quantile of each model's pooled scores; the dormant fraction per domain counts the
    examples beyond it, computed here independently with NumPy."""
    from analysis.database import connect
    from analysis.domains import domain_means

    rng = np.random.default_rng(1)
    con = connect(tmp_path / "d.duckdb")
    ex, sc = [], []
    for model in ("a", "b"):
        for i in range(12):
            dom = ["news", "code", "math"][i % 3]
            ex.append((model, "ds", f"e{i}", dom))
            for layer in range(2):
                for head in range(3):
                    sc.append((model, "ds", f"e{i}", layer, head, float(rng.uniform()), float(rng.normal())))
    con.executemany("INSERT INTO examples (model, dataset, example, domain) VALUES (?, ?, ?, ?)", ex)
    con.executemany("INSERT INTO head_scores (model, dataset, example, layer, head, awft, ahon_ln) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)", sc)
    for fn, p in (("awft", 0.15), ("ahon_ln", 0.3)):
        got = domain_means(con, fn, p)
        assert got.height == 2 * 2 * 3 * 3
        for model in ("a", "b"):
            col = 5 if fn == "awft" else 6
            v = np.array([r[col] for r in sc if r[0] == model])
            tau = np.quantile(v, 1 - p) if fn == "awft" else np.quantile(v, p)
            for layer, head, dom in ((0, 0, "news"), (1, 2, "math")):
                ids = {e[2] for e in ex if e[0] == model and e[3] == dom}
                s = np.array([r[col] for r in sc if r[0] == model and r[2] in ids and r[3] == layer and r[4] == head])
                want = (s > tau).mean() if fn == "awft" else (s < tau).mean()
                row = got.filter((pl.col("model") == model) & (pl.col("layer") == layer) & (pl.col("head") == head)
                                 & (pl.col("domain") == dom)).row(0, named=True)
                assert row["tau"] == pytest.approx(tau) and row["dormant_frac"] == pytest.approx(want)
                assert row["mean"] == pytest.approx(s.mean()) and row["n_examples"] == 4
    con.close()
    from analysis.domains import write_domain_report

    with pytest.raises(ValueError, match="--models zz: not in"):  # a typo is named before anything is written
        write_domain_report(tmp_path / "d.duckdb", tmp_path / "out", models=["a", "zz"])
    assert not (tmp_path / "out").exists()


def _row(df: pl.DataFrame, ablation: str = "zero", split: str = "median") -> dict:
    return df.filter((pl.col("ablation") == ablation) & (pl.col("split") == split)).row(0, named=True)


def _perm_ref(act: np.ndarray, dorm: np.ndarray) -> float:
    return stats.permutation_test((act, dorm), lambda x, y: x.mean() - y.mean(), alternative="greater",
                                  permutation_type="independent", n_resamples=9999, random_state=0).pvalue


def test_scatter_summary_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.uniform(size=30)
    d = 0.5 * (1 - a) + rng.normal(scale=0.05, size=30)
    df = pl.DataFrame({"model": ["m"] * 30, "layer": [1] * 30, "head": [2] * 30, "awft": a, "delta_loss": d})
    out = scatter_summary(df)
    assert out.height == 1  # no mean ablation, no τ: one row
    s = _row(out)
    assert s["pearson"] == pytest.approx(stats.pearsonr(a, d)[0])
    assert s["spearman"] == pytest.approx(stats.spearmanr(a, d)[0])
    active = a <= np.median(a)
    assert (s["n_active"], s["n_dormant"]) == (15, 15) and s["awft_cut"] == pytest.approx(np.median(a))
    assert s["delta_loss_dormant"] == pytest.approx(d[~active].mean())
    assert s["p_value"] == pytest.approx(_perm_ref(d[active], d[~active]), abs=0.01) and s["holds"]
    flat = df.with_columns(pl.Series("delta_loss", rng.normal(scale=0.05, size=30)))
    assert not _row(scatter_summary(flat))["holds"]
    # a head that costs as much on dormant examples as on active ones fails the pattern even when p is small
    r = _row(scatter_summary(df.with_columns(pl.Series("delta_loss", 0.4 + 0.5 * (1 - a)))))
    assert r["p_value"] < 0.05 and not r["holds"]
    # mean ablation: the same test on its own column
    noise = rng.normal(scale=0.05, size=30)
    out = scatter_summary(df.with_columns(pl.Series("delta_loss_mean", noise)))
    assert out.height == 2 and _row(out)["holds"]
    m = _row(out, "mean")
    assert not m["holds"]
    assert m["delta_loss_active"] == pytest.approx(noise[active].mean())
    assert m["delta_loss_dormant"] == pytest.approx(noise[~active].mean())
    assert m["p_value"] == pytest.approx(_perm_ref(noise[active], noise[~active]), abs=0.015)


def test_scatter_summary_tau_split():
    """The τ split puts the examples with awft above the model's τ on the dormant side (the candidate
    table's definition); a side with fewer than MIN_SIDE examples gets no test."""
    rng = np.random.default_rng(1)
    a = rng.uniform(size=40)
    d = np.where(a > 0.8, 0.0, 0.3) + rng.normal(scale=0.02, size=40)  # costless only above 0.8
    df = pl.DataFrame({"model": ["m"] * 40, "layer": [0] * 40, "head": [0] * 40, "awft": a, "delta_loss": d})
    out = scatter_summary(df, {"m": 0.8, "other": 0.1})
    assert out["split"].to_list() == ["median", "tau"]
    t = _row(out, split="tau")
    dorm = a > 0.8
    assert t["awft_cut"] == 0.8 and (t["n_active"], t["n_dormant"]) == (int((~dorm).sum()), int(dorm.sum()))
    assert t["delta_loss_dormant"] == pytest.approx(d[dorm].mean())
    assert t["delta_loss_active"] == pytest.approx(d[~dorm].mean())
    assert t["p_value"] == pytest.approx(_perm_ref(d[~dorm], d[dorm]), abs=0.01) and t["holds"]
    # the median split mixes costly examples into the dormant side: the pattern fails there
    assert not _row(out)["holds"]
    few = scatter_summary(df, {"m": float(np.sort(a)[-2])})  # one example above τ
    f = _row(few, split="tau")
    assert f["n_dormant"] == 1 and np.isnan(f["p_value"]) and not f["holds"]


def test_scatter_report_reads_tau_from_candidates(tmp_path):
    """Files with and without mean ablation load together; τ comes from the candidate table (per model),
    and a candidate table ranked by another score (no tau_awft) is refused."""
    from analysis.domains import write_scatter_report

    rng = np.random.default_rng(2)
    files = []
    for model, mean in (("a", True), ("b", False)):
        a = rng.uniform(size=12)
        df = pl.DataFrame({"model": [model] * 12, "layer": [3] * 12, "head": [1] * 12, "example": list(range(12)),
                           "domain": ["news"] * 12, "awft": a, "delta_loss": 1 - a})
        if mean:
            df = df.with_columns(pl.Series("delta_loss_mean", 0.5 * (1 - a)))
        files.append(tmp_path / f"{model}.parquet")
        df.write_parquet(files[-1])
    cands = tmp_path / "cands.parquet"
    pl.DataFrame({"model": ["a", "a", "b"], "tau_awft": [0.7, 0.7, 0.2]}).write_parquet(cands)
    paths = write_scatter_report(files, tmp_path / "out", cands)
    got = pl.read_csv(tmp_path / "out" / "tables" / "domain_scatter.csv")
    keys = sorted(zip(got["model"], got["ablation"], got["split"]))
    assert keys == [("a", "mean", "median"), ("a", "mean", "tau"), ("a", "zero", "median"), ("a", "zero", "tau"),
                    ("b", "zero", "median"), ("b", "zero", "tau")]  # b has no mean-ablation rows
    assert got.filter((pl.col("model") == "b") & (pl.col("split") == "tau"))["awft_cut"].to_list() == [0.2]
    assert all(p.exists() for p in paths) and (tmp_path / "out" / "figures" / "domain_scatter_a.svg").exists()
    pl.DataFrame({"model": ["a"], "tau_ahon_ln": [0.1]}).write_parquet(cands)
    with pytest.raises(ValueError, match="tau_awft"):
        write_scatter_report(files, tmp_path / "out", cands)


def test_zero_head_equals_zeroed_output_columns():
    from tiny import tiny_model
    from tiny_tokenizer import tiny_tokenizer

    model, tok = tiny_model("llama"), tiny_tokenizer()
    ids = torch.tensor([[1] + tok("def f(x): return x", add_special_tokens=False)["input_ids"]])
    with zero_head(model, 1, 2), torch.no_grad():
        got = model(input_ids=ids).logits
    ref = tiny_model("llama")
    D = ref.config.head_dim
    with torch.no_grad():
        ref.model.layers[1].self_attn.o_proj.weight[:, 2 * D:3 * D] = 0
        want = ref(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)


def _with_head_as_bias(model, layer: int, head: int, value: torch.Tensor):
    """Reference mean ablation: a copy of ``o_proj`` whose columns of ``head`` are zero and whose bias is those
    columns times ``value`` (a constant head output contributes ``W[:, head] @ value`` at every position)."""
    o = model.base_model.layers[layer].self_attn.o_proj
    D = o.in_features // model.config.num_attention_heads
    new = torch.nn.Linear(o.in_features, o.out_features, bias=True, dtype=o.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(o.weight)
        new.bias.copy_(o.weight[:, head * D:(head + 1) * D] @ value.to(o.weight.dtype))
        new.weight[:, head * D:(head + 1) * D] = 0
    model.base_model.layers[layer].self_attn.o_proj = new
    return o


def _o_inputs(model, layer: int, head: int, seqs: list[list[int]]) -> torch.Tensor:
    """The head's slice of the o_proj input at every position of every sequence, stacked ``(N, head_dim)``."""
    o = model.base_model.layers[layer].self_attn.o_proj
    D = o.in_features // model.config.num_attention_heads
    got = []
    h = o.register_forward_pre_hook(lambda m, a: got.append(a[0][0, :, head * D:(head + 1) * D].clone()))
    try:
        with torch.no_grad():
            for seq in seqs:
                model(input_ids=torch.tensor([seq]))
    finally:
        h.remove()
    return torch.cat(got)


def test_mean_ablation_equals_a_constant_head_output():
    """Mean ablation: the head's o_proj-input slice replaced by its mean over every position of every example
    equals zeroing its o_proj columns and adding their product with that mean as a bias."""
    from tiny import tiny_model
    from tiny_tokenizer import tiny_tokenizer

    model, tok = tiny_model("llama"), tiny_tokenizer()
    texts = [{"id": str(i), "text": t, "domain": d, "corpus": d} for i, (t, d) in enumerate(
        [("def f(x): return x + 1", "code"), ("The cat sat on the mat today.", "news"), ("2 + 2 = 4", "math")])]
    seqs = [[1] + tok(t["text"], add_special_tokens=False)["input_ids"] for t in texts]
    df = head_loss_changes(model, tok, texts, [(1, 2), (0, 1)], mean=True, progress=False)
    assert df.columns[-2:] == ["loss_mean_ablated", "delta_loss_mean"]
    for layer, head in [(1, 2), (0, 1)]:
        mean = _o_inputs(model, layer, head, seqs).double().mean(0).float()
        with replace_head(model, layer, head, mean), torch.no_grad():
            got = [model(input_ids=torch.tensor([s])).logits for s in seqs]
        saved = _with_head_as_bias(model, layer, head, mean)
        try:
            with torch.no_grad():
                want = [model(input_ids=torch.tensor([s])).logits for s in seqs]
        finally:
            model.base_model.layers[layer].self_attn.o_proj = saved
        rows = df.filter((pl.col("layer") == layer) & (pl.col("head") == head))
        for g, w, seq, row in zip(got, want, seqs, rows.iter_rows(named=True)):
            assert torch.allclose(g, w, atol=1e-5)
            ids = torch.tensor(seq)
            loss = torch.nn.functional.cross_entropy(w[0, :-1], ids[1:]).item()
            assert row["loss_mean_ablated"] == pytest.approx(loss, rel=1e-5)
            assert row["delta_loss_mean"] == pytest.approx(loss - row["loss_base"], abs=1e-6)
    assert "loss_mean_ablated" not in head_loss_changes(model, tok, texts[:1], [(0, 0)], progress=False).columns


@pytest.mark.slow
def test_real_model_head_loss_change(zoo_model):
    """SmolLM2: the loss change of zeroing a head equals the loss with its o_proj columns removed, and the
    per-example awft is the score engine's."""
    model, tok = zoo_model("smollm2-135m-instruct")
    texts = [{"id": "p", "text": "The weather in Paris was mild and sunny this spring.", "domain": "news",
              "corpus": "xsum"},
             {"id": "c", "text": "def add(a, b):\n    return a + b\n", "domain": "code", "corpus": "code"}]
    df = head_loss_changes(model, tok, texts, [(3, 1)], mean=True, progress=False)
    ref = score_heads(model, [[tok.bos_token_id] + tok(t["text"], add_special_tokens=False)["input_ids"]
                              for t in texts])
    ref = ref.filter((pl.col("layer") == 3) & (pl.col("head") == 1)).sort("example")
    assert df["awft"].to_list() == pytest.approx(ref["awft"].to_list(), rel=1e-4)
    o = model.model.layers[3].self_attn.o_proj
    D = o.in_features // model.config.num_attention_heads
    saved = o.weight[:, D:2 * D].clone()
    try:
        with torch.no_grad():
            o.weight[:, D:2 * D] = 0
            for row, t in zip(df.iter_rows(named=True), texts):
                ids = torch.tensor([[tok.bos_token_id] + tok(t["text"], add_special_tokens=False)["input_ids"]])
                logits = model(input_ids=ids).logits
                loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
                assert row["loss_ablated"] == pytest.approx(loss, rel=1e-4)
    finally:
        with torch.no_grad():
            o.weight[:, D:2 * D] = saved
    # mean ablation: the head's output replaced by its mean over both examples' positions = a constant bias
    seqs = [[tok.bos_token_id] + tok(t["text"], add_special_tokens=False)["input_ids"] for t in texts]
    mean = _o_inputs(model, 3, 1, seqs).double().mean(0)
    saved = _with_head_as_bias(model, 3, 1, mean)
    try:
        with torch.no_grad():
            for row, seq in zip(df.iter_rows(named=True), seqs):
                ids = torch.tensor([seq])
                loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1], ids[0, 1:]).item()
                assert row["loss_mean_ablated"] == pytest.approx(loss, rel=1e-4)
    finally:
        model.base_model.layers[3].self_attn.o_proj = saved


@pytest.mark.slow
def test_smoke_toy_target_through_snakemake(tmp_path):
    """The smoke profile's toy rules end to end in a copy of the workflow: the claims table and figures exist
    and hold the trained run's final metrics."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for item in ("Snakefile", "config", "rules"):
        src = root / item
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp_path / item)
    (tmp_path / "results" / "data").mkdir(parents=True)
    (tmp_path / "results" / "data" / "sources.txt").write_text("cached\n")  # BIG-bench is in the cache
    cmd = [sys.executable, "-m", "snakemake", "results/tables/toy_core_claims.csv",
           "results/figures/toy_core_dynamics.png", "--cores", "1", "--configfile", "config/smoke.yaml"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = pl.read_parquet(tmp_path / "results" / "toy" / "adam_1l" / "metrics.parquet")
    final = pl.read_csv(tmp_path / "results" / "tables" / "toy_core_final.csv")
    last = metrics.filter((pl.col("step") == 100) & (pl.col("metric") == "bigram_risk"))["value"][0]
    assert final["bigram_risk"][0] == pytest.approx(last)
    assert (tmp_path / "results" / "figures" / "toy_core_dynamics.png").stat().st_size > 1000


def test_outputs_keep_dotted_model_names(tmp_path):
    from analysis.render import write_table

    paths = write_table(pl.DataFrame({"a": [1]}), tmp_path / "domain_heads_qwen2.5-coder-0.5b-instruct")
    assert [p.name for p in paths] == [f"domain_heads_qwen2.5-coder-0.5b-instruct.{e}" for e in ("csv", "md", "tex")]
    assert pl.read_csv(paths[0])["a"].to_list() == [1]
