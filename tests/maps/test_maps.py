"""MAPS (definitions §8): static scores against hand-built and naive full-matrix answers (norm weights folded,
the three E' choices); the pair filter; the settings of `maps run` and `domains ablate` (dataclass <-> JSON <->
command line) and what `run` writes."""
import functools
import json

import pytest
import torch
from transformers import LlamaConfig, AutoModelForCausalLM

from extract.maps.static import static_scores, top_k_tests, top_tokens
from extract.maps.operations import Operation, filter_pairs, prepare
from tiny import tiny_model
from test_folding import independent_inputs, randomise_norms, scale_of
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
    U = model.lm_head.weight.detach().T
    top_i = top_tokens(z @ wo, U, n=2)
    assert top_i[:, 0].tolist() == right
    torch.testing.assert_close((z @ wo @ U).max(-1).values, torch.ones(16), atol=1e-5, rtol=0)


def _naive_scores(model, ops, layer, inputs):
    """Full vocabulary x vocabulary M per head in float64, with explicit GQA indexing and the norm weights
    folded by each family's own convention; E' from the model's own forward (layer 0's attention ablated);
    top-k by counting."""
    cfg = model.config
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    block = model.model.layers[layer]
    attn = block.self_attn
    hd = attn.o_proj.in_features // H
    with torch.no_grad():
        E = independent_inputs(model, torch.arange(cfg.vocab_size))["raw" if layer == 0 else inputs].double()
        U = scale_of(model, model.model.norm).double()[:, None] * model.lm_head.weight.double().T
        g_in = scale_of(model, block.input_layernorm).double()[:, None]
        out = {}
        for h in range(H):
            kv = h // (H // KV)
            wv = g_in * attn.v_proj.weight.double()[kv * hd:(kv + 1) * hd].T
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


@pytest.mark.parametrize("family", ["gemma3", "qwen2", "llama"])
def test_row_wise_scan_equals_the_full_matrix(family, monkeypatch):
    """Every E' choice at once, against the naive full matrix; a small first block of columns makes most rows
    go through the chunked second stage too."""
    import extract.maps.static as static

    model = randomise_norms(tiny_model(family, seed=1))
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    ops = [_op(f"op{k}", torch.randint(0, V, (25,), generator=g).tolist(),
               torch.randint(0, V, (25,), generator=g).tolist(), k) for k in (1, 3, 10)]
    monkeypatch.setattr(static, "FIRST_COLUMNS", 16)
    monkeypatch.setattr(static, "CHUNK_ELEMENTS", 1 << 12)
    choices = ("reference", "raw", "residual")
    res = static_scores(model, tiny_tokenizer(), ops, model_name=family, inputs=choices, progress=False)
    n_checked = 0
    for layer in range(model.config.num_hidden_layers):
        for c in choices:
            naive = _naive_scores(model, ops, layer, c)
            for r in res.scores.filter((res.scores["layer"] == layer) & (res.scores["inputs"] == c)).iter_rows(named=True):
                assert (r["score"], r["suppression_score"]) == pytest.approx(naive[(r["head"], r["operation"])])
                n_checked += 1
    assert n_checked == len(choices) * model.config.num_hidden_layers * model.config.num_attention_heads * len(ops)
    assert res.scores["score"].max() > 0  # not trivially all zero
    # the choices differ beyond layer 0 (where all three read E)
    wide = res.scores.pivot(on="inputs", index=["layer", "head", "operation"], values="score")
    assert (wide.filter(wide["layer"] == 0)["reference"] == wide.filter(wide["layer"] == 0)["raw"]).all()
    assert not (wide["reference"] == wide["raw"]).all() and not (wide["reference"] == wide["residual"]).all()


def test_the_default_is_the_reference():
    import inspect

    from extract.maps.run import MapsSettings

    assert MapsSettings().inputs == ("reference",)
    assert inspect.signature(static_scores).parameters["inputs"].default == ("reference",)
    with pytest.raises(ValueError, match="reference, raw, residual"):
        MapsSettings(inputs=("mlp",))
    with pytest.raises(ValueError, match="distinct"):
        MapsSettings(inputs=("raw", "raw"))


