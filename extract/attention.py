"""The one attention function every model family runs through (registered as ``"dormant"``).

Outside a capture session it is plain scaled-dot-product attention. (Filled in by the score engine.)
"""
from __future__ import annotations

from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_NAME = "dormant"


def register() -> str:
    """Register the attention function and its mask function under ``ATTN_NAME``; returns the name."""
    AttentionInterface.register(ATTN_NAME, sdpa_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME
