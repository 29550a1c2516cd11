"""The paired bootstrap over questions (definitions §5) against direct computations on hand-made
per-question results: point estimates equal the plain rules, intervals equal an explicit resampling loop,
pairing cancels shared noise, and the KL budget rule."""
import numpy as np
import polars as pl
import pytest

from analysis.core import bootstrap
from analysis.sweep import stats, uncertainty

FRACTIONS = (0.0, 0.1, 0.2)


def question_frame(n=60, seed=1):
    """Two models, three functions (random, awft, ahon_ln) with known per-question outcomes."""
    rng = np.random.default_rng(seed)
    rows = []
    for model, skill in (("m1", 0.7), ("m2", 0.8)):
        base = rng.random(n) < skill
        for fn, drop, zero in (("random", 0.15, 10), ("awft", 0.05, 4), ("ahon_ln", 0.01, 12)):
            for p in FRACTIONS:
                k = round(p * 10)
                flip = rng.random(n) < drop * k if p else np.zeros(n, bool)
                correct = base & ~flip
                for q in range(n):
                    rows.append((model, "suite", fn, p, f"q{q:03d}", bool(correct[q]), 0.02 * k * (1 + q % 3),
                                 0.01 * k, int(zero * k * (1 + q % 2)), 100))
    return pl.DataFrame(rows, schema=["model", "task", "score_fn", "target_fraction", "question", "correct", "kl",
                                      "kl_choices", "zeroed", "triples"], orient="row")


def aggregate(q: pl.DataFrame) -> pl.DataFrame:
    """The ablation_results point estimates computed directly."""
    return (q.group_by("model", "task", "score_fn", "target_fraction", maintain_order=True)
            .agg((100 * pl.col("zeroed").sum() / pl.col("triples").sum()).alias("realized_percent"),
                 (100 * pl.col("correct").cast(pl.Float64).mean()).alias("accuracy"),
                 pl.col("kl").mean().alias("kl_mean")))


def test_weights_are_a_with_replacement_resample():
    w = bootstrap.weights(50, 400, seed=3)
    assert w.shape == (400, 50) and (w.sum(1) == 50).all() and (w >= 0).all()
    assert abs(w.mean() - 1) < 1e-12 and 0.85 < w.var() < 1.15  # multinomial(n, 1/n): variance 1 - 1/n
    assert (bootstrap.weights(50, 400, seed=3) == w).all() and not (bootstrap.weights(50, 400, seed=4) == w).all()


def test_point_estimates_equal_the_plain_rules():
    q = question_frame()
    cv = bootstrap.curves(q, n_boot=50)
    agg = aggregate(q)
    for (m, f), c in cv.items():
        g = agg.filter((pl.col("model") == m) & (pl.col("score_fn") == f)).sort("target_fraction")
        np.testing.assert_allclose(c.x[0], g["realized_percent"].to_numpy())
        np.testing.assert_allclose(c.accuracy[0], g["accuracy"].to_numpy())
        np.testing.assert_allclose(c.kl[0], g["kl_mean"].to_numpy())
    t2 = uncertainty.table2(cv)
    plain = stats.table2(agg.with_columns(pl.lit(None, pl.Float64).alias("threshold"), pl.lit(60).alias("n_questions")))
    for col in ("awft", "best_other", "best_other_fn", "best_fn"):
        assert t2[col].to_list() == pytest.approx(plain[col].to_list()) if col in ("awft", "best_other") \
            else t2[col].to_list() == plain[col].to_list()
    ranks = uncertainty.auc_ranks(cv)
    plain_ranks = stats.auc_ranks(agg.with_columns(pl.lit(0.0).alias("threshold"), pl.lit(60).alias("n_questions")))
    assert ranks.select("model", "score_fn", "rank").sort("model", "score_fn").rows() == \
        plain_ranks.select("model", "score_fn", "rank").sort("model", "score_fn").rows()
    assert (ranks["rank_low"] <= ranks["rank"]).all() and (ranks["rank"] <= ranks["rank_high"]).all()


