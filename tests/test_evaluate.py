"""The multiple-choice evaluator: letter log-likelihoods by hand and against lm-evaluation-harness, the chat
formats, batching, ablation, calibration (the prompt text and tokens themselves: tests/test_prompts.py)."""
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from analysis.core.score_functions import score_keys
from extract.engine.ablation import ablate
from extract.cli import main
from extract.data.tasks import TaskData, load_task, make_question
from extract.errors import DormantError
from extract.evaluate import evaluate
from extract.engine.scores import score_heads
from extract.prompts import build_prompt, encode
from fakes import write_mmlu
from tiny import tiny_model
from tiny_tokenizer import tiny_tokenizer

LM_EVAL_FIXTURE = Path(__file__).parent / "fixtures" / "lm_eval_chat.json"  # scripts/lm_eval_fixture.py


def toy_task(n=7) -> TaskData:
    qs = [make_question(f"toy/{i}", "toy", f"What is {i} plus {i % 3}?",
                        [str(i + i % 3 + d) for d in range(-1, 2 + i % 3)], 1) for i in range(n)]
    shots = [make_question(f"toy/shot{i}", "toy", f"Is {i} even?", ["yes", "no"], i % 2) for i in range(3)]
    return TaskData("toy", qs, {"toy": shots}, {"toy": "Arithmetic.\n\n"})


