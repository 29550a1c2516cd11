"""The score database (``results/scores.duckdb``): schema, idempotent ingestion, views.

DuckDB allows one writing process, so scoring jobs write Parquet shards and one ingest job loads them.
Ingestion runs in one transaction per call and upserts by primary key: ingesting the same files again
changes nothing, and a killed ingest leaves the previous contents. ``build()`` writes a fresh database to
a temporary file and renames it, so the workflow's database is never half-written.

Tables (primary keys in brackets):

* ``models`` [model]: the ``extract.models.load.model_info`` fields.
* ``examples`` [model, dataset, example]: domain, tokens seen by that model, BOS-first flag, content hash.
* ``head_scores`` [model, dataset, example, layer, head]: the raw scores, one column per score function (SPEC §2).
* ``thresholds`` [model, task, score_fn, target_fraction]: τ per SPEC §3.
* ``ablation_results`` [model, task, score_fn, target_fraction]: realized %, accuracy (SPEC §4–5).
* ``calibration_scores`` [model, task, question, layer, head]: the same scores on the evaluation prompts.
* ``distribution_tests`` [comparison, score_fn, depth_bin, statistic]: SPEC §6 statistics with bootstrap CIs.
* ``finetune_log`` [model, step, split]: training / held-out loss of the SPEC §6 finetune (nats per token).
* ``bb_metrics`` [run, step, metric]: Bigram-Backcopy toy-model training metrics (SPEC §7).
* ``domain_head_ablation`` [model, dataset, example, layer, head]: loss change (nats/token) from zeroing one
  dormant-by-domain candidate head, with its per-example ``awft`` and ``ahon_ln`` (SPEC §7).
* ``maps_scores`` [model, layer, head, operation]: MAPS static and suppression scores (SPEC §8).
* ``maps_salient`` [model, layer, head, rank]: each head's most salient tokens and their top targets (SPEC §8).
* ``maps_dynamic`` [model, layer, head, operation, template, context]: MAPS dynamic scores from prompts.
* ``maps_correlations`` [model, operation, context]: Pearson r of static vs dynamic scores.
* ``maps_causal`` [model, operation, selection, n_heads, draw]: accuracy with heads ablated at the last position.

Views: ``head_scores_long`` (one row per score function) and ``head_summary`` (per model, function,
layer, head: mean, median, quantiles, fraction of examples on the inactive side of each threshold).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable

import duckdb

from analysis.core.io import atomic_path

from analysis.core.score_functions import SCORE_FUNCTIONS, score_keys

# one DOUBLE column per registered score function (those registered later: added by connect())
_SCORES = ", ".join(f"{k} DOUBLE" for k in score_keys())
_SCORE_TABLES = ("head_scores", "calibration_scores")
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS models (
  model VARCHAR PRIMARY KEY, upstream VARCHAR, family VARCHAR, variant VARCHAR, quantisation VARCHAR,
  n_params BIGINT, n_layers INTEGER, n_heads INTEGER, n_kv_heads INTEGER, head_dim INTEGER,
  d_model INTEGER, source_sha256 VARCHAR);
CREATE TABLE IF NOT EXISTS examples (
  model VARCHAR, dataset VARCHAR, example VARCHAR, domain VARCHAR, n_tokens INTEGER, max_tokens INTEGER,
  bos_first BOOLEAN, sha256 VARCHAR, PRIMARY KEY (model, dataset, example));
CREATE TABLE IF NOT EXISTS head_scores (
  model VARCHAR, dataset VARCHAR, example VARCHAR, layer INTEGER, head INTEGER, {_SCORES},
  PRIMARY KEY (model, dataset, example, layer, head));
CREATE TABLE IF NOT EXISTS thresholds (
  model VARCHAR, task VARCHAR, score_fn VARCHAR, target_fraction DOUBLE, threshold DOUBLE,
  n_scores BIGINT, PRIMARY KEY (model, task, score_fn, target_fraction));
CREATE TABLE IF NOT EXISTS ablation_results (
  model VARCHAR, task VARCHAR, score_fn VARCHAR, target_fraction DOUBLE, threshold DOUBLE,
  realized_percent DOUBLE, accuracy DOUBLE, n_questions INTEGER,
  PRIMARY KEY (model, task, score_fn, target_fraction));
CREATE TABLE IF NOT EXISTS calibration_scores (
  model VARCHAR, task VARCHAR, question_task VARCHAR, question VARCHAR, layer INTEGER, head INTEGER, {_SCORES},
  PRIMARY KEY (model, task, question, layer, head));
CREATE TABLE IF NOT EXISTS distribution_tests (
  comparison VARCHAR, score_fn VARCHAR, depth_bin VARCHAR, statistic VARCHAR, value DOUBLE, ci_low DOUBLE,
  ci_high DOUBLE, p_value DOUBLE, n_examples INTEGER, kind VARCHAR, model_a VARCHAR, model_b VARCHAR,
  PRIMARY KEY (comparison, score_fn, depth_bin, statistic));
CREATE TABLE IF NOT EXISTS finetune_log (
  model VARCHAR, step INTEGER, split VARCHAR, loss DOUBLE, tokens INTEGER, lr DOUBLE, seconds DOUBLE,
  PRIMARY KEY (model, step, split));
CREATE TABLE IF NOT EXISTS bb_metrics (
  run VARCHAR, step INTEGER, metric VARCHAR, value DOUBLE, PRIMARY KEY (run, step, metric));
CREATE TABLE IF NOT EXISTS domain_head_ablation (
  model VARCHAR, dataset VARCHAR, example VARCHAR, domain VARCHAR, n_tokens INTEGER, layer INTEGER, head INTEGER,
  awft DOUBLE, ahon_ln DOUBLE, loss_base DOUBLE, loss_ablated DOUBLE, delta_loss DOUBLE,
  loss_mean_ablated DOUBLE, delta_loss_mean DOUBLE,  -- NULL unless mean ablation was run
  PRIMARY KEY (model, dataset, example, layer, head));
CREATE TABLE IF NOT EXISTS maps_scores (
  model VARCHAR, layer INTEGER, head INTEGER, operation VARCHAR, category VARCHAR, k INTEGER, score DOUBLE,
  suppression_score DOUBLE, n_pairs INTEGER, PRIMARY KEY (model, layer, head, operation));
CREATE TABLE IF NOT EXISTS maps_salient (
  model VARCHAR, layer INTEGER, head INTEGER, rank INTEGER, token_id BIGINT, token VARCHAR, saliency DOUBLE,
  top_targets VARCHAR, PRIMARY KEY (model, layer, head, rank));
CREATE TABLE IF NOT EXISTS maps_dynamic (
  model VARCHAR, layer INTEGER, head INTEGER, operation VARCHAR, template INTEGER, context VARCHAR, score DOUBLE,
  n_prompts INTEGER, PRIMARY KEY (model, layer, head, operation, template, context));
CREATE TABLE IF NOT EXISTS maps_correlations (
  model VARCHAR, operation VARCHAR, context VARCHAR, pearson DOUBLE, n INTEGER, max_static DOUBLE,
  max_dynamic DOUBLE, PRIMARY KEY (model, operation, context));
CREATE TABLE IF NOT EXISTS maps_causal (
  model VARCHAR, operation VARCHAR, selection VARCHAR, n_heads INTEGER, draw INTEGER, accuracy DOUBLE,
  base_accuracy DOUBLE, n_prompts INTEGER, PRIMARY KEY (model, operation, selection, n_heads, draw));
CREATE TABLE IF NOT EXISTS score_functions (
  score_fn VARCHAR PRIMARY KEY, inactive_when VARCHAR);
"""
# Columns added after their table first shipped: a database built before gets them on its next writable open.
MIGRATIONS = """
ALTER TABLE domain_head_ablation ADD COLUMN IF NOT EXISTS loss_mean_ablated DOUBLE;
ALTER TABLE domain_head_ablation ADD COLUMN IF NOT EXISTS delta_loss_mean DOUBLE;
"""


