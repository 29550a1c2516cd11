"""The score database (``results/scores.duckdb``): schema, idempotent ingestion, views.

DuckDB allows one writing process, so scoring jobs write Parquet shards and one ingest job loads them.
Ingestion runs in one transaction per call and upserts by primary key: ingesting the same files again
changes nothing, and a killed ingest leaves the previous contents. ``build()`` writes a fresh database to
a temporary file and renames it, so the workflow's database is never half-written.

Tables: declared once, with their columns, types and primary keys, in :mod:`analysis.core.tables`
(``python -m analysis.core.tables`` prints them); the list at the end of this docstring is generated
from there.

Views: ``head_scores_long`` (one row per score function) and ``head_summary`` (per model, function,
layer, head: mean, median, quantiles, fraction of examples on the inactive side of each threshold).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import duckdb

from analysis.core import tables
from analysis.core.io import atomic_path
from analysis.core.score_functions import SCORE_FUNCTIONS, score_keys

_SCORE_TABLES = ("head_scores", "calibration_scores")

__doc__ = (__doc__ or "") + "\nTables (primary keys in brackets):\n\n" + tables.describe()

def _create(table: tables.Table) -> str:
    cols = ", ".join(f"{c.name} {c.sql_type}" for c in table.columns)
    return f"CREATE TABLE IF NOT EXISTS {table.name} (\n  {cols},\n  PRIMARY KEY ({', '.join(table.key)}));"


def schema() -> str:
    """DDL of every table of :mod:`analysis.core.tables` (``CREATE TABLE IF NOT EXISTS``, in declaration order),
    with one DOUBLE column per score function registered now."""
    return "\n".join(_create(t) for t in tables.all_tables()) + "\n"


def migrations() -> str:
    """The columns added after their table first shipped (``Table.added``): a database built before gets them
    on its next writable open."""
    return "".join(f"ALTER TABLE {t.name} ADD COLUMN IF NOT EXISTS {c.name} {c.sql_type};\n"
                   for t in tables.all_tables() for c in t.columns if c.name in t.added)


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


class DatabaseFileError(ValueError):
    """A database or Parquet file that cannot be read (damaged, truncated by a crash, or locked by another
    process); the message names the file and the fix. A ValueError, so the command line prints it on one line."""


REBUILD = "delete it and run the workflow again (bash scripts/run.sh), which writes it anew"


def _open(path: str | Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    try:
        return duckdb.connect(str(path), read_only=read_only)
    except duckdb.IOException as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "lock" in first.lower():
            raise DatabaseFileError(f"{path} is in use by another process ({first}); wait for that run to finish "
                                    "or stop it, then run again") from None
        raise DatabaseFileError(f"{path} is not a readable DuckDB database, e.g. truncated by a crash ({first}); "
                                f"{REBUILD}") from None


def check_parquet(files: Iterable[str | Path]) -> None:
    """Every file is a whole Parquet file (``PAR1`` at both ends), else a :class:`DatabaseFileError` naming it:
    a shard truncated by a crash or a full disk is found before any of it is ingested."""
    for f in files:
        try:
            size = os.path.getsize(f)
            with open(f, "rb") as fh:
                head = fh.read(4)
                fh.seek(max(size - 4, 0))
                tail = fh.read(4)
        except FileNotFoundError:
            raise FileNotFoundError(f"Parquet file {f} not found; run the workflow step that writes it") from None
        if size < 12 or head != b"PAR1" or tail != b"PAR1":
            raise DatabaseFileError(f"{f} is not a complete Parquet file ({size} bytes; truncated or damaged, e.g. "
                                    f"by a crash or a full disk); {REBUILD}")


def connect(path: str | Path, *, read_only: bool = False) -> duckdb.DuckDBPyConnection:
    """Open the database; a writable connection creates the schema and views if missing (and adds the columns
    of :func:`migrations` to an older database). A damaged or locked file: :class:`DatabaseFileError`."""
    if read_only:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no database at {path}; run the workflow first (bash scripts/run.sh)")
        return _open(path, read_only=True)
    con = _open(path, read_only=False)
    con.execute(schema())
    _recreate_rekeyed(con, path)
    con.execute(migrations())
    for table in _SCORE_TABLES:  # score functions registered after this database (or this module) was made
        have = {d[0] for d in con.execute(f"SELECT * FROM {table} LIMIT 0").description}
        for k in score_keys():
            if k not in have:
                con.execute(f"ALTER TABLE {table} ADD COLUMN {k} DOUBLE")
    con.executemany("INSERT OR REPLACE INTO score_functions VALUES (?, ?)",
                    [(f.key, f.inactive_when) for f in SCORE_FUNCTIONS.values()])
    con.execute(views())
    return con


def _recreate_rekeyed(con, path) -> None:
    """A table made before a key column of its declaration existed (``bb_metrics`` before ``layer`` and
    ``part``) is made again while it is empty (as in a core database, which never holds its rows); with rows,
    an error: build the database again."""
    for t in tables.all_tables():
        have = {d[0] for d in con.execute(f"SELECT * FROM {t.name} LIMIT 0").description}
        if missing := [k for k in t.key if k not in have]:
            if con.execute(f"SELECT count(*) FROM {t.name}").fetchone()[0]:
                raise ValueError(f"{path}: table {t.name} was made before its key column(s) {', '.join(missing)} "
                                 "existed and holds rows; build the database again")
            con.execute(f"DROP TABLE {t.name}")
            con.execute(_create(t))


def _sql_literal(v) -> str:
    return "'" + v.replace("'", "''") + "'" if isinstance(v, str) else str(int(v))


def _parquet_select(con, table: str, files: str) -> str:
    """The SELECT list that upserts Parquet ``files`` into ``table``: every column, NULL in a key column
    declared with ``null_as`` replaced by that sentinel (a primary key cannot hold NULL; files without the
    column get the sentinel too)."""
    subs = [c for c in tables.get(table).columns if c.null_as is not None]
    if not subs:
        return "*"
    have = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM read_parquet({files}, union_by_name = true)").fetchall()}
    rep = [f"coalesce({c.name}, {_sql_literal(c.null_as)}) AS {c.name}" for c in subs if c.name in have]
    add = [f"{_sql_literal(c.null_as)} AS {c.name}" for c in subs if c.name not in have]
    return "*" + (f" REPLACE ({', '.join(rep)})" if rep else "") + "".join(", " + a for a in add)


def _sql_list(paths: Iterable[Path]) -> str:
    return "[" + ", ".join("'" + str(p).replace("'", "''") + "'" for p in paths) + "]"


def ingest_models(con, model_jsons: Iterable[Path]) -> int:
    rows = [json.loads(Path(p).read_text()) for p in model_jsons]
    if not rows:
        return 0
    cols = tables.column_names("models")
    con.executemany(f"INSERT OR REPLACE INTO models VALUES ({', '.join('?' * len(cols))})",
                    [[r.get(c) for c in cols] for r in rows])
    return len(rows)


def ingest_scores(con, shards: list[Path], corpora: dict[str, Path]) -> int:
    """Load score shards (``extract.score`` Parquet) and their examples; returns head_scores rows seen."""
    if not shards:
        return 0
    source = f"read_parquet({_sql_list(shards)}, union_by_name = true)"  # shards of older code: fewer scores
    present = {r[0] for r in con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}
    cols = ", ".join(k if k in present else f"NULL AS {k}" for k in score_keys())  # not computed: NULL
    con.execute(f"""INSERT OR REPLACE INTO head_scores
        SELECT model, dataset, example_id, layer, head, {cols} FROM {source}""")
    beyond = "beyond_context" if "beyond_context" in present else "NULL::BOOLEAN"  # older shards: unknown
    run = "run_id" if "run_id" in present else "NULL::VARCHAR"
    meta = con.execute(f"""SELECT DISTINCT model, dataset, example_id, n_tokens, bos_first, {beyond}, {run}
                           FROM {source}""").fetchall()
    info = {}
    for name, path in corpora.items():
        with open(path, encoding="utf-8") as f:
            for k, line in enumerate(f):
                if line.strip():
                    try:
                        ex = json.loads(line.rstrip("\r\n"))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}:{k + 1}: not valid JSON ({e.msg} at column {e.colno}); fix or "
                                         "delete that line (one JSON object per line)") from None
                    info[(name, str(ex["id"]))] = (ex.get("domain"), ex.get("max_tokens"), ex.get("sha256"))
    rows = []
    for m, d, e, n, b, far, run_id in meta:
        domain, max_tokens, sha = info.get((d, e), (None, None, None))
        rows.append((m, d, e, domain, n, max_tokens, b, sha, far, run_id))
    cols = tables.column_names("examples")
    con.executemany(f"INSERT OR REPLACE INTO examples ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                    rows)
    ingest_file_runs(con, shards)
    return con.execute(f"SELECT count(*) FROM {source}").fetchone()[0]


def ingest_file_runs(con, files: list[Path]) -> int:
    """The ``runs`` rows held in Parquet files' metadata (key ``analysis.core.tables.RUN_KEY``: score shards
    and every job's result files, ``analysis.core.provenance``; files written before it have none); returns
    the rows read."""
    if not files:
        return 0
    found = con.execute(f"""SELECT file_name, decode(value) FROM parquet_kv_metadata({_sql_list(files)})
                            WHERE key = '{tables.RUN_KEY}'::BLOB""").fetchall()
    cols = tables.column_names("runs")
    rows = []
    for f, text in found:
        try:
            run = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatabaseFileError(f"{f}: its {tables.RUN_KEY} metadata is not JSON ({e.msg}); {REBUILD}") from None
        rows.append([run.get(c) for c in cols])
    if rows:
        con.executemany(f"INSERT OR REPLACE INTO runs VALUES ({', '.join('?' * len(cols))})", rows)
    return len(rows)


def ingest(path: str | Path, *, model_jsons: Iterable[Path] = (), shards: Iterable[Path] = (),
           corpora: dict[str, Path] | None = None, tables: dict[str, list[Path]] | None = None) -> dict[str, int]:
    """Upsert everything given into the database at ``path`` in one transaction; returns row counts.

    ``tables``: table name -> Parquet files to upsert into it (columns matched by name; a column some files
    lack is NULL in their rows, or a key column's ``null_as`` sentinel, as is NULL there).
    """
    shards = sorted(Path(s) for s in shards)
    table_files = {t: [f] if isinstance(f, (str, Path)) else list(f) for t, f in (tables or {}).items()}
    check_parquet([*shards, *(f for fs in table_files.values() for f in fs)])
    con = connect(path)
    try:
        con.execute("BEGIN TRANSACTION")
        ingest_models(con, model_jsons)
        ingest_scores(con, shards, corpora or {})
        for table, files in table_files.items():
            if table not in TABLES:
                raise ValueError(f"unknown table {table!r}; tables: {', '.join(TABLES)}")
            if files:
                sql_files = _sql_list(files)
                con.execute(f"INSERT OR REPLACE INTO {table} BY NAME SELECT {_parquet_select(con, table, sql_files)} "
                            f"FROM read_parquet({sql_files}, union_by_name = true)")
                ingest_file_runs(con, files)
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
    if base is not None:
        _open(base, read_only=True).close()  # a damaged base: an error naming it, not the temporary copy
    with atomic_path(path) as tmp:
        tmp.unlink(missing_ok=True)
        try:
            if base is not None:
                shutil.copyfile(base, tmp)
            counts = ingest(tmp, **parts)
        finally:
            Path(str(tmp) + ".wal").unlink(missing_ok=True)
    return counts


TABLES = tables.names()  # every declared table, in creation order


def row_counts(con) -> dict[str, int]:
    return {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}


def checksum(con) -> str:
    """An order-independent digest of head_scores (for 'same database' checks across reruns). The ``runs``
    table is not in it: its start and end times differ between two runs of one config by nature
    (``scripts/checksums.py`` leaves those two columns out by name)."""
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