def by_hand(model, tok, task, k_shot, scoring="letter"):
    """Letter (or choice) log-likelihoods computed one question at a time, one continuation at a time."""
    out = []
    for q in task.questions:
        text = build_prompt(q, task.shots["toy"][:k_shot], task.descriptions["toy"], scoring=scoring)
        prompt = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
        lls = []
        for j in range(len(q.choices)):
            cont = tok(" " + ("ABCDEF"[j] if scoring == "letter" else q.choices[j]), add_special_tokens=False)
            cont = cont["input_ids"]
            ids = torch.tensor([prompt + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            lls.append(sum(float(logp[len(prompt) - 1 + t, tok_id]) for t, tok_id in enumerate(cont)))
        out.append(lls)
    return out


@pytest.mark.parametrize("letter_tokens", [True, False], ids=["one-token-letters", "two-token-letters"])
def test_letter_loglik_by_hand(letter_tokens):
    model, tok = tiny_model("llama", seed=1), tiny_tokenizer(letter_tokens)
    task = toy_task()
    res = evaluate(model, tok, task, k_shot=2, progress=False)
    expect = by_hand(model, tok, task, 2)
    got = res.predictions["loglik"].to_list()
    for g, e in zip(got, expect):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
    assert res.predictions["predicted"].to_list() == [int(np.argmax(e)) for e in expect]
    assert res.predictions["id"].to_list() == [q.id for q in task.questions]
    assert res.accuracy == pytest.approx(np.mean([np.argmax(e) == 1 for e in expect]))
    assert res.chance == pytest.approx(np.mean([1 / len(q.choices) for q in task.questions]))
    assert res.n_questions == 7 and not res.chat_template
    # batching does not change a number
    small = evaluate(model, tok, task, k_shot=2, batch_tokens=1, progress=False)
    np.testing.assert_allclose(np.concatenate(small.predictions["loglik"].to_list()), np.concatenate(got), rtol=1e-5)


def test_cloze_scoring_by_hand():
    model, tok = tiny_model("qwen2", seed=3), tiny_tokenizer()
    task = toy_task()
    q = task.questions[0]
    assert build_prompt(q, task.shots["toy"][:1], "", scoring="cloze") == \
        "Is 0 even?\nAnswer: yes\n\nWhat is 0 plus 0?\nAnswer:"
    res = evaluate(model, tok, task, k_shot=2, scoring="cloze", batch_tokens=200, progress=False)
    expect = by_hand(model, tok, task, 2, scoring="cloze")
    for g, e in zip(res.predictions["loglik"].to_list(), expect):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
    per_char = [[ll / len(c) for ll, c in zip(e, q.choices)] for e, q in zip(expect, task.questions)]
    assert res.predictions["predicted"].to_list() == [int(np.argmax(x)) for x in per_char]
    assert res.scoring == "cloze"
    with pytest.raises(ValueError, match="scoring="):
        evaluate(model, tok, task, scoring="nope", progress=False)


def test_chat_template_option():
    model, tok = tiny_model("qwen2"), tiny_tokenizer(chat_template=True)
    task = toy_task(3)
    assert not evaluate(model, tok, task, k_shot=0, progress=False).chat_template  # base model: plain prompt
    model.config.dormant_source = {"name": "tiny-instruct", "variant": "instruct"}
    res = evaluate(model, tok, task, k_shot=1, progress=False)
    assert res.chat_template
    text = build_prompt(task.questions[0], task.shots["toy"][:1], task.descriptions["toy"], tok)
    assert text.startswith("<|system|>\nArithmetic.") and text.endswith("Answer:\n<|assistant|>\n")  # multiturn
    assert res.predictions["n_tokens"][0] == len(tok(text, add_special_tokens=False)["input_ids"])
    single = evaluate(model, tok, task, k_shot=1, chat_format="single_user", progress=False)
    text = build_prompt(task.questions[0], task.shots["toy"][:1], task.descriptions["toy"], tok,
                        chat_format="single_user")
    assert single.predictions["n_tokens"][0] == len(tok(text, add_special_tokens=False)["input_ids"])
    assert not evaluate(model, tok, task, k_shot=0, chat_template=False, progress=False).chat_template
    with pytest.raises(DormantError, match="no chat template"):
        evaluate(model, tiny_tokenizer(), task, chat_template=True, progress=False)
    with pytest.raises(DormantError, match="4-shot asked.*3 held-out"):
        evaluate(model, tok, task, k_shot=4, progress=False)


def chat_by_hand(model, tok, task, k_shot, scoring="letter", delim=" "):
    """lm-eval's chat log-likelihoods one choice at a time: the prompt's trailing whitespace moved into the
    continuation ``delim + answer`` (0.4.5: " A"; definitions §5: "A"), one full sequence per choice, no BOS
    (a llama model)."""
    out = []
    for q in task.questions:
        text = build_prompt(q, task.shots["toy"][:k_shot], task.descriptions["toy"], tok, scoring)
        context = text.rstrip()
        ctx = tok(context, add_special_tokens=False)["input_ids"]
        lls = []
        for c in ("ABCDEF"[:len(q.choices)] if scoring == "letter" else q.choices):
            ids = tok(text + delim + c, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            lls.append(sum(float(logp[t - 1, ids[t]]) for t in range(len(ctx), len(ids))))
        out.append(lls)
    return out


@pytest.mark.parametrize("chat_delimiter", ["none", "space"])
@pytest.mark.parametrize("letter_tokens,scoring", [(True, "letter"), (False, "letter"), (True, "cloze")],
                         ids=["one-token-letters", "two-token-letters", "cloze"])
def test_multiturn_lm_eval_loglik_by_hand(letter_tokens, scoring, chat_delimiter):
    """chat_format="multiturn" + tokenization="lm_eval": the shared "\\n" of the generation prompt is read in
    the same row as the letters, and the numbers equal one-sequence-per-choice forwards, with the bare answer
    (definitions §5) and with lm-eval 0.4.5's " A"."""
    model, tok = tiny_model("llama", seed=7), tiny_tokenizer(letter_tokens, chat_template=True)
    model.config.dormant_source = {"name": "tiny-instruct", "variant": "instruct"}
    task = toy_task(5)
    res = evaluate(model, tok, task, k_shot=2, tokenization="lm_eval", chat_delimiter=chat_delimiter,
                   scoring=scoring, batch_tokens=400, progress=False)
    assert res.chat_template
    expect = chat_by_hand(model, tok, task, 2, scoring, "" if chat_delimiter == "none" else " ")
    for g, e in zip(res.predictions["loglik"].to_list(), expect):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)
    text = build_prompt(task.questions[0], task.shots["toy"][:2], task.descriptions["toy"], tok, scoring)
    assert res.predictions["n_tokens"][0] == len(tok(text.rstrip(), add_special_tokens=False)["input_ids"])
    bos_first = evaluate(model, tok, task, k_shot=2, scoring=scoring, chat_delimiter=chat_delimiter, batch_tokens=400,
                         progress=False)
    if scoring == "letter":  # the newline's log-probability is shared by every choice: same predictions
        assert bos_first.predictions["predicted"].to_list() == res.predictions["predicted"].to_list()


@pytest.mark.slow
def test_logliks_equal_lm_eval_on_smollm2(zoo_model):
    """Our evaluator under the paper protocol (multiturn, lm_eval tokenization) reproduces the log-likelihoods
    lm-evaluation-harness 0.4.5 returned on smollm2-135m-instruct (tests/fixtures/lm_eval_chat.json), chat
    and plain, letters and cloze."""
    d = json.loads(LM_EVAL_FIXTURE.read_text())
    q = lambda x: make_question(x["id"], x["task"], x["question"], x["choices"], x["answer"])
    questions = {x["id"]: q(x) for x in d["questions"]}
    shots = {t: [q(x) for x in s] for t, s in d["shots"].items()}
    model, tok = zoo_model("smollm2-135m-instruct")
    worst = 0.0
    for case in [c for c in d["cases"] if c["model"] == "smollm2-135m-instruct"]:
        data = TaskData("fixture", [questions[w["id"]] for w in case["questions"]], shots, d["descriptions"])
        res = evaluate(model, tok, data, k_shot=case["k_shot"], chat_template=case["chat"], tokenization="lm_eval",
                       chat_delimiter="space",
                       scoring=case["scoring"], progress=False)
        for got, want in zip(res.predictions["loglik"].to_list(), case["questions"]):
            ref = [c["loglik"] for c in want["choices"]]
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4, err_msg=f"{case} {want['id']}")
            worst = max(worst, float(np.abs(np.subtract(got, ref)).max()))
    print(f"max |ours - lm-eval| = {worst:.2e} nats ({LM_EVAL_FIXTURE.name})")


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_evaluate_under_ablation(family):
    model, tok = tiny_model(family, seed=2), tiny_tokenizer()
    task = toy_task()
    base = evaluate(model, tok, task, k_shot=1, progress=False)
    with ablate(model, "random", p=1.0) as ab:
        zeroed = evaluate(model, tok, task, k_shot=1, progress=False)
    assert ab.zeroed_fraction == 1.0 and ab.mask.shape[0] == len(task.questions)
    diff = np.abs(np.concatenate(zeroed.predictions["loglik"].to_list()) -
                  np.concatenate(base.predictions["loglik"].to_list()))
    assert diff.max() > 1e-3
    with ablate(model, "ahon_ln", threshold=-1.0) as ab:  # ahon_ln >= 0: no head is below -1
        same = evaluate(model, tok, task, k_shot=1, progress=False)
    assert ab.zeroed_fraction == 0.0 and ab.mask.size > 0
    np.testing.assert_allclose(np.concatenate(same.predictions["loglik"].to_list()),
                               np.concatenate(base.predictions["loglik"].to_list()), rtol=1e-6, atol=1e-6)
    after = evaluate(model, tok, task, k_shot=1, progress=False)  # nothing leaks out of the block
    assert after.predictions.equals(base.predictions)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_calibrate_scores_equal_score_heads(family):
    model, tok = tiny_model(family, seed=4), tiny_tokenizer()
    task = toy_task(9)
    plain = evaluate(model, tok, task, k_shot=2, batch_tokens=300, progress=False)
    res = evaluate(model, tok, task, k_shot=2, calibrate=True, batch_tokens=300, progress=False)
    # recording changes no prediction; its logliks come from the score kernel (fused_cpu: another summation
    # order than SDPA's), equal to float32 rounding
    assert res.predictions.drop("loglik").equals(plain.predictions.drop("loglik"))
    np.testing.assert_allclose(np.concatenate(res.predictions["loglik"].to_list()),
                               np.concatenate(plain.predictions["loglik"].to_list()), rtol=1e-6, atol=1e-6)
    texts = [build_prompt(q, task.shots["toy"][:2], task.descriptions["toy"]) for q in task.questions]
    seqs = [p for p, _ in encode(tok, texts, [[" A"]] * len(texts), chat=False)]
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    ref = score_heads(model, seqs).sort(["example", "layer", "head"]).select(score_keys()).to_numpy()
    assert res.scores.shape == (len(seqs), L, H, len(score_keys()))
    np.testing.assert_allclose(res.scores.numpy().reshape(-1, len(score_keys())), ref, rtol=1e-5, atol=1e-7)


def test_mmlu_fixture_through_loader_and_evaluator(tmp_path):
    root = write_mmlu(tmp_path / "mmlu")
    model, tok = tiny_model("qwen2", seed=5), tiny_tokenizer()
    data = load_task("mmlu", mmlu_dir=root, limit=3)
    res = evaluate(model, tok, data, k_shot=5, progress=False)
    p = res.predictions
    assert p.height == 6 and p["task"].unique().sort().to_list() == ["mmlu/astronomy", "mmlu/high_school_physics"]
    assert res.chance == 0.25 and p["n_choices"].unique().to_list() == [4]
    assert all(len(ll) == 4 and np.isfinite(ll).all() for ll in p["loglik"].to_list())
    q = data.questions[0]
    text = build_prompt(q, data.shots[q.task][:5], data.descriptions[q.task])
    assert text.startswith("The following are multiple choice questions (with answers) about astronomy.\n\n"
                           "astronomy dev question 0")
    assert text.count("Answer:") == 6
    assert p["n_tokens"][0] == len(text) + 1 - 5  # chars + BOS; the shots' five " X" are one token each


def test_cli_eval_end_to_end(tmp_path, capsys):
    """``dormant eval`` on a saved tiny model directory and an MMLU fixture, with calibration output."""
    model, tok = tiny_model("llama", seed=6), tiny_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    root = write_mmlu(tmp_path / "mmlu")
    out, cal = tmp_path / "p.parquet", tmp_path / "c.parquet"
    assert main(["eval", "--model", str(tmp_path / "m"), "--task", "mmlu", "--mmlu-dir", str(root), "--k-shot", "1",
                 "--limit", "2", "--out", str(out), "--calibrate-out", str(cal)]) == 0
    text = capsys.readouterr().out
    assert "mmlu" in text and "all (micro)" in text and "0.250" in text
    p = pl.read_parquet(out)
    assert p.height == 4 and {"model", "dataset", "id", "correct", "loglik", "k_shot"} <= set(p.columns)
    c = pl.read_parquet(cal)
    assert c.height == 4 * 3 * 4 and set(c["example_id"]) == set(p["id"])


@pytest.mark.slow
def test_real_bigbench_task_end_to_end(zoo_model):
    """general_knowledge from the real sdist on smollm2-135m-instruct: chat template (multiturn), one-token
    letters, a hand check of one question, calibration scores and ablation."""
    from extract.data.tasks import LETTERS

    model, tok = zoo_model("smollm2-135m-instruct")
    data = load_task("general_knowledge", limit=8)
    assert len(data.questions) == 8 and all(len(q.choices) >= 4 for q in data.questions)
    res = evaluate(model, tok, data, k_shot=2, calibrate=True, progress=False)
    assert res.chat_template and res.n_questions == 8 and 0 <= res.accuracy <= 1
    assert res.scores.shape == (8, 30, 9, len(score_keys())) and torch.isfinite(res.scores).all()
    q = data.questions[0]
    text = build_prompt(q, data.shots[q.task][:2], data.descriptions[q.task], tok)
    assert text.startswith("<|im_start|>system") and text.endswith("Answer:<|im_end|>\n<|im_start|>assistant\n")
    assert text.count("<|im_start|>assistant\n") == 3  # multiturn: one per shot, then the generation prompt
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # chat_delimiter "none" (definitions §5): the bare letter right after the generation prompt
    letters = [tok(c, add_special_tokens=False)["input_ids"] for c in LETTERS[:len(q.choices)]]
    assert all(len(t) == 1 for t in letters)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
    np.testing.assert_allclose(res.predictions["loglik"][0].to_list(), [float(logp[t[0]]) for t in letters],
                               rtol=1e-4, atol=1e-4)
    with ablate(model, "random", p=0.5, seed=1):
        ablated = evaluate(model, tok, data, k_shot=2, progress=False)
    assert not np.allclose(ablated.predictions["loglik"][0].to_list(), res.predictions["loglik"][0].to_list())


def _pooled_ll(res):
    return np.concatenate(res.predictions["loglik"].to_list())


def _question_masks(res, ab):
    """Each question's ablation mask (layers, heads): every row of a question must carry the same one."""
    out = {}
    for q, m in zip(res.call_questions, ab.mask):
        assert q not in out or np.array_equal(out[q], m), f"question {q}: its rows ablated different heads"
        out[q] = m
    return [out[q] for q in range(res.n_questions)]


@pytest.mark.parametrize("family,window", [("llama", None), ("qwen2", None), ("gemma3", 256)])
def test_packed_rows_equal_one_row_per_choice(family, window):
    """Cloze choices of several tokens packed into one row per question (branches under a prepared mask)
    give the logliks, calibration scores, answer distributions and, under ablation, the masks and KL of one
    row per choice; a packed run has one row per question."""
    model, tok = tiny_model(family, seed=5, **({"sliding_window": window} if window else {})), tiny_tokenizer()
    task = toy_task(8)
    kw = dict(k_shot=1, scoring="cloze", batch_tokens=400, progress=False)
    packed = evaluate(model, tok, task, calibrate=True, keep_distributions=True, **kw)
    rows = evaluate(model, tok, task, calibrate=True, keep_distributions=True, pack=False, **kw)
    assert len(packed.call_questions) == len(task.questions) < len(rows.call_questions)
    np.testing.assert_allclose(_pooled_ll(packed), _pooled_ll(rows), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_pooled_ll(packed), np.concatenate(by_hand(model, tok, task, 1, "cloze")),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed.scores, rows.scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(packed.answer_logp, rows.answer_logp, rtol=1e-5, atol=1e-5)
    tau = float(np.quantile(packed.scores[..., score_keys().index("awft")], 0.7))  # awft > tau: inactive
    for fn, opts in [("awft", dict(threshold=tau)), ("random", dict(p=0.3, seed=1))]:
        with ablate(model, fn, **opts) as ab_p:
            a = evaluate(model, tok, task, reference=packed, **kw)
        with ablate(model, fn, **opts) as ab_r:
            b = evaluate(model, tok, task, reference=rows, pack=False, **kw)
        masks = _question_masks(a, ab_p)
        assert any(m.any() for m in masks) and not all(m.all() for m in masks)
        for m, n in zip(masks, _question_masks(b, ab_r)):
            np.testing.assert_array_equal(m, n)
        np.testing.assert_allclose(_pooled_ll(a), _pooled_ll(b), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a.predictions["kl"], b.predictions["kl"], rtol=1e-4, atol=1e-6)


def test_cloze_calibration_scores_the_shared_prompt():
    """Calibration scores of a cloze question are its heads' scores on the prompt and the tokens its
    continuations share (score_heads on that prefix alone), not on any choice's own tokens; a model whose
    sliding window is shorter than a packed row falls back to one row per choice with the same scores."""
    from extract.evaluate import _common_prefix, encode_questions

    task = toy_task(6)
    for window in (256, 8):
        model, tok = tiny_model("gemma3", seed=6, sliding_window=window), tiny_tokenizer()
        res = evaluate(model, tok, task, k_shot=1, scoring="cloze", calibrate=True, progress=False)
        assert (len(res.call_questions) == len(task.questions)) == (window == 256)
        prefixes = []
        for prompt, conts in encode_questions(model, tok, task, k_shot=1, chat=False, scoring="cloze"):
            c = min(_common_prefix(conts), min(map(len, conts)) - 1)
            prefixes.append(prompt + conts[0][:c])
        ref = score_heads(model, prefixes).sort(["example", "layer", "head"]).select(score_keys()).to_numpy()
        np.testing.assert_allclose(res.scores.numpy().reshape(-1, len(score_keys())), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_packed_rows_on_a_real_model(zoo_model):
    """SmolLM2 (chat template, lm_eval tokenization: its continuations share a "\\n") on the default suite's
    tasks: packed rows equal one row per choice, plain and under ablation."""
    from extract.sweep import load_suite

    model, tok = zoo_model("smollm2-135m-instruct")
    data = load_suite(["capitals", "antonyms"], limit=3, seed=0, name="relations", progress=False)
    kw = dict(k_shot=0, tokenization="lm_eval", scoring="cloze", progress=False)
    packed = evaluate(model, tok, data, keep_distributions=True, **kw)
    rows = evaluate(model, tok, data, keep_distributions=True, pack=False, **kw)
    np.testing.assert_allclose(_pooled_ll(packed), _pooled_ll(rows), rtol=1e-5, atol=1e-4)
    with ablate(model, "random", p=0.2) as ab_p:
        a = evaluate(model, tok, data, reference=packed, **kw)
    with ablate(model, "random", p=0.2) as ab_r:
        b = evaluate(model, tok, data, reference=rows, pack=False, **kw)
    for m, n in zip(_question_masks(a, ab_p), _question_masks(b, ab_r)):
        np.testing.assert_array_equal(m, n)
    np.testing.assert_allclose(_pooled_ll(a), _pooled_ll(b), rtol=1e-5, atol=1e-4)
