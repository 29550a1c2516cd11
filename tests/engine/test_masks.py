"""Masks that grow with S, not S²: the registered lazy mask function, its per-row key intervals, and the blocked
kernels (query blocks much shorter than the sequences here) against the eager reference and the dense path."""
import numpy as np
import pytest
import torch
from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

from extract.engine import masks
from extract.engine.kernels import attend_lse
from extract.engine.scores import score_heads
from reference import reference_scores
from tiny import ENGINE_FAMILIES, left_padded, tiny_model


def as_array(model, seqs):
    from analysis.core.score_functions import score_keys

    df = score_heads(model, seqs).sort(["example", "layer", "head"]).select(score_keys())
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    return df.to_numpy().reshape(len(seqs), L, H, -1)


def seqs(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, 128, (n - 1,), generator=g).tolist() for n in lengths]


@pytest.fixture
def small_blocks(monkeypatch):
    """Query blocks of 5 rows and mask bands of ~3 rows: every path crosses many block boundaries. Yields the
    list of the (s0, s1) blocks the kernels were given."""
    calls = []
    call = masks.Blocks.__call__

    def counted(self, s0, s1, dtype):
        calls.append((s0, s1))
        return call(self, s0, s1, dtype)

    monkeypatch.setattr(masks, "BLOCK_ROWS", 5)
    monkeypatch.setattr(masks, "BAND_ELEMENTS", 3 * 2 * 40)
    monkeypatch.setattr(masks.Blocks, "__call__", counted)
    yield calls


@pytest.mark.parametrize("family", ["mistral", "gemma3", "llama4", "gpt_oss", "gemma2"])
def test_blocked_scores_match_reference(family, small_blocks):
    """Windows, chunks, sinks and soft-capping, padded batches, blocks of 5 queries: still the eager reference."""
    model = tiny_model(family, seed=2)
    batch = seqs([37, 12, 25, 3], seed=4)
    got = as_array(model, batch)
    assert (30, 35) in small_blocks  # the windowed layers ran block by block
    for i, ids in enumerate(batch):
        ref = reference_scores(model, ids).numpy()
        assert np.max(np.abs(got[i] - ref) / np.maximum(np.abs(ref), 1e-12)) <= 1e-4


def test_scoring_forward_never_builds_a_dense_mask(monkeypatch):
    """A padded sliding-window batch: the attention function reads the lazy mask band by band, never whole."""
    def refuse(self):
        raise AssertionError(f"dense {self.shape} mask built")

    monkeypatch.setattr(masks.LazyMask, "dense", refuse)
    monkeypatch.setattr(masks, "BAND_ELEMENTS", 4 * 2 * 30)
    model = tiny_model("gemma3", seed=1)
    got = as_array(model, seqs([30, 11], seed=2))
    assert np.isfinite(got).all()


def test_left_padding_goes_through_blocks(small_blocks):
    """Left padding (not plain causal on the valid rows) takes the blocked path and equals score_heads."""
    from extract.engine.scores import recording

    model = tiny_model("mistral", seed=3)
    batch = seqs([17, 9, 14], seed=5)
    ref = as_array(model, batch)
    ids, am = left_padded(batch)
    small_blocks.clear()
    with recording(model) as rec, torch.no_grad():
        model(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp_min(0), use_cache=False)
    assert small_blocks
    np.testing.assert_allclose(rec.scores().numpy(), ref, rtol=1e-5, atol=1e-7)


def test_intervals_of_a_sliding_window_mask():
    """The lazy mask reads into the same rows sdpa_mask builds, band by band (here 2 rows a band)."""
    pad = torch.ones(2, 13, dtype=torch.bool)
    pad[1, 9:] = False
    kw = dict(batch_size=2, q_length=13, kv_length=13, mask_function=sliding_window_causal_mask_function(4),
              attention_mask=pad, allow_is_causal_skip=True, local_size=4)
    lazy = masks.lazy_mask(**kw)
    dense = sdpa_mask(**kw)[:, 0]
    assert torch.equal(lazy.dense(), sdpa_mask(**kw)) and torch.equal(lazy.rows(3, 8)[:, 0], dense[:, 3:8])
    old = masks.BAND_ELEMENTS
    masks.BAND_ELEMENTS = 2 * 2 * 13
    try:
        lo, hi, exact, diag = masks.intervals(lazy)
    finally:
        masks.BAND_ELEMENTS = old
    t = torch.arange(13)
    keys = (t >= lo[..., None]) & (t <= hi[..., None])
    assert exact.all() and torch.equal(diag, dense.diagonal(dim1=-2, dim2=-1))
    assert torch.equal(keys[diag], dense[diag])
    assert masks.lazy_mask(**dict(kw, attention_mask=None, local_size=None,
                                  mask_function=lambda b, h, q, k: k <= q)) is None  # plain causal: nothing


