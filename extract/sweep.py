"""The ablation sweep (definitions §3–§5): calibrate, threshold, then evaluate under every ablation config.

1. Calibration: one evaluation without ablation that also records every head score on the evaluation
   prompts (same forward passes); its accuracy is the baseline (``random`` at fraction 0).
2. Thresholds per (function, target fraction) from the pooled calibration scores (analysis.core.thresholds),
   for the pooled suite and for each of its tasks (threshold stability).
3. For every function and fraction > 0, the same evaluation inside ``ablate(model, fn, threshold=τ)``, and
   ``random`` with probability p; realized % = zeroed (question, layer, head) triples / all triples.
   At p = 0 τ is the extreme calibration score, which no head passes strictly on the same inputs: those
   rows equal the baseline by construction and are recorded without a rerun.

Cost: ablation by a function other than the entropy ones runs one attention pass (as a plain forward);
``timing`` reports the sweep time against (configs run x one plain evaluation). The plain evaluation is
timed three times, before, halfway through and after the configs, and its median is the unit, so a
change of machine load during a long sweep moves numerator and denominator alike. Each plain evaluation is
also compared with the calibration (``timing["plain_vs_calibration"]``: the largest log-likelihood difference
and the predictions that differ): in float32 no prediction may differ, in 16-bit rounding may flip a near-tie
and only a median difference over :data:`GROSS_LOGLIK_DIFF` is an error.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from analysis.core import tables
from analysis.core.bootstrap import N_BOOT, curves, point_intervals
from analysis.core.score_functions import score_keys
from analysis.core.thresholds import TARGET_FRACTIONS, thresholds
from extract.data.tasks import TaskData, load_tasks  # no torch: the CLI reads SweepSettings at start-up
from extract.prompts import ChatDelimiter, ChatFormat, Tokenization

RESULT_COLUMNS = tables.column_names("ablation_results")
GROSS_LOGLIK_DIFF = 0.5  # nats: a larger median calibration vs plain difference is a bug, not rounding
POINT_COLUMNS = RESULT_COLUMNS[:RESULT_COLUMNS.index("n_questions") + 1]  # one config's values; the rest: bootstrap


def per_question(res, zeroed, triples) -> pl.DataFrame:
    """One evaluation's questions: ``question, question_task, correct, kl, kl_choices, zeroed, triples``
    (``kl`` 0 without a reference: the unablated model itself)."""
    p = res.predictions
    zero = pl.lit(0.0)
    return pl.DataFrame({"question": p["id"], "question_task": p["task"], "correct": p["correct"],
                         "zeroed": np.asarray(zeroed, dtype=np.int64), "triples": np.asarray(triples, dtype=np.int64)}
                        ).with_columns(p["kl"] if "kl" in p.columns else zero.alias("kl"),
                                       p["kl_choices"] if "kl_choices" in p.columns else zero.alias("kl_choices"))


@dataclass(frozen=True)
class SweepSettings:
    """The sweep of one model: the config's ``evaluation`` section (less ``models``) and the scoring dtype/device."""
    tasks: tuple[str, ...] = ()  # task registry names, pooled into one task
    task_name: str | None = None  # name of the pooled task (default: the names joined by +)
    limit: int | None = None  # questions per task (None: all)
    k_shot: int = 0
    seed: int = 0  # question selection, choice order and the random baseline
    score_functions: tuple[str, ...] = ()  # () = every registered score function
    fractions: tuple[float, ...] = TARGET_FRACTIONS  # target fractions p (definitions §3); 0.0 is the baseline
    batch_tokens: int = 8192  # padded tokens per forward pass
    scoring: Literal["letter", "cloze"] = "letter"  # extract.evaluate; letter is definitions §5 (the paper)
    n_boot: int = N_BOOT  # paired bootstrap replicates over questions for every CI (definitions §5)
    chat_format: ChatFormat = "multiturn"  # instruct models' chat prompts (extract.prompts; definitions §5)
    tokenization: Tokenization = "bos_first"  # BOS first, or lm-evaluation-harness 0.4.5's (definitions §5)
    chat_delimiter: ChatDelimiter = "none"  # "A" after a multiturn chat prompt (§5), or 0.4.5's " A"
    dtype: str = "float32"
    device: str = "cpu"


