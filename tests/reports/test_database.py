"""The score database: schema, idempotent and transactional ingest, views, read-only SQL access."""
import json
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest

from fakes import fake_inputs, fake_shard

from analysis.database import build, checksum, connect, ingest, query, row_counts
from analysis.core.score_functions import score_keys

ROOT = Path(__file__).resolve().parents[2]


def test_ingest_roundtrip_and_idempotence(tmp_path):
    parts, df = fake_inputs(tmp_path)
    db = tmp_path / "x.duckdb"
    counts = ingest(db, **parts)
    assert counts["models"] == 1 and counts["examples"] == 3 and counts["head_scores"] == df.height
    con = connect(db, read_only=True)
    first = checksum(con)
    got = query(con, "SELECT * FROM head_scores ORDER BY example, layer, head")
    np.testing.assert_array_equal(got.select(score_keys()).to_numpy(),
                                  df.sort("example", "layer", "head").select(score_keys()).to_numpy())
    dom = query(con, "SELECT DISTINCT domain, max_tokens FROM examples").rows()
    assert dom == [("news", 50)]
    con.close()
    assert ingest(db, **parts) == counts  # again: nothing changes
    con = connect(db, read_only=True)
    assert checksum(con) == first
    long = query(con, "SELECT score_fn, count(*) AS n FROM head_scores_long GROUP BY 1")
    assert sorted(long["score_fn"].to_list()) == sorted(score_keys()) and set(long["n"].to_list()) == {df.height}
    con.close()


def test_failed_ingest_rolls_back(tmp_path):
    parts, df = fake_inputs(tmp_path)
    db = tmp_path / "x.duckdb"
    ingest(db, **parts)
    bad = tmp_path / "bad.parquet"
    fake_shard(bad, model="m2", seed=1)
    pl.read_parquet(bad).drop("ahon_ln").write_parquet(bad)  # a malformed shard
    with pytest.raises(Exception):
        ingest(db, model_jsons=[], shards=[tmp_path / "s2.parquet", bad], corpora={})
    con = connect(db, read_only=True)
    assert row_counts(con)["head_scores"] == df.height  # nothing of the failed call landed
    con.close()


def test_build_is_atomic_and_reproducible(tmp_path):
    parts, _ = fake_inputs(tmp_path)
    a, b = tmp_path / "a.duckdb", tmp_path / "b.duckdb"
    build(a, **parts)
    build(b, **parts)
    ca, cb = connect(a, read_only=True), connect(b, read_only=True)
    assert checksum(ca) == checksum(cb) and row_counts(ca) == row_counts(cb)
    assert not list(tmp_path.glob(".*tmp*"))


def test_head_summary_fraction_inactive_follows_direction(tmp_path):
    parts, df = fake_inputs(tmp_path)
    db = tmp_path / "x.duckdb"
    ingest(db, **parts)
    con = connect(db)
    con.execute("INSERT INTO thresholds VALUES ('m', 't', 'awft', 0.1, 0.5, 1, NULL), "
                "('m', 't', 'ahon', 0.1, 0.5, 1, NULL)")
    got = query(con, "SELECT score_fn, layer, head, fraction_inactive FROM head_summary WHERE task = 't'")
    for fn, op in (("awft", np.greater), ("ahon", np.less)):
        sub = df.filter((pl.col("layer") == 0) & (pl.col("head") == 1))[fn].to_numpy()
        want = op(sub, 0.5).mean()
        row = got.filter((pl.col("score_fn") == fn) & (pl.col("layer") == 0) & (pl.col("head") == 1))
        assert row["fraction_inactive"][0] == pytest.approx(want)
    con.close()


def test_sql_cli_is_read_only(tmp_path):
    parts, df = fake_inputs(tmp_path)
    db = tmp_path / "x.duckdb"
    ingest(db, **parts)
    run = lambda *a: subprocess.run([sys.executable, "-m", "extract.cli", "sql", "--db", str(db), *a],
                                    capture_output=True, text=True, cwd=ROOT)
    ok = run("--csv", "SELECT count(*) AS n FROM head_scores")
    assert ok.returncode == 0 and ok.stdout.strip().splitlines() == ["n", str(df.height)]
    bad = run("DELETE FROM head_scores")
    assert bad.returncode == 2 and "read-only" in bad.stderr.lower()
    missing = run("--csv", "SELECT 1").returncode  # db exists; and a missing db names the fix:
    assert missing == 0
    gone = subprocess.run([sys.executable, "-m", "extract.cli", "sql", "--db", str(tmp_path / "no.duckdb"), "SELECT 1"],
                          capture_output=True, text=True, cwd=ROOT)
    assert gone.returncode == 2 and "run the workflow" in gone.stderr


@pytest.mark.parametrize("override,needle", [
    ("corpora:\n  names: [xsum]\n  n: -1\n  min_tokens: 10\n  max_tokens: 20\n  seed: 0\n", "n"),
    ("evaluation:\n  models: []\n  tasks: [physics]\n  task_name: t\n  limit: 2\n  k_shot: 0\n  seed: 0\n"
     "  score_functions: [awft, nope]\n  fractions: [0, 0.1]\n  batch_tokens: 64\n", "nope"),
    ("models: [not-a-zoo-model]\n", "models[0]"),
    ("corpora:\n  names: [xsum]\n  n: 2\n  min_tokens: 30\n  max_tokens: 20\n  seed: 0\n", "corpora.min_tokens"),
    ("mechanism:\n  toy:\n    seeds: [1, 0]\n", "seed 0 is run 'adam_1l'"),  # a run's own seed listed again
])
def test_bad_config_fails_before_any_job(tmp_path, override, needle):
    bad = tmp_path / "bad.yaml"
    bad.write_text(override)
    res = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", str(bad)],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode != 0
    assert needle in res.stdout + res.stderr
    assert "rule " not in res.stdout  # failed before planning any job


