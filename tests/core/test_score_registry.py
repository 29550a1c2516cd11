"""The score-function registry: one definition of the raw stats' order, inactive sides on any array type, and a
user-registered 17th function scored, thresholded, ablated and stored with no other change."""
import numpy as np
import polars as pl
import pytest
import torch

from analysis.core import score_functions as sf
from analysis.core.score_functions import (RAW_STAT_KEYS, ScoreFunction, get_score_function, register_score_function,
                                           registered, score_keys, unregister_score_function)
from analysis.core.thresholds import thresholds
from analysis.database import build, connect, ingest, query
from extract.engine import attention, capture
from extract.engine.ablation import ablate
from extract.engine.scores import raw_head_stats, score_heads, scores_from_stats
from fakes import fake_inputs, fake_shard
from tiny import tiny_model

BUILTIN = ("awft", "awft_ln", "aeqd", "aeqd_ln", "ftvvn", "ftvvn_ln", "avvn", "avvn_ln", "lthon", "lthon_ln",
           "lthon_hn", "ahon", "ahon_ln", "afhon", "afhon_ln", "awls")
# entropy per unit of mean value norm, inactive when low; reads the entropy stat (needs the kernel's entropy pass)
EXTRA = ScoreFunction("aeqd_hn", "Avg Entropy per Value Norm", stat="entropy", inactive_side="below",
                      normalisation="head", norm_stat="v_norm")


@pytest.fixture
def extra():
    with registered(EXTRA) as fn:
        yield fn
    assert score_keys() == BUILTIN


def expected_extra(raw: torch.Tensor) -> np.ndarray:
    """aeqd_hn from raw stats ``(..., heads, n_stats)``, written out independently of the engine."""
    e = raw[..., RAW_STAT_KEYS.index("entropy")].numpy()
    vm = raw[..., RAW_STAT_KEYS.index("v_norm")].numpy()
    return np.where((e == 0) & (vm == 0), 1.0, e / vm)


def batch(seed=0, n=6, lo=6, hi=30):
    from extract.engine.scores import pad_right

    g = torch.Generator().manual_seed(seed)
    seqs = [[1] + torch.randint(3, 128, (int(L) - 1,), generator=g).tolist()
            for L in torch.randint(lo, hi, (n,), generator=g)]
    return seqs, *pad_right(seqs, 0, "cpu")


def test_builtins_keep_their_order_and_sides():
    assert score_keys() == BUILTIN
    assert [k for k in BUILTIN if get_score_function(k).inactive_side == "above"] == ["awft", "awft_ln", "awls"]
    assert [k for k in BUILTIN if get_score_function(k).needs_entropy] == ["aeqd", "aeqd_ln"]
    ln = get_score_function("lthon_ln")
    assert (ln.stat, ln.normalisation, ln.norm_stat) == ("o_last_norm", "layer", "o_norm")
    assert get_score_function("ahon_ln").norm_stat == "o_norm" and get_score_function("awft").unit == "probability"
    full = get_score_function("afhon_ln")  # normalised like ahon_ln: by the layer mean of the same stat
    assert (full.stat, full.normalisation, full.norm_stat, full.inactive_side) == ("o_full_norm", "layer",
                                                                                  "o_full_norm", "below")
    sink = get_score_function("awls")  # the learned sink's weight, inactive when high like awft
    assert (sink.stat, sink.normalisation, sink.unit) == ("p_sink", "none", "probability")


def test_raw_stat_order_is_defined_once():
    assert capture.RAW_STATS is sf.RAW_STATS
    assert RAW_STAT_KEYS == tuple(s.key for s in sf.RAW_STATS)
    # head_stats stacks by name: a missing or extra name is an error, not a silent shift
    with pytest.raises(ValueError):
        sf.ordered_stats({k: 0 for k in RAW_STAT_KEYS[:-1]})
    assert sf.ordered_stats({k: i for i, k in reversed(list(enumerate(RAW_STAT_KEYS)))}) == list(range(len(RAW_STAT_KEYS)))
    B, H, S, D = 2, 4, 5, 3
    out, value = torch.randn(B, H, S, D), torch.randn(B, 2, S, D)
    pf, ent = torch.rand(B, H, S, dtype=torch.float64), torch.rand(B, H, S, dtype=torch.float64)
    valid = torch.ones(B, S, dtype=torch.bool)
    W = torch.randn(7, H * D)  # an o_proj weight (d_model = 7)
    gram = torch.stack([W[:, h * D:(h + 1) * D].T @ W[:, h * D:(h + 1) * D] for h in range(H)])
    st = attention.head_stats(out, value, pf, ent, valid, torch.zeros(B, dtype=torch.long), torch.full((B,), S - 1),
                              gram)
    assert st.shape == (B, H, len(RAW_STAT_KEYS))
    full = torch.stack([(out[:, h] @ W[:, h * D:(h + 1) * D].T).norm(dim=-1).mean(-1) for h in range(H)], 1)
    torch.testing.assert_close(st[..., RAW_STAT_KEYS.index("o_full_norm")], full.double())
    torch.testing.assert_close(st[..., RAW_STAT_KEYS.index("entropy")], ent.mean(-1))
    torch.testing.assert_close(st[..., RAW_STAT_KEYS.index("o_last_norm")], out[:, :, -1].norm(dim=-1).double())