@pytest.mark.parametrize("backend", ["flash_cpu", "chunked"])
def test_blocks_equal_the_dense_mask(backend):
    """attend_lse on Blocks (query blocks of 4 over 23 positions) = on the dense additive mask, valid rows."""
    torch.manual_seed(5)
    B, H, S, D = 2, 3, 23, 8
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    t = torch.arange(S)
    valid = t[None] < torch.tensor([[S], [15]])
    lo = torch.where(valid, (t - 5).clamp_min(0), t)
    hi = t.expand(B, S)
    seen = (t >= lo[..., None]) & (t <= hi[..., None])
    add = torch.zeros(B, 1, S, S).masked_fill(~seen[:, None], float("-inf"))
    first = torch.zeros(B, dtype=torch.long)
    dense = attend_lse(q, k, v, add, 0.3, first, valid=valid, backend=backend, chunk_size=3)
    blocked = attend_lse(q, k, v, masks.Blocks(lo, hi, 4), 0.3, first, valid=valid, backend=backend, chunk_size=3)
    sel = valid[:, None, :].expand(B, H, S)
    for a, b in zip(dense, blocked):
        torch.testing.assert_close(b[sel], a[sel], rtol=1e-5, atol=1e-6)


@pytest.fixture
def lazy_masks(monkeypatch):
    """Every LazyMask the registered mask function returns during the test (a list, filled as forwards run)."""
    from extract.engine.attention import register

    made, original = [], masks.lazy_mask

    def recorded(*a, **kw):
        m = original(*a, **kw)
        if m is not None:
            made.append(m)
        return m

    monkeypatch.setattr(masks, "lazy_mask", recorded)  # register() (tiny_model, score_heads) picks it up
    yield made
    monkeypatch.undo()
    register()


@pytest.mark.parametrize("family", ENGINE_FAMILIES)
def test_derived_intervals_equal_the_banded_ones(family, lazy_masks):
    """Every mask a forward builds (right and left padding; windows, chunks, global layers): the intervals derived
    from the arguments are the banded evaluation's, element for element, and none falls back."""
    from extract.engine.scores import recording

    made = lazy_masks
    model = tiny_model(family, seed=1)
    batch = seqs([37, 12, 25, 3], seed=6)
    as_array(model, batch)  # right padding
    ids, am = left_padded(batch)
    with recording(model), torch.no_grad():
        model(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp_min(0), use_cache=False)
    assert made
    for m in made:
        derived = masks.derived_intervals(m)
        assert derived is not None
        for a, b in zip(derived, masks.banded_intervals(m)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["mistral", "llama4", "gpt_oss"])
def test_scores_unchanged_without_derived_intervals(family, monkeypatch):
    """Scores with the derived intervals equal those with the banded evaluation alone, bit for bit."""
    model = tiny_model(family, seed=2)
    batch = seqs([37, 12, 25, 3], seed=4)
    derived = as_array(model, batch)
    monkeypatch.setattr(masks, "derived_intervals", lambda m: None)
    np.testing.assert_array_equal(as_array(model, batch), derived)


def test_unrecognised_mask_functions_fall_back():
    """A custom mask function, or padding with a hole, is not derived (None): intervals() evaluates it."""
    pad = torch.ones(2, 13, dtype=torch.bool)
    kw = dict(batch_size=2, q_length=13, kv_length=13, attention_mask=pad, allow_is_causal_skip=False)
    custom = masks.lazy_mask(**kw, mask_function=lambda b, h, q, k: (k <= q) & (k % 2 == 0))
    assert masks.derived_intervals(custom) is None
    lo, hi, exact, _ = masks.intervals(custom)
    assert not exact.all()
    holed = pad.clone()
    holed[1, 4] = False
    lazy = masks.lazy_mask(**dict(kw, attention_mask=holed), mask_function=sliding_window_causal_mask_function(4))
    assert masks.derived_intervals(lazy) is None
    assert torch.equal(masks.intervals(lazy)[2], masks.banded_intervals(lazy)[2])
