"""Bad model input (issue #20 §4): a configured local model directory that does not exist, and a model
conversion half-written by a crash (detected by its missing source.json and done again; a complete one is
never touched)."""
import json
import os

import pytest

from extract.errors import UnknownModelError
from extract.models import load as models
from extract.models.fetch import converted_dir
from extract.models.zoo import model_name_problem


@pytest.mark.parametrize("spec", ["./models/mine", "models/mine/", "/nonexistent/mine", "a/b/c", "~/no-such-model"])
def test_a_missing_local_model_path_is_named(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    path = os.path.expanduser(spec).rstrip("/")
    where = "" if os.path.isabs(path) else f" (from {tmp_path})"
    want = (f"local model path {os.path.normpath(path) if spec.startswith('./') else path}{where} does not exist; "
            "check the path (a directory written by save_pretrained, or a .gguf file), or give a zoo name or a hub "
            "id (org/name)")
    assert model_name_problem(spec) == want  # what the workflow's config check prints after the config key
    with pytest.raises(UnknownModelError) as e:
        models.load_model(spec)
    assert str(e.value) == f"model {spec!r}: {want}"


def test_a_path_beside_an_existing_folder_is_local_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert model_name_problem("models/mine").startswith(f"local model path models/mine (from {tmp_path}) does not")
    assert model_name_problem("Qwen/Qwen2.5-0.5B") is None  # no such folder: a hub id
    assert model_name_problem("smollm2-135m-instruct") is None
    assert model_name_problem("no-such-model").startswith("not a zoo name (")
    (tmp_path / "models" / "mine").mkdir()
    assert model_name_problem("models/mine") is None  # exists: load_model says if it is no model directory


@pytest.fixture
def fake_transformers(tmp_path, monkeypatch):
    """convert() with transformers' GGUF loading replaced by a tiny model; counts the conversions."""
    import transformers

    from tiny import tiny_model
    from tiny_tokenizer import tiny_tokenizer

    monkeypatch.setenv("DORMANT_CACHE", str(tmp_path / "cache"))
    calls = []

    def model(*a, **k):
        calls.append(1)
        if os.environ.get("FAKE_CRASH"):
            raise KeyboardInterrupt  # killed mid-conversion
        return tiny_model("llama")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tiny_tokenizer())
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    return gguf, {"name": "m", "sha256": "ab" * 32}, calls


def test_a_half_written_conversion_is_done_again(fake_transformers, monkeypatch):
    gguf, source, calls = fake_transformers
    final = converted_dir(source["sha256"])
    final.mkdir(parents=True)
    (final / "model.safetensors").write_bytes(b"half")  # a crash before source.json, the completion mark
    assert models.convert(gguf, source) == final and calls == [1]
    assert json.loads((final / "source.json").read_text()) == source
    assert (final / "model.safetensors").stat().st_size > 100 and (final / "config.json").is_file()
    assert [p.name for p in final.parent.iterdir()] == [final.name]  # no temporary left
    done = {p.name: p.stat().st_mtime_ns for p in final.iterdir()}
    assert models.convert(gguf, source) == final and calls == [1]  # complete: reused, untouched
    assert {p.name: p.stat().st_mtime_ns for p in final.iterdir()} == done


def test_an_interrupted_conversion_leaves_the_complete_one(fake_transformers, monkeypatch):
    gguf, source, calls = fake_transformers
    other = {**source, "sha256": "cd" * 32}
    models.convert(gguf, source)
    monkeypatch.setenv("FAKE_CRASH", "1")
    with pytest.raises(KeyboardInterrupt):
        models.convert(gguf, other)
    assert not converted_dir(other["sha256"]).exists()  # nothing half-written under the final name
    assert [p.name for p in converted_dir(source["sha256"]).parent.iterdir()] == [source["sha256"][:16]]
    assert (converted_dir(source["sha256"]) / "source.json").is_file()  # the earlier conversion is intact
    monkeypatch.delenv("FAKE_CRASH")
    assert models.convert(gguf, other) == converted_dir(other["sha256"])  # the rerun converts it



def test_native_bf16_is_read_from_the_cpu_flags():
    """bf16 on a CPU is fast only with AMX or AVX512-BF16 (docs/bf16.md); elsewhere loading warns, naming the fix."""
    from extract.models.load import cpu_has_native_bf16

    assert cpu_has_native_bf16("flags\t: fpu sse2 avx512f amx_bf16 amx_tile")
    assert cpu_has_native_bf16("flags\t: fpu avx512f avx512_bf16")
    assert not cpu_has_native_bf16("flags\t: fpu sse2 avx2 avx512f avx512_vnni")
