"""Bad input to a scoring job (issue #20 §4): a corpus JSONL with a bad line, a full disk while writing a
shard (the earlier shard survives), examples beyond the model's trained context (flagged per example)."""
import errno
import json

import polars as pl
import pytest

from analysis.core import io
from extract.errors import InputError
from extract.score import read_examples, score_shard


@pytest.mark.parametrize("line, message", [
    ('{"id": "b", "text": "x"', "not valid JSON (Expecting ',' delimiter at column 24); fix or delete that line "
                                "(one JSON object per line)"),
    ('["b", "x"]', 'a JSON list, not an object; write one {"id": ..., "text": ...} object per line'),
    ('{"text": "x"}', "each line needs an 'id' and a non-empty 'text'"),
])
def test_bad_corpus_line_names_file_and_line(tmp_path, line, message):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"id": "a", "text": "hello"}) + "\n\n" + line + "\n")
    with pytest.raises(InputError) as e:
        read_examples(p)
    assert str(e.value) == f"{p}:3: {message}"


def test_corpus_that_is_not_utf8(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "caf\xe9"}\n')
    with pytest.raises(InputError) as e:
        read_examples(p)
    assert str(e.value) == f"{p}:2: not UTF-8 text (invalid continuation byte); re-save the file as UTF-8"


@pytest.fixture
def tiny_dir(tmp_path):
    from tiny import tiny_model
    from tiny_tokenizer import tiny_tokenizer

    d = tmp_path / "tiny-llama"
    tiny_model("llama", max_position_embeddings=12).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def corpus(tmp_path, texts):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"id": f"e{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    return p


def test_examples_beyond_the_context_are_flagged_per_example(tmp_path, tiny_dir):
    data = corpus(tmp_path, ["a b c", "a b c d e f g h"])  # 6 and 16 tokens with BOS; context 12
    with pytest.warns(UserWarning, match=r"^1 of 2 sequences are longer than the model's trained context \(12"):
        df = score_shard(str(tiny_dir), data, "toy", tmp_path / "s.parquet", progress=False)
    flags = df.select("example_id", "n_tokens", "beyond_context").unique().sort("example_id").rows()
    assert flags == [("e0", 6, False), ("e1", 16, True)]
    stored = pl.read_parquet(tmp_path / "s.parquet")
    assert stored.columns[-2:] == ["beyond_context", "run_id"]  # added after the scores, then the run (provenance)
    assert stored.filter(pl.col("beyond_context"))["example_id"].unique().to_list() == ["e1"]


def test_disk_full_keeps_the_earlier_shard(tmp_path, tiny_dir, monkeypatch):
    out = tmp_path / "s.parquet"
    first = score_shard(str(tiny_dir), corpus(tmp_path, ["a b c"]), "toy", out, progress=False)

    def full(self, path, *a, **k):
        open(path, "wb").write(b"PAR1 half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", full)
    with pytest.raises(io.WriteError) as e:
        score_shard(str(tiny_dir), corpus(tmp_path, ["b c a", "c a b"]), "toy", out, progress=False)
    assert str(e.value) == (f"no space left on the device of {out} while writing it; free some space and run "
                            "again (the previous file, if any, is kept)")
    monkeypatch.undo()
    assert pl.read_parquet(out).equals(first)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_real_full_disk_keeps_the_earlier_file(tmp_path):
    """A 256 KiB tmpfs (needs mount rights: skipped elsewhere; the monkeypatched test above runs everywhere)."""
    import subprocess

    import numpy as np

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = mnt / "s.parquet"
        small = pl.DataFrame({"a": [1.0, 2.0]})
        io.write_parquet(small, out)
        with pytest.raises(io.WriteError, match=f"^no space left on the device of {out} while writing it"):
            io.write_parquet(pl.DataFrame({"a": np.random.default_rng(0).random(200_000)}), out)
        assert pl.read_parquet(out).equals(small)
        assert [p.name for p in mnt.iterdir()] == ["s.parquet"]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
