"""Within-budget rule, AUC, Table 2, ranks and overlaps on hand-made curves with known answers."""
import numpy as np
import polars as pl
import pytest

from analysis.sweep.stats import (auc_ranks, normalised_auc, rank_correlation, selection_overlap, table2,
                               top_k_iou, within_budget)
from analysis.core.thresholds import stability, threshold, thresholds

BASE = 50.0  # budget line at 49


@pytest.mark.parametrize("x,y,want", [
    ([0, 10, 20], [50, 50, 48], 15.0),                       # crossing inside the last segment
    ([0, 10, 20], [50, 49, 47], 10.0),                       # exactly on a point
    ([0, 5, 10, 15, 20], [50, 48, 50, 48, 47], 12.5),       # several crossings: the last one
    ([0, 10, 20], [50, 49.5, 49.2], 0.0),                   # never crosses -> 0 (definitions §5, to the letter)
    ([20, 0, 10], [48, 50, 50], 15.0),                       # unsorted input is sorted by x first
    ([0, 10, 20], [50, 49, 49], 20.0),                       # running along the line: the last point on it
    ([0, 10, 20], [48, 48, 47], 0.0),                        # always below: no crossing either
    ([0, 4, 8], [48, 50, 50], 2.0),                          # crossing upward counts as a crossing
])
def test_within_budget(x, y, want):
    assert within_budget(x, y, BASE) == pytest.approx(want)


def test_normalised_auc():
    assert normalised_auc([0, 10, 20], [50, 40, 40]) == pytest.approx((450 + 400) / 20)
    assert normalised_auc([10, 0], [40, 50]) == pytest.approx(45)
    assert np.isnan(normalised_auc([0, 0], [40, 50]))  # zeroes no head at any fraction: no curve, no AUC


def results_frame():
    rows = []
    curves = {  # (realized %, accuracy) at 3 target fractions; random at fraction 0 is the baseline
        "m1": {"random": [(0, 50), (10, 45), (20, 40)], "awft": [(0, 50), (4, 48), (8, 46)],
               "ahon_ln": [(0, 50), (10, 50), (20, 48)], "aeqd": [(0, 50), (10, 49), (20, 45)]},
        "m2": {"random": [(0, 60), (10, 50), (20, 45)], "awft": [(0, 60), (6, 59), (12, 58)],
               "ahon_ln": [(0, 60), (10, 59.5), (20, 58)], "aeqd": [(0, 60), (10, 60), (20, 57)]},
    }
    for m, fns in curves.items():
        for fn, pts in fns.items():
            for p, (x, y) in zip((0.0, 0.1, 0.2), pts):
                rows.append((m, "t", fn, p, 0.0, float(x), float(y), 100))
    return pl.DataFrame(rows, schema=["model", "task", "score_fn", "target_fraction", "threshold",
                                      "realized_percent", "accuracy", "n_questions"], orient="row")


def test_table2_and_ranks():
    r = results_frame()
    t2 = table2(r)
    assert t2.columns == ["model", "awft", "best_other", "best_other_fn", "best_fn"]
    m1 = t2.row(0, named=True)
    # awft on m1: 48 at x=4 is below 49: crossing at x=2; ahon_ln: (10, 50)->(20, 48) crosses at 15
    assert m1["awft"] == pytest.approx(2.0) and m1["best_other"] == pytest.approx(15.0)
    assert m1["best_other_fn"] == "ahon_ln" and m1["best_fn"] == "ahon_ln"
    m2 = t2.row(1, named=True)  # aeqd (10,60)->(20,57) crosses 59 at 13.33; ahon_ln 59.5->58 at 13.33 too
    assert m2["awft"] == pytest.approx(6.0)
    assert m2["best_other"] == pytest.approx(10 + 10 / 3)
    avg = t2.row(2, named=True)
    assert avg["model"] == "average" and avg["awft"] == pytest.approx(4.0)
    ranks = auc_ranks(r)
    m1r = {f: k for _, f, _, k in ranks.filter(pl.col("model") == "m1").iter_rows()}
    assert m1r["ahon_ln"] == 1 and m1r["random"] == 4
    assert set(ranks.columns) == {"model", "score_fn", "auc", "rank"}
    rc = rank_correlation(ranks)
    assert rc.filter(pl.col("model_a") == pl.col("model_b"))["rho"].to_list() == [1.0, 1.0]
    assert top_k_iou(ranks, k=2)["iou"].to_list() == [1.0, 1.0, 1.0]  # both: {ahon_ln, aeqd}
    hand = pl.DataFrame({"model": ["a"] * 4 + ["b"] * 4, "score_fn": ["f1", "f2", "f3", "random"] * 2,
                         "auc": [3.0, 2.0, 1.0, 9.0, 1.0, 2.0, 3.0, 9.0]})
    iou = top_k_iou(hand, k=2)  # a: {f1, f2}, b: {f3, f2} -> 1/3 (random never counts)
    assert iou.filter((pl.col("model_a") == "a") & (pl.col("model_b") == "b"))["iou"][0] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="several tasks"):
        table2(pl.concat([r, r.with_columns(pl.lit("u").alias("task"))]))


def test_selection_overlap():
    sel = pl.DataFrame({"model": ["m"] * 5, "score_fn": ["awft", "awft", "ahon", "ahon", "ahon"],
                        "target_fraction": [0.1] * 5, "example": [0, 0, 0, 0, 1],
                        "layer": [0, 1, 0, 2, 0], "head": [0, 0, 0, 0, 0]})
    ov = selection_overlap(sel)
    row = ov.filter((pl.col("fn_a") == "awft") & (pl.col("fn_b") == "ahon")).row(0, named=True)
    assert row["iou"] == pytest.approx(1 / 4) and row["precision"] == pytest.approx(1 / 2)
    back = ov.filter((pl.col("fn_a") == "ahon") & (pl.col("fn_b") == "awft")).row(0, named=True)
    assert back["precision"] == pytest.approx(1 / 3)


def test_thresholds_follow_spec():
    v = np.arange(101, dtype=float)  # quantile p of 0..100 is 100 p
    assert threshold(v, 0.1, "ahon_ln") == pytest.approx(10.0)
    assert threshold(v, 0.1, "awft") == pytest.approx(90.0)  # (1 - p)-quantile for the '>' functions
    assert threshold(np.array([0.0, 1.0]), 0.25, "aeqd") == pytest.approx(0.25)  # linear interpolation
    df = pl.DataFrame({"model": ["m"] * 101 + ["m"] * 101, "task": ["a"] * 101 + ["b"] * 101,
                       "awft": np.r_[v, 2 * v], "ahon_ln": np.r_[v, v + 1]})
    th = thresholds(df, fractions=(0.0, 0.15), score_fns=("awft", "ahon_ln"))
    assert th.height == 2 * 2 * 2 and th["n_scores"].unique().to_list() == [101]
    st = stability(th, 0.15)
    aw = st.filter(pl.col("score_fn") == "awft").row(0, named=True)
    assert aw["ratio"] == pytest.approx(2.0) and aw["n_tasks"] == 2
