"""The table declarations (analysis.core.tables): the DDL built from them, the migrations, the polars schemas,
and the frames the producers build for each table."""
import re

import duckdb
import numpy as np
import polars as pl
import pytest
import torch

from analysis.core import tables
from analysis.core.score_functions import ScoreFunction, registered, score_keys
from analysis.database import connect, migrations, schema

# The schema as it shipped before analysis.core.tables (the DDL of analysis/database.py at abe9ea2), written
# out by hand: the 13 built-in score columns in definitions §2 order. Changed since: two built-in scores (afhon,
# afhon_ln: IH's full head output norm) follow the 13, then awls (the learned sink's weight); bb_metrics has layer and part
# (key columns; the toy metrics no longer spell them in the metric name); maps_scores, maps_correlations and
# maps_causal have inputs (the E' choice, a key column) and maps_inputs is new; runs is new (the provenance of
# each job) and every result table ends with its run_id.
BUILTIN_SCORES = ("awft DOUBLE, awft_ln DOUBLE, aeqd DOUBLE, aeqd_ln DOUBLE, ftvvn DOUBLE, ftvvn_ln DOUBLE, "
                  "avvn DOUBLE, avvn_ln DOUBLE, lthon DOUBLE, lthon_ln DOUBLE, lthon_hn DOUBLE, ahon DOUBLE, "
                  "ahon_ln DOUBLE, afhon DOUBLE, afhon_ln DOUBLE, awls DOUBLE")