def views() -> str:
    """SQL of the views, one branch per registered score function."""
    fns = SCORE_FUNCTIONS.values()
    long = " UNION ALL ".join(
        f"SELECT model, dataset, example, layer, head, '{f.key}' AS score_fn, {f.key} AS score FROM head_scores"
        for f in fns)
    inactive = "\n           ".join(
        f"WHEN '{f.key}' THEN ({f.sql_predicate('s.score', 't.threshold')})::INT" for f in fns)
    return f"""
CREATE OR REPLACE VIEW head_scores_long AS {long};
CREATE OR REPLACE VIEW head_summary AS
SELECT s.model, s.score_fn, s.layer, s.head, count(*) AS n_examples,
  avg(s.score) AS mean, median(s.score) AS median,
  quantile_cont(s.score, 0.05) AS q05, quantile_cont(s.score, 0.25) AS q25,
  quantile_cont(s.score, 0.75) AS q75, quantile_cont(s.score, 0.95) AS q95,
  t.task, t.target_fraction, t.threshold,
  avg(CASE s.score_fn {inactive} END) AS fraction_inactive
FROM head_scores_long s
JOIN score_functions f USING (score_fn)
LEFT JOIN thresholds t ON t.model = s.model AND t.score_fn = s.score_fn
GROUP BY ALL;
"""


