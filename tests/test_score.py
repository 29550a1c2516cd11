"""Shard scoring: input validation, atomic writes, and the written numbers equal score_heads."""
import json

import numpy as np
import polars as pl
import pytest

from analysis.core.score_functions import score_keys
from analysis.core.io import write_parquet
from extract.score import read_examples, score_shard


def test_read_examples_validates(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"id": "a", "text": "hello"}) + "\n" + json.dumps({"id": "b", "text": "  "}) + "\n")
    with pytest.raises(ValueError, match=":2: each line needs"):
        read_examples(p)
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no examples"):
        read_examples(tmp_path / "e.jsonl")


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    out = tmp_path / "x" / "s.parquet"
    df = pl.DataFrame({"a": [1, 2]})
    write_parquet(df, out)
    assert pl.read_parquet(out).equals(df)

    def broken(self, path, *a, **k):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", broken)
    with pytest.raises(OSError):
        write_parquet(pl.DataFrame({"a": [3]}), out)
    assert pl.read_parquet(out).equals(df)  # the earlier result is intact
    assert [p.name for p in out.parent.iterdir()] == ["s.parquet"]  # no temporary left behind


@pytest.mark.slow
def test_score_shard_matches_score_heads(tmp_path, zoo_model):
    from extract.engine.scores import encode_texts, score_heads

    texts = ["The cat sat on the mat.", "import os\nprint(os.getcwd())", "Rain is expected tomorrow.",
             "A short one."]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": f"ex{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    parts = [score_shard("smollm2-135m-instruct", data, "toy", tmp_path / f"s{i}.parquet", shard=i, num_shards=2,
                         progress=False) for i in range(2)]
    both = pl.concat(parts)
    assert sorted(both["example_id"].unique().to_list()) == ["ex0", "ex1", "ex2", "ex3"]
    assert set(parts[0]["example"].unique().to_list()) == {0, 2}
    assert both["model"].unique().to_list() == ["smollm2-135m-instruct"] and both["dataset"].unique().to_list() == ["toy"]
    assert both["bos_first"].all()
    model, tok = zoo_model("smollm2-135m-instruct")
    ref = score_heads(model, encode_texts(tok, texts))
    got = both.sort("example", "layer", "head").select(score_keys()).to_numpy()
    np.testing.assert_allclose(got, ref.sort("example", "layer", "head").select(score_keys()).to_numpy(), rtol=1e-5)
    assert pl.read_parquet(tmp_path / "s1.parquet").equals(parts[1])


def test_shard_records_the_self_check(tmp_path):
    """Provenance: the shard's Parquet metadata holds the engine's self-check of the model (passed, per layer)."""
    from extract.engine import selfcheck
    from extract.score import SELF_CHECK_KEY
    from tiny import tiny_model
    from tiny_tokenizer import tiny_tokenizer

    model_dir = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": f"e{i}", "text": t}) + "\n" for i, t in enumerate(["a b c", "b c a b"])))
    selfcheck.reset()
    score_shard(str(model_dir), data, "toy", tmp_path / "s.parquet", progress=False)
    (rec,) = json.loads(pl.read_parquet_metadata(tmp_path / "s.parquet")[SELF_CHECK_KEY])
    assert rec["passed"] and rec["backend"] == "flash_cpu" and rec["layers"] == 3 and rec["seconds"] > 0
