"""Regenerate tests/fixtures/lm_eval_chat.json: what lm-evaluation-harness 0.4.5 builds and scores on a few
real BIG-bench questions, the expected values of tests/test_prompts.py and tests/test_evaluate.py.

Run it in a throwaway environment that has lm-eval (never a dependency of the package), with the repository
on the path for the questions and the zoo models' local directories::

    python3 -m venv /tmp/lmeval && /tmp/lmeval/bin/pip install torch==2.13.0 lm-eval==0.4.5 \\
        transformers==4.57.1 datasets==3.6.0
    PYTHONPATH=. OMP_NUM_THREADS=1 /tmp/lmeval/bin/python scripts/lm_eval_fixture.py tests/fixtures/lm_eval_chat.json

Each case is one lm-eval run (``lm_eval.evaluator.evaluate`` on a ``ConfigurableTask`` per BIG-bench task,
the MMLU template with as many letters as choices, first-n shots from a ``dev`` split that holds the
task's shot pool, the task prefix as ``description``; ``HFLM`` from the model's directory, float32, batch
size 1, its default ``add_bos_token``; the model loaded by transformers 4.x with the RoPE settings it reads,
see v4_model). For every question the fixture holds the context and continuation
strings of each choice's request, ``HFLM._encode_pair``'s token ids and the log-likelihood lm-eval returned.
"""
from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path

TASKS = {"general_knowledge": 2, "physics": 2}  # questions per task (no description / a description)
CASES = [  # (model, k_shot, chat, scoring)
    ("smollm2-135m-instruct", 0, True, "letter"),
    ("smollm2-135m-instruct", 2, True, "letter"),
    ("smollm2-135m-instruct", 2, True, "cloze"),
    ("smollm2-135m-instruct", 2, False, "letter"),
    ("qwen2.5-coder-0.5b-instruct", 0, True, "letter"),
    ("qwen2.5-coder-0.5b-instruct", 2, True, "letter"),
    ("qwen2.5-coder-0.5b-instruct", 2, False, "letter"),
    ("gemma-3-270m", 2, False, "letter"),
]
LETTER_TEXT = ("{{question}}\n{% for c in choices %}{{ 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'[loop.index0] }}. {{c}}\n"
               "{% endfor %}Answer:")


def questions() -> dict:
    from extract.data.tasks import load_task

    out = {"questions": [], "shots": {}, "descriptions": {}}
    for name, n in TASKS.items():
        data = load_task(name, limit=n, progress=False)
        doc = lambda q: {"id": q.id, "task": q.task, "question": q.question, "choices": list(q.choices),
                         "answer": q.answer}
        out["questions"] += [doc(q) for q in data.questions]
        out["shots"][name] = [doc(q) for q in data.shots[name]]
        out["descriptions"][name] = data.descriptions[name]
    return out


def lm_eval_task(name: str, data: dict, scoring: str, k_shot: int, tmp: Path):
    from lm_eval.api.task import ConfigurableTask

    files = {}
    splits = {"test": [q for q in data["questions"] if q["task"] == name], "dev": data["shots"][name]}
    for split, docs in splits.items():
        files[split] = str(tmp / f"{name}_{split}.json")
        Path(files[split]).write_text(json.dumps(docs))
    letter = scoring == "letter"
    task = ConfigurableTask(config={
        "task": f"fixture_{name}", "dataset_path": "json", "dataset_kwargs": {"data_files": files},
        "test_split": "test", "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
        "output_type": "multiple_choice", "doc_to_text": LETTER_TEXT if letter else "{{question}}\nAnswer:",
        "doc_to_choice": (lambda d: list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:len(d["choices"])])) if letter
        else (lambda d: d["choices"]),
        "doc_to_target": "answer", "description": data["descriptions"][name],
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]})
    task.set_config("num_fewshot", k_shot)
    task.set_fewshot_seed(0)
    return task


def run_case(lm, data: dict, k_shot: int, chat: bool, scoring: str, tmp: Path) -> list[dict]:
    from lm_eval import evaluator

    tasks = {f"fixture_{n}": lm_eval_task(n, data, scoring, k_shot, tmp) for n in TASKS}
    res = evaluator.evaluate(lm, tasks, log_samples=True, bootstrap_iters=0, apply_chat_template=chat, fewshot_as_multiturn=chat,
                             verbosity="WARNING")
    rows = []
    for name in TASKS:
        for s in sorted(res["samples"][f"fixture_{name}"], key=lambda s: s["doc_id"]):
            reqs = []
            for (ctx, cont), resp in zip(s["arguments"], s["resps"]):
                ctx_ids, cont_ids = lm._encode_pair(ctx, cont)
                reqs.append({"context": ctx, "continuation": cont, "context_ids": ctx_ids,
                             "continuation_ids": cont_ids, "loglik": float(resp[0][0])})
            assert all(r["context_ids"] == reqs[0]["context_ids"] and r["context"] == reqs[0]["context"]
                       for r in reqs)
            ctx = {k: reqs[0][k] for k in ("context", "context_ids")}
            rows.append({"id": s["doc"]["id"], **ctx,
                         "choices": [{k: v for k, v in r.items() if not k.startswith("context")} for r in reqs]})
    return rows


def v4_model(path: str):
    """The float32 model of ``path`` for transformers 4.x: transformers 5 writes RoPE settings as
    ``rope_parameters``, which 4.x ignores (falling back to its default base), so they are set as 4.x reads them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    rope = getattr(cfg, "rope_parameters", None) or {}
    by_type = rope if "full_attention" in rope else {"full_attention": rope}
    assert all(r.get("rope_type", "default") == "default" for r in by_type.values()), rope
    cfg.rope_theta = by_type["full_attention"]["rope_theta"]
    if "sliding_attention" in by_type:
        cfg.rope_local_base_freq = by_type["sliding_attention"]["rope_theta"]
    return AutoModelForCausalLM.from_pretrained(path, config=cfg, torch_dtype=torch.float32).eval()


def main(out: Path) -> None:
    from importlib.metadata import version

    from lm_eval.models.huggingface import HFLM
    from transformers import PreTrainedTokenizerFast

    from extract.models.load import converted_model_dir

    data = questions()
    cases, lms = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for model, k, chat, scoring in CASES:
            if model not in lms:
                path = str(converted_model_dir(model, progress=False))
                tok = PreTrainedTokenizerFast.from_pretrained(path)  # the directory names transformers 5's class
                lms[model] = HFLM(pretrained=v4_model(path), tokenizer=tok, batch_size=1, device="cpu")
            print(f"{model} {k}-shot chat={chat} {scoring}", file=sys.stderr)
            cases.append({"model": model, "k_shot": k, "chat": chat, "scoring": scoring,
                          "add_bos_token": lms[model].add_bos_token,
                          "questions": run_case(lms[model], data, k, chat, scoring, Path(tmp))})
    note = (f"Produced by scripts/lm_eval_fixture.py with lm-eval {version('lm_eval')} and transformers "
            f"{version('transformers')}: chat cases ran with apply_chat_template=True and fewshot_as_multiturn=True, "
            f"plain cases without; HFLM's default add_bos_token (True only for gemma).")
    text = json.dumps({"note": note, **data, "cases": cases}, ensure_ascii=False, indent=1)
    text = re.sub(r"\[\n[0-9,\s]+\]", lambda m: json.dumps(json.loads(m.group(0))), text)  # id lists on one line
    out.write_text(text + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
