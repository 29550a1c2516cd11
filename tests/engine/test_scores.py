"""score_heads against the naive eager reference (tests/reference.py), on tiny and real models."""
import numpy as np
import pytest
import torch

from analysis.core.score_functions import RAW_STATS, score_keys
from extract.engine.scores import score_heads, scores_from_stats
from reference import reference_scores
from tiny import ENGINE_FAMILIES, FAMILIES, left_padded, tiny_model


def as_array(df, n_examples, model):
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    assert df.columns == ["example", "layer", "head", *score_keys()]
    assert df.height == n_examples * L * H
    return df.sort(["example", "layer", "head"]).select(score_keys()).to_numpy().reshape(n_examples, L, H, -1)


def assert_close_to_reference(model, seqs, rtol=1e-4):
    got = as_array(score_heads(model, seqs), len(seqs), model)
    assert np.isfinite(got).all()
    for i, ids in enumerate(seqs):
        ref = reference_scores(model, ids).numpy()
        rel = np.abs(got[i] - ref) / np.maximum(np.abs(ref), 1e-12)
        worst = {k: float(rel[..., j].max()) for j, k in enumerate(score_keys())}
        assert max(worst.values()) <= rtol, worst


def random_seqs(n, lo, hi, vocab, seed=0, bos=1):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [[bos] + torch.randint(3, vocab, (L - 1,), generator=g).tolist() for L in lens]


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_families_match_reference(family):
    model = tiny_model(family)
    # lengths past gemma's sliding window (8), batched with padding
    assert_close_to_reference(model, random_seqs(4, 5, 40, 128))


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batch_equals_unbatched(family):
    model = tiny_model(family, seed=3)
    seqs = random_seqs(5, 2, 50, 128, seed=1)
    batched = as_array(score_heads(model, seqs), len(seqs), model)
    alone = np.stack([as_array(score_heads(model, [s]), 1, model)[0] for s in seqs])
    np.testing.assert_allclose(batched, alone, rtol=1e-5, atol=1e-7)
    # and several batch budgets give the same numbers
    small = as_array(score_heads(model, seqs, batch_tokens=60), len(seqs), model)
    np.testing.assert_allclose(small, batched, rtol=1e-5, atol=1e-7)


def test_chunked_backend_equals_flash(monkeypatch):
    model = tiny_model("gemma3", seed=5)
    seqs = random_seqs(3, 10, 30, 128, seed=2)
    fast = as_array(score_heads(model, seqs), 3, model)
    monkeypatch.setenv("DORMANT_ATTN_BACKEND", "chunked")
    slow = as_array(score_heads(model, seqs, chunk_size=7), 3, model)
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad", [[], [5]])
def test_short_sequences_are_refused(bad):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="at least 2"):
        score_heads(model, [[1, 4, 5], bad])


def test_two_token_sequence_is_finite():
    model = tiny_model("qwen2")
    got = as_array(score_heads(model, [[1, 7]]), 1, model)
    assert np.isfinite(got).all()


def test_ln_zero_over_zero_is_one():
    stats = torch.zeros(1, 3, len(RAW_STATS), dtype=torch.float64)
    s = scores_from_stats(stats)
    assert torch.equal(s[..., score_keys().index("ahon_ln")], torch.ones(1, 3))


def test_float64_model_matches_reference_tightly():
    # the eager reference computes its softmax in float32 even for float64 models: 1e-6, not 1e-12
    model = tiny_model("llama", dtype=torch.float64)
    assert_close_to_reference(model, random_seqs(2, 10, 30, 128, seed=4), rtol=1e-6)


