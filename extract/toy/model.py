"""A small transformer for the Bigram-Backcopy task (definitions §7), as a transformers ``PreTrainedModel``.

Pre-LayerNorm blocks, learned absolute positions, ReLU MLP (4x), no biases anywhere, untied output layer.
Softmax attention goes through transformers' attention registry (``config._attn_implementation``: sdpa,
eager, or the score engine's ``"dormant"``) with a mask from ``create_causal_mask``, so
``extract.engine.scores.score_heads`` and ``extract.engine.ablation.ablate`` work on it unchanged. ReLU attention
(``attention="relu"``) is its own path: ``A = ReLU(QKᵀ·scale) / i`` with ``i`` the number of visible keys;
the head scores are defined for softmax attention only, and a capture session (scores, ablation)
refuses ReLU models with a ``DormantError``.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from extract.engine import capture
from extract.errors import DormantError

INITS = {"normal": "every weight N(0, 0.02²), LayerNorm weights 1 (GPT-2 style)",
         "torch": "PyTorch's module defaults: embeddings N(0, 1), linear layers U(±1/√fan_in) (the AD authors' code)"}


class ToyConfig(PretrainedConfig):
    model_type = "bb_toy"

    def __init__(self, vocab_size: int = 78, hidden_size: int = 128, num_hidden_layers: int = 1,
                 num_attention_heads: int = 1, max_position_embeddings: int = 256, attention: str = "softmax",
                 mlp_ratio: int = 4, init: str = "normal", bos_token_id: int = 0, pad_token_id: int = 0, **kwargs):
        if attention not in ("softmax", "relu"):
            raise ValueError(f"attention={attention!r}; choose 'softmax' or 'relu'")
        if init not in INITS:
            raise ValueError(f"init={init!r}; choose one of {sorted(INITS)}")
        self.init = init
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads = num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.max_position_embeddings, self.attention, self.mlp_ratio = max_position_embeddings, attention, mlp_ratio
        super().__init__(bos_token_id=bos_token_id, pad_token_id=pad_token_id, **kwargs)


def eager_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Explicit softmax attention: q/k/v ``(B, H, S, D)`` -> ``((B, S, H, D), A (B, H, S, S))``."""
    scores = query @ key.transpose(-1, -2) * (scaling or query.shape[-1] ** -0.5)
    if attention_mask is not None:
        m = attention_mask if attention_mask.dtype != torch.bool else torch.zeros_like(
            attention_mask, dtype=scores.dtype).masked_fill(~attention_mask, float("-inf"))
        scores = scores + m
    else:
        S = query.shape[2]
        scores = scores.masked_fill(~torch.ones(S, S, dtype=torch.bool, device=scores.device).tril(), float("-inf"))
    A = scores.softmax(-1)
    return (A @ value).transpose(1, 2).contiguous(), A


class ToyAttention(nn.Module):
    def __init__(self, config: ToyConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = 1
        self.scaling = self.head_dim ** -0.5
        self.is_causal = True
        d = config.hidden_size
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.v_proj, self.o_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` ``(B, S, d)`` -> q, k, v each ``(B, H, S, head_dim)``."""
        shape = (*x.shape[:-1], -1, self.head_dim)
        return tuple(p(x).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))

    def weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Causal attention logits and weights ``(B, H, S, S)`` (masked logits are -inf) and values
        ``(B, H, S, head_dim)`` of this layer on its (normalised) input ``x``, without padding."""
        q, k, v = self.qkv(x)
        S = x.shape[1]
        causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
        logits = (q @ k.transpose(-1, -2) * self.scaling).masked_fill(~causal, float("-inf"))
        if self.config.attention == "softmax":
            A = logits.softmax(-1)
        else:
            visible = torch.arange(1, S + 1, device=x.device, dtype=x.dtype)[:, None]
            A = torch.relu(logits.masked_fill(~causal, 0.0)) / visible
        return logits, A, v

    def forward(self, x: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
        if self.config.attention == "relu":
            if capture.current() is not None:
                raise DormantError("the head scores and ablations are defined for softmax attention only; "
                                   "this toy model uses ReLU attention")
            if attention_mask is not None and not bool(attention_mask.all()):
                raise NotImplementedError("ReLU attention supports unpadded batches only")
            _, A, v = self.weights(x)
            out = (A @ v).transpose(1, 2)
        else:
            q, k, v = self.qkv(x)
            fn = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
            out, _ = fn(self, q, k, v, attention_mask, scaling=self.scaling, dropout=0.0, **kwargs)
        return self.o_proj(out.reshape(*x.shape[:-1], -1))


class ToyBlock(nn.Module):
    def __init__(self, config: ToyConfig, layer_idx: int):
        super().__init__()
        d = config.hidden_size
        self.input_layernorm = nn.LayerNorm(d, bias=False)
        self.self_attn = ToyAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, config.mlp_ratio * d, bias=False), nn.ReLU(),
                                 nn.Linear(config.mlp_ratio * d, d, bias=False))

    def forward(self, x: torch.Tensor, attention_mask=None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), attention_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class ToyPreTrainedModel(PreTrainedModel):
    config_class = ToyConfig
    base_model_prefix = "model"
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        if self.config.init == "torch":
            if isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm)):
                module.reset_parameters()
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)


class ToyModel(ToyPreTrainedModel):
    """The decoder: embeddings + positions, blocks, final LayerNorm -> ``last_hidden_state`` ``(B, S, d)``."""

    def __init__(self, config: ToyConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(ToyBlock(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> BaseModelOutput:
        S = input_ids.shape[1]
        if S > self.config.max_position_embeddings:
            raise ValueError(f"{S} tokens > max_position_embeddings {self.config.max_position_embeddings}")
        pos = torch.arange(S, device=input_ids.device)
        x = self.embed_tokens(input_ids) + self.embed_positions(pos)[None]
        mask = create_causal_mask(config=self.config, inputs_embeds=x, attention_mask=attention_mask,
                                  past_key_values=None, position_ids=pos[None])
        for block in self.layers:
            x = block(x, mask if self.config.attention == "softmax" else attention_mask)
        return BaseModelOutput(last_hidden_state=self.norm(x))


class ToyForCausalLM(ToyPreTrainedModel):
    def __init__(self, config: ToyConfig):
        super().__init__(config)
        self.model = ToyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels=None,
                **kwargs) -> CausalLMOutput:
        """Logits ``(B, S, V)``; with ``labels`` ``(B, S)`` also the mean next-token cross-entropy (nats)."""
        logits = self.lm_head(self.model(input_ids, attention_mask).last_hidden_state)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return CausalLMOutput(loss=loss, logits=logits)


AutoConfig.register(ToyConfig.model_type, ToyConfig, exist_ok=True)
AutoModelForCausalLM.register(ToyConfig, ToyForCausalLM, exist_ok=True)


def toy_model(vocab_size: int, *, width: int = 128, layers: int = 1, length: int = 256,
              attention: str = "softmax", init: str = "normal", seed: int = 0,
              attn_implementation: str = "sdpa") -> ToyForCausalLM:
    """A fresh, seeded toy model (1 head); ``init`` one of :data:`INITS`."""
    torch.manual_seed(seed)
    cfg = ToyConfig(vocab_size=vocab_size, hidden_size=width, num_hidden_layers=layers,
                    max_position_embeddings=length, attention=attention, init=init)
    cfg._attn_implementation = attn_implementation
    return ToyForCausalLM(cfg)
