"""Provenance (extract.provenance): the runs row's fields and types, a score shard's metadata and run_id, the
sweep's runs.parquet, and a database where head_scores, examples and the sweep's tables join their run."""
import importlib.util
import json
import re
from pathlib import Path

import polars as pl
import pytest

from fakes import fake_inputs

from analysis.core import tables
from analysis.database import build, checksum, connect, query, row_counts
from extract import provenance
from extract.score import ScoreSettings, score_shard

ROOT = Path(__file__).resolve().parents[1]
HEX = re.compile(r"[0-9a-f]+")
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


@pytest.fixture(scope="module")
def tiny():
    from tiny import tiny_model
    from tiny_tokenizer import tiny_tokenizer

    return tiny_model("llama"), tiny_tokenizer()


def test_run_record_fields_and_types(tiny):
    model, _ = tiny
    start = provenance.now()
    rec = provenance.run_record("score", model, {"b": 1, "a": [0.5]}, prompt_format="raw text", start_time=start)
    assert list(rec) == tables.column_names("runs")
    assert len(rec["run_id"]) == 16 and HEX.fullmatch(rec["run_id"])
    assert rec["kind"] == "score" and rec["model"] == "unnamed"  # model_info's name of a model without one
    assert rec["device"] == "cpu" and rec["dtype"] == "float32" and rec["attention_backend"] == "flash_cpu"
    assert rec["model_sha256"] is None  # a tiny random model has no source file
    assert rec["config"] == '{"a":[0.5],"b":1}'
    assert rec["config_hash"] == "1c6e9e1e92b8d1d5246b5ebb3591fcd42716c42b8323a237d3ebd430be8cc8ff"
    import torch
    import transformers

    assert rec["torch_version"] == torch.__version__ and rec["transformers_version"] == transformers.__version__
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", rec["git_commit"])
    assert rec["package_version"] != provenance.UNKNOWN
    assert TIME.fullmatch(rec["start_time"]) and rec["end_time"] is None
    assert all(isinstance(v, str) for k, v in rec.items() if k not in ("model_sha256", "end_time"))
    done = provenance.finished(rec)
    assert TIME.fullmatch(done["end_time"]) and done["end_time"] >= done["start_time"]
    # the content hash: the times do not change it, any other field does
    again = provenance.run_record("score", model, {"a": [0.5], "b": 1}, prompt_format="raw text",
                                  start_time="2000-01-01T00:00:00Z", end_time="2000-01-01T00:00:01Z")
    assert again["run_id"] == rec["run_id"] == provenance.run_id(done)
    other = provenance.run_record("score", model, {"a": [0.5], "b": 2}, prompt_format="raw text", start_time=start)
    assert other["run_id"] != rec["run_id"]
    assert provenance.runs_frame(done).schema == pl.Schema(tables.polars_schema("runs"))


def test_git_commit_outside_a_checkout_is_unknown(tmp_path):
    assert provenance.git_commit(tmp_path) == "unknown"


def test_score_shard_carries_its_run(tmp_path, tiny):
    model, tok = tiny
    model_dir = tmp_path / "tiny-llama"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": f"e{i}", "text": t}) + "\n" for i, t in enumerate(["a b c", "b c a b"])))
    out = tmp_path / "s.parquet"
    df = score_shard(str(model_dir), data, "toy", out, shard=1, num_shards=2, progress=False)
    run = json.loads(pl.read_parquet_metadata(out)[provenance.RUN_KEY])
    assert list(run) == tables.column_names("runs") and run["kind"] == "score"
    assert pl.read_parquet(out).columns[-1] == "run_id" and df["run_id"].unique().to_list() == [run["run_id"]]
    assert df.height == 1 * 3 * 4  # example e1 only (shard 1 of 2), 3 layers x 4 heads
    cfg = json.loads(run["config"])
    assert cfg["dataset"] == "toy" and (cfg["shard"], cfg["num_shards"]) == (1, 2)
    assert cfg == {"model": str(model_dir), "dataset": "toy", "shard": 1, "num_shards": 2,
                   "data_sha256": cfg["data_sha256"], **{k: getattr(ScoreSettings(), k) for k in
                                                         ("batch_tokens", "dtype", "device", "prepend_bos")}}
    assert run["prompt_format"] == "raw text, BOS first" and TIME.fullmatch(run["end_time"])
    # the database: the shard's run from its metadata, joined from head_scores through examples
    build(tmp_path / "x.duckdb", shards=[out])
    con = connect(tmp_path / "x.duckdb", read_only=True)
    got = con.execute("""SELECT r.run_id, r.kind, count(*) FROM head_scores s
                         JOIN examples e USING (model, dataset, example) JOIN runs r USING (run_id)
                         GROUP BY ALL""").fetchall()
    con.close()
    assert got == [(run["run_id"], "score", df.height)]


def test_a_job_result_file_brings_its_run_into_the_database(tmp_path):
    """``write_with_run`` (what the MAPS, domain, finetune, distributions and MAPS report jobs write): every row
    carries the run's id and the file's metadata the row, ended; building the database upserts that row into
    ``runs`` from the file alone, and every row of the result table joins it."""
    run = provenance.base_record("finetune", {"lr": 0.1}, model="m", device="cpu", start_time=provenance.now())
    log = pl.DataFrame({"model": ["m", "m"], "step": [0, 1], "split": ["train", "train"], "loss": [2.0, 1.5],
                        "tokens": [10, 10], "lr": [0.1, 0.1], "seconds": [0.0, 1.0]},
                       schema=tables.computed_schema("finetune_log"))
    out = provenance.write_with_run(log, tmp_path / "log.parquet", run)
    assert pl.read_parquet(out)["run_id"].to_list() == [run["run_id"]] * 2
    stored = json.loads(pl.read_parquet_metadata(out)[provenance.RUN_KEY])
    assert {k: v for k, v in stored.items() if k != "end_time"} == {k: v for k, v in run.items() if k != "end_time"}
    assert TIME.fullmatch(stored["end_time"]) and run["end_time"] is None
    build(tmp_path / "x.duckdb", tables={"finetune_log": [out]})
    con = connect(tmp_path / "x.duckdb", read_only=True)
    got = con.execute("SELECT r.run_id, r.kind, r.end_time, count(*) FROM finetune_log JOIN runs r USING (run_id) "
                      "GROUP BY ALL").fetchall()
    con.close()
    assert got == [(run["run_id"], "finetune", stored["end_time"], 2)]


