"""The attention kernels against an explicit softmax, with causal, padded and sliding-window masks."""
import pytest
import torch

from extract.engine.kernels import attend


def naive(q, k, v, allowed, scale, first, softcap=None):
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~allowed, float("-inf"))
    p = s.softmax(-1)
    ent = -(p * p.log().nan_to_num(neginf=0.0)).sum(-1)
    pf = p[torch.arange(q.shape[0]), :, :, first]
    return p @ v.double(), pf, ent


def masks(B, S, window, pad):
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    if window:
        causal &= ~torch.ones(S, S, dtype=torch.bool).tril(-window)
    valid = torch.arange(S)[None] < (S - torch.tensor(pad))[:, None]  # right padding
    allowed = causal[None] & valid[:, None, :]
    allowed |= torch.eye(S, dtype=torch.bool)  # the engine always opens the diagonal
    add = torch.zeros(B, 1, S, S).masked_fill(~allowed[:, None], float("-inf"))
    return allowed[:, None], add


@pytest.mark.parametrize("backend", ["flash_cpu", "chunked"])
@pytest.mark.parametrize("window,pad", [(None, [0, 0]), (None, [0, 7]), (6, [0, 3])])
def test_attend_matches_explicit_softmax(backend, window, pad):
    torch.manual_seed(0)
    B, H, S, D = 2, 3, 33, 16
    q, k, v = (torch.randn(B, H, S, D) * 1.5 for _ in range(3))
    allowed, add = masks(B, S, window, pad)
    first = torch.zeros(B, dtype=torch.long)
    mask = None if window is None and pad == [0, 0] else add
    out, pf, ent = attend(q, k, v, mask, 0.3, first, backend=backend, chunk_size=8)
    ro, rpf, rent = naive(q, k, v, allowed, 0.3, first)
    valid = ~torch.isinf(add[:, 0].diagonal(dim1=-2, dim2=-1)) & (torch.arange(S)[None] < S - torch.tensor(pad)[:, None])
    sel = valid[:, None, :].expand(B, H, S)
    assert torch.allclose(out.double()[sel], ro[sel], atol=1e-5)
    assert torch.allclose(pf[sel], rpf[sel], atol=1e-6)
    assert torch.allclose(ent[sel], rent[sel], atol=2e-5)


def test_softcap_uses_exact_path():
    torch.manual_seed(1)
    B, H, S, D = 1, 2, 20, 8
    q, k, v = (torch.randn(B, H, S, D) * 4 for _ in range(3))
    allowed, _ = masks(B, S, None, [0])
    first = torch.zeros(B, dtype=torch.long)
    out, pf, ent = attend(q, k, v, None, 0.5, first, softcap=5.0)
    ro, rpf, rent = naive(q, k, v, allowed, 0.5, first, softcap=5.0)
    assert torch.allclose(out.double(), ro, atol=1e-5) and torch.allclose(ent, rent, atol=1e-5)
    # and the soft-capping matters here (the test would not notice a dropped cap otherwise)
    _, _, ent_nocap = naive(q, k, v, allowed, 0.5, first)
    assert (ent_nocap - rent).abs().max() > 1e-2


def test_low_entropy_heads_are_exact():
    """A nearly one-hot head: entropy ~1e-7 nats must still match to 1e-4 relative."""
    torch.manual_seed(2)
    B, H, S, D = 1, 2, 64, 16
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    k[:, 0, 0] = 4.0
    q[:, 0] = 1.0  # head 0 puts almost all weight on key 0 (logit 16 vs ~N(0, 1))
    allowed, _ = masks(B, S, None, [0])
    first = torch.zeros(B, dtype=torch.long)
    _, _, ent = attend(q, k, v, None, 0.25, first, backend="flash_cpu")
    _, _, rent = naive(q, k, v, allowed, 0.25, first)
    m, rm = ent[0, 0, 1:].mean(), rent[0, 0, 1:].mean()
    assert 1e-7 < rm < 1e-3
    assert abs(m - rm) <= 1e-4 * rm