SHIPPED = f"""
CREATE TABLE models (
  model VARCHAR PRIMARY KEY, upstream VARCHAR, family VARCHAR, variant VARCHAR, quantisation VARCHAR,
  n_params BIGINT, n_layers INTEGER, n_heads INTEGER, n_kv_heads INTEGER, head_dim INTEGER,
  d_model INTEGER, source_sha256 VARCHAR);
CREATE TABLE examples (
  model VARCHAR, dataset VARCHAR, example VARCHAR, domain VARCHAR, n_tokens INTEGER, max_tokens INTEGER,
  bos_first BOOLEAN, sha256 VARCHAR, beyond_context BOOLEAN, run_id VARCHAR, PRIMARY KEY (model, dataset, example));
CREATE TABLE head_scores (
  model VARCHAR, dataset VARCHAR, example VARCHAR, layer INTEGER, head INTEGER, {BUILTIN_SCORES},
  PRIMARY KEY (model, dataset, example, layer, head));
CREATE TABLE thresholds (
  model VARCHAR, task VARCHAR, score_fn VARCHAR, target_fraction DOUBLE, threshold DOUBLE,
  n_scores BIGINT, run_id VARCHAR, PRIMARY KEY (model, task, score_fn, target_fraction));
CREATE TABLE ablation_results (
  model VARCHAR, task VARCHAR, score_fn VARCHAR, target_fraction DOUBLE, threshold DOUBLE,
  realized_percent DOUBLE, accuracy DOUBLE, n_questions INTEGER,
  chance DOUBLE, accuracy_ci_low DOUBLE, accuracy_ci_high DOUBLE, delta_ci_low DOUBLE, delta_ci_high DOUBLE,
  kl_mean DOUBLE, kl_ci_low DOUBLE, kl_ci_high DOUBLE, kl_choices_mean DOUBLE, run_id VARCHAR,
  PRIMARY KEY (model, task, score_fn, target_fraction));
CREATE TABLE ablation_questions (
  model VARCHAR, task VARCHAR, score_fn VARCHAR, target_fraction DOUBLE, question VARCHAR, question_task VARCHAR,
  correct BOOLEAN, kl DOUBLE, kl_choices DOUBLE, zeroed INTEGER, triples INTEGER, run_id VARCHAR,
  PRIMARY KEY (model, task, score_fn, target_fraction, question));
CREATE TABLE calibration_scores (
  model VARCHAR, task VARCHAR, question_task VARCHAR, question VARCHAR, layer INTEGER, head INTEGER,
  {BUILTIN_SCORES}, run_id VARCHAR, PRIMARY KEY (model, task, question, layer, head));
CREATE TABLE distribution_tests (
  comparison VARCHAR, score_fn VARCHAR, depth_bin VARCHAR, statistic VARCHAR, value DOUBLE, ci_low DOUBLE,
  ci_high DOUBLE, p_value DOUBLE, n_examples INTEGER, kind VARCHAR, model_a VARCHAR, model_b VARCHAR, run_id VARCHAR,
  PRIMARY KEY (comparison, score_fn, depth_bin, statistic));
CREATE TABLE finetune_log (
  model VARCHAR, step INTEGER, split VARCHAR, loss DOUBLE, tokens INTEGER, lr DOUBLE, seconds DOUBLE, run_id VARCHAR,
  PRIMARY KEY (model, step, split));
CREATE TABLE bb_metrics (
  run VARCHAR, step INTEGER, metric VARCHAR, layer INTEGER, part VARCHAR, value DOUBLE, run_id VARCHAR,
  PRIMARY KEY (run, step, metric, layer, part));
CREATE TABLE domain_head_ablation (
  model VARCHAR, dataset VARCHAR, example VARCHAR, domain VARCHAR, n_tokens INTEGER, layer INTEGER, head INTEGER,
  awft DOUBLE, ahon_ln DOUBLE, loss_base DOUBLE, loss_ablated DOUBLE, delta_loss DOUBLE,
  loss_mean_ablated DOUBLE, delta_loss_mean DOUBLE,
  run_id VARCHAR, PRIMARY KEY (model, dataset, example, layer, head));
CREATE TABLE maps_scores (
  model VARCHAR, inputs VARCHAR, layer INTEGER, head INTEGER, operation VARCHAR, category VARCHAR, k INTEGER,
  score DOUBLE, suppression_score DOUBLE, n_pairs INTEGER, run_id VARCHAR,
  PRIMARY KEY (model, inputs, layer, head, operation));
CREATE TABLE maps_salient (
  model VARCHAR, layer INTEGER, head INTEGER, rank INTEGER, token_id BIGINT, token VARCHAR, saliency DOUBLE,
  top_targets VARCHAR, run_id VARCHAR, PRIMARY KEY (model, layer, head, rank));
CREATE TABLE maps_dynamic (
  model VARCHAR, layer INTEGER, head INTEGER, operation VARCHAR, template INTEGER, context VARCHAR, score DOUBLE,
  n_prompts INTEGER, run_id VARCHAR, PRIMARY KEY (model, layer, head, operation, template, context));
CREATE TABLE maps_correlations (
  model VARCHAR, inputs VARCHAR, operation VARCHAR, context VARCHAR, pearson DOUBLE, n INTEGER, max_static DOUBLE,
  max_dynamic DOUBLE, run_id VARCHAR, PRIMARY KEY (model, inputs, operation, context));
CREATE TABLE maps_causal (
  model VARCHAR, inputs VARCHAR, operation VARCHAR, selection VARCHAR, n_heads INTEGER, draw INTEGER,
  accuracy DOUBLE, base_accuracy DOUBLE, n_prompts INTEGER, run_id VARCHAR,
  PRIMARY KEY (model, inputs, operation, selection, n_heads, draw));
CREATE TABLE maps_inputs (
  source VARCHAR, model VARCHAR, inputs VARCHAR, r_without DOUBLE, r_without_low DOUBLE, r_without_high DOUBLE,
  r_with DOUBLE, r_with_low DOUBLE, r_with_high DOUBLE, r_operations INTEGER, r_undefined INTEGER, n_heads INTEGER,
  drop_top DOUBLE,
  drop_top_low DOUBLE, drop_top_high DOUBLE, drop_random DOUBLE, drop_random_low DOUBLE, drop_random_high DOUBLE,
  causal_operations INTEGER, run_id VARCHAR, PRIMARY KEY (source, model, inputs));
CREATE TABLE score_functions (
  score_fn VARCHAR PRIMARY KEY, inactive_when VARCHAR);
CREATE TABLE runs (
  run_id VARCHAR PRIMARY KEY, kind VARCHAR, model VARCHAR, package_version VARCHAR, git_commit VARCHAR,
  python_version VARCHAR, torch_version VARCHAR, transformers_version VARCHAR, device VARCHAR, dtype VARCHAR,
  attention_backend VARCHAR, model_sha256 VARCHAR, prompt_format VARCHAR, config_hash VARCHAR, config VARCHAR,
  start_time VARCHAR, end_time VARCHAR);
"""
SHIPPED_TABLES = re.findall(r"CREATE TABLE (\w+)", SHIPPED)


