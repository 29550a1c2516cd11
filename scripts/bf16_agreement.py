"""float32 vs bfloat16 forwards on real models: do the default profile's results survive bf16? (docs/bf16.md)

Per model, the same checkpoint loaded twice (float32 and bfloat16), both run in this process on one thread:

1. Head scores (``score_heads``) on the default profile's corpora (``--n`` examples each, the corpus protocol's
   lengths drawn in [10, ``--max-tokens``]) and the calibration scores the sweep records on the suite's prompts
   (``evaluate(calibrate=True)``): per score function the median / max absolute difference, the median relative
   difference (triples with a nonzero float32 score), Spearman's rho over (example, layer, head), and the
   inactive set at target fraction ``--fraction``, each dtype thresholded on its own scores
   (``analysis.core.thresholds.threshold``, pooled over every triple): Jaccard index and the fraction of triples
   whose label flips.
2. The sweep suite (5 relation tasks x ``--limit`` questions, cloze, 0-shot): both accuracies, the fraction of
   questions predicted differently, bf16 - fp32 accuracy with its paired bootstrap 95% CI over questions
   (``analysis.core.bootstrap``), and the mean KL(fp32 || bf16) of the answer-position distributions.
3. Per-head ablation losses (``extract.domains.head_loss_changes``) of the ``--heads`` heads with the highest
   mean float32 ``awft``, zeroed and mean-ablated, on ``--ablation-examples`` examples per corpus: how far bf16
   moves the loss change, against the size of the change itself.
4. Speed: the suite's evaluation, fp32 and bf16 alternating ``--repeats`` times; median seconds and their ratio.

    .venv/bin/python scripts/bf16_agreement.py --models smollm2-135m-instruct gemma-3-270m

Prints markdown tables and writes them to ``--out``. The defaults (both models) take about 9 min of CPU on one
thread (measured: 8.6 min user + sys, 13.5 min wall on a shared 2-core machine).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from scipy.stats import spearmanr

from analysis.core.bootstrap import interval, ratio, weights
from analysis.core.score_functions import get_score_function, score_keys
from analysis.core.thresholds import threshold

CORPORA = ("xsum", "wikilingua", "math", "code")  # config/default.yaml corpora.names
TASKS = ("capitals", "workplaces", "superclasses", "antonyms", "comparatives")  # evaluation.tasks
EVAL = dict(k_shot=0, chat_format="multiturn", tokenization="lm_eval", scoring="cloze", progress=False)


# ----------------------------------------------------------------------------- agreement (the tested core)

def inactive(scores: np.ndarray, key: str, p: float) -> np.ndarray:
    """Inactive mask of pooled ``scores`` of function ``key``, τ at target fraction ``p`` of these scores."""
    return np.asarray(get_score_function(key).is_inactive(scores, threshold(scores, p, key)))


def agreement(a32: np.ndarray, a16: np.ndarray, keys: tuple[str, ...], p: float = 0.15) -> pl.DataFrame:
    """One row per score function of ``(..., len(keys))`` score arrays of the two dtypes (same triples).

    Spearman is NaN for a score that is constant in either dtype; Jaccard is NaN when neither dtype marks a
    triple inactive (e.g. ``awls`` without learned sinks)."""
    rows = []
    for j, key in enumerate(keys):
        x, y = a32[..., j].ravel(), a16[..., j].ravel()
        d, nz = np.abs(y - x), x != 0
        m32, m16 = inactive(x, key, p), inactive(y, key, p)
        union = int((m32 | m16).sum())
        constant = np.ptp(x) == 0 or np.ptp(y) == 0
        rows.append({"score": key, "median_abs": float(np.median(d)), "max_abs": float(d.max()),
                     "median_rel": float(np.median(d[nz] / np.abs(x[nz]))) if nz.any() else float("nan"),
                     "spearman": float("nan") if constant else float(spearmanr(x, y).statistic),
                     "inactive_fp32": float(m32.mean()), "inactive_bf16": float(m16.mean()),
                     "jaccard": (m32 & m16).sum() / union if union else float("nan"),
                     "flipped": float((m32 != m16).mean())})
    return pl.DataFrame(rows)


# ----------------------------------------------------------------------------- measurements

def corpus_examples(n: int, max_tokens: int, corpus_dir: Path, seed: int) -> list[dict]:
    """``n`` examples per corpus: ``corpus_dir/<name>.jsonl`` when it holds that many, else sampled."""
    from extract.data.corpora import sample_corpus
    from extract.score import read_examples

    out = []
    for name in CORPORA:
        path = corpus_dir / f"{name}.jsonl"
        rows = read_examples(path) if path.is_file() else []
        rows = rows[:n] if len(rows) >= n else sample_corpus(name, n, 10, max_tokens, seed, progress=False)
        out += [{**r, "corpus": name, "max_tokens": min(r.get("max_tokens") or max_tokens, max_tokens)} for r in rows]
    return out


def head_scores(model, tok, examples: list[dict]) -> np.ndarray:
    """``(examples, layers, heads, n_scores)`` from :func:`score_heads`, BOS first as the scorer encodes."""
    from extract.engine.scores import encode_texts, score_heads

    seqs = [encode_texts(tok, [ex["text"]], max_tokens=ex["max_tokens"])[0] for ex in examples]
    df = score_heads(model, seqs).sort("example", "layer", "head")
    return df.select(score_keys()).to_numpy().reshape(len(seqs), -1, df["head"].max() + 1, len(score_keys()))


def multiple_choice(m32, m16, tok, data, n_boot: int, seed: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """The suite in both dtypes: a summary row and both dtypes' calibration scores."""
    from extract.evaluate import evaluate

    r32 = evaluate(m32, tok, data, keep_distributions=True, calibrate=True, **EVAL)
    r16 = evaluate(m16, tok, data, reference=r32, calibrate=True, **EVAL)
    c32, c16 = (r.predictions["correct"].cast(pl.Float64).to_numpy() for r in (r32, r16))
    w = weights(len(c32), n_boot, seed)
    lo, hi = interval(100 * ratio(w, c16 - c32))
    kl = r16.predictions["kl"].to_numpy()
    row = {"questions": len(c32), "acc_fp32": 100 * c32.mean(), "acc_bf16": 100 * c16.mean(),
           "pred_differs": float((r32.predictions["predicted"] != r16.predictions["predicted"]).mean()),
           "delta_pts": 100 * (c16 - c32).mean(), "delta_ci_low": lo, "delta_ci_high": hi,
           "kl_mean": float(kl.mean()), "kl_median": float(np.median(kl)), "kl_max": float(kl.max())}
    return row, r32.scores.numpy(), r16.scores.numpy()


