"""Bad token-id input to score_heads (issue #20 §4): each a one-line InputError naming the fix, raised before
any forward pass; an empty input is an empty frame with the usual columns; sequences beyond the trained
context are scored with a warning and flagged."""
import warnings

import numpy as np
import polars as pl
import pytest
import torch

from analysis.core.score_functions import score_keys
from extract.engine.scores import beyond_context, score_heads
from extract.errors import DormantError, InputError
from tiny import tiny_model


def no_forward(model):
    calls = []
    model.model.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


def refused(model, sequences, message):
    calls = no_forward(model)
    with pytest.raises(InputError) as e:
        score_heads(model, sequences)
    assert str(e.value) == message and "\n" not in message
    assert isinstance(e.value, DormantError) and isinstance(e.value, ValueError)
    assert calls == []


def test_empty_input_is_an_empty_frame_with_the_columns():
    model = tiny_model("llama")
    df = score_heads(model, [])
    full = score_heads(model, [[1, 5, 6]])
    assert df.height == 0 and df.schema == full.schema
    assert df.columns == ["example", "layer", "head", *score_keys()]


def test_id_outside_the_vocabulary():
    refused(tiny_model("llama"), [[1, 5, 6], [1, 128, 3]],
            "sequence 1 holds token id 128, outside this model's vocabulary (0..127); encode the text with this "
            "model's own tokenizer")
    refused(tiny_model("llama"), [[1, -1, 3]],
            "sequence 0 holds token id -1, outside this model's vocabulary (0..127); encode the text with this "
            "model's own tokenizer")


def test_float_tensor_is_not_cast_to_ids():
    refused(tiny_model("llama"), [torch.tensor([1.0, 5.0, 6.0])],
            "sequence 0 has dtype torch.float32; token ids must be integers: pass the tokenizer's input_ids "
            "(e.g. torch.long), not embeddings, logits or a mask")
    refused(tiny_model("llama"), [[1, 5.0, 6]],
            "sequence 0 holds float 5.0; token ids must be ints: pass the tokenizer's input_ids, not embeddings, "
            "logits or a mask")
    refused(tiny_model("llama"), [np.array([True, False])],
            "sequence 0 has dtype bool; token ids must be integers: pass the tokenizer's input_ids "
            "(e.g. torch.long), not embeddings, logits or a mask")


def test_shapes_a_new_user_tries():
    model = tiny_model("llama")
    refused(model, [1, 5, 6], "sequence 0 is the single int 1; pass a list of token-id sequences ([ids], not ids)")
    refused(model, torch.tensor([1, 5, 6]), "sequences must be a list of token-id sequences; wrap one sequence in "
            "a list ([ids]), or score texts with score_texts(model, tokenizer, texts)")
    refused(model, "hello", "sequences must be a list of token-id sequences; wrap one sequence in a list ([ids]), "
            "or score texts with score_texts(model, tokenizer, texts)")
    refused(model, ["hello world"], "sequence 0 is a str, not token ids; score texts with "
            "score_texts(model, tokenizer, texts)")
    refused(model, [torch.ones(2, 3, dtype=torch.long)], "sequence 0 has shape (2, 3); each sequence is 1-D "
            "(iterate the rows of a batch, or drop padding first)")
    # a 2-D integer batch is a list of rows: scored as such
    assert score_heads(model, torch.tensor([[1, 5, 6], [1, 7, 8]])).height == 2 * 3 * 4


def test_integer_tensors_and_numpy_ids_are_accepted():
    model = tiny_model("llama")
    a = score_heads(model, [[1, 5, 6]])
    for s in (torch.tensor([1, 5, 6], dtype=torch.int32), np.array([1, 5, 6]), [np.int64(1), 5, 6]):
        assert score_heads(model, [s]).equals(a)


def test_beyond_the_trained_context_warns_and_is_flagged():
    model = tiny_model("llama", max_position_embeddings=8)
    seqs = [[1] + [5] * 6, [1] + [5] * 9]
    with pytest.warns(UserWarning, match=r"^1 of 2 sequences are longer than the model's trained context \(8 "
                      r"tokens; first: #1, 10 tokens\); scored anyway, flagged per example as beyond_context$"):
        df = score_heads(model, seqs)
    assert df["example"].unique().sort().to_list() == [0, 1]
    assert beyond_context(model, seqs) == [False, True]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        score_heads(model, seqs[:1])  # within the context: no warning
