"""BIG-bench tar reading, the corpus truncation protocol, the task registry and the MMLU CSV loader."""
import hashlib
import io
import json
import subprocess
import sys
import tarfile

import pytest

from extract.data import bigbench, corpora, tasks
from extract.cli import main
from extract.data.corpora import CHARS_PER_TOKEN, assign_documents, draw_lengths, sample_corpus
from extract.data.tasks import SHOT_POOL, load_task, load_tasks
from analysis.core.io import write_jsonl
from extract.errors import ChecksumError, DormantError
from extract.score import read_examples
from fakes import write_mmlu

ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks"


def mc_task(n, n_choices=4, prefix=""):
    examples = []
    for i in range(n):
        scores = {f"choice {i}.{j}": int(j == i % n_choices) for j in range(n_choices)}
        examples.append({"input": f"Question {i}?", "target_scores": scores})
    examples.append({"input": "Two right answers?", "target_scores": {"x": 1, "y": 1, "z": 0, "w": 0}})
    examples.append({"input": "Free text", "target": "no scores"})
    return {"name": "mc", "task_prefix": prefix, "examples": examples}


def text_task(lengths):
    words = "The quick brown fox jumps over the lazy dog near the river bank today. "
    return {"name": "gem", "examples": [{"input": (words * (n // len(words) + 1))[:n] + f" #{i}", "target": "t"}
                                        for i, n in enumerate(lengths)]}


@pytest.fixture()
def bb_tar(tmp_path, monkeypatch):
    """A small tar in the sdist's layout; DORMANT_BIGBENCH_TAR and DORMANT_CACHE point into tmp_path."""
    members = {
        "gem/xsum": text_task([100, 300, 20000, 800, 7000, 2500, 50, 12000, 400, 3000]),
        "gem/wikilingua_en": text_task([500, 900, 1500]),
        "elementary_math_qa/question_with_mathematical_hint": mc_task(40, 5),
        "general_knowledge": mc_task(12, 5),
        "logical_deduction/five_objects": mc_task(9, 5, prefix="Five objects.\n\n"),
        "logical_deduction": {"name": "parent", "examples": []},
    }
    path = tmp_path / "bigbench-fixture.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, data in list(members.items()) + [("README", None)]:
            raw = json.dumps(data).encode() if data is not None else b"not a task"
            info = tarfile.TarInfo(f"{ROOT}/{name}/task.json" if data is not None else f"{ROOT}/{name}.md")
            info.size = len(raw)
            tf.addfile(info, io.BytesIO(raw))
    monkeypatch.setenv("DORMANT_BIGBENCH_TAR", str(path))
    monkeypatch.setenv("DORMANT_CACHE", str(tmp_path / "cache"))
    return path, members


def test_read_tasks_extracts_once(bb_tar, monkeypatch):
    _, members = bb_tar
    got = bigbench.read_tasks(["gem/xsum", "logical_deduction/five_objects"], progress=False)
    assert got["gem/xsum"] == members["gem/xsum"]
    assert got["logical_deduction/five_objects"] == members["logical_deduction/five_objects"]
    assert bigbench.task_paths(progress=False) == sorted(members)
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: pytest.fail("the tar was scanned again"))
    assert bigbench.read_tasks(["gem/xsum"], progress=False)["gem/xsum"] == members["gem/xsum"]
    with pytest.raises(DormantError, match="no BIG-bench task 'nope'.*general_knowledge"):
        bigbench.read_tasks(["nope"], progress=False)


def test_fetch_refuses_and_deletes_a_mismatch(tmp_path, monkeypatch):
    monkeypatch.delenv("DORMANT_BIGBENCH_TAR", raising=False)
    monkeypatch.setenv("DORMANT_CACHE", str(tmp_path))
    calls = []

    def fake_download(package, version, dest, progress=True):
        calls.append(package)
        dest.mkdir(parents=True, exist_ok=True)
        (dest / bigbench.FILENAME).write_bytes(b"not the sdist")
        return dest / bigbench.FILENAME

    monkeypatch.setattr(bigbench, "download_sdist", fake_download)
    with pytest.raises(ChecksumError, match="sha256 mismatch.*deleted") as e:
        bigbench.fetch(progress=False)
    assert str(e.value).count("\n") == 0
    assert not (tmp_path / "bigbench" / bigbench.FILENAME).exists()
    monkeypatch.setattr(bigbench, "SHA256", hashlib.sha256(b"not the sdist").hexdigest())
    monkeypatch.setattr(bigbench, "SIZE", len(b"not the sdist"))
    path = bigbench.fetch(progress=False)
    assert path.read_bytes() == b"not the sdist" and calls == ["bigbench", "bigbench"]
    assert bigbench.fetch(progress=False) == path and len(calls) == 2  # verified once: no new download


def test_download_falls_back_to_older_pip(tmp_path, monkeypatch):
    """pip >= 26.3 refuses sdists declaring direct-URL dependencies: the download reruns with pip 26.2."""
    cmds = []

    def fake_run(cmd, progress):
        cmds.append(cmd)
        if len(cmds) == 1:
            return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Distributions from PyPI cannot declare direct "
                                                            "URL dependencies.\nbigbench depends on bleurt @ file:")
        (tmp_path / "bigbench-1.0.0.tar.gz").write_bytes(b"x")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(bigbench, "_run_pip", fake_run)
    monkeypatch.setattr(bigbench, "ensure_wheel", lambda p, v, progress: tmp_path / f"{p}-{v}-py3-none-any.whl")
    assert bigbench.download_sdist("bigbench", "1.0.0", tmp_path, progress=False).name == "bigbench-1.0.0.tar.gz"
    assert cmds[0][1:3] == ["-m", "pip"] and cmds[1][1].endswith(f"pip-{bigbench.PIP_FALLBACK}-py3-none-any.whl/pip")
    assert cmds[1][2:] == ["download", "--no-deps", "--no-binary", ":all:", "-d", str(tmp_path),
                           "bigbench==1.0.0", "--quiet", "--progress-bar", "off"]


def test_lengths_seeded_within_range():
    a = draw_lengths(200, 10, 3000, seed=0)
    assert a == draw_lengths(200, 10, 3000, seed=0)
    assert a != draw_lengths(200, 10, 3000, seed=1)
    assert min(a) >= 10 and max(a) <= 3000 and len(set(a)) > 150
    assert min(a) < 300 and max(a) > 2700  # spread over the range
    assert set(draw_lengths(500, 3, 5, seed=2)) == {3, 4, 5}
    with pytest.raises(ValueError):
        draw_lengths(3, 10, 5, seed=0)


def test_assign_prefers_documents_long_enough():
    import random

    chars = [100, 5000, 700, 30000, 60, 12000]
    lengths = [1000, 5, 100, 1900]
    picked = assign_documents(chars, lengths, random.Random(0))
    assert len(set(picked)) == 4
    for slot, doc in enumerate(picked):
        assert chars[doc] >= CHARS_PER_TOKEN * lengths[slot], (slot, doc)
    # nothing long enough left: the longest free document
    assert assign_documents([10, 50, 20], [1000], random.Random(0)) == [1]
    with pytest.raises(ValueError, match="corpus has 3"):
        assign_documents([1, 2, 3], [1, 1, 1, 1], random.Random(0))


def test_sample_corpus_protocol(bb_tar, tmp_path):
    rows = sample_corpus("xsum", 6, 10, 2000, seed=3, progress=False)
    assert rows == sample_corpus("xsum", 6, 10, 2000, seed=3, progress=False)
    other = sample_corpus("xsum", 6, 10, 2000, seed=4, progress=False)
    assert [r["max_tokens"] for r in rows] != [r["max_tokens"] for r in other]
    assert [r["max_tokens"] for r in rows] == draw_lengths(6, 10, 2000, seed=3)
    texts = {f"xsum/{i}": ex["input"] for i, ex in enumerate(bb_tar[1]["gem/xsum"]["examples"])}
    for r in rows:
        assert 10 <= r["max_tokens"] <= 2000 and r["domain"] == "news" and r["corpus"] == "xsum"
        assert r["text"] == texts[r["id"]].strip()
        assert r["sha256"] == hashlib.sha256(r["text"].encode()).hexdigest()
    assert len({r["id"] for r in rows}) == 6
    longest = max(rows, key=lambda r: r["max_tokens"])
    assert len(longest["text"]) >= CHARS_PER_TOKEN * longest["max_tokens"]  # 3 fixture docs fit any length
    out = write_jsonl(tmp_path / "x" / "xsum.jsonl", rows)
    back = read_examples(out)  # the scorer's reader
    assert back == rows and not list(out.parent.glob(".*tmp"))
    assert sample_corpus("wikilingua", 2, 5, 50, progress=False)[0]["domain"] == "howto"
    with pytest.raises(ValueError, match="corpus has 3"):
        sample_corpus("wikilingua", 4, 5, 50, progress=False)


def test_math_corpus_pages(bb_tar):
    """math: 16 consecutive problems per document, each with its correct answer; ids name the first one."""
    examples = bb_tar[1]["elementary_math_qa/question_with_mathematical_hint"]["examples"]
    docs = corpora.corpus_documents("math", progress=False)
    assert [d[0] for d in docs] == ["math/0", "math/16", "math/32"]  # 42 examples: 16 + 16 + 10
    first = docs[0][1].split("\n\n")
    assert len(first) == 16 and first[3] == "Question 3?\nAnswer: choice 3.3"
    last = docs[2][1].split("\n\n")
    assert last[-2] == "Two right answers?\nAnswer: x" and last[-1] == "Free text\nAnswer: no scores"
    rows = sample_corpus("math", 3, 5, 50, progress=False)
    assert {r["domain"] for r in rows} == {"math"} and {r["id"] for r in rows} == {d[0] for d in docs}
    assert corpora.correct_target({"input": "q", "target": ["a", "b"]}) == "a"
    with pytest.raises(DormantError, match="without target"):
        corpora.correct_target({"input": "q"})


def test_cli_corpus(bb_tar, tmp_path, capsys):
    out = tmp_path / "c.jsonl"
    assert main(["data", "corpus", "xsum", "--n", "4", "--min-tokens", "5", "--max-tokens", "40",
                 "--seed", "1", "--out", str(out)]) == 0
    assert "xsum: 4 documents" in capsys.readouterr().out
    assert read_examples(out) == sample_corpus("xsum", 4, 5, 40, seed=1, progress=False)
    assert main(["data", "corpus", "nope", "--out", str(out)]) == 2
    assert "unknown corpus 'nope'" in capsys.readouterr().err


def test_bigbench_task_split(bb_tar):
    data = load_task("bigbench:general_knowledge", progress=False)
    assert len(data.questions) == 12 - SHOT_POOL  # the two-answer and free-text examples are left out
    pool = data.shots["bigbench:general_knowledge"]
    assert len(pool) == SHOT_POOL
    assert not {q.id for q in pool} & {q.id for q in data.questions}
    for q in data.questions + pool:
        i = int(q.id.rsplit("/", 1)[1])
        assert q.id == f"bigbench/general_knowledge/{i}" and q.question == f"Question {i}?"
        assert q.choices[q.answer] == f"choice {i}.{i % 5}" and len(q.choices) == 5
        assert sorted(q.choices) == sorted(f"choice {i}.{j}" for j in range(5))
    answers = {q.answer for q in data.questions + pool}
    assert len(answers) > 1  # choices are shuffled, not left in the file's order
    again = load_task("bigbench:general_knowledge", progress=False)
    assert again.questions == data.questions and again.shots == data.shots
    three = load_task("bigbench:general_knowledge", limit=3, progress=False)
    assert [q.id for q in three.questions] == [q.id for q in load_task("bigbench:general_knowledge", limit=3,
                                                                       progress=False).questions]
    assert set(three.questions) <= set(data.questions) and len(three.questions) == 3
    assert three.shots == data.shots  # the shot pool does not depend on the limit
    other = load_task("bigbench:general_knowledge", seed=1, progress=False)
    assert {q.id for q in other.questions} != {q.id for q in data.questions}
    assert {q.id: q.choices for q in other.questions + other.shots[other.name]} != \
        {q.id: q.choices for q in data.questions + pool}


def test_registry_subtask_and_description(bb_tar):
    (data,) = load_tasks(["logical_deduction"], progress=False)
    assert data.name == "logical_deduction" and len(data.questions) == 9 - SHOT_POOL
    assert data.descriptions["logical_deduction"] == "Five objects.\n\n"
    assert data.questions[0].id.startswith("bigbench/logical_deduction/five_objects/")
    assert abs(data.chance - 0.2) < 1e-12
    with pytest.raises(DormantError, match="unknown task 'nope'"):
        load_task("nope")


def test_default_suite_prefers_four_or_more_choices():
    assert len(tasks.DEFAULT_SUITE) == 10
    assert all(tasks.TASKS[n].source == "bigbench" for n in tasks.DEFAULT_SUITE)


def test_mmlu_csv_loader(tmp_path):
    root = write_mmlu(tmp_path / "mmlu")
    data = load_task("mmlu", mmlu_dir=root)
    assert len(data.questions) == 12 and set(data.shots) == {"mmlu/astronomy", "mmlu/high_school_physics"}
    q = data.questions[0]
    assert q.id == "mmlu/astronomy/test/0" and q.task == "mmlu/astronomy"
    assert q.question == 'astronomy test question 0, with a comma and "quotes"?'
    assert q.choices == ("a0", "b0", "c, 0", "d0") and q.answer == 0
    assert data.questions[5].answer == 1
    assert [s.id for s in data.shots["mmlu/astronomy"]] == [f"mmlu/astronomy/dev/{i}" for i in range(5)]
    assert data.descriptions["mmlu/high_school_physics"] == \
        "The following are multiple choice questions (with answers) about high school physics.\n\n"
    limited = load_task("mmlu", mmlu_dir=root, limit=2)
    assert len(limited.questions) == 4 and set(limited.questions) <= set(data.questions)
    one = load_task("mmlu:astronomy", mmlu_dir=root)
    assert [x.id for x in one.questions] == [f"mmlu/astronomy/test/{i}" for i in range(6)]
    assert one.questions[0].sha256 == q.sha256
    (root / "test" / "astronomy_test.csv").write_text("only,three,columns\n")
    with pytest.raises(DormantError, match="astronomy_test.csv:1: expected 6 columns"):
        load_task("mmlu", mmlu_dir=root)


def test_mmlu_hub_without_datasets_package(monkeypatch):
    monkeypatch.delenv("DORMANT_MMLU_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(DormantError, match="needs the 'datasets' package.*--mmlu-dir") as e:
        load_task("mmlu")
    assert "\n" not in str(e.value)


def test_data_commands_do_not_import_torch(bb_tar):
    code = ("import sys; from extract.cli import main; "
            "main(['data', 'corpus', 'xsum', '--n', '2', '--out', sys.argv[1]]); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    res = subprocess.run([sys.executable, "-c", code, str(bb_tar[0].parent / "t.jsonl")], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.slow
def test_real_corpora_and_suite(zoo_model):
    """The real sdists: every default task has >= 50 evaluable questions; corpora truncate as drawn."""
    from extract.engine.scores import encode_texts

    suite = load_tasks(tasks.DEFAULT_SUITE, limit=50, progress=False)
    assert [len(t.questions) for t in suite] == [50] * 10
    assert all(len(q.choices) >= 2 and 0 <= q.answer < len(q.choices) for t in suite for q in t.questions)
    _, tok = zoo_model("smollm2-135m-instruct")
    for name, domain in (("xsum", "news"), ("wikilingua", "howto"), ("math", "math"), ("code", "code")):
        rows = sample_corpus(name, 20, 10, 512, seed=0, progress=False)
        assert len({r["id"] for r in rows}) == 20 and {r["domain"] for r in rows} == {domain}
        for r in rows:
            ids = encode_texts(tok, [r["text"]], max_tokens=r["max_tokens"])[0]
            assert len(ids) == r["max_tokens"]  # every document is long enough at [10, 512]
    assert rows[0]["id"].startswith("code/networkx-3.6.1/")


@pytest.mark.parametrize("name", tasks.RELATION_SUITE)
def test_relation_tasks_pose_each_pair_with_valid_distractors(name):
    from extract.maps.operations import load_pairs

    spec = tasks.get_task(name)
    pairs = load_pairs(spec.path)
    valid: dict[str, set[str]] = {}
    for s, t in pairs:
        valid.setdefault(s.lower(), set()).add(t.lower())
    by_question = {spec.template.format(s): s for s, _ in pairs}
    data = load_task(name, limit=20, seed=3)
    pool = data.shots[name]
    assert len(data.questions) == 20 and len(pool) == SHOT_POOL
    assert not {q.id for q in pool} & {q.id for q in data.questions}
    for q in data.questions + pool:
        src = by_question[q.question]
        assert len(q.choices) == tasks.RELATION_CHOICES == len(set(q.choices))
        assert q.choices[q.answer].lower() in valid[src.lower()]  # the answer is a target of this source
        wrong = [c for j, c in enumerate(q.choices) if j != q.answer]
        assert not {c.lower() for c in wrong} & valid[src.lower()]  # no distractor is also right
        assert all(any(c == t for _, t in pairs) for c in wrong)  # distractors are targets of the operation
    again = load_task(name, limit=20, seed=3)
    assert [(q.id, q.choices, q.answer) for q in again.questions] == [(q.id, q.choices, q.answer) for q in data.questions]
    assert [q.choices for q in load_task(name, limit=20, seed=4).questions] != [q.choices for q in data.questions]
