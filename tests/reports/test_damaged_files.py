"""Damaged files left by a crash or a full disk (issue #20 §4): a truncated Parquet shard, a truncated or
foreign DuckDB file, a database locked by another run, a bad corpus line. Each is a one-line error naming the
file and the fix, and the database built before survives unchanged."""
import json
import subprocess
import sys
import time

import pytest

from fakes import fake_inputs, fake_shard

from analysis.database import DatabaseFileError, build, checksum, connect, ingest, row_counts

REBUILD = "delete it and run the workflow again (bash scripts/run.sh), which writes it anew"


def good_database(tmp_path):
    parts, _ = fake_inputs(tmp_path)
    db = tmp_path / "scores.duckdb"
    build(db, **parts)
    con = connect(db, read_only=True)
    before = (checksum(con), row_counts(con))
    con.close()
    return db, parts, before


def unchanged(db, before):
    con = connect(db, read_only=True)
    assert (checksum(con), row_counts(con)) == before
    con.close()
    assert sorted(p.name for p in db.parent.iterdir() if p.name.startswith(".")) == []  # no temporary left


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return len(data[: int(len(data) * keep)])


def test_truncated_shard_is_named_and_the_old_database_survives(tmp_path):
    db, parts, before = good_database(tmp_path)
    bad = tmp_path / "s2.parquet"
    fake_shard(bad, dataset="d2")
    n = truncate(bad)
    with pytest.raises(DatabaseFileError) as e:
        build(db, **{**parts, "shards": [*parts["shards"], bad]})
    assert str(e.value) == (f"{bad} is not a complete Parquet file ({n} bytes; truncated or damaged, e.g. by a "
                            f"crash or a full disk); {REBUILD}")
    unchanged(db, before)
    with pytest.raises(DatabaseFileError, match="not a complete Parquet file"):  # an ingest into it, too
        ingest(db, tables={"thresholds": [bad]})
    unchanged(db, before)


def test_truncated_database_is_named(tmp_path):
    db, parts, _ = good_database(tmp_path)
    truncate(db, 0.05)  # cuts into the blocks in use (a cut in the unused tail goes unseen)
    for read_only in (True, False):
        with pytest.raises(DatabaseFileError) as e:
            connect(db, read_only=read_only)
        msg = str(e.value)
        assert msg.startswith(f"{db} is not a readable DuckDB database, e.g. truncated by a crash (IO Error: ")
        assert msg.endswith(f"); {REBUILD}") and "\n" not in msg
    base = tmp_path / "core.duckdb"
    base.write_bytes(b"not a database" * 100)
    with pytest.raises(DatabaseFileError, match=f"^{base} is not a readable DuckDB database"):
        build(tmp_path / "full.duckdb", base=base, **parts)  # names the base, not its temporary copy
    assert not (tmp_path / "full.duckdb").exists()
    # the damaged file is replaced whole by a fresh build
    build(db, **parts)
    assert row_counts(connect(db, read_only=True))["head_scores"] > 0


def test_database_locked_by_another_run(tmp_path):
    db, parts, before = good_database(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                               "print('open', flush=True); time.sleep(60)", str(db)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(DatabaseFileError) as e:
            ingest(db, **parts)
        msg = str(e.value)
        assert msg.startswith(f"{db} is in use by another process (IO Error: Could not set lock on file")
        assert msg.endswith("; wait for that run to finish or stop it, then run again") and "\n" not in msg
    finally:
        holder.kill()
        holder.wait()
    unchanged(db, before)


def test_bad_corpus_line_at_ingest_names_file_and_line(tmp_path):
    db, parts, before = good_database(tmp_path)
    corpus = parts["corpora"]["d"]
    corpus.write_text(corpus.read_text() + '{"id": "d/3", "text": \n')
    with pytest.raises(ValueError) as e:
        build(db, **parts)
    assert str(e.value) == (f"{corpus}:4: not valid JSON (Expecting value at column 23); fix or delete that line "
                            "(one JSON object per line)")
    unchanged(db, before)


def test_old_shards_without_beyond_context_ingest_as_null(tmp_path):
    db, parts, _ = good_database(tmp_path)
    con = connect(db, read_only=True)
    assert con.execute("SELECT DISTINCT beyond_context FROM examples").fetchall() == [(None,)]
    con.close()