def test_intervals_equal_an_explicit_resampling_loop():
    q = question_frame(n=40)
    n_boot, seed = 200, 7
    cv = bootstrap.curves(q, n_boot=n_boot, seed=seed)
    w = bootstrap.weights(40, n_boot, seed)  # question ids q000..q039 sort in index order
    g = q.filter((pl.col("model") == "m1") & (pl.col("score_fn") == "awft") & (pl.col("target_fraction") == 0.2))
    base = q.filter((pl.col("model") == "m1") & (pl.col("score_fn") == "random") & (pl.col("target_fraction") == 0))
    c, b = g.sort("question")["correct"].to_numpy(), base.sort("question")["correct"].to_numpy()
    acc, delta = [], []
    for r in range(n_boot):  # draw the resampled list of questions and average, the textbook way
        idx = np.repeat(np.arange(40), w[r])
        acc.append(100 * c[idx].mean())
        delta.append(100 * (c[idx].mean() - b[idx].mean()))
    pts = bootstrap.point_intervals(cv).filter((pl.col("model") == "m1") & (pl.col("score_fn") == "awft")
                                               & (pl.col("target_fraction") == 0.2)).row(0, named=True)
    assert (pts["accuracy_ci_low"], pts["accuracy_ci_high"]) == pytest.approx(tuple(np.percentile(acc, [2.5, 97.5])))
    assert (pts["delta_ci_low"], pts["delta_ci_high"]) == pytest.approx(tuple(np.percentile(delta, [2.5, 97.5])))
    assert pts["delta_ci_high"] - pts["delta_ci_low"] < pts["accuracy_ci_high"] - pts["accuracy_ci_low"]  # paired
    base_row = bootstrap.point_intervals(cv).filter((pl.col("model") == "m1") & (pl.col("score_fn") == "awft")
                                                    & (pl.col("target_fraction") == 0)).row(0, named=True)
    assert base_row["delta_ci_low"] == base_row["delta_ci_high"] == 0  # the same answers: no paired noise


def test_within_budget_is_applied_inside_each_replicate():
    q = question_frame(n=40)
    cv = bootstrap.curves(q, n_boot=100, seed=2)
    v = uncertainty.budget_values(cv, "m2", "awft")
    c, base = cv[("m2", "awft")], cv[("m2", "random")].accuracy[:, 0]
    want = [stats.within_budget(c.x[r], c.accuracy[r], base[r]) for r in range(101)]
    assert v.tolist() == pytest.approx(want)
    t2 = uncertainty.table2(cv)
    row = t2.filter(pl.col("model") == "m2").row(0, named=True)
    gain = uncertainty.budget_values(cv, "m2", row["best_other_fn"]) - v
    assert (row["gain_ci_low"], row["gain_ci_high"]) == pytest.approx(tuple(np.percentile(gain[1:], [2.5, 97.5])))
    assert row["gain_ci_has_0"] == (row["gain_ci_low"] <= 0 <= row["gain_ci_high"])
    avg = t2.filter(pl.col("model") == "average").row(0, named=True)
    assert avg["awft"] == pytest.approx(t2.filter(pl.col("model") != "average")["awft"].mean())


def test_kl_budget_rule():
    x = np.array([[0.0, 10.0, 20.0]])
    cv = {("m", "f"): bootstrap.Curve(np.array(FRACTIONS), x, np.array([[50.0, 50, 50]]), np.array([[0.0, 0.05, 0.15]]),
                                      np.zeros((1, 3)))}
    # mean KL crosses 0.1 nats halfway between x=10 (0.05) and x=20 (0.15)
    assert uncertainty.budget_values(cv, "m", "f", "kl", 0.1)[0] == pytest.approx(15.0)
    assert uncertainty.budget_values(cv, "m", "f", "kl", 0.2)[0] == pytest.approx(0.0)  # never reached: the rule's 0
    with pytest.raises(ValueError, match="metric"):
        uncertainty.budget_values(cv, "m", "f", "loss")


