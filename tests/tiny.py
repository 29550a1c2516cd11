"""Tiny random-initialised models of real configurations (no download), for fast unit tests.

``FAMILIES``: the three the zoo ships (what most tests loop over). ``ENGINE_FAMILIES``: every family the score
engine serves, each with the attention feature that makes it differ (mistral and gemma2 sliding windows,
gemma2 logit soft-capping, qwen3 and olmo2 q/k norms, phi3 a fused qkv projection, llama4 chunked attention,
no-RoPE layers and mixture-of-experts MLPs, gpt_oss learned attention sinks with alternating sliding windows and
mixture-of-experts MLPs); the engine's oracle test runs on all of them.
"""
from __future__ import annotations

import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GptOssConfig, LlamaConfig,
                          Llama4TextConfig, MistralConfig, Olmo2Config, Phi3Config, Qwen2Config, Qwen3Config)

from extract.engine.attention import register

FAMILIES = ("llama", "qwen2", "gemma3")
ENGINE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "gemma2", "gemma3", "phi3", "llama4", "gpt_oss")


_SPECIFIC = {  # family -> (config class, what differs from the common shape)
    "llama": (LlamaConfig, dict(head_dim=16)),
    "qwen2": (Qwen2Config, {}),
    # sliding-window layers (window 8) interleaved with a global one; one KV head like gemma-3-270m
    "gemma3": (Gemma3TextConfig, dict(num_key_value_heads=1, head_dim=32, sliding_window=8,
                                      layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
    "mistral": (MistralConfig, dict(head_dim=16, sliding_window=8)),
    "qwen3": (Qwen3Config, dict(head_dim=16)),
    "olmo2": (Olmo2Config, {}),
    # larger weights (initializer_range) give logits of order one, where a soft cap of 1 bends them
    "gemma2": (Gemma2Config, dict(head_dim=16, sliding_window=8, attn_logit_softcapping=1.0, initializer_range=0.3)),
    "phi3": (Phi3Config, {}),
    # chunked attention (chunks of 8) on the first two layers, which use RoPE; the last is global, without RoPE
    "llama4": (Llama4TextConfig, dict(head_dim=16, attention_chunk_size=8, no_rope_layers=[1, 1, 0],
                                      num_local_experts=2, num_experts_per_tok=1, intermediate_size_mlp=128,
                                      interleave_moe_layer_step=2)),
    # sliding (window 8) / full / sliding layers as gpt-oss alternates them, YaRN RoPE, 2 experts; the sinks are
    # spread over [-2, 4] after initialisation (SINK_RANGE), so some heads send most of their mass to the sink
    "gpt_oss": (GptOssConfig, dict(head_dim=16, sliding_window=8, num_local_experts=2, num_experts_per_tok=1,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                   rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0,
                                                    "original_max_position_embeddings": 128})),
}
SINK_RANGE = (-2.0, 4.0)  # learned sink logits of the tiny models (N(0, 0.02²) at initialisation: no sink to see)


def tiny_config(family: str, **overrides):
    """The config of a 3-layer, 4-head (2 KV heads unless noted), 64-wide model of ``family``; ``overrides``
    replace any field."""
    if family not in _SPECIFIC:
        raise ValueError(f"no tiny config for family {family!r}; choose one of {ENGINE_FAMILIES}")
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cls, specific = _SPECIFIC[family]
    return cls(**{**common, **specific, **overrides})


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A random-init causal LM of ``family`` using the registered attention function (``overrides``: config)."""
    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    cfg._attn_implementation = register()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=register(), dtype=dtype)
    _spread_sinks(model, seed)
    return model.eval()


def left_padded(seqs) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id sequences as a left-padded batch: ``(input_ids, attention_mask)``, both ``(B, max len)`` long."""
    n = max(map(len, seqs))
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    am = torch.zeros(len(seqs), n, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, n - len(s):] = torch.tensor(s)
        am[b, n - len(s):] = 1
    return ids, am


def _spread_sinks(model, seed: int) -> None:
    """Set every learned sink logit (a ``sinks`` parameter of shape (heads,)) uniformly in ``SINK_RANGE``, seeded."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = SINK_RANGE
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".sinks"):
                p.copy_(lo + (hi - lo) * torch.rand(p.shape, generator=g))
