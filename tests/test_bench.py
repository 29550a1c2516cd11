"""The benchmark's naive eager baseline computes the same scores as the engine (or its ratios are moot)."""
import numpy as np
import pytest
import torch
from tiny import tiny_model

from analysis.core.score_functions import score_keys
from extract.bench import _naive_eager
from extract.engine.scores import score_heads


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_naive_eager_equals_score_heads(family):
    model = tiny_model(family)
    ids = [1] + torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    got = score_heads(model, [ids]).sort("layer", "head").select(score_keys()).to_numpy()
    model.set_attn_implementation("eager")
    naive = _naive_eager(model, ids).numpy().reshape(-1, len(score_keys()))  # (layers, heads, scores)
    np.testing.assert_allclose(naive, got, rtol=1e-5, atol=1e-6)