@pytest.mark.parametrize("side,op", [("above", np.greater), ("below", np.less)])
def test_is_inactive_on_floats_arrays_tensors_and_expressions(side, op):
    fn = ScoreFunction("x", "x", "p_first", side)
    x = np.array([0.1, 0.5, 0.9])
    want = op(x, 0.5)
    assert fn.is_inactive(0.9, 0.5) is bool(op(0.9, 0.5)) and fn.is_inactive(0.5, 0.5) is False
    np.testing.assert_array_equal(fn.is_inactive(x, 0.5), want)
    np.testing.assert_array_equal(fn.is_inactive(torch.tensor(x), 0.5).numpy(), want)
    got = pl.DataFrame({"s": x, "t": [0.5] * 3}).select(fn.is_inactive(pl.col("s"), pl.col("t")))["s"]
    np.testing.assert_array_equal(got.to_numpy(), want)
    assert fn.higher_is_inactive == (side == "above") and fn.inactive_when == (">" if side == "above" else "<")
    assert fn.sql_predicate("s.score", "t.threshold") == f"s.score {fn.inactive_when} t.threshold"


def test_register_rejects_duplicates_unknown_stats_and_bad_definitions():
    with pytest.raises(ValueError, match="already registered"):
        register_score_function(ScoreFunction("awft", "again", "p_first", "above"))
    with pytest.raises(ValueError, match="unknown raw stat"):
        register_score_function(ScoreFunction("new_fn", "n", "q_norm", "below"))
    with pytest.raises(ValueError, match="unknown raw stat"):
        register_score_function(ScoreFunction("new_fn", "n", "o_norm", "below", "head", "nope"))
    with pytest.raises(ValueError):
        ScoreFunction("new_fn", "n", "o_norm", "sideways")
    with pytest.raises(ValueError):
        ScoreFunction("new_fn", "n", "o_norm", "below", "head")  # head normalisation needs norm_stat
    with pytest.raises(ValueError):
        register_score_function(ScoreFunction("bad key", "n", "o_norm", "below"))
    with pytest.raises(ValueError):
        unregister_score_function("awft")
    with pytest.raises(AttributeError, match="score_keys"):  # constants that would go stale are gone
        sf.SCORE_KEYS
    with pytest.raises(ImportError):
        from analysis.core.score_functions import INACTIVE_WHEN  # noqa: F401
    assert score_keys() == BUILTIN


