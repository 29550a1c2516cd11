"""The first-use self-check: it passes on correct kernels, checks each layer once per (model, device, dtype,
backend), and stops a job whose fast kernel is wrong (here deliberately, only at lengths = 1 mod 32, like the
reported PyTorch bug) with an error naming the backend and DORMANT_ATTN_BACKEND."""
import pytest
import torch

from extract.engine import kernels, selfcheck
from extract.engine.scores import score_heads
from tiny import tiny_model


@pytest.fixture(autouse=True)
def fresh_checks(monkeypatch):
    monkeypatch.delenv("DORMANT_ATTN_BACKEND", raising=False)
    monkeypatch.delenv(selfcheck.ENV, raising=False)
    selfcheck.reset()
    yield
    selfcheck.reset()


def seqs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 128, (n - 1,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_check_passes_once_per_layer_on_the_first_forward(family):
    model = tiny_model(family)
    score_heads(model, seqs([33, 20, 9]))
    (rec,) = selfcheck.checks(model)
    L = model.config.num_hidden_layers
    assert rec["passed"] and rec["backend"] == "flash_cpu" and rec["dtype"] == "float32" and rec["layers"] == L
    assert rec["max_error"]["out"] < 1e-5 and rec["max_error"]["p_first"] < 1e-6 and rec["max_error"]["entropy"] < 1e-5
    assert sorted({b for _, b, _ in rec["pairs"]}) == [0, 1, 2]  # the padded examples are sampled too
    score_heads(model, seqs([40, 12], seed=1))  # later forwards are not checked again
    assert selfcheck.checks(model)[0]["pairs"] == rec["pairs"]
    assert selfcheck.checks(tiny_model(family, seed=1)) == []  # another model: its own record, none yet


def wrong_on_lengths_1_mod_32(q, k, v, mask, scale):
    """flash_cpu, except that at lengths = 1 mod 32 the output misses the last key (lse stays right)."""
    out, lse = kernels.flash_cpu(q, k, v, mask, scale)
    if q.shape[2] % 32 == 1:
        out = out.clone()
        out[..., -1, :] = kernels.flash_cpu(q[..., -1:, :], k[..., :-1, :], v[..., :-1, :], None, scale)[0][..., 0, :]
    return out, lse


def test_a_wrong_fast_kernel_is_caught(monkeypatch):
    monkeypatch.setitem(kernels.FAST_KERNELS, "flash_cpu", wrong_on_lengths_1_mod_32)
    model = tiny_model("qwen2")
    score_heads(model, seqs([32, 31]))  # lengths where the kernel is right: no complaint
    selfcheck.reset()
    with pytest.raises(RuntimeError, match=r"backend 'flash_cpu'.*DORMANT_ATTN_BACKEND=chunked"):
        score_heads(model, seqs([33, 20]))
    assert selfcheck.checks(model)[0]["passed"] is False
    monkeypatch.setenv("DORMANT_ATTN_BACKEND", "chunked")  # the way out the error names
    score_heads(model, seqs([33, 20]))


def test_a_wrong_lse_is_caught(monkeypatch):
    def lse_off(q, k, v, mask, scale):
        out, lse = kernels.flash_cpu(q, k, v, mask, scale)
        return out, lse + 1e-2

    monkeypatch.setitem(kernels.FAST_KERNELS, "flash_cpu", lse_off)
    with pytest.raises(RuntimeError, match="p_first error"):
        score_heads(tiny_model("llama"), seqs([12, 7]))


def test_check_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(selfcheck.ENV, "0")
    model = tiny_model("llama")
    score_heads(model, seqs([10]))
    assert selfcheck.checks(model) == []
