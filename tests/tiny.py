"""Tiny random-initialised models of real configurations (no download), for fast unit tests."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config

from extract.engine.attention import register

FAMILIES = ("llama", "qwen2", "gemma3")


def tiny_config(family: str):
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama":
        return LlamaConfig(**common, head_dim=16)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "gemma3":
        # sliding-window layers (window 8) interleaved with a global one; one KV head like gemma-3-270m
        common.update(num_key_value_heads=1, head_dim=32)
        return Gemma3TextConfig(**common, sliding_window=8,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-init causal LM of ``family`` using the registered attention function."""
    torch.manual_seed(seed)
    cfg = tiny_config(family)
    cfg._attn_implementation = register()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=register(), dtype=dtype)
    return model.eval()
