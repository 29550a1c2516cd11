"""scripts/bf16_agreement.py's agreement table against independent computations (docs/bf16.md)."""
import importlib.util
from pathlib import Path

import numpy as np
import torch

from analysis.core.score_functions import score_keys
from extract.engine.scores import score_heads
from tiny import tiny_model

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bf16_agreement", ROOT / "scripts" / "bf16_agreement.py")
bf16 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bf16)


def _scores(model, seqs) -> np.ndarray:
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    df = score_heads(model, seqs).sort("example", "layer", "head")
    return df.select(score_keys()).to_numpy().reshape(len(seqs), L, H, -1)


def test_tiny_model_bf16_agreement_matches_a_direct_computation():
    g = torch.Generator().manual_seed(3)
    seqs = [[1] + torch.randint(3, 128, (n,), generator=g).tolist() for n in (12, 30, 45, 20, 37, 25)]
    a32 = _scores(tiny_model("llama", seed=5), seqs)
    a16 = _scores(tiny_model("llama", seed=5, dtype=torch.bfloat16), seqs)
    assert not np.array_equal(a32, a16)  # bf16 really moved the scores
    table = {r["score"]: r for r in bf16.agreement(a32, a16, score_keys(), 0.15).to_dicts()}
    for key, above in (("awft", True), ("ahon", False)):  # inactive above / below τ
        x, y = (a[..., score_keys().index(key)].ravel() for a in (a32, a16))

        def inactive(v):
            tau = np.quantile(v, 0.85 if above else 0.15)
            return {i for i, s in enumerate(v) if (s > tau if above else s < tau)}

        s32, s16 = inactive(x), inactive(y)
        assert table[key]["jaccard"] == len(s32 & s16) / len(s32 | s16)
        assert table[key]["flipped"] == len(s32 ^ s16) / x.size
        assert table[key]["max_abs"] == np.abs(y - x).max()
        assert table[key]["spearman"] > 0.9


def test_known_masks_give_known_jaccard():
    # 200 distinct scores per function: at p = 0.15 exactly 30 are inactive (below τ for ahon, above for awft)
    x = np.random.default_rng(0).permutation(200).astype(float)
    a = np.stack([x, x], -1)
    keys = ("awft", "ahon")
    same = bf16.agreement(a, a + 1.0, keys).to_dicts()  # a shift moves τ with it: nothing flips
    assert all(r["jaccard"] == 1.0 and r["flipped"] == 0.0 and r["spearman"] == 1.0 for r in same)
    mirrored = bf16.agreement(a, -a, keys).to_dicts()  # order reversed: the two inactive sets are disjoint
    assert all(r["jaccard"] == 0.0 and r["flipped"] == 60 / 200 for r in mirrored)
    swapped = a.copy()  # the most and the least inactive score swapped: one triple leaves the set, one joins
    lo, hi = int(np.argmin(x)), int(np.argmax(x))
    swapped[[lo, hi]] = swapped[[hi, lo]]
    for r in bf16.agreement(a, swapped, keys).to_dicts():
        assert r["jaccard"] == 29 / 31 and r["flipped"] == 2 / 200
        assert r["inactive_fp32"] == r["inactive_bf16"] == 30 / 200
