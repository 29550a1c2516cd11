"""definitions §7: dormant-by-domain heads (the Bigram-Backcopy toy study is tests/test_toy.py)."""
from __future__ import annotations

import contextlib

import numpy as np
import polars as pl
import pytest
import torch
from scipy import stats

from analysis.domains import candidates, scatter_summary
from extract.domains import head_loss_changes, replace_head, zero_head
from extract.engine import hooks
from extract.engine.scores import score_heads
from tiny import ENGINE_FAMILIES

torch.set_num_threads(1)


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
    """τ is the definitions §3 quantile of each model's pooled scores; the dormant fraction per domain counts the
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


_TEXTS = [("def f(x): return x + 1", "code"), ("The cat sat on the mat today, and then it slept.", "news"),
          ("2 + 2 = 4", "math"), ("for i in range(10):\n    print(i * i)", "code"), ("Rain again.", "news"),
          ("x", "math")]  # "x": BOS + one token, the shortest example with a loss


def _examples():
    return [{"id": f"e{i}", "text": t, "domain": d, "corpus": d} for i, (t, d) in enumerate(_TEXTS)]


def _one_at_a_time(model, tok, examples, heads, mean):
    """Reference: one example and one head per forward pass (the full model's logits, the loss over positions
    1..P-1), with the head zeroed or set to its mean output over every position of every example."""
    from extract.engine.ablation import head_output_means
    from extract.engine.scores import recording

    seqs = [[tok.bos_token_id] + tok(ex["text"], add_special_tokens=False)["input_ids"] for ex in examples]
    means = head_output_means(model, seqs).float()

    def loss(ids):
        logits = model(input_ids=ids, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).item()

    rows = []
    with torch.inference_mode():
        for ex, seq in zip(examples, seqs):
            ids = torch.tensor([seq])
            with recording(model) as rec:
                base = loss(ids)
            sc = rec.frame()
            for layer, head in heads:
                with hooks.replace_heads(model, {layer: [head]}):
                    zero = loss(ids)
                with hooks.replace_heads(model, {layer: [head]}, means[layer, head]):
                    m = loss(ids)
                r = sc.filter((pl.col("layer") == layer) & (pl.col("head") == head)).row(0, named=True)
                rows.append({"example": ex["id"], "n_tokens": len(seq), "layer": layer, "head": head,
                             "awft": r["awft"], "ahon_ln": r["ahon_ln"], "loss_base": base, "loss_ablated": zero,
                             "delta_loss": zero - base, "loss_mean_ablated": m, "delta_loss_mean": m - base}
                            | ({} if mean else {"loss_mean_ablated": None, "delta_loss_mean": None}))
    return rows


@pytest.mark.parametrize("family", ENGINE_FAMILIES)
def test_batched_head_loss_changes_equal_one_example_one_head_at_a_time(family, monkeypatch):
    """Padded batches of several examples, each row with its own head zeroed or mean-replaced and starting at the
    ablated layer from the base pass, give every row of the one-at-a-time computation (losses within 1e-5
    relative): heads in every layer, two in one layer, budgets that split the variants over many forward passes
    or put them in one, logits in small tiles over slices of the vocabulary, in one, or in whole rows; every
    family the engine serves (the layer skipping is family-independent). gemma2 soft-caps its final logits; larger weights make every head's loss change distinct (a row with the wrong head,
    example or ablation fails)."""
    from tiny import tiny_model
    from tiny_tokenizer import tiny_tokenizer

    from extract import domains

    model, tok = tiny_model(family, initializer_range=0.2), tiny_tokenizer()
    heads = [(2, 3), (0, 1), (1, 0), (1, 2)]
    examples = _examples()
    want = _one_at_a_time(model, tok, examples, heads, mean=True)
    for budget, tile in ((48, (7, 40)), (4096, domains._CPU_TILE), (4096, (5, 128))):  # (5, 128): whole rows
        monkeypatch.setattr(domains, "_CPU_TILE", tile)
        got = head_loss_changes(model, tok, examples, heads, mean=True, batch_tokens=budget, progress=False)
        assert got.height == len(want) and got["dataset"].to_list() == [ex["corpus"] for ex in examples
                                                                         for _ in heads]
        for g, w in zip(got.iter_rows(named=True), want):
            assert (g["example"], g["n_tokens"], g["layer"], g["head"]) == (w["example"], w["n_tokens"],
                                                                            w["layer"], w["head"])
            for k in ("loss_base", "loss_ablated", "loss_mean_ablated"):
                assert g[k] == pytest.approx(w[k], rel=1e-5), (budget, g["example"], g["layer"], k)
            for k in ("delta_loss", "delta_loss_mean"):  # differences of losses: within the losses' tolerance
                assert g[k] == pytest.approx(w[k], abs=2e-5 * w["loss_base"]), (budget, g["example"], k)
            assert (g["awft"], g["ahon_ln"]) == pytest.approx((w["awft"], w["ahon_ln"]), rel=1e-4, abs=1e-6)
    # the test can tell the rows apart: any two variants of an example differ by over twice the tolerance (on
    # these families; on others two of the 8 variants of an example happen to come closer)
    for ex in examples[:-1] if family in ("llama", "gemma3", "gemma2", "phi3", "gpt_oss") else ():
        v = [r[k] for r in want if r["example"] == ex["id"] for k in ("loss_ablated", "loss_mean_ablated")]
        assert min(abs(a - b) for i, a in enumerate(v) for b in v[i + 1:]) > 2e-5 * max(v)
    plain = head_loss_changes(model, tok, examples[:2], heads[:1], batch_tokens=64, progress=False)
    assert plain.columns[-1] == "delta_loss" and plain["loss_ablated"].to_list() == pytest.approx(
        [w["loss_ablated"] for w in want if w["layer"] == 2][:2], rel=1e-5)


def test_per_row_head_replacement_layer_skipping_and_logits_from_hidden():
    """hooks.replace_heads_rows on a padded batch equals replace_heads on each row alone; start_at from the
    recorded residual stream reproduces the full forward pass; logits_from_hidden equals the model's logits, on
    the whole vocabulary or a slice (gemma2: final soft-capping included)."""
    from tiny import tiny_model

    from extract.engine.scores import pad_right

    model = tiny_model("gemma2", initializer_range=0.2)
    assert model.config.final_logit_softcapping
    L, H, _, D = hooks.head_shape(model)
    seqs = [[1, 5, 9, 33, 7, 12, 90, 4], [1, 40, 41, 42], [1, 7, 7, 8, 9, 10]]
    ids, am = pad_right(seqs, 0, "cpu")
    mask = torch.zeros(3, L, H, dtype=torch.bool)
    mask[0, 1, 2] = mask[1, 2, 0] = mask[1, 2, 3] = True  # row 2: nothing replaced
    value = torch.randn(L, H, D)
    dec = hooks.decoder(model)
    with torch.inference_mode():
        for v in (None, value):
            with hooks.replace_heads_rows(model, mask, v):
                got = model(input_ids=ids, attention_mask=am).logits
            for b, seq in enumerate(seqs):
                with contextlib.ExitStack() as stack:
                    for la in range(L):
                        stack.enter_context(hooks.replace_heads(model, {la: [h for h in range(H) if mask[b, la, h]]},
                                                                None if v is None else v[la]))
                    want = model(input_ids=torch.tensor([seq])).logits
                torch.testing.assert_close(got[b, :len(seq)], want[0], rtol=1e-5, atol=1e-5)
        with hooks.capture(model, "resid_post") as resid:
            full = dec(input_ids=ids, attention_mask=am).last_hidden_state
            logits = model(input_ids=ids, attention_mask=am).logits
        torch.testing.assert_close(hooks.logits_from_hidden(model, full), logits)
        torch.testing.assert_close(hooks.logits_from_hidden(model, full, slice(30, 70)), logits[..., 30:70])
        for start in range(1, L):
            with hooks.start_at(model, start, resid[start - 1].clone()):
                again = dec(input_ids=ids, attention_mask=am).last_hidden_state
            for b, seq in enumerate(seqs):
                torch.testing.assert_close(again[b, :len(seq)], full[b, :len(seq)])
        assert "forward" not in model.model.layers[0].__dict__ and "forward" not in dec.__dict__


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


def test_outputs_keep_dotted_model_names(tmp_path):
    from analysis.render import write_table

    paths = write_table(pl.DataFrame({"a": [1]}), tmp_path / "domain_heads_qwen2.5-coder-0.5b-instruct")
    assert [p.name for p in paths] == [f"domain_heads_qwen2.5-coder-0.5b-instruct.{e}" for e in ("csv", "md", "tex")]
    assert pl.read_csv(paths[0])["a"].to_list() == [1]
