"""The named capture points of extract/engine/hooks.py against independent constructions on tiny real-config
models: zeroing a head at "z" equals zeroing its columns of o_proj, "resid_post" equals transformers'
hidden states, "v" equals v_proj of the normed input, and a last-position replacement changes only the last
position."""
import copy

import pytest
import torch
from tiny import tiny_model

from extract.engine import hooks


def _ids():
    return torch.tensor([[1, 5, 9, 33, 7, 12, 90, 4, 61, 2]])


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_zeroing_z_equals_zeroing_o_proj_columns(family):
    model = tiny_model(family)
    _, H, _, D = hooks.head_shape(model)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for layer, h in [(0, 1), (2, H - 1)]:
            ref.model.layers[layer].self_attn.o_proj.weight[:, h * D:(h + 1) * D] = 0
    with torch.no_grad(), hooks.replace_heads(model, {0: [1], 2: [H - 1]}):
        got = model(input_ids=_ids()).logits
    want = ref(input_ids=_ids()).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the hooks are gone after the block
        after = model(input_ids=_ids()).logits
    assert (after - want).abs().max() > 1e-4


def test_replace_at_the_last_position_only_changes_the_last_position():
    model = tiny_model("llama")
    with torch.no_grad():
        base = model(input_ids=_ids()).logits
        with hooks.replace_heads(model, {1: [0, 2]}, positions=-1):
            got = model(input_ids=_ids()).logits
    torch.testing.assert_close(got[:, :-1], base[:, :-1])
    assert (got[:, -1] - base[:, -1]).abs().max() > 1e-4


def test_resid_post_and_v_equal_independent_computations():
    model = tiny_model("llama")
    L, H, KV, D = hooks.head_shape(model)
    with torch.no_grad(), hooks.capture(model, "resid_post") as resid, hooks.capture(model, "v") as v:
        out = model(input_ids=_ids(), output_hidden_states=True)
    for layer in range(L - 1):  # the last hidden state is after the final norm
        torch.testing.assert_close(resid[layer], out.hidden_states[layer + 1])
    block = model.model.layers[0]
    with torch.no_grad():
        x = block.input_layernorm(model.model.embed_tokens(_ids()))
        want = block.self_attn.v_proj(x).view(1, -1, KV, D)
    torch.testing.assert_close(v[0], want)


def test_unknown_point_and_head_are_clear_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="unknown capture point"):
        with hooks.hooked(model, "q", lambda layer, x: None):
            pass
    with pytest.raises(ValueError, match="outside 0..3"):
        with hooks.replace_heads(model, {0: [4]}):
            pass


def test_value_point_on_a_fused_projection_is_a_clear_error():
    from tiny import tiny_model

    from extract.engine import hooks

    with pytest.raises(NotImplementedError, match="phi3: capture point 'v' needs a separate v_proj"):
        with hooks.capture(tiny_model("phi3"), "v"):
            pass