def ablation_losses(m32, m16, tok, examples: list[dict], heads: list[tuple[int, int]]) -> list[dict]:
    """Per ablation kind: the loss changes of both dtypes compared over (example, head)."""
    from extract.domains import head_loss_changes

    d = [head_loss_changes(m, tok, examples, heads, mean=True, progress=False) for m in (m32, m16)]
    j = d[0].join(d[1], on=["example", "layer", "head"], suffix="_bf16")
    rows = []
    for kind, col in (("zero", "delta_loss"), ("mean", "delta_loss_mean")):
        x, y = j[col].to_numpy(), j[col + "_bf16"].to_numpy()
        rows.append({"ablation": kind, "pairs": len(x), "median_abs_delta_fp32": float(np.median(np.abs(x))),
                     "median_abs_diff": float(np.median(np.abs(y - x))), "max_abs_diff": float(np.abs(y - x).max()),
                     "spearman": float(spearmanr(x, y).statistic), "same_sign": float((np.sign(x) == np.sign(y)).mean()),
                     "base_loss_abs_diff": float(np.median(np.abs(j["loss_base_bf16"] - j["loss_base"])))})
    return rows


def speed(m32, m16, tok, data, repeats: int) -> dict:
    """Median seconds of ``repeats`` alternating fp32 / bf16 evaluations of the suite."""
    from extract.evaluate import evaluate

    t: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(repeats):
        for k, m in (("fp32", m32), ("bf16", m16)):
            t0 = time.perf_counter()
            evaluate(m, tok, data, **EVAL)
            t[k].append(time.perf_counter() - t0)
    s32, s16 = statistics.median(t["fp32"]), statistics.median(t["bf16"])
    return {"fp32_s": s32, "bf16_s": s16, "speedup": s32 / s16}


