"""ablate() against independent hook-based implementations of definitions §4 (eager attention, o_proj pre-hooks)."""
import contextlib

import numpy as np
import pytest
import torch

from extract.engine.ablation import ablate, head_output_means
from extract.engine.scores import pad_right, score_heads
from reference import attention_modules, eager
from tiny import tiny_model


@contextlib.contextmanager
def o_proj_hooks(model, fn):
    """fn(layer, O (B, S, H, D)) -> new O; applied to the input of every o_proj."""
    cfg = model.config
    H = cfg.num_attention_heads
    hooks = []
    for i, att in enumerate(attention_modules(model)):
        def pre(mod, args, i=i):
            x = args[0]
            O = fn(i, x.view(*x.shape[:2], H, -1))
            return (O.reshape(x.shape),)
        hooks.append(att.o_proj.register_forward_pre_hook(pre))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def reference_ahon_ln_ablation(model, ids, am, tau):
    """definitions §4 literally: per layer, ahon_ln from the o_proj input, zero heads with ahon_ln < tau."""
    valid = am.bool()
    masks = []

    def fn(layer, O):
        norms = O.double().norm(dim=-1)  # (B, S, H)
        ahon = (norms * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
        m = ahon / ahon.mean(-1, keepdim=True) < tau
        masks.append(m)
        return O.masked_fill(m[:, None, :, None], 0.0)

    with eager(model), o_proj_hooks(model, fn), torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits
    return torch.stack(masks, 1).numpy(), logits


def batch(seed=0, n=4, lo=6, hi=30):
    g = torch.Generator().manual_seed(seed)
    seqs = [[1] + torch.randint(3, 128, (int(L) - 1,), generator=g).tolist()
            for L in torch.randint(lo, hi, (n,), generator=g)]
    return seqs, *pad_right(seqs, 0, "cpu")


def logits_under(model, ids, am, **kw):
    with ablate(model, **kw) as ab, torch.no_grad():
        logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits
    return ab, logits


def valid_logits(logits, am):
    return logits[am.bool()]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_threshold_selecting_no_head_changes_nothing(family):
    model = tiny_model(family)
    _, ids, am = batch(1, n=1)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=am).logits
    ab, got = logits_under(model, ids, am, score_fn="ahon_ln", threshold=0.0)
    assert ab.zeroed_fraction == 0.0 and ab.mask.shape == (1, 3, model.config.num_attention_heads)
    assert (got - plain).abs().max() <= 1e-6
    # padded batch: same up to float noise of a different (but exact) kernel call
    _, ids, am = batch(2)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=am).logits
    _, got = logits_under(model, ids, am, score_fn="awft", threshold=2.0)
    assert (valid_logits(got, am) - valid_logits(plain, am)).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_threshold_selecting_every_head_equals_zeroing_o_proj_input(family):
    model = tiny_model(family)
    _, ids, am = batch(3)
    with eager(model), o_proj_hooks(model, lambda i, O: torch.zeros_like(O)), torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am, use_cache=False).logits
    ab, got = logits_under(model, ids, am, score_fn="ahon_ln", threshold=float("inf"))
    assert ab.mask.all() and ab.zeroed_fraction == 1.0
    assert (valid_logits(got, am) - valid_logits(ref, am)).abs().max() <= 1e-5


def mid_threshold(model, seqs):
    """A threshold between two well-separated ahon_ln values near the median (no float ties)."""
    v = np.sort(score_heads(model, seqs)["ahon_ln"].to_numpy())
    lo, hi = len(v) * 3 // 10, len(v) * 7 // 10
    gaps = np.diff(v[lo:hi])
    j = lo + int(gaps.argmax())
    return float((v[j] + v[j + 1]) / 2)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_mid_threshold_matches_layer_by_layer_reference(family):
    model = tiny_model(family, seed=11)
    seqs, ids, am = batch(4, n=5)
    tau = mid_threshold(model, seqs)
    ref_mask, ref_logits = reference_ahon_ln_ablation(model, ids, am, tau)
    ab, got = logits_under(model, ids, am, score_fn="ahon_ln", threshold=tau)
    assert 0.05 < ref_mask.mean() < 0.95
    np.testing.assert_array_equal(ab.mask, ref_mask)
    assert ab.zeroed_fraction == pytest.approx(ab.mask.mean())
    assert (valid_logits(got, am) - valid_logits(ref_logits, am)).abs().max() <= 1e-5


