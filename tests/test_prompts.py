"""Prompt text and tokens (extract.prompts): the chat formats, the two tokenizations, and the exact token
sequences lm-evaluation-harness 0.4.5 builds for real tokenizers (tests/fixtures/lm_eval_chat.json)."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from extract.data.tasks import make_question
from extract.prompts import build_prompt, chat_messages, encode, format_question, lm_eval_adds_special_tokens
from tiny_tokenizer import tiny_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "lm_eval_chat.json"
Q = make_question("q", "t", "2+2?", ["3", "4", "5"], 1)
SHOT = make_question("s", "t", "Sky?", ["blue", "red"], 0)


def test_plain_and_single_user_text():
    assert format_question(Q) == "2+2?\nA. 3\nB. 4\nC. 5\nAnswer:"
    assert format_question(SHOT, True) == "Sky?\nA. blue\nB. red\nAnswer: A\n\n"
    assert build_prompt(Q, [SHOT], "Desc.\n\n") == \
        "Desc.\n\nSky?\nA. blue\nB. red\nAnswer: A\n\n2+2?\nA. 3\nB. 4\nC. 5\nAnswer:"
    chat = build_prompt(Q, [SHOT], "", tiny_tokenizer(chat_template=True), chat_format="single_user")
    assert chat == "<|user|>\nSky?\nA. blue\nB. red\nAnswer: A\n\n2+2?\nA. 3\nB. 4\nC. 5\n<|assistant|>\nAnswer:"
    with pytest.raises(ValueError, match="chat_format='nope'"):
        build_prompt(Q, [SHOT], "", tiny_tokenizer(chat_template=True), chat_format="nope")


def test_multiturn_text():
    """System = description, a user and an assistant turn per shot (the bare answer), the question last."""
    tok = tiny_tokenizer(chat_template=True)
    assert build_prompt(Q, [SHOT], "Desc.\n\n", tok) == (
        "<|system|>\nDesc.\n\n\n<|user|>\nSky?\nA. blue\nB. red\nAnswer:\n<|assistant|>\nA\n"
        "<|user|>\n2+2?\nA. 3\nB. 4\nC. 5\nAnswer:\n<|assistant|>\n")
    assert chat_messages(Q) == [{"role": "user", "content": "2+2?\nA. 3\nB. 4\nC. 5\nAnswer:"}]  # no system turn
    assert chat_messages(Q, [SHOT], "", "cloze") == [
        {"role": "user", "content": "Sky?\nAnswer:"}, {"role": "assistant", "content": "blue"},
        {"role": "user", "content": "2+2?\nAnswer:"}]


def test_tokenization_rules_on_a_character_tokenizer():
    """bos_first: BOS + text, continuations on their own; lm_eval: no BOS (unless gemma), the trailing newline
    of the prompt moves to the continuations, which are the whole's tokens beyond the prompt's."""
    tok = tiny_tokenizer(chat_template=True)
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    (p, c), = encode(tok, ["Hi:"], [[" A", " B"]], chat=False)
    assert p == [tok.bos_token_id] + ids("Hi:") and c == [ids(" A"), ids(" B")]
    (p, c), = encode(tok, ["<|x|>\n"], [[" A"]], chat=True)
    assert p == ids("<|x|>\n") and c == [ids(" A")]
    (p, c), = encode(tok, ["<|x|>\n"], [[" A", " yes"]], chat=True, tokenization="lm_eval")
    assert p == ids("<|x|>") and c == [ids("\n A"), ids("\n yes")]
    (p, c), = encode(tok, ["Hi:"], [[" A"]], chat=False, tokenization="lm_eval", special_tokens=True)
    assert p == tok("Hi:")["input_ids"] and c == [ids(" A")]
    gemma, llama = (SimpleNamespace(config=SimpleNamespace(model_type=t)) for t in ("gemma3_text", "llama"))
    assert lm_eval_adds_special_tokens(gemma) and not lm_eval_adds_special_tokens(llama)
    with pytest.raises(ValueError, match="tokenization='x'"):
        encode(tok, ["Hi"], [[" A"]], chat=False, tokenization="x")


def fixture_cases():
    return [pytest.param(c, id=f"{c['model']}-{c['k_shot']}shot-{'chat' if c['chat'] else 'plain'}-{c['scoring']}")
            for c in json.loads(FIXTURE.read_text())["cases"]]


def fixture_data():
    d = json.loads(FIXTURE.read_text())
    q = lambda x: make_question(x["id"], x["task"], x["question"], x["choices"], x["answer"])
    return d, {x["id"]: q(x) for x in d["questions"]}, {t: [q(x) for x in s] for t, s in d["shots"].items()}


@pytest.fixture(scope="module")
def zoo_tokenizer():
    from transformers import AutoConfig, AutoTokenizer

    from extract.models.load import converted_model_dir

    def load(name):
        path = converted_model_dir(name, progress=False)
        return AutoTokenizer.from_pretrained(path), SimpleNamespace(config=AutoConfig.from_pretrained(path))
    return load


@pytest.mark.slow
@pytest.mark.parametrize("case", fixture_cases())
def test_token_sequences_equal_lm_eval(case, zoo_tokenizer):
    """Our text and token ids of every question equal lm-evaluation-harness 0.4.5's (fixture), under
    chat_format="multiturn" and tokenization="lm_eval"; plain prompts under bos_first are BOS + the same."""
    d, questions, shots = fixture_data()
    tok, model = zoo_tokenizer(case["model"])
    special = lm_eval_adds_special_tokens(model)
    assert special == case["add_bos_token"] and bool(tok.chat_template) >= case["chat"]
    for want in case["questions"]:
        q = questions[want["id"]]
        text = build_prompt(q, shots[q.task][:case["k_shot"]], d["descriptions"][q.task],
                            tok if case["chat"] else None, case["scoring"], "multiturn")
        assert text == want["context"]
        conts = [c["continuation"] for c in want["choices"]]
        assert conts == [" " + c for c in ("ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:len(q.choices)]
                                           if case["scoring"] == "letter" else q.choices)]
        (ids, cont_ids), = encode(tok, [text], [conts], chat=case["chat"], tokenization="lm_eval",
                                  special_tokens=special)
        assert ids == want["context_ids"]
        assert cont_ids == [c["continuation_ids"] for c in want["choices"]]
        if not case["chat"]:
            (ours, ours_cont), = encode(tok, [text], [conts], chat=False)
            bos = [] if special else [tok.bos_token_id]
            assert ours == bos + want["context_ids"] and ours_cont == cont_ids