def test_bfloat16_model_scores_are_close_to_float32():
    seqs = random_seqs(3, 10, 30, 128, seed=6)
    m32 = tiny_model("qwen2", seed=7)
    m16 = tiny_model("qwen2", seed=7, dtype=torch.bfloat16)
    assert next(m16.parameters()).dtype == torch.bfloat16
    a32 = as_array(score_heads(m32, seqs), 3, m32)
    a16 = as_array(score_heads(m16, seqs), 3, m16)
    assert np.isfinite(a16).all()
    np.testing.assert_allclose(a16, a32, rtol=0.1, atol=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma-3-270m"])
def test_real_zoo_models_match_reference(name, zoo_model):
    model, tok = zoo_model(name)
    texts = ["The quick brown fox jumps over the lazy dog. Then it ran into the forest, where nobody saw it again "
             "for a very long time, until one winter morning.",
             "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
             "Paris is the capital of France."]
    seqs = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    if name == "gemma-3-270m":  # past the 512-token sliding window, so local layers really slide
        long = " ".join(["The history of the city spans many centuries and many rulers."] * 60)
        seqs.append([tok.bos_token_id] + tok(long, add_special_tokens=False)["input_ids"][:700])
        assert model.config.sliding_window < len(seqs[-1])
    assert_close_to_reference(model, seqs)


def test_recording_equals_score_heads_on_padded_forwards():
    """Calibration mode: scores recorded from ordinary (padded, full-LM) forwards equal score_heads."""
    from extract.engine.scores import pad_right, recording

    model = tiny_model("gemma3", seed=9)
    seqs = random_seqs(5, 3, 30, 128, seed=8)
    ref = as_array(score_heads(model, seqs), 5, model)
    with recording(model) as rec, torch.no_grad():
        for part in (seqs[:2], seqs[2:]):
            ids, am = pad_right(part, 0, "cpu")
            model(input_ids=ids, attention_mask=am, use_cache=False)
    np.testing.assert_allclose(rec.scores().numpy(), ref, rtol=1e-5, atol=1e-7)
    assert rec.frame().height == ref.size // len(score_keys())


def test_recording_left_padding_with_position_ids():
    from extract.engine.scores import recording

    model = tiny_model("llama", seed=10)
    seqs = random_seqs(3, 4, 20, 128, seed=12)
    ref = as_array(score_heads(model, seqs), 3, model)
    ids, am = left_padded(seqs)
    pos = (am.cumsum(-1) - 1).clamp_min(0)
    with recording(model) as rec, torch.no_grad():
        model(input_ids=ids, attention_mask=am, position_ids=pos, use_cache=False)
    np.testing.assert_allclose(rec.scores().numpy(), ref, rtol=1e-5, atol=1e-7)


def _partitions(n):
    """Every split of range(n) into contiguous runs (brute force for small n)."""
    if n == 0:
        yield []
        return
    for first in range(1, n + 1):
        for rest in _partitions(n - first):
            yield [first] + rest


@pytest.mark.parametrize("seed", range(6))
def test_batches_minimise_padded_tokens_within_budget(seed):
    from extract.engine.scores import batches

    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 200, size=int(rng.integers(1, 9))).tolist()
    budget, overhead = 400, 30
    groups = batches(lengths, budget, overhead)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(len(g) == 1 or len(g) * max(lengths[i] for i in g) <= budget for g in groups)
    cost = sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)
    desc = sorted(lengths, reverse=True)
    brute = float("inf")
    for sizes in _partitions(len(desc)):
        start, total = 0, 0
        for k in sizes:
            run = desc[start:start + k]
            if k > 1 and k * run[0] > budget:
                break
            total, start = total + k * run[0] + overhead, start + k
        else:
            brute = min(brute, total)
    assert cost == brute


def test_full_head_output_follows_its_slice_of_o_proj():
    """afhon reads head h's own columns of o_proj (scaling them scales only that head's score, ahon unchanged),
    and a weight changed in place (training) is seen by the next forward."""
    model = tiny_model("llama", seed=11)
    seqs = random_seqs(2, 8, 20, 128, seed=3)
    before = as_array(score_heads(model, seqs), 2, model)
    att = model.model.layers[1].self_attn
    D = att.o_proj.in_features // model.config.num_attention_heads
    with torch.no_grad():
        att.o_proj.weight[:, 2 * D:3 * D] *= 3.0
    after = as_array(score_heads(model, seqs), 2, model)
    k = score_keys()
    fh, ah = k.index("afhon"), k.index("ahon")
    np.testing.assert_allclose(after[:, 1, 2, fh], 3 * before[:, 1, 2, fh], rtol=1e-5)
    others = [h for h in range(model.config.num_attention_heads) if h != 2]
    np.testing.assert_allclose(after[:, :2, others, fh], before[:, :2, others, fh], rtol=1e-6)
    np.testing.assert_allclose(after[:, :2, :, ah], before[:, :2, :, ah], rtol=1e-6)