def table_info(con, table: str) -> list[tuple]:
    """(name, type, notnull, default, pk) of every column, in order."""
    return [tuple(r[1:]) for r in con.execute(f"PRAGMA table_info('{table}')").fetchall()]


def constraints(con, table: str) -> list[tuple]:
    return sorted(con.execute("SELECT constraint_type, constraint_column_names::VARCHAR FROM duckdb_constraints() "
                              "WHERE table_name = ?", [table]).fetchall())


@pytest.fixture()
def fresh(tmp_path):
    con = connect(tmp_path / "fresh.duckdb")
    yield con
    con.close()


def test_ddl_creates_the_shipped_columns_types_and_keys(fresh):
    old = duckdb.connect()
    old.execute(SHIPPED)
    assert list(tables.names()) == SHIPPED_TABLES
    for t in SHIPPED_TABLES:
        assert table_info(fresh, t) == table_info(old, t), t
        assert constraints(fresh, t) == constraints(old, t), t


def test_a_few_tables_against_literal_column_lists(fresh):
    """The same, written out column by column (name, DuckDB type, primary-key member)."""
    want = {
        "models": [("model", "VARCHAR", 1), ("upstream", "VARCHAR", 0), ("family", "VARCHAR", 0),
                   ("variant", "VARCHAR", 0), ("quantisation", "VARCHAR", 0), ("n_params", "BIGINT", 0),
                   ("n_layers", "INTEGER", 0), ("n_heads", "INTEGER", 0), ("n_kv_heads", "INTEGER", 0),
                   ("head_dim", "INTEGER", 0), ("d_model", "INTEGER", 0), ("source_sha256", "VARCHAR", 0)],
        "examples": [("model", "VARCHAR", 1), ("dataset", "VARCHAR", 1), ("example", "VARCHAR", 1),
                     ("domain", "VARCHAR", 0), ("n_tokens", "INTEGER", 0), ("max_tokens", "INTEGER", 0),
                     ("bos_first", "BOOLEAN", 0), ("sha256", "VARCHAR", 0), ("beyond_context", "BOOLEAN", 0),
                     ("run_id", "VARCHAR", 0)],
        "thresholds": [("model", "VARCHAR", 1), ("task", "VARCHAR", 1), ("score_fn", "VARCHAR", 1),
                       ("target_fraction", "DOUBLE", 1), ("threshold", "DOUBLE", 0), ("n_scores", "BIGINT", 0),
                       ("run_id", "VARCHAR", 0)],
        "runs": [("run_id", "VARCHAR", 1)] + [(c, "VARCHAR", 0) for c in (
            "kind", "model", "package_version", "git_commit", "python_version", "torch_version",
            "transformers_version", "device", "dtype", "attention_backend", "model_sha256", "prompt_format",
            "config_hash", "config", "start_time", "end_time")],
        "maps_salient": [("model", "VARCHAR", 1), ("layer", "INTEGER", 1), ("head", "INTEGER", 1),
                         ("rank", "INTEGER", 1), ("token_id", "BIGINT", 0), ("token", "VARCHAR", 0),
                         ("saliency", "DOUBLE", 0), ("top_targets", "VARCHAR", 0), ("run_id", "VARCHAR", 0)],
        "score_functions": [("score_fn", "VARCHAR", 1), ("inactive_when", "VARCHAR", 0)],
        "head_scores": [("model", "VARCHAR", 1), ("dataset", "VARCHAR", 1), ("example", "VARCHAR", 1),
                        ("layer", "INTEGER", 1), ("head", "INTEGER", 1)] + [
            (k, "DOUBLE", 0) for k in ("awft", "awft_ln", "aeqd", "aeqd_ln", "ftvvn", "ftvvn_ln", "avvn", "avvn_ln",
                                       "lthon", "lthon_ln", "lthon_hn", "ahon", "ahon_ln", "afhon", "afhon_ln",
                                       "awls")],
    }
    for t, cols in want.items():
        assert [(n, ty, int(pk > 0)) for n, ty, _, _, pk in table_info(fresh, t)] == cols, t