@pytest.mark.parametrize("backend", ["flash_cpu", "chunked"])
def test_half_precision_inputs_keep_float32_accurate_statistics(backend):
    """bf16 q/k/v (the paper profile's dtype): the weight on the first key and the entropy must be those of
    the bf16 logits to float32 accuracy (the entropy is a difference of two ~logit-sized terms, so a second
    pass in bf16 would leave errors of ~1e-2 nats)."""
    torch.manual_seed(3)
    B, H, S, D = 2, 3, 48, 32
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.bfloat16) * 2 for _ in range(3))
    allowed, add = masks(B, S, None, [0, 5])
    first = torch.zeros(B, dtype=torch.long)
    out, pf, ent = attend(q, k, v, add.to(torch.bfloat16), 0.3, first, backend=backend, chunk_size=16)
    assert out.dtype == torch.bfloat16
    ro, rpf, rent = naive(q, k, v, allowed, 0.3, first)
    sel = (torch.arange(S)[None] < S - torch.tensor([0, 5])[:, None])[:, None, :].expand(B, H, S)
    assert torch.allclose(pf[sel], rpf[sel], atol=1e-5)
    assert torch.allclose(ent[sel], rent[sel], atol=1e-4)
    assert torch.allclose(out.double()[sel], ro[sel], atol=0.05)