@pytest.mark.parametrize("family", ENGINE_FAMILIES)
def test_every_engine_family_matches_reference(family):
    """One test per family the engine serves, against the eager reference, padded batches with lengths past
    every window and chunk (8), and batched = unbatched."""
    model = tiny_model(family, seed=2)
    seqs = random_seqs(4, 5, 40, 128, seed=5)
    assert_close_to_reference(model, seqs)
    alone = np.stack([as_array(score_heads(model, [s]), 1, model)[0] for s in seqs])
    np.testing.assert_allclose(as_array(score_heads(model, seqs), len(seqs), model), alone, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family,feature", [("llama4", dict(attention_chunk_size=256)),
                                            ("mistral", dict(sliding_window=None)),
                                            ("gemma2", dict(attn_logit_softcapping=None)),
                                            ("gpt_oss", dict(sliding_window=256))])
def test_the_family_feature_matters(family, feature):
    """The families' features change the scores (so the oracle test above sees them): the same weights without
    llama4's chunks, mistral's or gpt_oss's window or gemma2's soft-capping give other scores."""
    seqs = random_seqs(2, 30, 40, 128, seed=6)
    a, b = tiny_model(family, seed=2), tiny_model(family, seed=2, **feature)
    assert not np.allclose(as_array(score_heads(a, seqs), 2, a), as_array(score_heads(b, seqs), 2, b), rtol=1e-3)


def test_unsupported_family_fails_before_any_forward():
    """lfm2's convolution layers (no self_attn): a clear error naming the family and the layer, from the first call."""
    from transformers import AutoModelForCausalLM, Lfm2Config

    cfg = Lfm2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, layer_types=["conv", "full_attention"], max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    calls = []
    model.model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(NotImplementedError, match="lfm2: decoder layer 0 has no self_attn"):
        score_heads(model, [[1, 5, 6]])
    assert calls == []


def padded(seqs):
    from extract.engine.scores import pad_right

    return pad_right(seqs, 0, "cpu")


def test_gpt_oss_logits_equal_its_eager_attention():
    """The learned sinks through the registered function: logits (padded batch, valid positions) and the
    attention output equal the family's own eager attention, outside and inside a capture session."""
    from extract.engine.scores import recording
    from reference import eager

    model = tiny_model("gpt_oss", seed=4)
    ids, am = padded(random_seqs(3, 5, 30, 128, seed=7))
    with torch.no_grad():
        with eager(model):
            ref = model(input_ids=ids, attention_mask=am, use_cache=False).logits
        ours = model(input_ids=ids, attention_mask=am, use_cache=False).logits
        with recording(model) as rec:
            scored = model(input_ids=ids, attention_mask=am, use_cache=False).logits
    keep = am.bool()
    scale = ref[keep].abs().max()
    assert float((ours[keep] - ref[keep]).abs().max() / scale) < 1e-5
    assert float((scored[keep] - ref[keep]).abs().max() / scale) < 1e-5
    assert rec.raw_stats().shape[1] == model.config.num_hidden_layers


def test_sink_scores_see_the_sinks():
    """The sinks change the scores: weight on the sink in (0, 1), larger for a larger sink logit, zero in a family
    without sinks; a head whose sink logit is raised sends its mass there (awls up, awft down)."""
    seqs = random_seqs(2, 20, 30, 128, seed=8)
    k = score_keys()
    ws, wf = k.index("awls"), k.index("awft")
    llama = tiny_model("llama")
    assert np.all(as_array(score_heads(llama, seqs), 2, llama)[..., ws] == 0)
    model = tiny_model("gpt_oss", seed=1)
    before = as_array(score_heads(model, seqs), 2, model)
    assert np.all((before[..., ws] > 0) & (before[..., ws] < 1))
    with torch.no_grad():
        model.model.layers[1].self_attn.sinks[0] = 12.0
    after = as_array(score_heads(model, seqs), 2, model)
    assert np.all(after[:, 1, 0, ws] > 0.99) and np.all(after[:, 1, 0, wf] < before[:, 1, 0, wf] / 10)
    np.testing.assert_allclose(after[:, 0], before[:, 0], rtol=1e-6)  # the layer before it: unchanged


def test_cached_decoding_with_sinks_is_a_clear_error():
    model = tiny_model("gpt_oss")
    with pytest.raises(NotImplementedError, match="learned attention sinks"), torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 5, 6]]), use_cache=True)
        model(input_ids=torch.tensor([[7]]), past_key_values=out.past_key_values, use_cache=True)