def test_extra_function_is_scored_thresholded_and_ablated(extra):
    assert score_keys() == BUILTIN + ("aeqd_hn",) and extra.needs_entropy
    model = tiny_model("qwen2", seed=13)
    seqs, ids, am = batch(8)
    df = score_heads(model, seqs)
    assert df.columns == ["example", "layer", "head", *BUILTIN, "aeqd_hn"]
    raw = raw_head_stats(model, seqs)  # (examples, layers, heads, n_stats)
    E, L, H, _ = raw.shape
    want = expected_extra(raw)
    got = df.sort("example", "layer", "head")["aeqd_hn"].to_numpy().reshape(E, L, H)
    np.testing.assert_array_equal(got, want)
    assert scores_from_stats(raw).shape[-1] == len(BUILTIN) + 1

    th = thresholds(df.with_columns(pl.lit("m").alias("model"), pl.lit("t").alias("task")), (0.0, 0.25))
    row = th.filter((pl.col("score_fn") == "aeqd_hn") & (pl.col("target_fraction") == 0.25))
    assert row.height == 1 and row["threshold"][0] == pytest.approx(np.quantile(want, 0.25))  # inactive below

    v = np.sort(want[:, 0].ravel())
    tau = float((v[v.size // 2 - 1] + v[v.size // 2]) / 2)  # between two scores: no ties at τ
    with ablate(model, "aeqd_hn", threshold=tau) as ab, torch.no_grad():
        model(input_ids=ids, attention_mask=am, use_cache=False)
        seen = ab._cap.stacked_stats()  # the stats each layer saw, upstream ablations included
    mask = ab.mask
    assert mask.shape == (E, L, H)
    np.testing.assert_array_equal(mask[:, 0], want[:, 0] < tau)  # layer 0: exact from the unablated stats
    np.testing.assert_array_equal(mask, expected_extra(seen) < tau)  # every layer, from what it saw
    assert 0 < mask[:, 0].sum() < mask[:, 0].size


def test_extra_function_is_stored_in_the_database(extra, tmp_path):
    parts, df = fake_inputs(tmp_path)  # shards carry a column per registered function, aeqd_hn included
    assert "aeqd_hn" in df.columns
    th = thresholds(df.rename({"dataset": "task"}), (0.0, 0.5))
    th.write_parquet(tmp_path / "th.parquet")
    build(tmp_path / "x.duckdb", tables={"thresholds": [tmp_path / "th.parquet"]}, **parts)
    con = connect(tmp_path / "x.duckdb", read_only=True)
    got = query(con, "SELECT example, layer, head, aeqd_hn FROM head_scores ORDER BY example, layer, head")
    np.testing.assert_array_equal(got["aeqd_hn"].to_numpy(), df.sort("example", "layer", "head")["aeqd_hn"].to_numpy())
    assert query(con, "SELECT * FROM score_functions WHERE score_fn = 'aeqd_hn'").rows() == [("aeqd_hn", "<")]
    assert query(con, "SELECT count(*) AS n FROM head_scores_long WHERE score_fn = 'aeqd_hn'")["n"][0] == df.height
    tau = th.filter((pl.col("score_fn") == "aeqd_hn") & (pl.col("target_fraction") == 0.5))["threshold"][0]
    summ = query(con, """SELECT fraction_inactive FROM head_summary WHERE score_fn = 'aeqd_hn'
                         AND target_fraction = 0.5 AND layer = 1 AND head = 2""")
    v = df.filter((pl.col("layer") == 1) & (pl.col("head") == 2))["aeqd_hn"].to_numpy()
    assert summ["fraction_inactive"][0] == pytest.approx(float((v < tau).mean()))
    con.close()


def test_function_registered_after_the_database_was_built_gets_its_column(tmp_path):
    parts, df = fake_inputs(tmp_path)
    db = tmp_path / "x.duckdb"
    ingest(db, **parts)
    with registered(EXTRA):
        shard = tmp_path / "s2.parquet"
        df2 = fake_shard(shard, model="m2", seed=1)
        ingest(db, shards=[shard])
    con = connect(db, read_only=True)
    got = query(con, "SELECT model, aeqd_hn FROM head_scores ORDER BY model, example, layer, head")
    assert got.filter(pl.col("model") == "m")["aeqd_hn"].is_null().all()
    np.testing.assert_array_equal(got.filter(pl.col("model") == "m2")["aeqd_hn"].to_numpy(),
                                  df2.sort("example", "layer", "head")["aeqd_hn"].to_numpy())
    cols = [r[0] for r in con.execute("SELECT * FROM calibration_scores LIMIT 0").description]
    assert cols[-1] == "aeqd_hn"
    con.close()


def test_head_stats_computes_only_the_needed_stats():
    """An ablation computes only the stats its rule reads: those equal the full computation, the rest are NaN."""
    B, H, S, D = 2, 4, 5, 3
    out, value = torch.randn(B, H, S, D), torch.randn(B, 2, S, D)
    pf, ent = torch.rand(B, H, S, dtype=torch.float64), torch.rand(B, H, S, dtype=torch.float64)
    valid = torch.ones(B, S, dtype=torch.bool)
    args = (out, value, pf, ent, valid, torch.zeros(B, dtype=torch.long), torch.full((B,), S - 1), torch.randn(H, D, D))
    every = attention.head_stats(*args)
    for needed in (("p_first",), ("v_norm", "v_first_norm"), ("o_norm",), ()):
        part = attention.head_stats(*args, needed=needed)
        for i, k in enumerate(RAW_STAT_KEYS):
            if k in needed:
                torch.testing.assert_close(part[..., i], every[..., i])
            else:
                assert torch.isnan(part[..., i]).all(), k
