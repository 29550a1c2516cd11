"""Multiple-choice tasks as a registry of specs (in the style of lm-evaluation-harness; definitions §5).

:data:`DEFAULT_SUITE` (ten BIG-bench tasks, see :data:`TASKS`), :data:`RELATION_SUITE` (factual and
linguistic relations from the MAPS operation pairs, posed as four-choice questions: the offline suite the
small zoo models can do), MMLU from a local directory of the original CSV files or the hub dataset
``cais/mmlu``, and any BIG-bench task file as ``bigbench:<task>[/<subtask>]``. Every question has a stable id
and a content sha256.

The text corpora are in :mod:`extract.data.corpora`.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from extract.data import bigbench
from extract.data.common import seeded_rng, sha256_text
from extract.errors import DormantError, HubError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
SHOT_POOL = 5  # BIG-bench questions held out per task as the few-shot pool (never evaluated)


@dataclass(frozen=True)
class Question:
    """One multiple-choice question; ``answer`` indexes ``choices``; ``sha256`` covers the content."""
    id: str
    task: str
    question: str
    choices: tuple[str, ...]
    answer: int
    sha256: str


def make_question(id: str, task: str, question: str, choices: Sequence[str], answer: int) -> Question:
    content = json.dumps({"question": question, "choices": list(choices), "answer": answer}, ensure_ascii=False)
    return Question(id, task, question, tuple(choices), answer, sha256_text(content))


@dataclass(frozen=True)
class TaskSpec:
    """A multiple-choice task: a BIG-bench task path, an MMLU subject ("" = all 57), or a MAPS operation
    posed through ``template`` (source "relation")."""
    name: str
    source: str  # "bigbench", "mmlu" or "relation"
    path: str
    skill: str = ""
    template: str = ""  # relation: the question with "{}" for the source word


@dataclass
class TaskData:
    """Loaded questions (in a fixed order) with their few-shot pools and preambles, keyed by ``Question.task``."""
    name: str
    questions: list[Question]
    shots: dict[str, list[Question]] = field(default_factory=dict)  # first k are the k shots
    descriptions: dict[str, str] = field(default_factory=dict)  # text before the shots

    @property
    def chance(self) -> float:
        """Expected accuracy of uniform guessing: mean of 1 / choices."""
        return sum(1 / len(q.choices) for q in self.questions) / max(len(self.questions), 1)


# The default suite (DEFAULT_SUITE: the BIG-bench entries). Picked for: knowledge (general_knowledge,
# hindu_knowledge, physics) and reasoning (physical_intuition, elementary_math_qa, logical_deduction,
# date_understanding, temporal_sequences, understanding_fables, strange_stories); >= 4 choices on nearly
# every question (chance 0.15-0.26), so a letter bias cannot pass for skill and ablation effects are not
# drowned by a high chance level; one correct answer each; >= 60 usable questions each, so a per-task
# limit of 50 still leaves the few-shot pool out. Left out: the two-choice tasks (known_unknowns,
# misconceptions, epistemic_reasoning, navigate, strategyqa; chance 0.5) and three-choice social_iqa.
# Subtasks: elementary_math_qa/question_only (the plain word problem, no hint), logical_deduction/
# five_objects (the middle difficulty). `dormant data tasks` lists question and choice counts.
TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    TaskSpec("general_knowledge", "bigbench", "general_knowledge", "world knowledge (4-13 choices)"),
    TaskSpec("hindu_knowledge", "bigbench", "hindu_knowledge", "Hindu mythology knowledge"),
    TaskSpec("physics", "bigbench", "physics", "which formula solves a physics problem"),
    TaskSpec("physical_intuition", "bigbench", "physical_intuition", "physical reasoning"),
    TaskSpec("elementary_math_qa", "bigbench", "elementary_math_qa/question_only",
             "math word problems"),
    TaskSpec("logical_deduction", "bigbench", "logical_deduction/five_objects", "deduce an order of five objects"),
    TaskSpec("date_understanding", "bigbench", "date_understanding", "date arithmetic"),
    TaskSpec("temporal_sequences", "bigbench", "temporal_sequences", "reason over a schedule"),
    TaskSpec("understanding_fables", "bigbench", "understanding_fables", "the moral of a fable"),
    TaskSpec("strange_stories", "bigbench", "strange_stories/multiple_choice",
             "theory of mind in short stories"),
    TaskSpec("mmlu", "mmlu", "", "MMLU, 57 subjects (local CSV directory or hub cais/mmlu)"),
    # relations (MAPS operation pairs, extract/maps/operations_data): the answer and three distractors
    TaskSpec("capitals", "relation", "country_to_capital_wikidata", "capital of a country (Wikidata)",
             "What is the capital of {}?"),
    TaskSpec("languages", "relation", "country_to_official_language_wikidata",
             "official language of a country (Wikidata)", "What is the official language of {}?"),
    TaskSpec("makers", "relation", "product_by_company", "company behind a product",
             "Which company makes {}?"),
    TaskSpec("workplaces", "relation", "work_location", "where a profession works", "Where does a {} work?"),
    TaskSpec("superclasses", "relation", "object_superclass", "what kind of thing an object is",
             "What kind of thing is a {}?"),
    TaskSpec("antonyms", "relation", "adj_antonym", "antonym of an adjective", "What is the opposite of {}?"),
    TaskSpec("synonyms", "relation", "word_to_synonym", "synonym of a word", "What is a synonym of {}?"),
    TaskSpec("past_tense", "relation", "verb_past_tense", "past tense of a verb",
             "What is the past tense of {}?"),
    TaskSpec("comparatives", "relation", "adj_comparative", "comparative of an adjective",
             "What is the comparative form of {}?"),
    TaskSpec("french", "relation", "english_to_french", "English word to French",
             "What is the French word for {}?"),
    TaskSpec("spanish", "relation", "english_to_spanish", "English word to Spanish",
             "What is the Spanish word for {}?"),
]}
DEFAULT_SUITE: tuple[str, ...] = tuple(n for n, t in TASKS.items() if t.source == "bigbench")
RELATION_SUITE: tuple[str, ...] = tuple(n for n, t in TASKS.items() if t.source == "relation")
RELATION_CHOICES = 4  # the answer and three distractors


def get_task(name: str) -> TaskSpec:
    """A registry task, ``bigbench:<task>[/<subtask>]`` or ``mmlu:<subject>``."""
    if name in TASKS:
        return TASKS[name]
    source, _, path = name.partition(":")
    if source in ("bigbench", "mmlu") and path:
        return TaskSpec(name, source, path)
    raise DormantError(f"unknown task {name!r}; registry: {', '.join(TASKS)}; or bigbench:<task>[/<subtask>], "
                       f"mmlu:<subject>")


def _pick(n: int, limit: int | None, seed: int, key: str) -> list[int]:
    """``limit`` of the indices ``0..n-1`` (all if None): the first of a seeded shuffle, sorted."""
    order = list(range(n))
    seeded_rng(seed, "split", key).shuffle(order)
    return sorted(order if limit is None else order[:limit])


def _bigbench_task(spec: TaskSpec, data: dict, limit: int | None, seed: int) -> TaskData:
    """Questions with exactly one top-scoring target and 2-26 choices; choices shuffled per question (seeded).

    The shot pool: the first ``SHOT_POOL`` usable questions of a seeded shuffle; the evaluated questions: the
    next ``limit`` of that order, sorted by their index in the task file.
    """
    qs = []
    for i, ex in enumerate(data["examples"]):
        ts = ex.get("target_scores") or {}
        best = max(ts.values(), default=0)
        if not 2 <= len(ts) <= len(LETTERS) or best <= 0 or sum(v == best for v in ts.values()) != 1:
            continue
        qid = f"bigbench/{spec.path}/{i}"
        choices = [str(c) for c in ts]
        seeded_rng(seed, "choices", qid).shuffle(choices)
        right = next(str(c) for c, v in ts.items() if v == best)
        qs.append(make_question(qid, spec.name, ex["input"].strip(), choices, choices.index(right)))
    if len(qs) <= SHOT_POOL:
        raise DormantError(f"BIG-bench task {spec.path!r} has {len(qs)} usable multiple-choice questions; "
                           f"it needs more than {SHOT_POOL}")
    order = list(range(len(qs)))
    seeded_rng(seed, "split", spec.path).shuffle(order)
    evaluated = sorted(order[SHOT_POOL:] if limit is None else order[SHOT_POOL:SHOT_POOL + limit])
    prefix = data.get("task_prefix", "").strip()
    return TaskData(spec.name, [qs[i] for i in evaluated], {spec.name: [qs[i] for i in order[:SHOT_POOL]]},
                    {spec.name: prefix + "\n\n" if prefix else ""})


def _relation_task(spec: TaskSpec, limit: int | None, seed: int) -> TaskData:
    """Each (source, target) pair of a MAPS operation as a question ``template.format(source)`` with the
    target and ``RELATION_CHOICES - 1`` distractors: other targets of the operation that no pair gives for
    this source (seeded per question), in a seeded order. Shot pool and evaluated questions as for BIG-bench.
    """
    from extract.maps.operations import load_pairs

    pairs = list(dict.fromkeys(load_pairs(spec.path)))
    answers: dict[str, set[str]] = {}
    for s, t in pairs:
        answers.setdefault(s.lower(), set()).add(t.lower())
    targets = sorted({t for _, t in pairs}, key=str.lower)
    qs = []
    for i, (src, tgt) in enumerate(pairs):
        qid = f"relation/{spec.path}/{i}"
        wrong = [t for t in targets if t.lower() not in answers[src.lower()]]
        if len(wrong) < RELATION_CHOICES - 1:
            continue
        choices = [tgt] + seeded_rng(seed, "distractors", qid).sample(wrong, RELATION_CHOICES - 1)
        seeded_rng(seed, "choices", qid).shuffle(choices)
        qs.append(make_question(qid, spec.name, spec.template.format(src), choices, choices.index(tgt)))
    if len(qs) <= SHOT_POOL:
        raise DormantError(f"relation task {spec.name!r} has {len(qs)} usable pairs; it needs more than {SHOT_POOL}")
    order = list(range(len(qs)))
    seeded_rng(seed, "split", spec.path).shuffle(order)
    evaluated = sorted(order[SHOT_POOL:] if limit is None else order[SHOT_POOL:SHOT_POOL + limit])
    return TaskData(spec.name, [qs[i] for i in evaluated], {spec.name: [qs[i] for i in order[:SHOT_POOL]]},
                    {spec.name: ""})


def mmlu_dir_or_none(mmlu_dir: Path | str | None = None) -> Path | None:
    """``mmlu_dir``, else env ``DORMANT_MMLU_DIR``, else None (the hub)."""
    d = mmlu_dir or os.environ.get("DORMANT_MMLU_DIR")
    return Path(d).expanduser() if d else None


MMLU_HINT = ("or point at a local copy of the original CSV files with --mmlu-dir DIR or env DORMANT_MMLU_DIR "
             "(DIR/dev/<subject>_dev.csv, DIR/test/<subject>_test.csv)")


def _read_mmlu_csv(path: Path) -> list[tuple[str, list[str], int]]:
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for k, r in enumerate(csv.reader(f)):
            letter = r[5].strip() if len(r) == 6 else ""
            if letter not in ("A", "B", "C", "D"):
                raise DormantError(f"{path}:{k + 1}: expected 6 columns (question, A, B, C, D, answer letter)")
            rows.append((r[0], r[1:5], "ABCD".index(letter)))
    return rows


def _mmlu_local(root: Path, subject: str) -> dict[str, dict[str, list]]:
    """``{subject: {"dev": rows, "test": rows}}`` from the original CSV layout."""
    if not (root / "test").is_dir():
        raise DormantError(f"{root} has no test/ directory; " + MMLU_HINT)
    subjects = [subject] if subject else sorted(p.name.removesuffix("_test.csv")
                                                for p in (root / "test").glob("*_test.csv"))
    out = {}
    for s in subjects:
        test, dev = root / "test" / f"{s}_test.csv", root / "dev" / f"{s}_dev.csv"
        if not test.is_file():
            raise DormantError(f"MMLU subject {s!r}: {test} not found; " + MMLU_HINT)
        out[s] = {"test": _read_mmlu_csv(test), "dev": _read_mmlu_csv(dev) if dev.is_file() else []}
    if not out:
        raise DormantError(f"no test/<subject>_test.csv files in {root}; " + MMLU_HINT)
    return out


def _mmlu_hub(subject: str) -> dict[str, dict[str, list]]:
    """The same from the hub dataset ``cais/mmlu`` (needs the ``datasets`` package and hub access)."""
    try:
        import datasets
    except ImportError:
        raise DormantError("MMLU from the hub needs the 'datasets' package (pip install datasets) and hub "
                           "access; " + MMLU_HINT) from None
    try:
        ds = datasets.load_dataset("cais/mmlu", subject or "all")
    except Exception as e:  # offline, no such config, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"cannot load cais/mmlu from the hub ({msg}); " + MMLU_HINT) from None
    out: dict[str, dict[str, list]] = {}
    for split in ("dev", "test"):
        for r in ds[split]:
            s = subject or r["subject"]
            out.setdefault(s, {"dev": [], "test": []})[split].append((r["question"], list(r["choices"]), r["answer"]))
    return dict(sorted(out.items()))


def _mmlu_task(spec: TaskSpec, limit: int | None, seed: int, mmlu_dir: Path | str | None) -> TaskData:
    """Test questions (per subject: ``limit`` of a seeded shuffle, sorted); shots: the dev split in order."""
    root = mmlu_dir_or_none(mmlu_dir)
    data = _mmlu_local(root, spec.path) if root else _mmlu_hub(spec.path)
    task = TaskData(spec.name, [])
    for s, splits in data.items():
        key = f"mmlu/{s}"
        rows = splits["test"]
        task.questions += [make_question(f"{key}/test/{i}", key, *rows[i]) for i in _pick(len(rows), limit, seed, key)]
        task.shots[key] = [make_question(f"{key}/dev/{i}", key, *r) for i, r in enumerate(splits["dev"])]
        task.descriptions[key] = f"The following are multiple choice questions (with answers) about " \
                                 f"{s.replace('_', ' ')}.\n\n"
    return task


def load_task(name: str, *, limit: int | None = None, seed: int = 0, mmlu_dir: Path | str | None = None,
              tar: Path | str | None = None, progress: bool = True) -> TaskData:
    """The questions of one task (``limit`` per task, or per subject for MMLU; None = all), deterministic."""
    spec = get_task(name)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    if spec.source == "mmlu":
        return _mmlu_task(spec, limit, seed, mmlu_dir)
    if spec.source == "relation":
        return _relation_task(spec, limit, seed)
    return _bigbench_task(spec, bigbench.read_tasks([spec.path], tar, progress)[spec.path], limit, seed)


def load_tasks(names: Sequence[str] = DEFAULT_SUITE, **options) -> list[TaskData]:
    """Several tasks; the BIG-bench files they need are extracted in one pass over the tar."""
    paths = [get_task(n).path for n in names if get_task(n).source == "bigbench"]
    if paths:
        bigbench.read_tasks(paths, options.get("tar"), options.get("progress", True))
    return [load_task(n, **options) for n in names]
