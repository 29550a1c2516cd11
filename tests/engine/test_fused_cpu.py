"""The one-pass CPU kernel (extract.engine.fused_cpu) against an explicit float64 softmax: grouped KV heads read in
place, causal / padded / rectangular masks, query and key blocks beyond one block, nearly one-hot rows; and its
output norms against the tensor expressions of head_stats."""
import pytest
import torch

from extract.engine import fused_cpu, kernels

pytestmark = pytest.mark.skipif(not fused_cpu.available(), reason="fused CPU kernel unavailable (no compiler?)")


def reference(q, k, v, allowed, scale, first):
    n = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(n, 1), v.double().repeat_interleave(n, 1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    logp = s.log_softmax(-1)
    p = logp.exp()
    ent = -(p * logp.nan_to_num(neginf=0.0)).sum(-1)
    return p @ v, p[torch.arange(q.shape[0]), :, :, first], ent, s.logsumexp(-1)


@pytest.mark.parametrize("S_q,S_k", [(37, 37), (600, 600), (800, 1100), (5, 40)])
@pytest.mark.parametrize("masked", [False, True])
def test_one_pass_matches_explicit_softmax(S_q, S_k, masked):
    torch.manual_seed(S_q + S_k)
    B, H, KV, D = 2, 6, 2, 16
    q = torch.randn(B, S_q, H, D).transpose(1, 2) * 1.5  # the (B, S, H, D) layout of a projection
    k, v = (torch.randn(B, KV, S_k, D) * 1.5 for _ in range(2))
    off = S_k - S_q
    allowed = torch.ones(S_q, S_k, dtype=torch.bool).tril(off)[None, None].repeat(B, 1, 1, 1)
    mask = None
    if masked:  # example 1: its first 3 keys are padding and a window of 300 keys
        allowed[1, :, :, :3] = False
        allowed[1] &= ~torch.ones(S_q, S_k, dtype=torch.bool).tril(off - 300)
        allowed[1, :, torch.arange(S_q), torch.arange(S_q) + off] = True
        mask = torch.zeros(B, 1, S_q, S_k).masked_fill(~allowed, float("-inf"))
    first = torch.tensor([0, 3 if masked else 0])
    out, pf, ent, lse = kernels.flash_cpu_stats(q, k, v, mask, 0.3, first)
    ro, rpf, rent, rlse = reference(q, k, v, allowed, 0.3, first)
    assert out.shape == (B, H, S_q, D) and out.dtype == torch.float32
    assert torch.allclose(out.double(), ro, atol=1e-5)
    assert torch.allclose(pf, rpf, atol=1e-6) and torch.allclose(lse, rlse, atol=1e-5)
    assert torch.allclose(ent, rent, atol=2e-5)


def test_nearly_one_hot_rows_keep_their_relative_precision():
    """Entropies down to ~1e-8 nats: relative error < 1e-5 without any exact recomputation."""
    torch.manual_seed(5)
    B, H, S, D = 1, 3, 700, 16
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    k[:, :, 0] = torch.tensor([3.0, 5.0, 7.0])[:, None]
    q[:] = 1.0  # logit 12, 20, 28 on key 0 (scale 0.25) against ~N(0, 1)
    allowed = torch.ones(S, S, dtype=torch.bool).tril()
    first = torch.zeros(B, dtype=torch.long)
    _, _, ent, _ = kernels.flash_cpu_stats(q, k, v, None, 0.25, first)
    _, _, rent, _ = reference(q, k, v, allowed, 0.25, first)
    rows = slice(S // 2, None)  # far enough from key 0 that the weight elsewhere is tiny
    assert float(rent[0, 2, rows].max()) < 1e-6
    torch.testing.assert_close(ent[0, :, rows], rent[0, :, rows], rtol=1e-5, atol=0)


def test_unavailable_kernel_falls_back_to_two_calls(monkeypatch):
    torch.manual_seed(6)
    q, k, v = (torch.randn(2, 4, 30, 8) for _ in range(3))
    first = torch.zeros(2, dtype=torch.long)
    fused = kernels.attend_lse(q, k[:, :2], v[:, :2], None, 0.3, first, backend="flash_cpu")
    monkeypatch.setenv(fused_cpu.ENV, "0")
    assert kernels.flash_cpu_stats(q, k, v, None, 0.3, first) is None
    two = kernels.attend_lse(q, k[:, :2], v[:, :2], None, 0.3, first, backend="flash_cpu")
    for a, b in zip(fused, two):
        assert torch.allclose(a.double(), b.double(), atol=2e-5)


def test_row_norms_match_the_tensor_expressions():
    torch.manual_seed(7)
    B, H, S, D = 2, 3, 130, 16
    out = torch.randn(B, S, H, D).transpose(1, 2)
    w = torch.randn(40, H * D).view(40, H, D).transpose(0, 1)
    gram = w.transpose(1, 2) @ w
    on, full = fused_cpu.row_norms(out, gram)
    torch.testing.assert_close(on, out.norm(dim=-1))
    torch.testing.assert_close(full, ((out @ gram) * out).sum(-1).clamp_min(0).sqrt())
    assert fused_cpu.row_norms(out, None)[1] is None and fused_cpu.row_norms(out.double(), gram) is None