def test_build_from_base_adds_tables_and_leaves_base_untouched(tmp_path):
    base = tmp_path / "core.duckdb"
    thr = tmp_path / "thr.parquet"
    pl.DataFrame({"model": ["m"], "task": ["t"], "score_fn": ["awft"], "target_fraction": [0.1],
                  "threshold": [0.5], "n_scores": [10]}).write_parquet(thr)
    build(base, tables={"thresholds": [thr]})
    metrics = tmp_path / "bb.parquet"  # columns in another order than the table: matched by name
    pl.DataFrame({"value": [0.25, 0.5], "metric": ["attn_bos", "attn_bos"], "step": [10, 20],
                  "run": ["r", "r"]}).write_parquet(metrics)
    final = tmp_path / "scores.duckdb"
    counts = build(final, base=base, tables={"bb_metrics": [metrics]})
    assert counts["thresholds"] == 1 and counts["bb_metrics"] == 2
    con = connect(final, read_only=True)
    assert con.execute("SELECT value FROM bb_metrics WHERE step = 20").fetchone()[0] == 0.5
    con.close()
    con = connect(base, read_only=True)
    assert con.execute("SELECT count(*) FROM bb_metrics").fetchone()[0] == 0
    con.close()
    with pytest.raises(FileNotFoundError, match="build it first"):
        build(tmp_path / "x.duckdb", base=tmp_path / "missing.duckdb")


def test_domain_ablation_rows_with_and_without_mean_ablation(tmp_path):
    """Files with the mean-ablation columns and files without them load together; the missing ones are NULL."""
    row = {"dataset": "d", "example": "1", "domain": "code", "n_tokens": 5, "layer": 0, "head": 1, "awft": 0.5,
           "ahon_ln": 0.1, "loss_base": 2.0, "loss_ablated": 2.5, "delta_loss": 0.5}
    with_mean, without = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pl.DataFrame([{"model": "a", **row, "loss_mean_ablated": 2.25, "delta_loss_mean": 0.25}]).write_parquet(with_mean)
    pl.DataFrame([{"model": "b", **row}]).write_parquet(without)
    counts = build(tmp_path / "x.duckdb", tables={"domain_head_ablation": [with_mean, without]})
    assert counts["domain_head_ablation"] == 2
    con = connect(tmp_path / "x.duckdb", read_only=True)
    got = con.execute("SELECT model, delta_loss, delta_loss_mean FROM domain_head_ablation ORDER BY model").fetchall()
    con.close()
    assert got == [("a", 0.5, 0.25), ("b", 0.5, None)]
    # a database written before the columns existed (an older core database used as the base) gets them
    old = tmp_path / "old.duckdb"
    raw = duckdb.connect(str(old))
    raw.execute("CREATE TABLE domain_head_ablation (model VARCHAR, dataset VARCHAR, example VARCHAR, domain VARCHAR, "
                "n_tokens INTEGER, layer INTEGER, head INTEGER, awft DOUBLE, ahon_ln DOUBLE, loss_base DOUBLE, "
                "loss_ablated DOUBLE, delta_loss DOUBLE, PRIMARY KEY (model, dataset, example, layer, head))")
    raw.close()
    build(tmp_path / "y.duckdb", base=old, tables={"domain_head_ablation": [with_mean]})
    con = connect(tmp_path / "y.duckdb", read_only=True)
    assert con.execute("SELECT delta_loss_mean FROM domain_head_ablation").fetchall() == [(0.25,)]
    con.close()


def test_atomic_dir_replaces_on_success_and_keeps_the_old_one_on_failure(tmp_path):
    from analysis.core.io import atomic_dir

    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("killed midway")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left behind
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    with atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_shards_from_older_code_ingest_with_null_scores(tmp_path):
    """A shard written before a score function was added lacks its column: the other shards keep theirs, the
    missing scores are NULL (not computed), nothing else changes."""
    parts, df = fake_inputs(tmp_path)
    old = tmp_path / "old.parquet"
    missing = score_keys()[-1]
    fake_shard(old, dataset="e", seed=5).drop(missing).write_parquet(old)
    db = tmp_path / "x.duckdb"
    counts = ingest(db, **{**parts, "shards": [*parts["shards"], old]})
    con = connect(db, read_only=True)
    got = query(con, f"SELECT dataset, count(*) AS n, count({missing}) AS scored FROM head_scores GROUP BY 1 ORDER BY 1")
    assert got.rows() == [("d", df.height, df.height), ("e", 18, 0)] and counts["head_scores"] == df.height + 18
    kept = query(con, f"SELECT {score_keys()[0]} FROM head_scores WHERE dataset = 'e' ORDER BY example, layer, head")
    want = pl.read_parquet(old).sort("example", "layer", "head")[score_keys()[0]].to_list()
    assert kept[score_keys()[0]].to_list() == want
    con.close()