def test_top_k_tests_against_brute_force():
    """Both stages, ties, and rows that need no suppression answer."""
    g = torch.Generator().manual_seed(5)
    H, P, hd, d, V = 3, 40, 4, 8, 700
    z, wo = torch.randn(H, P, hd, generator=g), torch.randn(H, hd, d, generator=g)
    U = torch.randn(d, V, generator=g)
    U[:, 11] = U[:, 10]  # a tie with the target of some rows
    targets = torch.randint(0, V, (P,), generator=g)
    targets[:5] = 10
    k = torch.randint(1, 12, (P,), generator=g)
    need = torch.arange(P) % 3 != 0
    full = torch.einsum("hpk,hkd,dv->hpv", z.double(), wo.double(), U.double()).float()
    t = full.gather(-1, targets.expand(H, -1)[..., None])
    others = torch.ones(H, P, V, dtype=torch.bool).scatter_(-1, targets.expand(H, -1)[..., None], False)
    want_hit = ((full > t) & others).sum(-1) < k
    want_supp = need & (((full < t) & others).sum(-1) < k)
    for first in (16, 700):
        hit, supp = top_k_tests(z, wo, U, targets, k, need, first=first)
        assert torch.equal(hit, want_hit) and torch.equal(supp, want_supp), first
    assert want_hit.any() and (~want_hit).any() and want_supp.any()