def test_questions_must_match_across_fractions():
    q = question_frame(n=10)
    bad = q.filter(~((pl.col("score_fn") == "awft") & (pl.col("target_fraction") == 0.1) & (pl.col("question") == "q003")))
    with pytest.raises(ValueError, match="same questions"):
        bootstrap.curves(bad, n_boot=5)


def test_table2_display_cells():
    from analysis.render import with_ci
    from analysis.sweep.report import table2_display

    assert with_ci(4.567, 2.1, 7.94) == "4.6 [2.1, 7.9]" and with_ci(3.0, None, None) == "3.0" and with_ci(None, 1, 2) == ""
    t2 = uncertainty.table2(bootstrap.curves(question_frame(n=30), n_boot=40))
    shown = table2_display(t2)
    assert shown.columns == ["model", "awft", "best other", "gain", "best other fn", "best fn"]
    for r, s in zip(t2.iter_rows(named=True), shown.iter_rows(named=True)):
        assert s["awft"] == with_ci(r["awft"], r["awft_ci_low"], r["awft_ci_high"])
        assert s["gain"].endswith("(ns)") == bool(r["gain_ci_has_0"])


def test_candidate_table_against_direct_counts():
    from analysis.sweep.candidates import candidates_table

    rng = np.random.default_rng(0)
    rows = []
    for task, p, k in (("easy", 0.9, 4), ("hard", 0.3, 4), ("two", 0.55, 2)):
        for c in rng.random(80) < p:
            rows.append(("m", task, "cloze", 0, bool(c), k))
    frame = pl.DataFrame(rows, schema=["model", "task", "scoring", "k_shot", "correct", "n_choices"], orient="row")
    t = candidates_table(frame, n_boot=300)
    for r in t.iter_rows(named=True):
        g = frame.filter(pl.col("task") == r["task"])
        acc = 100 * g["correct"].mean()
        chance = 100 * (1 / g["n_choices"]).mean()
        assert r["accuracy"] == pytest.approx(acc) and r["chance"] == pytest.approx(chance)
        assert r["ci_low"] < acc < r["ci_high"] and r["n_questions"] == 80
        assert r["qualifies"] == (r["above_ci_low"] >= 15)
    assert t.filter(pl.col("task") == "easy")["qualifies"][0] and not t.filter(pl.col("task") == "hard")["qualifies"][0]


def test_a_function_that_zeroes_no_head_has_no_rank():
    """avvn_ln on a model with one KV head per layer is 1.0 for every head: τ = 1 selects nothing, the curve is
    one point, and it must not rank first by its (baseline) accuracy."""
    q = question_frame(n=30)
    flat = q.filter(pl.col("score_fn") == "awft").with_columns(pl.lit("avvn_ln").alias("score_fn"),
                                                            pl.lit(0, pl.Int64).alias("zeroed"))
    base = q.filter((pl.col("score_fn") == "random") & (pl.col("target_fraction") == 0))
    flat = flat.join(base.select("model", "question", pl.col("correct").alias("c0")), on=["model", "question"]).with_columns(
        pl.col("c0").alias("correct"), pl.lit(0.0).alias("kl"), pl.lit(0.0).alias("kl_choices")).drop("c0")
    cv = bootstrap.curves(pl.concat([q, flat.select(q.columns)]), n_boot=30)
    ranks = uncertainty.auc_ranks(cv)
    row = ranks.filter(pl.col("score_fn") == "avvn_ln")
    assert row["rank"].to_list() == [None, None] and row["auc"].to_list() == [None, None]
    assert sorted(ranks.filter(pl.col("model") == "m1")["rank"].drop_nulls().to_list()) == [1, 2, 3]
    t2 = uncertainty.table2(cv)
    assert "avvn_ln" not in t2["best_fn"].to_list()  # within budget it zeroes 0%, never the best
    from analysis.sweep.figures import figure3
    figure3(ranks).to_json()  # drawn without the unranked function