def test_every_declaration_is_what_the_database_holds(fresh):
    for t in tables.all_tables():
        info = table_info(fresh, t.name)
        assert [(r[0], r[1]) for r in info] == [(c.name, c.sql_type) for c in t.columns], t.name
        assert [r[0] for r in info if r[4]] == list(t.key), t.name
    assert tables.describe().count("\n") == len(tables.names())
    assert "* ``maps_causal`` [model, inputs, operation, selection, n_heads, draw]:" in tables.describe()


def test_a_registered_score_function_is_a_column_of_both_score_tables(tmp_path):
    before = tables.column_names("head_scores")
    with registered(ScoreFunction("tbl_test", "test score", "p_first", "above")):
        assert tables.column_names("head_scores") == before + ["tbl_test"]
        assert tables.column_names("calibration_scores")[-2:] == ["tbl_test", "run_id"]
        assert tables.polars_schema("calibration_scores")["tbl_test"] == pl.Float64
        assert "tbl_test DOUBLE" in schema()
        con = connect(tmp_path / "x.duckdb")
        for t in ("head_scores", "calibration_scores"):
            cols = [c[:2] for c in table_info(con, t)]
            assert cols[-1 if t == "head_scores" else -2] == ("tbl_test", "DOUBLE")  # calibration: then run_id
        con.close()
    assert tables.column_names("head_scores") == before


def test_migrations_add_exactly_the_added_columns(tmp_path):
    added = {(t.name, c) for t in tables.all_tables() for c in t.added}
    assert added == {("domain_head_ablation", "loss_mean_ablated"), ("domain_head_ablation", "delta_loss_mean"),
                     ("examples", "beyond_context")} | {
        ("ablation_results", c) for c in ("chance", "accuracy_ci_low", "accuracy_ci_high", "delta_ci_low",
                                          "delta_ci_high", "kl_mean", "kl_ci_low", "kl_ci_high", "kl_choices_mean")} | {
        (t, "run_id") for t in ("examples", "thresholds", "ablation_results", "ablation_questions", "calibration_scores",
                                "distribution_tests", "finetune_log", "bb_metrics", "domain_head_ablation",
                                "maps_scores", "maps_salient", "maps_dynamic", "maps_correlations", "maps_causal",
                                "maps_inputs")}
    statements = re.findall(r"ALTER TABLE (\w+) ADD COLUMN IF NOT EXISTS (\w+) (\w+);", migrations())
    assert len(statements) == len(migrations().strip().splitlines()) == len(added)
    assert {(t, c) for t, c, _ in statements} == added
    # a database from before the added columns shipped: they are missing; one row in it
    path = tmp_path / "old.duckdb"
    old = duckdb.connect(str(path))
    ddl = SHIPPED.replace(" run_id VARCHAR,", "").replace(" beyond_context BOOLEAN,", "").replace(
        "  loss_mean_ablated DOUBLE, delta_loss_mean DOUBLE,\n", "").replace(
        "  chance DOUBLE, accuracy_ci_low DOUBLE, accuracy_ci_high DOUBLE, delta_ci_low DOUBLE, delta_ci_high DOUBLE,\n"
        "  kl_mean DOUBLE, kl_ci_low DOUBLE, kl_ci_high DOUBLE, kl_choices_mean DOUBLE,\n", "")
    old.execute(ddl)
    old.execute("INSERT INTO domain_head_ablation (model, dataset, example, layer, head, delta_loss) "
                "VALUES ('m', 'd', 'e', 0, 1, 0.5)")
    before = {t: table_info(old, t) for t in SHIPPED_TABLES}
    old.close()
    con = connect(path)  # a writable open migrates
    for t in SHIPPED_TABLES:
        info = table_info(con, t)
        new = [r[0] for r in info if r[0] not in {r0[0] for r0 in before[t]}]
        assert new == [c.name for c in tables.columns(t) if c.name in tables.get(t).added]
        assert info[:len(before[t])] == before[t]  # the old columns untouched, the new ones appended
        assert [(r[0], r[1]) for r in info] == [(c.name, c.sql_type) for c in tables.columns(t)]
    assert con.execute("SELECT delta_loss, loss_mean_ablated, delta_loss_mean FROM domain_head_ablation").fetchall() \
        == [(0.5, None, None)]
    con.close()


