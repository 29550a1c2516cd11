"""The oracle tests on CUDA (``pytest -m gpu``; skipped without CUDA): every backend that runs on CUDA, fp32 and
bf16, padded and unpadded, lengths around multiples of 8/16/32 (+-1), head dims up to 512 (the reported
PyTorch case: bf16, a mask, key length = 1 mod 32, head_dim 512), tiny models of three families (gemma3 with
sliding windows) against the naive eager reference, and the self-check passing on each."""
import numpy as np
import pytest
import torch

from reference import reference_scores
from test_kernels import masks, naive
from test_scores import as_array, random_seqs
from tiny import FAMILIES, tiny_model

from extract.engine import selfcheck
from extract.engine.kernels import attend
from extract.engine.scores import score_heads

DEVICE = "cuda"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA_BACKENDS = ["efficient_cuda", "chunked"]
LENGTHS = [7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 511, 512, 513]
TOL = {torch.float32: dict(out=1e-4, p_first=1e-5, entropy=1e-4), torch.bfloat16: dict(out=0.05, p_first=1e-4,
                                                                                        entropy=1e-3)}


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S", LENGTHS)
@pytest.mark.parametrize("window,pad", [(None, [0, 0]), (None, [0, 5]), (6, [0, 3])])
@pytest.mark.parametrize("D", [64, 256, 512])
def test_cuda_kernels_match_explicit_softmax(backend, dtype, S, window, pad, D):
    torch.manual_seed(S + D)
    B, H = 2, 2
    q, k, v = (torch.randn(B, H, S, D, device=DEVICE, dtype=dtype) for _ in range(3))
    allowed, add = masks(B, S, window, pad)
    allowed, add = allowed.to(DEVICE), add.to(DEVICE).to(dtype)
    first = torch.zeros(B, dtype=torch.long, device=DEVICE)
    mask = None if window is None and pad == [0, 0] else add
    out, pf, ent = attend(q, k, v, mask, D ** -0.5, first, backend=backend)
    ro, rpf, rent = naive(q, k, v, allowed, D ** -0.5, first)
    sel = (torch.arange(S, device=DEVICE)[None] < S - torch.tensor(pad, device=DEVICE)[:, None])
    sel = sel[:, None, :].expand(B, H, S)
    tol = TOL[dtype]
    assert (out.double() - ro)[sel].abs().max() <= tol["out"] * ro[sel].abs().max()
    assert (pf - rpf)[sel].abs().max() <= tol["p_first"]
    assert (ent - rent)[sel].abs().max() <= tol["entropy"]


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_scores_match_reference(monkeypatch, backend, family):
    """fp32 on CUDA: padded batches (lengths around 32 and 64, past gemma3's window of 8) = the reference."""
    monkeypatch.setenv("DORMANT_ATTN_BACKEND", backend)
    selfcheck.reset()
    model = tiny_model(family).to(DEVICE)
    seqs = [s[:n] for s, n in zip(random_seqs(6, 70, 70, 128, seed=1), [31, 32, 33, 63, 64, 65])]
    got = as_array(score_heads(model, seqs), len(seqs), model)
    for i, ids in enumerate(seqs):
        ref = reference_scores(model, ids).numpy()
        np.testing.assert_allclose(got[i], ref, rtol=1e-4, atol=1e-6)
    alone = np.stack([as_array(score_heads(model, [s]), 1, model)[0] for s in seqs])  # unpadded
    np.testing.assert_allclose(alone, got, rtol=1e-5, atol=1e-6)
    recs = selfcheck.checks(model)
    assert all(r["passed"] for r in recs) and (backend == "chunked") == (recs == [])


@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_bfloat16_scores_match_cpu(monkeypatch, backend, family):
    """bf16 on CUDA (the paper profile's dtype) against bf16 on CPU, padded and unpadded lengths around 32."""
    seqs = [s[:n] for s, n in zip(random_seqs(4, 70, 70, 128, seed=2), [32, 33, 65, 17])]
    model = tiny_model(family, seed=4, dtype=torch.bfloat16)
    cpu = as_array(score_heads(model, seqs), len(seqs), model)
    monkeypatch.setenv("DORMANT_ATTN_BACKEND", backend)
    selfcheck.reset()
    model.to(DEVICE)
    got = as_array(score_heads(model, seqs), len(seqs), model)
    np.testing.assert_allclose(got, cpu, rtol=0.1, atol=0.02)
    assert all(r["passed"] for r in selfcheck.checks(model))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_real_sliding_window_model(dtype):
    """gemma-3-270m on CUDA past its 512-token window, lengths = 1 mod 32 among them (the reported silent-error
    case): fp32 equals the reference, bf16 stays near fp32, the self-check passes on both."""
    from extract.models.load import load_model

    selfcheck.reset()
    model, tok = load_model("gemma-3-270m", dtype=dtype, device=DEVICE, progress=False)
    long = " ".join(["The history of the city spans many centuries and many rulers."] * 80)
    ids = [tok.bos_token_id] + tok(long, add_special_tokens=False)["input_ids"]
    seqs = [ids[:n] for n in (545, 513, 33, 100)]
    assert model.config.sliding_window < 545
    got = as_array(score_heads(model, seqs), len(seqs), model)
    assert all(r["passed"] for r in selfcheck.checks(model))
    if dtype == torch.float32:
        for i in range(len(seqs)):
            np.testing.assert_allclose(got[i], reference_scores(model, seqs[i]).numpy(), rtol=1e-4, atol=1e-6)
    else:
        m32, _ = load_model("gemma-3-270m", dtype=torch.float32, device=DEVICE, progress=False)
        np.testing.assert_allclose(got, as_array(score_heads(m32, seqs), len(seqs), m32), rtol=0.1, atol=0.02)