def pooled(tasks: list[TaskData], name: str) -> TaskData:
    """One task made of several (questions concatenated; shots and descriptions keyed by question task)."""
    out = TaskData(name, [])
    for t in tasks:
        out.questions += t.questions
        out.shots.update(t.shots)
        out.descriptions.update(t.descriptions)
    return out


def calibration_frame(model_name: str, data: TaskData, scores) -> pl.DataFrame:
    """Wide frame of the calibration scores: ``model, task, question_task, question, layer, head`` + the scores."""
    questions = pl.DataFrame({"example": range(len(data.questions)),
                              "question_task": [q.task for q in data.questions],
                              "question": [q.id for q in data.questions]}, schema_overrides={"example": pl.Int64})
    from extract.engine.scores import scores_frame

    frame = scores_frame(scores.numpy()).join(questions, on="example", how="left", maintain_order="left")
    return frame.select(pl.lit(model_name).alias("model"), pl.lit(data.name).alias("task"), "question_task",
                        "question", "layer", "head", *score_keys())


@dataclass
class SweepResult:
    results: pl.DataFrame  # RESULT_COLUMNS
    thresholds: pl.DataFrame  # analysis.core.thresholds columns (pooled task and each question task)
    calibration: pl.DataFrame  # calibration_frame
    questions: pl.DataFrame  # ablation_questions columns: each question under each configuration
    timing: dict = field(default_factory=dict)