def test_the_sweep_command_writes_its_run(tmp_path, tiny, monkeypatch):
    """``dormant sweep`` (task loading and model loading replaced by a toy task and the tiny model)."""
    import extract.models.load
    import extract.sweep
    from test_sweep_run import toy_task

    from extract.cli.main import main

    monkeypatch.setattr(extract.sweep, "load_suite", lambda *a, **k: toy_task(4))
    monkeypatch.setattr(extract.models.load, "load_model", lambda *a, **k: tiny)
    out = tmp_path / "sweep"
    assert main(["sweep", "--model", "tiny", "--tasks", "toy", "--score-functions", "awft", "--fractions", "0",
                 "0.25", "--n-boot", "20", "--out-dir", str(out)]) == 0
    (run,) = pl.read_parquet(out / "runs.parquet").to_dicts()
    assert run["kind"] == "sweep" and json.loads(run["config"])["model"] == "tiny"
    assert run["prompt_format"] == ("no chat template, tokenization bos_first, chat delimiter none, scoring letter, "
                                    "0-shot")
    for part in ("ablation_results", "ablation_questions", "thresholds"):
        assert pl.read_parquet(out / f"{part}.parquet")["run_id"].unique().to_list() == [run["run_id"]], part


def test_a_table2_row_joins_its_run_and_the_checksum_ignores_times(tmp_path, tiny, monkeypatch):
    """The README's query on a database of the fakes plus one sweep; a second build of the same inputs with
    other start and end times has the same checksum, and the same run_id (one runs row per job)."""
    import extract.models.load
    import extract.sweep
    from test_sweep_run import toy_task

    from extract.cli.main import main

    monkeypatch.setattr(extract.sweep, "load_suite", lambda *a, **k: toy_task(4))
    monkeypatch.setattr(extract.models.load, "load_model", lambda *a, **k: tiny)
    out = tmp_path / "sweep"
    assert main(["sweep", "--model", "tiny", "--tasks", "toy", "--score-functions", "awft", "--fractions", "0",
                 "0.25", "--n-boot", "20", "--out-dir", str(out)]) == 0
    parts, _ = fake_inputs(tmp_path)
    sweep = {t: [out / f"{f}.parquet"] for t, f in [("ablation_results", "ablation_results"),
                                                    ("ablation_questions", "ablation_questions"),
                                                    ("thresholds", "thresholds"), ("runs", "runs")]}
    build(tmp_path / "a.duckdb", **parts, tables=sweep)
    con = connect(tmp_path / "a.duckdb", read_only=True)
    want = pl.read_parquet(out / "runs.parquet")
    t2 = query(con, readme_query(want["model"][0]))
    assert t2.select("score_fn", "target_fraction").rows() == [("awft", 0.0), ("awft", 0.25), ("random", 0.0),
                                                           ("random", 0.25)]
    assert t2["run_id"].unique().to_list() == want["run_id"].to_list()
    assert t2["git_commit"].unique().to_list() == want["git_commit"].to_list()
    assert query(con, "SELECT count(*) AS n FROM ablation_questions q JOIN runs USING (run_id)")["n"][0] == 4 * 4
    # the pooled task and its one question task are both "toy": one threshold per fraction
    assert query(con, "SELECT count(*) AS n FROM thresholds t JOIN runs USING (run_id)")["n"][0] == 2
    first = (checksum(con), row_counts(con))
    con.close()
    runs = pl.read_parquet(out / "runs.parquet").with_columns(pl.lit("2001-01-01T00:00:00Z").alias("start_time"),
                                                              pl.lit("2001-01-01T00:10:00Z").alias("end_time"))
    runs.write_parquet(out / "runs.parquet")  # a rerun of the same job: other times
    build(tmp_path / "b.duckdb", **parts, tables=sweep)
    con = connect(tmp_path / "b.duckdb", read_only=True)
    assert (checksum(con), row_counts(con)) == first and row_counts(con)["runs"] == 1
    assert query(con, "SELECT start_time FROM runs")["start_time"].to_list() == ["2001-01-01T00:00:00Z"]
    con.close()
    # scripts/checksums.py, which compares two runs of one config, leaves the times out and sees no difference
    spec = importlib.util.spec_from_file_location("checksums", ROOT / "scripts" / "checksums.py")
    sums = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sums)
    a, b = sums.db_lines(tmp_path / "a.duckdb"), sums.db_lines(tmp_path / "b.duckdb")
    assert [x.replace("a.duckdb", "") for x in a] == [x.replace("b.duckdb", "") for x in b]
    assert any(x.startswith("db a.duckdb base table runs: rows=1 ") and x.endswith("(left out: end_time, start_time)")
               for x in a)



def readme_query(model: str) -> str:
    """The README's query of a model's Table 2 rows and their run, for ``model``."""
    text = (ROOT / "README.md").read_text()
    sql = re.search(r'# a model\'s Table 2 rows .*?\ndormant sql "(.*?)"\n', text, re.S).group(1)
    assert "'gemma-3-270m'" in sql
    return sql.replace("'gemma-3-270m'", f"'{model}'")
