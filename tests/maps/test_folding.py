"""The MAPS reference's weight processing (extract.maps.folding): folded norm weights and the E' choices against
what the model itself computes in a forward pass, on tiny random models (norm weights randomised) and on real
zoo models (gemma's ``1 + w`` norms, qwen2's value bias)."""
import pytest
import torch

from extract.engine import hooks
from extract.maps.folding import embedding_inputs, final_norm, input_norm, norm_scale, post_mlp_norm, pre_mlp_norm
from extract.maps.run import INPUTS
from extract.maps.static import final_scale, head_weights, unembedding
from tiny import FAMILIES, tiny_model

torch.set_num_threads(1)


def randomise_norms(model, seed=0):
    """Every norm weight drawn from U(0.5, 1.5), so that folding it in matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in model.named_modules():
            w = getattr(mod, "weight", None)
            if "norm" in type(mod).__name__.lower() and w is not None and w.dim() == 1:
                w.copy_(0.5 + torch.rand(w.shape, generator=g))
    return model


def scale_of(model, norm):
    """The family's own convention, from its config: gemma's norms multiply by 1 + w, the others by w."""
    w = norm.weight.detach().float()
    return 1 + w if model.config.model_type.startswith("gemma") else w


def _rms(x, model):
    return x / (x.pow(2).mean(-1, keepdim=True) + model.config.rms_norm_eps).sqrt()


@torch.no_grad()
def independent_inputs(model, ids):
    """E' from the model's own forward pass with layer 0's attention ablated: its MLP output (reference) and
    its output (residual); raw: the embedding module's output. ids ``(n,)`` -> ``{choice: (n, d)}``."""
    H = model.config.num_attention_heads
    x = ids[None].to(model.device)
    with hooks.replace_heads(model, {0: list(range(H))}), hooks.capture(model, "mlp_out", [0]) as mlp, \
            hooks.capture(model, "resid_post", [0]) as post:
        model(input_ids=x, use_cache=False)
    return {"reference": mlp[0][0].float(), "residual": post[0][0].float(),
            "raw": model.get_input_embeddings()(x)[0].float()}


def _check_values(model, ids, layers):
    """v_proj's output (bias removed) = RMS-normalised layer input @ diag(γ_in) W_V, per KV head."""
    cfg = model.config
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    x = ids[None]
    with torch.no_grad(), hooks.capture(model, "resid_post") as resid, hooks.capture(model, "v") as v:
        model(input_ids=x, use_cache=False)
        emb = model.get_input_embeddings()(x)
    for layer in layers:
        h = (emb if layer == 0 else resid[layer - 1])[0].float()
        wv, _ = head_weights(model, layer)
        bias = hooks.decoder_layers(model)[layer].self_attn.v_proj.bias
        for kv in range(KV):
            got = v[layer][0, :, kv].float() - (0 if bias is None else bias.view(KV, -1)[kv].float())
            torch.testing.assert_close(_rms(h, model) @ wv[kv * (H // KV)], got, atol=2e-4, rtol=2e-3)


def _check_unembedding(model, ids):
    """The logits = RMS-normalised last residual @ diag(γ_final) W_U (no softcapping in these models)."""
    L = model.config.num_hidden_layers
    with torch.no_grad(), hooks.capture(model, "resid_post", [L - 1]) as resid:
        logits = model(input_ids=ids[None], use_cache=False).logits[0].float()
    U = final_scale(model)[:, None] * unembedding(model)
    torch.testing.assert_close(_rms(resid[L - 1][0].float(), model) @ U, logits, atol=2e-3, rtol=2e-3)


def _check_inputs(model, ids):
    _, got = embedding_inputs(model, ids, INPUTS)
    want = independent_inputs(model, ids)
    for c in INPUTS:
        torch.testing.assert_close(got[c], want[c], atol=1e-4, rtol=1e-4, msg=c)
    assert not torch.allclose(got["reference"], got["residual"]) and not torch.allclose(got["raw"], got["residual"])


@pytest.mark.parametrize("family", FAMILIES)
def test_folding_on_tiny_models(family):
    model = randomise_norms(tiny_model(family, seed=3))
    block = model.model.layers[0]
    d = model.config.hidden_size
    for norm in (input_norm(block), pre_mlp_norm(block), final_norm(model)):
        torch.testing.assert_close(norm_scale(norm, d), scale_of(model, norm))
    # gemma reads the MLP through pre_feedforward_layernorm and adds it through post_feedforward_layernorm
    assert pre_mlp_norm(block) is getattr(block, "pre_feedforward_layernorm", block.post_attention_layernorm)
    assert (post_mlp_norm(block) is not None) == (family == "gemma3")
    ids = torch.randint(3, model.config.vocab_size, (12,), generator=torch.Generator().manual_seed(0))
    _check_values(model, ids, range(model.config.num_hidden_layers))
    _check_unembedding(model, ids)
    _check_inputs(model, torch.arange(model.config.vocab_size))


def test_a_norm_that_is_not_rms_with_a_weight_is_refused():
    with pytest.raises(TypeError, match="not an RMS norm"):
        norm_scale(torch.nn.LayerNorm(8).eval().requires_grad_(False).apply(
            lambda m: torch.nn.init.normal_(m.bias) if hasattr(m, "bias") else None), 8)


@pytest.mark.parametrize("name", ["gemma-3-270m", "qwen2.5-coder-0.5b-instruct"])
def test_folding_on_zoo_models(zoo_model, name):
    model, tok = zoo_model(name)
    if model.config.model_type.startswith("gemma"):
        assert getattr(model.config, "final_logit_softcapping", None) is None
    d = model.config.hidden_size
    block = hooks.decoder_layers(model)[0]
    for norm in (input_norm(block), pre_mlp_norm(block), final_norm(model)):
        torch.testing.assert_close(norm_scale(norm, d), scale_of(model, norm))
    ids = torch.tensor(tok("The capital of France is Paris, and the capital of Italy is")["input_ids"])
    _check_values(model, ids, [0, 1, model.config.num_hidden_layers - 1])
    _check_unembedding(model, ids)
    _check_inputs(model, ids)