def test_polars_types_round_trip_to_the_duckdb_types(tmp_path, fresh):
    """An empty frame with a table's polars schema, written to Parquet, reads back as the table's SQL types."""
    for t in tables.names():
        path = tmp_path / f"{t}.parquet"
        pl.DataFrame(schema=tables.polars_schema(t)).write_parquet(path)
        got = [tuple(r[:2]) for r in fresh.execute(f"DESCRIBE SELECT * FROM read_parquet('{path}')").fetchall()]
        assert got == [(r[0], r[1]) for r in table_info(fresh, t)], t
    with pytest.raises(ValueError, match="no column"):
        tables.polars_schema("models", ["model", "nope"])
    with pytest.raises(ValueError, match="unknown table"):
        tables.get("nope")


# ---------------------------------------------------------------- the producers' frames

def test_thresholds_frame():
    from analysis.core.thresholds import thresholds

    keys = score_keys()
    rng = np.random.default_rng(0)
    wide = pl.DataFrame({"model": ["m"] * 20, "task": ["t"] * 20, **{k: rng.random(20) for k in keys}})
    from analysis.core.thresholds import COLUMNS

    assert COLUMNS == tables.column_names("thresholds")[:-1] and tables.column_names("thresholds")[-1] == "run_id"
    assert thresholds(wide).schema == pl.Schema(tables.polars_schema("thresholds", COLUMNS))  # run_id: the sweep's


def test_distribution_tests_schema():
    """The statistics frame keeps its own column order (the report tables print it) with the table's types."""
    from analysis.distributions.stats import SCHEMA

    assert sorted(SCHEMA) == sorted(tables.computed_schema("distribution_tests"))  # run_id: the job's
    assert list(SCHEMA.items()) == list(tables.polars_schema("distribution_tests", list(SCHEMA)).items())
    assert list(SCHEMA) == ["comparison", "kind", "model_a", "model_b", "score_fn", "depth_bin", "statistic", "value",
                            "ci_low", "ci_high", "p_value", "n_examples"]


def test_model_info_is_the_models_table():
    from tiny import tiny_model

    from extract.models.load import model_info

    assert list(model_info(tiny_model("llama"))) == tables.column_names("models")


def _op(name, src, tgt, k):
    from extract.maps.operations import Operation

    return Operation(name, "test", k, tuple(src), tuple(tgt), tuple((str(s), str(t)) for s, t in zip(src, tgt)),
                     len(src), len(src))


