"""MAPS (SPEC §8): static scores against hand-built and naive full-matrix answers; the pair filter."""
import json

import pytest
import torch
from transformers import LlamaConfig, AutoModelForCausalLM

from extract.maps.static import in_top_k, scan_vocab, static_scores
from extract.maps.operations import Operation, filter_pairs, prepare
from tiny import tiny_model
from tiny_tokenizer import tiny_tokenizer

torch.set_num_threads(1)


def _op(name, src, tgt, k):
    return Operation(name, "test", k, tuple(src), tuple(tgt), tuple((str(s), str(t)) for s, t in zip(src, tgt)),
                     len(src), len(src))


def _permutation_model(seed=0):
    """Layer 0, head 3 (KV head 1) maps token S[i] to S[perm[i]] exactly: W_VO = E_S^T P E_S, U = E^T."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    S = torch.arange(40, 56)
    perm = torch.randperm(16)
    with torch.no_grad():
        E = torch.randn(128, 64)
        E = 0.4 * E / E.norm(dim=1, keepdim=True)  # other tokens: norm 0.4 < 1, so |e_pi . e_j| < 1
        q, _ = torch.linalg.qr(torch.randn(64, 64))
        E[S] = q[:16]  # orthonormal rows for the permuted set
        model.model.embed_tokens.weight.copy_(E)
        attn = model.model.layers[0].self_attn
        P = torch.eye(16)[perm]
        attn.v_proj.weight[16:32] = E[S]  # KV head 1: W_V = E_S^T (d x 16)
        attn.o_proj.weight[:, 48:64] = (P @ E[S]).T  # head 3: W_O = P E_S (16 x d)
    return model, S, perm


def test_static_score_on_a_known_permutation():
    model, S, perm = _permutation_model()
    src, right, wrong = S.tolist(), S[perm].tolist(), S[perm.roll(1)].tolist()
    ops = [_op("right", src, right, 1), _op("wrong", src, wrong, 1)]
    res = static_scores(model, tiny_tokenizer(), ops, model_name="perm", layers=[0], progress=False)
    got = {(r["head"], r["operation"]): r["score"] for r in res.scores.iter_rows(named=True)}
    assert got[(3, "right")] == 1.0
    assert got[(3, "wrong")] == 0.0
    # the top target of each row is exactly the permuted token
    z = torch.einsum("rd,de->re", model.model.embed_tokens.weight[S].detach(),
                     model.model.layers[0].self_attn.v_proj.weight[16:32].detach().T)
    wo = model.model.layers[0].self_attn.o_proj.weight[:, 48:64].detach().T
    top_v, top_i, _, _ = scan_vocab(z[None], wo[None], model.lm_head.weight.detach().T, n=2)
    assert top_i[0, :, 0].tolist() == right
    torch.testing.assert_close(top_v[0, :, 0], torch.ones(16), atol=1e-5, rtol=0)


def _naive_scores(model, ops, layer, inputs="mlp"):
    """Full vocabulary x vocabulary M per head in float64, with explicit GQA indexing; top-k by counting."""
    cfg = model.config
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    attn = model.model.layers[layer].self_attn
    hd = attn.o_proj.in_features // H
    with torch.no_grad():
        E = model.model.embed_tokens(torch.arange(cfg.vocab_size)).double()
        if layer > 0 and inputs == "mlp":
            E = model.model.layers[0].mlp(E.float()).double()
        U = model.lm_head.weight.double().T
        out = {}
        for h in range(H):
            kv = h // (H // KV)
            wv = attn.v_proj.weight.double()[kv * hd:(kv + 1) * hd].T
            wo = attn.o_proj.weight.double()[:, h * hd:(h + 1) * hd].T
            M = E @ wv @ wo @ U  # (V, V)
            for op in ops:
                hits = supp = 0
                for s, t in zip(op.src, op.tgt):
                    row = M[s]
                    others = torch.cat([row[:t], row[t + 1:]])
                    hits += int((others > row[t]).sum() < op.k)
                    supp += int((others < row[t]).sum() < op.k)
                out[(h, op.name)] = (hits / len(op.src), supp / len(op.src))
    return out


@pytest.mark.parametrize("family,inputs", [("gemma3", "mlp"), ("qwen2", "mlp"), ("llama", "raw")])
def test_row_wise_scan_equals_the_full_matrix(family, inputs):
    model = tiny_model(family, seed=1)
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    ops = [_op(f"op{k}", torch.randint(0, V, (25,), generator=g).tolist(),
               torch.randint(0, V, (25,), generator=g).tolist(), k) for k in (1, 3, 10)]
    res = static_scores(model, tiny_tokenizer(), ops, model_name=family, inputs=inputs, progress=False)
    n_checked = 0
    for layer in range(model.config.num_hidden_layers):
        naive = _naive_scores(model, ops, layer, inputs)
        for r in res.scores.filter(res.scores["layer"] == layer).iter_rows(named=True):
            assert (r["score"], r["suppression_score"]) == pytest.approx(naive[(r["head"], r["operation"])])
            n_checked += 1
    assert n_checked == model.config.num_hidden_layers * model.config.num_attention_heads * len(ops)
    assert res.scores["score"].max() > 0  # not trivially all zero


def test_scan_low_rank_and_direct_agree_with_topk():
    g = torch.Generator().manual_seed(3)
    z, wo, U = torch.randn(3, 7, 4, generator=g), torch.randn(3, 4, 16, generator=g), torch.randn(16, 1000, generator=g)
    full = torch.einsum("hrk,hkd,dv->hrv", z.double(), wo.double(), U.double())
    for low_rank in (True, False):
        tv, ti, bv, bi = scan_vocab(z, wo, U, 5, low_rank=low_rank)
        assert torch.equal(ti, full.topk(5, dim=-1).indices)
        assert torch.equal(bi, full.topk(5, dim=-1, largest=False).indices)


def test_in_top_k_counts_strictly_greater_others():
    values = torch.tensor([[5.0, 4.0, 4.0, 1.0]])
    ids = torch.tensor([[7, 8, 9, 3]])
    # target 9 (logit 4): one other token (7) is greater -> in top-2, not in top-1; tie with 8 counts for it
    assert in_top_k(values, ids, torch.tensor([9]), torch.tensor([4.0]), torch.tensor([2])).item()
    assert not in_top_k(values, ids, torch.tensor([9]), torch.tensor([4.0]), torch.tensor([1])).item()
    assert in_top_k(values, ids, torch.tensor([7]), torch.tensor([5.0]), torch.tensor([1])).item()


def test_tokenisation_filter(tmp_path):
    from extract.models.load import converted_model_dir
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted_model_dir("smollm2-135m-instruct", progress=False))
    one = lambda w: len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1  # noqa: E731
    assert one("France") and one("Paris") and not one("Andorra la Vella")
    pairs = [("France", "Paris"), ("France", "Paris"), ("Andorra", "Andorra la Vella"), ("Italy", "Rome")]
    kept = filter_pairs(tok, pairs)
    assert [(s, t) for s, t, _, _ in kept] == [("France", "Paris"), ("Italy", "Rome")]  # deduplicated, multi-token out
    assert kept[0][2] == tok(" France", add_special_tokens=False)["input_ids"][0]
    # an operation is used only with >= 30 surviving pairs
    words = [w for w in ["cat", "dog", "sun", "red", "big", "car", "tree", "book", "house", "water", "fire", "city",
                         "road", "king", "moon", "star", "ship", "bird", "fish", "hand", "door", "song", "game",
                         "food", "gold", "rain", "snow", "wind", "blue", "green", "black", "white"] if one(w)]
    assert len(words) >= 31
    for n, used in ((29, False), (30, True)):
        (tmp_path / "name_copying").mkdir(exist_ok=True)
        (tmp_path / "name_copying" / "name_copying.json").write_text(
            json.dumps([[w, w] for w in words[:n]] + [["Andorra la Vella", "x"]] * 5))
        ops = prepare(tok, ["name_copying"], root=tmp_path)
        assert bool(ops) is used
    assert ops[0].k == 1 and ops[0].n_single == 30 and ops[0].n_total == 35
    capped = prepare(tok, ["name_copying"], root=tmp_path, max_pairs=10, seed=4)[0]
    assert len(capped.src) == 10 and capped == prepare(tok, ["name_copying"], root=tmp_path, max_pairs=10, seed=4)[0]
    assert set(capped.src) <= set(ops[0].src)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_head_io_matches_values_and_output_projection(family):
    """Without-context rows are the source's value vectors (GQA-expanded); with-context rows re-assemble the
    o_proj output at the last position."""
    from extract.maps.dynamic import head_io

    model = tiny_model(family, seed=2)
    cfg = model.config
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    ids = torch.randint(4, 100, (3, 7), generator=torch.Generator().manual_seed(1))
    o, v = head_io(model, ids, src_pos=4)
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        outs = {}
        hooks = [layer.self_attn.o_proj.register_forward_hook(
            lambda m, a, out, i=i: outs.__setitem__(i, out[:, -1])) for i, layer in enumerate(model.model.layers)]
        model(input_ids=ids)
        for h in hooks:
            h.remove()
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            hd = attn.o_proj.in_features // H
            vv = attn.v_proj(layer.input_layernorm(hs[i][:, 4])).view(3, KV, hd)
            for h in range(H):
                torch.testing.assert_close(v[:, i, h], vv[:, h // (H // KV)])
            wo = attn.o_proj.weight.view(-1, H, hd)
            torch.testing.assert_close(torch.einsum("bhk,dhk->bd", o[:, i], wo), outs[i], atol=1e-5, rtol=1e-5)


def test_report_tables_against_hand_computation():
    import polars as pl
    from scipy.stats import spearmanr

    from analysis.maps import causal_table, correlation_table, join_table

    corr = pl.DataFrame({"model": ["m"] * 4, "operation": ["a", "b", "c", "d"], "context": ["with"] * 4,
                         "pearson": [0.1, 0.5, float("nan"), 0.9]})
    t = correlation_table(corr).row(0, named=True)
    assert (t["median_r"], t["min_r"], t["max_r"], t["operations"]) == (0.5, 0.1, 0.9, 3)
    causal = pl.DataFrame({"model": ["m"] * 4, "operation": ["a"] * 4, "selection": ["none", "top", "random", "random"],
                           "n_heads": [0, 2, 2, 2], "draw": [0, 0, 0, 1], "accuracy": [0.8, 0.2, 0.6, 0.8],
                           "base_accuracy": [0.8] * 4, "n_prompts": [10] * 4})
    c = causal_table(causal).row(0, named=True)
    assert c["drop_top"] == pytest.approx(0.6) and c["drop_random"] == pytest.approx(0.1)
    heads = pl.DataFrame({"model": ["m"] * 5, "layer": [0, 0, 1, 1, 2], "head": [0, 1, 0, 1, 0],
                          "max_static": [0.0, 0.1, 0.5, 0.9, 0.05], "median_ahon_ln": [0.2, 0.4, 1.1, 1.3, 0.9]})
    j = join_table(heads, inactive_below=0.5, salient_min=0.2).row(0, named=True)
    assert (j["heads"], j["inactive"], j["no_salient"], j["both"]) == (5, 2, 3, 2)
    assert j["p_no_salient_if_inactive"] == 1.0 and j["p_no_salient_if_active"] == pytest.approx(1 / 3)
    assert j["spearman"] == pytest.approx(spearmanr(heads["max_static"], heads["median_ahon_ln"]).statistic)