def efficient_stand_in(calls):
    """A CPU stand-in for ``aten._scaled_dot_product_efficient_attention`` (same signature and outputs) that
    refuses what the CUDA kernel refuses: a bias that is not (B, H, S_q, S_k), has a non-unit last stride,
    a stride that is not a multiple of 8 elements, or a misaligned data pointer. It records what it got."""
    def op(q, k, v, bias, compute_lse, dropout_p=0.0, is_causal=False, *, scale=None):
        B, H, S, D = q.shape
        assert compute_lse and dropout_p == 0.0 and all(t.stride(-1) == 1 for t in (q, k, v))
        if bias is not None:
            assert not is_causal
            assert tuple(bias.shape) == (B, H, S, k.shape[2]), bias.shape
            if bias.stride(-1) != 1 or any(st % 8 for st in bias.stride()[:-1]) or bias.data_ptr() % 16:
                raise RuntimeError("attn_bias is not correctly aligned")
        calls.append({"shape": None if bias is None else tuple(bias.shape),
                      "stride": None if bias is None else bias.stride(), "dtype": q.dtype, "causal": is_causal})
        s = (q.float() @ k.float().transpose(-1, -2)) * scale
        if bias is None:
            s = s.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
        else:
            s = s + bias.float()
        lse = torch.full((B, H, -(-S // 32) * 32), float("nan"))  # padded to 32 queries, like the kernel
        lse[..., :S] = s.logsumexp(-1)
        return (s.softmax(-1) @ v.float()).to(q.dtype), lse, torch.empty(()), torch.empty(())
    return op


def test_stand_in_refuses_an_unaligned_bias():
    """The stand-in is strict: the bias the old code passed ((B,1,S,S) expanded over heads, S = 33) is refused."""
    q = torch.randn(1, 2, 33, 8)
    _, add = masks(1, 33, None, [4])
    with pytest.raises(RuntimeError, match="not correctly aligned"):
        efficient_stand_in([])(q, q, q, add.expand(1, 2, 33, 33), True, 0.0, False, scale=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S", [7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65])
@pytest.mark.parametrize("pad", [[0, 0], [0, 5]])
def test_efficient_cuda_passes_an_aligned_bias(monkeypatch, dtype, S, pad):
    """efficient_cuda pads the bias as scaled_dot_product_attention does (lengths around multiples of 8/16/32),
    expands it over heads without a copy, cuts the kernel's padded lse, and attend's statistics stay exact."""
    from functools import partial

    from extract.engine import kernels

    calls = []
    monkeypatch.setitem(kernels.FAST_KERNELS, "efficient_cuda", partial(kernels.efficient_cuda,
                                                                        op=efficient_stand_in(calls)))
    torch.manual_seed(S)
    B, H, D = 2, 3, 16
    q, k, v = (torch.randn(B, H, S, D, dtype=dtype) * 1.5 for _ in range(3))
    allowed, add = masks(B, S, None, pad)
    mask = None if pad == [0, 0] else add.to(dtype)
    first = torch.zeros(B, dtype=torch.long)
    out, pf, ent = attend(q, k, v, mask, 0.3, first, backend="efficient_cuda", chunk_size=8)
    assert calls and all(c["causal"] == (mask is None) for c in calls)
    for c in calls:
        if mask is not None:
            assert c["shape"] == (B, H, S, S) and c["stride"][1] == 0 and c["stride"][2] == -(-S // 8) * 8
    ro, rpf, rent = naive(q, k, v, allowed, 0.3, first)
    sel = (torch.arange(S)[None] < S - torch.tensor(pad)[:, None])[:, None, :].expand(B, H, S)
    atol = 1e-5 if dtype == torch.float32 else 0.05
    assert torch.allclose(out.double()[sel], ro[sel], atol=atol)
    assert torch.allclose(pf[sel], rpf[sel], atol=1e-5)
    assert torch.allclose(ent[sel], rent[sel], atol=1e-4)


def test_aligned_bias_keeps_an_aligned_mask():
    from extract.engine.kernels import aligned_bias

    m = torch.zeros(2, 1, 16, 16)
    got = aligned_bias(m, (2, 4, 16, 16))
    assert got.data_ptr() == m.data_ptr() and got.stride() == (256, 0, 16, 1)
    odd = torch.randn(2, 1, 9, 9)
    got = aligned_bias(odd, (2, 4, 9, 9))
    assert got.stride() == (144, 0, 16, 1) and torch.equal(got[:, 0], odd[:, 0])


@pytest.mark.parametrize("backend", ["flash_cpu", "chunked"])
def test_sinks_match_explicit_softmax_over_keys_and_sink(backend):
    """with_sinks against a float64 softmax over the visible keys plus one sink column (padded, windowed): the
    output and first-key weight of the visible rows, the sink's weight and the entropy with the sink as one
    outcome; sink weights from negligible (logit -30) to dominant (+30) keep their relative precision."""
    from extract.engine.kernels import attend_lse, with_sinks

    torch.manual_seed(4)
    B, H, S, D = 2, 5, 29, 16
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    allowed, add = masks(B, S, 6, [0, 4])
    sinks = torch.tensor([-30.0, -1.0, 0.5, 3.0, 30.0])
    first = torch.zeros(B, dtype=torch.long)
    out, pf, ent, lse = attend_lse(q, k, v, add, 0.3, first, backend=backend, chunk_size=8)
    out, pf, ent, ps = with_sinks(out, pf, ent, lse, sinks)
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.3
    s = torch.cat([s.masked_fill(~allowed, float("-inf")), sinks.double().view(1, H, 1, 1).expand(B, H, S, 1)], -1)
    logp = s.log_softmax(-1)
    p = logp.exp()
    rent = -(p * logp.nan_to_num(neginf=0.0)).sum(-1)
    sel = (torch.arange(S)[None] < S - torch.tensor([0, 4])[:, None])[:, None, :].expand(B, H, S)
    assert torch.allclose(out.double()[sel], (p[..., :S] @ v.double())[sel], atol=1e-5)
    assert torch.allclose(pf[sel], p[..., 0][sel], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ps[sel], p[..., S][sel], rtol=1e-5, atol=0)
    assert torch.allclose(ent[sel], rent[sel], atol=2e-5)  # the fast kernel's ~1e-7-nat rows, as above
    dominant = sel[:, 4]  # the sink takes all but ~1e-12: the entropy (~1e-11 nats) keeps its relative precision
    torch.testing.assert_close(ent[:, 4][dominant], rent[:, 4][dominant], rtol=1e-4, atol=0)
    assert float(ps[:, 4].min()) > 1 - 1e-9 and float(ps[:, 0].max()) < 1e-9  # both ends are really reached