def test_top_tokens_is_topk_over_the_whole_vocabulary(monkeypatch):
    import extract.maps.static as static

    g = torch.Generator().manual_seed(3)
    y, U = torch.randn(7, 16, generator=g), torch.randn(16, 1000, generator=g)
    monkeypatch.setattr(static, "CHUNK_ELEMENTS", 7 * 300)  # several chunks
    assert torch.equal(top_tokens(y, U, 5), (y.double() @ U.double()).topk(5, dim=-1).indices)


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
    """Without-context rows are the source's value vectors (GQA-expanded); with-context rows are the heads'
    outputs at the last position (attention-weighted values)."""
    from extract.maps.dynamic import head_io

    model = tiny_model(family, seed=2)
    cfg = model.config
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    ids = torch.randint(4, 100, (3, 7), generator=torch.Generator().manual_seed(1))
    o, v = head_io(model, ids, src_pos=4)
    # the reference, without hooks: eager attention's weights applied to the value vectors computed by hand
    model.set_attn_implementation("eager")
    with torch.no_grad():
        r = model(input_ids=ids, output_hidden_states=True, output_attentions=True)
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            hd = attn.o_proj.in_features // H
            vv = attn.v_proj(layer.input_layernorm(r.hidden_states[i])).view(3, 7, KV, hd)
            for h in range(H):
                torch.testing.assert_close(v[:, i, h], vv[:, 4, h // (H // KV)])
                z = torch.einsum("bs,bsk->bk", r.attentions[i][:, h, -1], vv[:, :, h // (H // KV)])
                torch.testing.assert_close(o[:, i, h], z, atol=1e-5, rtol=1e-5)


def test_report_tables_against_hand_computation():
    import polars as pl
    from scipy.stats import spearmanr

    from analysis.maps import causal_table, correlation_table, join_table

    corr = pl.DataFrame({"model": ["m"] * 4, "inputs": ["reference"] * 4, "operation": ["a", "b", "c", "d"],
                         "context": ["with"] * 4, "pearson": [0.1, 0.5, float("nan"), 0.9]})
    t = correlation_table(corr).row(0, named=True)
    assert (t["inputs"], t["median_r"], t["min_r"], t["max_r"], t["operations"]) == ("reference", 0.5, 0.1, 0.9, 3)
    causal = pl.DataFrame({"model": ["m"] * 4, "inputs": ["raw"] * 4, "operation": ["a"] * 4,
                           "selection": ["none", "top", "random", "random"],
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


def test_inputs_table_in_the_reference_form():
    """Per model and E' choice: medians over operations by hand (r; relative drops at the largest count, base
    accuracy 0 left out), a bootstrap CI that holds the median, and the MAPS paper's four rows."""
    import numpy as np
    import polars as pl

    from analysis.core import tables
    from analysis.maps import MAPS_PAPER, inputs_answer, inputs_table

    rng = np.random.default_rng(0)
    corr = pl.DataFrame([("m", c, f"op{i}", ctx, float("nan") if (c, i) == ("raw", 0) else float(rng.uniform(-1, 1)),
                          10, 0.5, 0.5) for c in ("reference", "raw") for i in range(5) for ctx in ("with", "without")],
                        orient="row", schema=tables.computed_schema("maps_correlations"))  # raw op0: r undefined
    acc = {"op0": (0.5, 0.25, 0.5), "op1": (0.8, 0.2, 0.6), "op2": (0.0, 0.0, 0.0)}  # base, top, random
    causal = pl.DataFrame([("m", c, op, sel, n, d, {"none": b, "top": t * (c == "raw") + b * (c != "raw"),
                                                       "random": r}[sel] if n == 4 or sel == "none" else 0.0, b, 8)
                           for c in ("reference", "raw") for op, (b, t, r) in acc.items()
                           for sel, n, d in (("none", 0, 0), ("top", 1, 0), ("random", 1, 0), ("top", 4, 0),
                                             ("random", 4, 0), ("random", 4, 1))],
                          orient="row", schema=tables.computed_schema("maps_causal"))
    t = inputs_table(corr, causal)
    assert t.schema == pl.Schema(tables.computed_schema("maps_inputs"))
    ours = {r["inputs"]: r for r in t.filter(pl.col("source") == "this run").iter_rows(named=True)}
    for c, r in ours.items():
        for ctx, col in (("without", "r_without"), ("with", "r_with")):
            v = corr.filter((pl.col("inputs") == c) & (pl.col("context") == ctx))["pearson"].drop_nans().to_numpy()
            assert r[col] == pytest.approx(np.median(v)) and r[col + "_low"] <= r[col] <= r[col + "_high"]
        undefined = int(c == "raw")
        assert (r["r_operations"], r["r_undefined"], r["n_heads"], r["causal_operations"]) == (5 - undefined, undefined, 4, 2)
    # raw: top heads drop 0.25/0.5 = 0.5 and 0.6/0.8 = 0.75 -> median 0.625; reference: no drop
    assert ours["raw"]["drop_top"] == pytest.approx(0.625) and ours["reference"]["drop_top"] == pytest.approx(0.0)
    assert ours["raw"]["drop_random"] == pytest.approx(np.median([0.0, (0.8 - 0.6) / 0.8]))
    paper = t.filter(pl.col("source") == "MAPS paper")
    assert paper["model"].to_list() == [m[0] for m in MAPS_PAPER] and paper["r_without"][0] == 0.945
    assert paper["drop_top"].to_list() == [0.685, 0.955, 0.785, 0.5]
    scores = pl.DataFrame([("m", c, 0, 0, "op0", "algorithmic", 1, 0.5, 0.0, 30) for c in ("reference", "raw")],
                          orient="row", schema=tables.computed_schema("maps_scores"))
    text = inputs_answer(t, corr, causal, scores)
    assert "`raw` - `reference`" in text and "(n = 4)" in text and "| m | algorithmic | 0.5 | 0.5 |" in text
    assert "| raw | 1 |" in text  # one undefined r, counted as 0 in the `undefined = 0` columns (n = 5)


# ---- settings: dataclass <-> JSON <-> command line; what run() writes ------------------------------------

def _parse(argv):
    from extract.cli.main import build_parser

    return build_parser().parse_args(argv)


def test_maps_settings_json_and_flags(tmp_path):
    from analysis.core.settings import settings_from_args
    from extract.maps.run import CausalSettings, DynamicSettings, MapsSettings, SalientSettings

    cfg = tmp_path / "maps.json"
    cfg.write_text(json.dumps({"seed": 3, "operations": ["name_copying", "adj_comparative"], "max_pairs": 16,
                               "salient": {"vocab": None, "tokens": 3}, "dynamic": {"pairs": None},
                               "causal": {"operations": ["name_copying"], "counts": [1, 4], "prompts": None}}))
    base = ["maps", "run", "--model", "m", "--out-dir", str(tmp_path / "out")]
    s = settings_from_args(MapsSettings, _parse(base + ["--config", str(cfg), "--k-other", "5",
                                                                "--causal-counts", "2", "8", "--max-pairs", "none"]))
    assert s == MapsSettings(seed=3, operations=("name_copying", "adj_comparative"), k_other=5, max_pairs=None,
                             salient=SalientSettings(vocab=None, tokens=3, targets=5),
                             dynamic=DynamicSettings(operations=None, pairs=None),
                             causal=CausalSettings(operations=("name_copying",), counts=(2, 8), draws=3,
                                                   prompts=None, shots=3))
    # the settings as JSON read back are the same settings; no flags and no file: the defaults
    cfg.write_text(json.dumps(s.as_dict()))
    assert settings_from_args(MapsSettings, _parse(base + ["--config", str(cfg)])) == s
    assert settings_from_args(MapsSettings, _parse(base)) == MapsSettings()
    # an empty list flag is the empty list: no causal check
    assert settings_from_args(MapsSettings, _parse(base + ["--causal-operations"])).causal.operations == ()
    # unknown keys, also inside a section, are an error naming the known ones
    for bad, named in (({"sed": 1}, "sed; known: causal, data_dir, dynamic, inputs"),
                       ({"salient": {"voc": 1}}, "salient.voc; known: salient.targets, salient.tokens, salient.vocab")):
        cfg.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=named):
            settings_from_args(MapsSettings, _parse(base + ["--config", str(cfg)]))
    # null where None is not allowed, and unknown operation names, are errors naming the setting
    cfg.write_text(json.dumps({"causal": {"draws": None}}))
    with pytest.raises(ValueError, match="causal.draws cannot be None"):
        settings_from_args(MapsSettings, _parse(base + ["--config", str(cfg)]))
    with pytest.raises(ValueError, match="dynamic.operations: unknown operation.*no_such_op"):
        settings_from_args(MapsSettings, _parse(base + ["--dynamic-operations", "no_such_op"]))


def test_maps_settings_are_the_config_section():
    """What rules/maps.smk writes (the `maps` section of each config minus models, join, threads) is exactly
    a MapsSettings, every field spelled as in the config."""
    import yaml

    from analysis.core.settings import build_settings
    from extract.maps.run import MapsSettings

    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    for name in ("smoke", "default", "paper"):
        section = yaml.safe_load((root / "config" / f"{name}.yaml").read_text())["maps"]
        values = {k: v for k, v in section.items() if k not in ("models", "join", "threads")}
        s = build_settings(MapsSettings, values)
        got = s.as_dict()
        for k, v in values.items():
            assert got[k] == ({**got[k], **v} if isinstance(v, dict) else v), (name, k)


def test_maps_cli_passes_settings_to_run(tmp_path, monkeypatch, capsys):
    import extract.maps.run as maps_run
    from extract.cli import main

    seen = {}

    def fake_run(model_name, settings, out_dir, *, dtype, device):
        seen.update(model=model_name, settings=settings, out=out_dir, dtype=dtype, device=device)
        return [out_dir / "scores.parquet"]

    monkeypatch.setattr(maps_run, "run", fake_run)
    cfg = tmp_path / "maps.json"
    cfg.write_text(json.dumps({"k_copy": 2, "dynamic": {"operations": None, "pairs": 0}}))
    assert main(["maps", "run", "--model", "m", "--out-dir", str(tmp_path), "--config", str(cfg),
                 "--dynamic-pairs", "4", "--dtype", "bfloat16"]) == 0
    assert seen["settings"] == maps_run.MapsSettings(k_copy=2, dynamic=maps_run.DynamicSettings(pairs=4))
    assert (seen["dtype"], seen["device"], seen["model"]) == ("bfloat16", "cpu", "m")
    assert capsys.readouterr().out == f"wrote {tmp_path / 'scores.parquet'}\n"


def test_domain_ablation_settings_json_and_flags(tmp_path):
    from analysis.core.settings import settings_from_args
    from extract.domains import DomainAblationSettings

    cfg = tmp_path / "domain_ablate.json"
    cfg.write_text(json.dumps({"heads": 3, "limit": 2, "max_tokens": 64, "mean_ablation": True,
                               "prepend_bos": True}))
    base = ["domains", "ablate", "--model", "m", "--data", "a.jsonl", "--out", str(tmp_path / "x.parquet")]
    a = _parse(base + ["--config", str(cfg), "--no-prepend-bos", "--heads", "1"])
    assert settings_from_args(DomainAblationSettings, a) == DomainAblationSettings(
        heads=1, limit=2, max_tokens=64, mean_ablation=True, prepend_bos=False)
    assert a.threads is None and _parse(["maps", "run", "--model", "m", "--out-dir", "o"]).threads is None
    cfg.write_text(json.dumps({"heads": 3, "score_fn": "awft"}))
    with pytest.raises(ValueError, match="score_fn; known: heads, limit, max_tokens, mean_ablation, prepend_bos"):
        settings_from_args(DomainAblationSettings, _parse(base + ["--config", str(cfg)]))


def test_run_returns_exactly_the_files_it_wrote(tmp_path, monkeypatch):
    """A whole MAPS run (static, salient, dynamic, causal) of a tiny model with one small operation."""
    from extract.maps import operations
    from extract.maps.run import PARTS, CausalSettings, DynamicSettings, MapsSettings, SalientSettings, run
    import polars as pl

    model_dir, data = tmp_path / "model", tmp_path / "ops"
    tiny_model("llama", seed=0).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    (data / "name_copying").mkdir(parents=True)
    (data / "name_copying" / "name_copying.json").write_text(json.dumps([[c, c] for c in "ABCDEF"]))
    # the tiny tokenizer has six single-token words; an operation normally needs 30
    monkeypatch.setattr(operations, "prepare", functools.partial(operations.prepare, min_pairs=2))
    s = MapsSettings(operations=("name_copying",), data_dir=str(data), salient=SalientSettings(vocab=None), k_copy=50,
                     dynamic=DynamicSettings(pairs=3),
                     causal=CausalSettings(operations=("name_copying",), counts=(1, 2), draws=1, prompts=4, shots=2))
    out = tmp_path / "out"
    paths = run(str(model_dir), s, out, progress=False)
    assert paths == [out / f"{p}.parquet" for p in PARTS] + [out / "timing.json"]
    assert sorted(out.iterdir()) == sorted(paths)
    L, H = 3, 4
    assert pl.read_parquet(out / "scores.parquet").height == L * H
    assert pl.read_parquet(out / "dynamic.parquet").height == L * H * 4 * 2  # templates x contexts
    assert pl.read_parquet(out / "causal.parquet")["selection"].to_list() == ["none", "top", "random", "top",
                                                                               "random"]
    assert set(json.loads((out / "timing.json").read_text())) >= {"load_s", "total_s", "threads"}


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_causal_check_batch_equals_one_prompt_at_a_time(family):
    """The left-padded batch with its KV cache gives each prompt the answer it gets alone, ablated or not."""
    import polars as pl

    from analysis.core import tables
    from extract.maps.dynamic import ablate_last, causal_check, fewshot_prompts

    model, tok = tiny_model(family, seed=4), tiny_tokenizer()
    op = _op("letters", list(range(20, 40)), list(range(40, 60)), 3)
    words = tuple(("ABCDEF"[i % 6] * (1 + i % 4), "ABCDEF"[(i + 1) % 6]) for i in range(20))  # 1-4 tokens
    op = op.__class__(**{**op.__dict__, "words": words})
    static = pl.DataFrame([("m", c, la, h, "letters", "test", 3, float(la * 4 + h) * (c == "reference"), 0.0, 20)
                           for c in ("reference", "raw") for la in range(3) for h in range(4)], orient="row",
                          schema=tables.computed_schema("maps_scores"))
    got = causal_check(model, tok, op, static, model_name="m", counts=[2], draws=1, prompts=6, shots=2, seed=1)
    ids, answers = fewshot_prompts(tok, op, 6, 2, 1)
    assert len({len(p) for p in ids}) > 1  # the batch is padded
    for sel, heads in (("none", []), ("top", [(2, 3), (2, 2)])):
        with ablate_last(model, heads), torch.no_grad():
            pred = [int(model(input_ids=torch.tensor([p])).logits[0, -1].argmax()) for p in ids]
        acc = sum(p == a for p, a in zip(pred, answers)) / len(ids)
        assert got.filter(pl.col("selection") == sel)["accuracy"][0] == pytest.approx(acc), sel
    # every head of `raw` scores 0: no top heads there, the same none / random rows as `reference`
    raw = got.filter(pl.col("inputs") == "raw")
    assert raw["selection"].to_list() == ["none", "random"]
    assert raw.drop("inputs").equals(got.filter((pl.col("inputs") == "reference") & (pl.col("selection") != "top"))
                                     .drop("inputs"))