def test_maps_frames():
    from tiny import tiny_model
    from tiny_tokenizer import tiny_tokenizer

    from extract.maps.dynamic import causal_check, correlations, dynamic_scores
    from extract.maps.static import static_scores

    model, tok = tiny_model("llama"), tiny_tokenizer()
    ops = [_op("digits", range(20, 30), range(30, 40), 3), _op("letters", range(40, 50), range(50, 60), 5)]
    res = static_scores(model, tok, ops, model_name="m", progress=False)
    assert res.scores.schema == pl.Schema(tables.computed_schema("maps_scores"))
    assert res.salient.schema == pl.Schema(tables.computed_schema("maps_salient"))
    rows = [("digits", t, c, i) for t in range(2) for c in ("with", "without") for i in range(2)]
    frame = pl.DataFrame(rows, orient="row", schema={"operation": pl.Utf8, "template": pl.Int32,
                                                     "context": pl.Utf8, "pair": pl.Int32})  # as dynamic_rows
    L, H = model.config.num_hidden_layers, model.config.num_attention_heads
    dyn = dynamic_scores("m", frame, torch.rand(L, H, len(rows), generator=torch.Generator().manual_seed(0)) > 0.5)
    assert dyn.schema == pl.Schema(tables.computed_schema("maps_dynamic"))
    assert correlations(res.scores, dyn).schema == pl.Schema(tables.computed_schema("maps_correlations"))
    causal = causal_check(model, tok, ops[0], res.scores, model_name="m", counts=[1, 2], draws=2, prompts=4,
                          shots=2, seed=0)
    assert causal.height == 1 + 2 * (1 + 2) and causal.schema == pl.Schema(tables.computed_schema("maps_causal"))


def test_domain_head_ablation_frame():
    """As ``dormant domains ablate`` writes it: the model column first."""
    from tiny import tiny_model
    from tiny_tokenizer import tiny_tokenizer

    from extract.domains import head_loss_changes

    model, tok = tiny_model("llama"), tiny_tokenizer()
    texts = [{"id": str(i), "text": t, "domain": d, "corpus": d} for i, (t, d) in enumerate(
        [("def f(x): return x + 1", "code"), ("The cat sat on the mat today.", "news")])]
    for mean in (True, False):
        df = head_loss_changes(model, tok, texts, [(1, 2), (0, 1)], mean=mean, progress=False)
        df = df.with_columns(pl.lit("m").alias("model")).select("model", *[c for c in df.columns if c != "model"])
        want = tables.computed_schema("domain_head_ablation")
        if not mean:
            want = {c: t for c, t in want.items() if c not in tables.get("domain_head_ablation").added}
        assert df.schema == pl.Schema(want)


def test_sweep_frames():
    """ablation_results, thresholds and calibration_scores from one small sweep of a tiny model."""
    from tiny import tiny_model
    from tiny_tokenizer import tiny_tokenizer

    from extract.data.tasks import TaskData, make_question
    from extract.sweep import RESULT_COLUMNS, run_sweep

    qs = [make_question(f"toy/{i}", "toy", f"What is {i} plus {i % 3}?",
                        [str(i + i % 3 + d) for d in range(-1, 2 + i % 3)], 1) for i in range(4)]
    data = TaskData("toy", qs, {"toy": []}, {"toy": ""})
    res = run_sweep(tiny_model("llama"), tiny_tokenizer(), data, score_fns=("awft", "ahon_ln"),
                    fractions=(0.0, 0.25), progress=False)
    assert RESULT_COLUMNS == tables.column_names("ablation_results")
    assert res.results.schema == pl.Schema(tables.polars_schema("ablation_results"))
    assert res.thresholds.schema == pl.Schema(tables.polars_schema("thresholds"))
    assert res.calibration.schema == pl.Schema(tables.polars_schema("calibration_scores"))
    assert res.questions.schema == pl.Schema(tables.polars_schema("ablation_questions"))