def connect(path: str | Path, *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open the database; a writable connection creates the schema and views if missing (and adds the columns
    of :data:`MIGRATIONS` to an older database)."""
    if read_only:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no database at {path}; run the workflow first (bash scripts/run.sh)")
        return duckdb.connect(str(path), read_only=True)
    con = duckdb.connect(str(path))
    con.execute(SCHEMA)
    con.execute(MIGRATIONS)
    for table in _SCORE_TABLES:  # score functions registered after this database (or this module) was made
        have = {d[0] for d in con.execute(f"SELECT * FROM {table} LIMIT 0").description}
        for k in score_keys():
            if k not in have:
                con.execute(f"ALTER TABLE {table} ADD COLUMN {k} DOUBLE")
    con.executemany("INSERT OR REPLACE INTO score_functions VALUES (?, ?)",
                    [(f.key, f.inactive_when) for f in SCORE_FUNCTIONS.values()])
    con.execute(views())
    return con


def _sql_list(paths: Iterable[Path]) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def ingest_models(con, model_jsons: Iterable[Path]) -> int:
    rows = [json.loads(Path(p).read_text()) for p in model_jsons]
    if not rows:
        return 0
    cols = ["model", "upstream", "family", "variant", "quantisation", "n_params", "n_layers", "n_heads",
            "n_kv_heads", "head_dim", "d_model", "source_sha256"]
    con.executemany(f"INSERT OR REPLACE INTO models VALUES ({', '.join('?' * len(cols))})",
                    [[r.get(c) for c in cols] for r in rows])
    return len(rows)


def ingest_scores(con, shards: list[Path], corpora: dict[str, Path]) -> int:
    """Load score shards (``extract.score`` Parquet) and their examples; returns head_scores rows seen."""
    if not shards:
        return 0
    files = _sql_list(shards)
    cols = ", ".join(score_keys())
    con.execute(f"""INSERT OR REPLACE INTO head_scores
        SELECT model, dataset, example_id, layer, head, {cols} FROM read_parquet({files})""")
    meta = con.execute(f"""SELECT DISTINCT model, dataset, example_id, n_tokens, bos_first
                           FROM read_parquet({files})""").fetchall()
    info = {}
    for name, path in corpora.items():
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    ex = json.loads(line)
                    info[(name, str(ex["id"]))] = (ex.get("domain"), ex.get("max_tokens"), ex.get("sha256"))
    rows = []
    for m, d, e, n, b in meta:
        domain, max_tokens, sha = info.get((d, e), (None, None, None))
        rows.append((m, d, e, domain, n, max_tokens, b, sha))
    con.executemany("INSERT OR REPLACE INTO examples VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    return con.execute(f"SELECT count(*) FROM read_parquet({files})").fetchone()[0]


def ingest(path: str | Path, *, model_jsons: Iterable[Path] = (), shards: Iterable[Path] = (),
           corpora: dict[str, Path] | None = None, tables: dict[str, list[Path]] | None = None) -> dict[str, int]:
    """Upsert everything given into the database at ``path`` in one transaction; returns row counts.

    ``tables``: table name -> Parquet files to upsert into it (columns matched by name; a column some files
    lack is NULL in their rows).
    """
    con = connect(path)
    try:
        con.execute("BEGIN TRANSACTION")
        ingest_models(con, model_jsons)
        ingest_scores(con, sorted(Path(s) for s in shards), corpora or {})
        for table, files in (tables or {}).items():
            if table not in TABLES:
                raise ValueError(f"unknown table {table!r}; tables: {', '.join(TABLES)}")
            files = [files] if isinstance(files, (str, Path)) else list(files)
            if files:
                con.execute(f"INSERT OR REPLACE INTO {table} BY NAME SELECT * FROM read_parquet({_sql_list(files)}, union_by_name = true)")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    counts = row_counts(con)
    con.close()
    return counts


def build(path: str | Path, *, base: str | Path | None = None, **parts) -> dict[str, int]:
    """Write a database from ``parts`` (see :func:`ingest`) to a temporary file, then rename it.

    ``base``: an existing database to start from (copied, never modified); else the database starts empty.
    """
    if base is not None and not Path(base).is_file():
        raise FileNotFoundError(f"no base database at {base}; build it first")
    with atomic_path(path) as tmp:
        tmp.unlink(missing_ok=True)
        try:
            if base is not None:
                shutil.copyfile(base, tmp)
            counts = ingest(tmp, **parts)
        finally:
            Path(str(tmp) + ".wal").unlink(missing_ok=True)
    return counts


TABLES = ("models", "examples", "head_scores", "thresholds", "ablation_results", "calibration_scores",
          "distribution_tests", "bb_metrics", "maps_scores")
TABLES += ("domain_head_ablation",)
TABLES += ("finetune_log",)
TABLES += ("maps_salient", "maps_dynamic", "maps_correlations", "maps_causal")


def row_counts(con) -> dict[str, int]:
    return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}


def checksum(con) -> str:
    """An order-independent digest of head_scores (for 'same database' checks across reruns)."""
    cols = " || '|' || ".join(["model", "dataset", "example", "layer::VARCHAR", "head::VARCHAR"]
                              + [f"{k}::VARCHAR" for k in score_keys()])
    return str(con.execute(f"SELECT bit_xor(hash({cols})) FROM head_scores").fetchone()[0])


def query(con, sql: str, params: list | None = None):
    """Run ``sql`` and return a polars DataFrame (through NumPy columns; no pyarrow needed)."""
    import polars as pl

    cur = con.execute(sql, params or [])
    cols = [d[0] for d in cur.description]
    import numpy as np

    data = cur.fetchnumpy()

    def column(a):
        if isinstance(a, np.ma.MaskedArray) or a.dtype == object:  # nullable / strings: let polars infer
            return pl.Series(np.ma.asarray(a).astype(object).tolist() if not isinstance(a, np.ma.MaskedArray)
                             else [None if m else v for v, m in zip(a.data.tolist(), np.ma.getmaskarray(a))])
        return a

    return pl.DataFrame({c: column(data[c]) for c in cols})
