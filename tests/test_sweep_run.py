"""The sweep's per-question records (definitions §5): they reproduce every ablation_results value, the KL
equals an independent computation from the kept answer distributions, and batching does not change them."""
import numpy as np
import polars as pl
import pytest
import torch

from extract.data.tasks import TaskData, make_question
from extract.engine.ablation import ablate
from extract.evaluate import evaluate
from extract.sweep import run_sweep


def toy_task(n=6):
    qs = [make_question(f"toy/{i}", "toy", f"What is {i} plus {i % 3}?",
                        [str(i + i % 3 + d) for d in range(-1, 2 + i % 3)], 1) for i in range(n)]
    return TaskData("toy", qs, {"toy": []}, {"toy": ""})


@pytest.fixture(scope="module")
def tiny():
    from tiny import tiny_model
    from tiny_tokenizer import tiny_tokenizer

    return tiny_model("llama"), tiny_tokenizer()


@pytest.mark.parametrize("scoring", ["letter", "cloze"])
def test_questions_reproduce_the_results(tiny, scoring):
    model, tok = tiny
    res = run_sweep(model, tok, toy_task(), score_fns=("awft", "ahon_ln"), fractions=(0.0, 0.25, 0.5),
                    scoring=scoring, n_boot=50, progress=False)
    q = res.questions
    agg = (q.group_by("score_fn", "target_fraction")
           .agg((100 * pl.col("correct").cast(pl.Float64).mean()).alias("acc"),
                (100 * pl.col("zeroed").sum() / pl.col("triples").sum()).alias("realized"),
                pl.col("kl").mean().alias("kl"), pl.len().alias("n")))
    r = res.results.join(agg, on=["score_fn", "target_fraction"])
    assert r.height == res.results.height == 1 + 3 * 2 + 2
    np.testing.assert_allclose(r["accuracy"], r["acc"])
    np.testing.assert_allclose(r["realized_percent"], r["realized"], atol=1e-9)
    np.testing.assert_allclose(r["kl_mean"], r["kl"])
    assert (r["n"] == 6).all() and (r["chance"] == 100 * np.mean([1 / len(x.choices) for x in toy_task().questions])).all()
    assert (r["accuracy_ci_low"] <= r["accuracy"]).all() and (r["accuracy"] <= r["accuracy_ci_high"]).all()
    at0 = r.filter(pl.col("target_fraction") == 0)
    assert (at0["kl_mean"] == 0).all() and (at0["delta_ci_low"] == 0).all() and (at0["delta_ci_high"] == 0).all()
    ablated = q.filter(pl.col("target_fraction") > 0)
    assert (ablated["zeroed"] > 0).any() and (ablated["kl"] > 0).any() and (ablated["kl"] >= -1e-12).all()


def test_kl_against_an_independent_computation(tiny):
    model, tok = tiny
    data = toy_task()
    base = evaluate(model, tok, data, k_shot=0, keep_distributions=True, progress=False)
    # letter scoring, single-token letters: the answer distribution is where the letters are read
    for i, row in enumerate(base.predictions.iter_rows(named=True)):
        letters = [tok(" " + c, add_special_tokens=False)["input_ids"] for c in "ABCDEF"[:row["n_choices"]]]
        if all(len(t) == 1 for t in letters):
            got = [float(base.answer_logp[i, t[0]]) for t in letters]
            assert got == pytest.approx(row["loglik"], abs=1e-5)
    for batch_tokens in (8192, 16):  # batched and padded vs one row per forward
        with ablate(model, "random", p=0.3, seed=1):
            abl = evaluate(model, tok, data, k_shot=0, reference=base, keep_distributions=True,
                           batch_tokens=batch_tokens, progress=False)
        want = torch.nn.functional.kl_div(abl.answer_logp.double(), base.answer_logp.double(), log_target=True,
                                          reduction="none").sum(-1)
        np.testing.assert_allclose(abl.predictions["kl"].to_numpy(), want.clamp_min(0).numpy(), rtol=1e-6, atol=1e-9)
        ll_a, ll_b = abl.predictions["loglik"].to_list(), base.predictions["loglik"].to_list()
        want_c = [float(torch.nn.functional.kl_div(torch.tensor(a).log_softmax(-1), torch.tensor(b).log_softmax(-1),
                                                   log_target=True, reduction="sum")) for a, b in zip(ll_a, ll_b)]
        np.testing.assert_allclose(abl.predictions["kl_choices"].to_numpy(), np.maximum(want_c, 0), rtol=1e-6,
                                   atol=1e-9)
        if batch_tokens == 8192:
            first = abl.predictions["kl"].to_numpy()
    np.testing.assert_allclose(abl.predictions["kl"].to_numpy(), first, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="keep_distributions"):
        evaluate(model, tok, data, k_shot=0, reference=abl.__class__(**{**abl.__dict__, "answer_logp": None}),
                 progress=False)


def test_kept_answer_distributions_do_not_hold_their_batch(tiny):
    """Each kept (vocab,) row is its own copy: a view would keep the batch's whole (kept positions, vocab)
    log-prob tensor alive until the evaluation ends; without keep_distributions nothing is extracted."""
    from extract.evaluate import _forward, _rows

    model, tok = tiny
    rows = _rows([1, 5, 7, 9], [[11], [12], [13]], 0, 0) + _rows([1, 6, 8], [[11, 4], [12, 4]], 1, 0)
    vocab = model.config.vocab_size
    _, kept = _forward(model, rows, 0, torch.device("cpu"), answers=True)
    firsts = [d for d in kept if d is not None]
    assert len(firsts) == 2 and all(d.shape == (vocab,) and d.untyped_storage().nbytes() == 4 * vocab for d in firsts)
    _, none = _forward(model, rows, 0, torch.device("cpu"))
    assert none == [None] * len(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_evaluation_agrees_with_the_calibration(tiny, dtype):
    """The sweep's plain evaluations (the cost unit) are checked against the calibration, and the record is
    the independent comparison of the two evaluations: float32 agrees to 1e-5 nats with no prediction changed,
    bf16 within the bound on the median difference (its kernels round differently)."""
    from extract.sweep import GROSS_LOGLIK_DIFF

    model, tok = tiny
    model = model.to(dtype)
    try:
        res = run_sweep(model, tok, toy_task(), score_fns=("awft",), fractions=(0.0, 0.5), scoring="cloze",
                        n_boot=20, progress=False)
        kw = dict(scoring="cloze", k_shot=0, progress=False)
        cal = evaluate(model, tok, toy_task(), calibrate=True, **kw)
        plain = evaluate(model, tok, toy_task(), **kw)
    finally:
        model.float()
    got = res.timing["plain_vs_calibration"]
    diff = max(abs(x - y) for a, b in zip(cal.predictions["loglik"], plain.predictions["loglik"]) for x, y in zip(a, b))
    assert got["max_loglik_diff"] >= diff - 1e-12 and got["median_loglik_diff"] <= GROSS_LOGLIK_DIFF
    if dtype == torch.float32:
        assert got["prediction_flips"] == 0 and got["max_loglik_diff"] < 1e-5
    else:
        assert got["max_loglik_diff"] > 0  # 16-bit: the two kernels do differ (else the check would be vacuous)