# ----------------------------------------------------------------------------- output

def markdown(rows: list[dict] | pl.DataFrame) -> str:
    """A markdown table; floats to 3 significant digits, NaN as a dash."""
    rows = rows.to_dicts() if isinstance(rows, pl.DataFrame) else rows
    cols = list(rows[0])

    def cell(v) -> str:
        if isinstance(v, float):
            return "—" if np.isnan(v) else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "gemma-3-270m"])
    ap.add_argument("--n", type=int, default=8, help="examples per corpus for the head scores")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--corpus-dir", type=Path, default=Path("results/data/corpora"))
    ap.add_argument("--fraction", type=float, default=0.15, help="target fraction of the inactive sets")
    ap.add_argument("--limit", type=int, default=20, help="questions per task of the suite")
    ap.add_argument("--heads", type=int, default=4, help="heads ablated (highest mean fp32 awft)")
    ap.add_argument("--ablation-examples", type=int, default=2, help="examples per corpus for the ablation losses")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("results/bf16_agreement.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from extract.models.load import load_model
    from extract.sweep import load_suite

    examples = corpus_examples(args.n, args.max_tokens, args.corpus_dir, args.seed)
    data = load_suite(list(TASKS), limit=args.limit, seed=args.seed, name="relations", progress=False)
    keys = score_keys()
    cpu = Path("/proc/cpuinfo")
    flags = set(cpu.read_text().split()) if cpu.is_file() else set()
    isa = " ".join(f for f in ("avx512_bf16", "amx_bf16") if f in flags) or "none (bf16 is emulated: slow)"
    out = [f"# float32 vs bfloat16 forwards\n\ntorch {torch.__version__}, {platform.machine()}, CPU bf16 "
           f"instructions: {isa}, {args.threads} thread(s); "
           f"{len(examples)} corpus examples ({', '.join(CORPORA)}, <= {args.max_tokens} tokens), suite "
           f"{data.name} ({len(data.questions)} questions), inactive sets at p = {args.fraction}.\n"]
    mc_rows, abl_rows, speed_rows = [], [], []
    for name in args.models:
        t0 = time.perf_counter()
        m32, tok = load_model(name, dtype=torch.float32, progress=False)
        m16, _ = load_model(name, dtype=torch.bfloat16, progress=False)
        a32, a16 = head_scores(m32, tok, examples), head_scores(m16, tok, examples)
        out.append(f"## {name}: head scores on the corpora ({a32.shape[0]} x {a32.shape[1]} x {a32.shape[2]} "
                   f"triples)\n\n{markdown(agreement(a32, a16, keys, args.fraction))}\n")
        row, c32, c16 = multiple_choice(m32, m16, tok, data, args.n_boot, args.seed)
        out.append(f"## {name}: calibration scores on the suite's prompts ({c32.shape[0]} x {c32.shape[1]} x "
                   f"{c32.shape[2]} triples)\n\n{markdown(agreement(c32, c16, keys, args.fraction))}\n")
        mc_rows.append({"model": name, **row})
        awft = a32[..., keys.index("awft")].mean(0)  # (layers, heads)
        heads = [divmod(int(i), awft.shape[1]) for i in np.argsort(-awft, axis=None)[:args.heads]]
        few = [ex for c in CORPORA for ex in [e for e in examples if e["corpus"] == c][:args.ablation_examples]]
        abl_rows += [{"model": name, "heads": " ".join(f"L{l}H{h}" for l, h in heads), **r}
                     for r in ablation_losses(m32, m16, tok, few, heads)]
        speed_rows.append({"model": name, **speed(m32, m16, tok, data, args.repeats)})
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
        del m32, m16
    out += [f"## Multiple-choice suite (accuracy and delta in points, 95% paired bootstrap CI, KL in nats)\n\n"
            f"{markdown(mc_rows)}\n",
            f"## Per-head ablation losses (nats/token; diff = bf16 - fp32 loss change)\n\n{markdown(abl_rows)}\n",
            f"## Speed: suite evaluation, median of {args.repeats} alternating runs\n\n{markdown(speed_rows)}\n"]
    text = "\n".join(out)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