def run_sweep(model, tokenizer, data: TaskData, *, score_fns=None, fractions=TARGET_FRACTIONS,
              seed: int = 0, k_shot: int = 0, batch_tokens: int = 8192, chat_template: bool | None = None,
              chat_format: str = "multiturn", tokenization: str = "bos_first", chat_delimiter: str = "none",
              scoring: str = "letter",
              n_boot: int = N_BOOT, progress: bool = True, run_id: str | None = None) -> SweepResult:
    """Calibrate, threshold and sweep ``data`` (see module doc); accuracy in points (0–100).

    score_fns: the functions to sweep (default: every registered one, ``score_keys()``). n_boot: paired
    bootstrap replicates over the questions for the CIs of ``results`` (seeded by ``seed``). run_id: the
    ``run_id`` column of results, questions and thresholds (``extract.provenance``; None: NULL)."""
    score_fns = score_keys() if score_fns is None else score_fns
    import torch

    from extract.engine.ablation import ablate
    from extract.evaluate import evaluate
    from extract.models.load import model_info

    name = model_info(model)["model"]
    kw = dict(k_shot=k_shot, batch_tokens=batch_tokens, chat_template=chat_template, chat_format=chat_format,
              tokenization=tokenization, chat_delimiter=chat_delimiter, scoring=scoring, progress=False)
    t0 = time.perf_counter()
    base = evaluate(model, tokenizer, data, calibrate=True, keep_distributions=True, **kw)
    t_cal = time.perf_counter() - t0
    t_plain = []
    exact = next(model.parameters()).dtype in (torch.float32, torch.float64)
    agreement = {"max_loglik_diff": 0.0, "median_loglik_diff": 0.0, "prediction_flips": 0}

    def plain_eval() -> None:
        t0 = time.perf_counter()
        plain = evaluate(model, tokenizer, data, **kw)
        t_plain.append(time.perf_counter() - t0)
        diffs = [max((abs(x - y) for x, y in zip(a, b)), default=0.0)  # per question, its largest
                 for a, b in zip(base.predictions["loglik"], plain.predictions["loglik"])]
        flips = int((base.predictions["predicted"] != plain.predictions["predicted"]).sum())
        worst = {"max_loglik_diff": max(diffs, default=0.0), "median_loglik_diff": statistics.median(diffs or [0.0]),
                 "prediction_flips": flips}
        agreement.update({k: max(agreement[k], v) for k, v in worst.items()})
        # the recorded pass and the model's own attention round differently: float32 by <= 1e-6 nats, 16-bit by
        # up to a nat on a long choice (a median of a tenth; docs/bf16.md), which can flip a near-tie: allowed,
        # and reported; a systematic difference is not
        if (exact and flips) or worst["median_loglik_diff"] > GROSS_LOGLIK_DIFF:
            raise RuntimeError(f"recording changed the evaluation: {flips} of {base.n_questions} predictions differ "
                               f"and log-likelihoods by {worst['median_loglik_diff']:.3g} nats (median over questions; "
                               f"largest {worst['max_loglik_diff']:.3g}) between the calibration and the plain "
                               "evaluation")

    plain_eval()
    cal = calibration_frame(name, data, base.scores)
    run = pl.lit(run_id, pl.String).alias("run_id")
    th = pl.concat([thresholds(cal, fractions, score_fns),
                    thresholds(cal.drop("task").rename({"question_task": "task"}), fractions, score_fns)]
                   ).with_columns(run)
    tau = {(f, p): t for f, p, t in th.filter(pl.col("task") == data.name)
           .select("score_fn", "target_fraction", "threshold").iter_rows()}
    n = base.n_questions
    heads = base.scores.shape[1] * base.scores.shape[2]  # layers x heads
    rows_per_q = np.bincount(base.call_questions, minlength=n)
    unablated = per_question(base, np.zeros(n), heads * rows_per_q)
    rows = [(name, data.name, "random", 0.0, None, 0.0, 100 * base.accuracy, n)]
    rows += [(name, data.name, f, 0.0, tau[(f, 0.0)], 0.0, 100 * base.accuracy, n) for f in score_fns]
    questions = [unablated.with_columns(pl.lit(f).alias("score_fn"), pl.lit(0.0).alias("target_fraction"))
                 for f in ("random", *score_fns)]
    configs = [(f, p) for f in (*score_fns, "random") for p in fractions if p > 0]
    t_sweep = 0.0
    for i, (f, p) in enumerate(tqdm(configs, desc=f"sweep {name}", unit="config", disable=not progress)):
        if i == len(configs) // 2:
            plain_eval()
        t0 = time.perf_counter()
        opts = dict(p=p, seed=seed) if f == "random" else dict(threshold=tau[(f, p)])
        with ablate(model, f, **opts) as ab:
            res = evaluate(model, tokenizer, data, reference=base, **kw)
        rows.append((name, data.name, f, float(p), opts.get("threshold"), 100 * ab.zeroed_fraction,
                     100 * res.accuracy, res.n_questions))
        zeroed = np.bincount(res.call_questions, weights=ab.mask.sum((1, 2)), minlength=n)
        questions.append(per_question(res, zeroed, heads * rows_per_q).with_columns(
            pl.lit(f).alias("score_fn"), pl.lit(float(p)).alias("target_fraction")))
        t_sweep += time.perf_counter() - t0
    plain_eval()
    questions = (pl.concat(questions, how="diagonal")
                 .with_columns(pl.lit(name).alias("model"), pl.lit(data.name).alias("task"), run)
                 .select(tables.column_names("ablation_questions")).cast(tables.polars_schema("ablation_questions")))
    points = point_intervals(curves(questions, n_boot, seed)).drop("model")
    results = (pl.DataFrame(rows, schema=tables.polars_schema("ablation_results", POINT_COLUMNS), orient="row")
               .with_columns(pl.lit(100 * base.chance).alias("chance"), run)
               .join(points, on=["score_fn", "target_fraction"], how="left", maintain_order="left")
               .select(RESULT_COLUMNS))
    unit = statistics.median(t_plain)
    timing = {"configs": len(configs), "plain_eval_s": unit, "plain_eval_runs_s": t_plain, "calibration_s": t_cal,
              "sweep_s": t_sweep, "cost_ratio": t_sweep / (len(configs) * unit) if configs else float("nan"),
              "questions": n, "plain_vs_calibration": agreement}
    return SweepResult(results, th, cal.with_columns(run), questions, timing)


def prompt_format(model, tokenizer, s: SweepSettings) -> str:
    """How the sweep's questions became tokens, for the ``runs`` row (``prompt_format``)."""
    from extract.evaluate import uses_chat_template

    chat = f"chat template ({s.chat_format})" if uses_chat_template(model, tokenizer, None) else "no chat template"
    return (f"{chat}, tokenization {s.tokenization}, chat delimiter {s.chat_delimiter}, scoring {s.scoring}, "
            f"{s.k_shot}-shot")


def load_suite(names, *, limit: int | None, seed: int = 0, name: str | None = None, progress: bool = True) -> TaskData:
    """The tasks ``names`` (registry names) with ``limit`` questions each, pooled as one task."""
    tasks = load_tasks(names, limit=limit, seed=seed, progress=progress)
    return tasks[0] if len(tasks) == 1 and name is None else pooled(tasks, name or "+".join(names))