def test_random_ablation_is_seeded_per_example_and_batch_independent():
    model = tiny_model("llama")
    seqs, ids, am = batch(5, n=6)
    ab, _ = logits_under(model, ids, am, score_fn="random", p=0.3, seed=7)
    assert ab.zeroed_fraction == pytest.approx(ab.mask.mean())
    assert 0.15 < ab.zeroed_fraction < 0.45
    # example 2 alone (no padding) gets the same mask as inside the batch
    alone_ids = torch.tensor([seqs[2]])
    ab2, _ = logits_under(model, alone_ids, None, score_fn="random", p=0.3, seed=7)
    np.testing.assert_array_equal(ab2.mask[0], ab.mask[2])
    ab3, _ = logits_under(model, alone_ids, None, score_fn="random", p=0.3, seed=8)
    assert not np.array_equal(ab3.mask[0], ab.mask[2]) or ab.mask[2].all() or not ab.mask[2].any()
    # p = 0 and p = 1 are exact
    assert logits_under(model, ids, am, score_fn="random", p=0.0)[0].zeroed_fraction == 0.0
    assert logits_under(model, ids, am, score_fn="random", p=1.0)[0].zeroed_fraction == 1.0


def test_mask_accumulates_over_forward_passes():
    model = tiny_model("qwen2")
    _, ids, am = batch(6, n=3)
    with ablate(model, "awft", threshold=0.3) as ab, torch.no_grad():
        model(input_ids=ids, attention_mask=am, use_cache=False)
        model(input_ids=ids[:2], attention_mask=am[:2], use_cache=False)
    assert ab.mask.shape == (5, 3, 4)
    np.testing.assert_array_equal(ab.mask[3:], ab.mask[:2])


def test_mean_ablation_replaces_with_means():
    model = tiny_model("llama")
    seqs, ids, am = batch(7)
    means = head_output_means(model, seqs)
    assert means.shape == (3, 4, 16)

    def fn(layer, O):
        return means[layer].to(O.dtype)[None, None].expand_as(O)

    with eager(model), o_proj_hooks(model, fn), torch.no_grad():
        ref = model(input_ids=ids, attention_mask=am, use_cache=False).logits
    _, got = logits_under(model, ids, am, score_fn="ahon_ln", threshold=float("inf"), mode="mean", means=means)
    assert (valid_logits(got, am) - valid_logits(ref, am)).abs().max() <= 1e-5


def test_bad_arguments_are_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="unknown score function"):
        with ablate(model, "nope", threshold=1.0):
            pass
    with pytest.raises(ValueError, match="needs a threshold"):
        with ablate(model, "ahon_ln"):
            pass
    with pytest.raises(ValueError, match="needs p"):
        with ablate(model, "random"):
            pass
    with pytest.raises(ValueError, match="means"):
        with ablate(model, "ahon", threshold=1.0, mode="mean"):
            pass


def test_cached_decoding_under_ablation_is_refused():
    model = tiny_model("llama")
    with ablate(model, "ahon", threshold=0.5), pytest.raises(RuntimeError, match="use_cache=False"):
        model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=2, do_sample=False)


@pytest.mark.slow
def test_real_model_mid_threshold_matches_reference(zoo_model):
    model, tok = zoo_model("smollm2-135m-instruct")
    texts = ["The history of Rome begins with a small settlement on the Tiber.", "x = [i * i for i in range(10)]"]
    seqs = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    ids, am = pad_right(seqs, 0, "cpu")
    tau = mid_threshold(model, seqs)
    ref_mask, ref_logits = reference_ahon_ln_ablation(model, ids, am, tau)
    ab, got = logits_under(model, ids, am, score_fn="ahon_ln", threshold=tau)
    np.testing.assert_array_equal(ab.mask, ref_mask)
    assert (valid_logits(got, am) - valid_logits(ref_logits, am)).abs().max() <= 1e-3


@pytest.mark.parametrize("fn", __import__("analysis.core.score_functions", fromlist=["score_keys"]).score_keys())
def test_layer0_masks_follow_each_function_and_direction(fn):
    from analysis.core.score_functions import get_score_function

    model = tiny_model("qwen2", seed=13)
    seqs, ids, am = batch(8, n=6)
    scores = score_heads(model, seqs)
    v = scores.filter(scores["layer"] == 0).sort("example", "head")[fn].to_numpy().reshape(len(seqs), -1)
    tau = float(np.median(v))
    ab, _ = logits_under(model, ids, am, score_fn=fn, threshold=tau)
    want = v > tau if get_score_function(fn).inactive_side == "above" else v < tau
    np.testing.assert_array_equal(ab.mask[:, 0, :], want)
