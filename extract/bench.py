"""Benchmark of the score engine against plain forwards and the naive eager approach, in one run.

Each (method, length) runs in a fresh subprocess so its peak resident memory is its own. Methods:

* ``sdpa_lm``: plain ``sdpa`` forward of the causal LM (with the LM head), no scores;
* ``sdpa_decoder``: plain ``sdpa`` forward of the decoder stack only (what ``score_heads`` runs);
* ``score_heads``: the registered scores of every head;
* ``naive_eager``: eager attention with ``output_attentions=True`` (every layer's S x S weights kept), hooks
  on the value projection and the output projection's input, scores with plain tensor ops (skipped, and
  marked n/a, where the weights alone would exceed ``NAIVE_MAX_GIB``).

Times are medians over repeats after one warm-up, the methods interleaved in one process (rotated order
each repetition) so that background load affects them alike; peak resident memory comes from a fresh
process per (method, length). Input is real text (Python standard-library source) truncated to the length. Usage: ``dormant bench [--model NAME] [--lengths 512 2048 4096] [--device cuda]`` (on CUDA each
timed run ends with a device synchronisation and rows also carry the peak allocated GPU memory).
"""
from __future__ import annotations

import argparse  # its source is part of the benchmark text
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("sdpa_lm", "sdpa_decoder", "score_heads", "naive_eager")


def _text_ids(tok, n: int) -> list[int]:
    import inspect
    import typing

    text = "".join(Path(m.__file__).read_text() for m in (inspect, typing, argparse, json))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id
    ids = ([bos] if bos is not None else []) + ids
    if len(ids) < n:
        raise RuntimeError(f"benchmark text has only {len(ids)} tokens")
    return ids[:n]


NAIVE_MAX_GIB = 8.0  # the naive approach keeps every layer's (heads, S, S) weights: skip it beyond this


def naive_gib(model, n: int) -> float:
    """GiB of attention weights the naive approach holds at once (all layers, float32)."""
    cfg = model.config
    return cfg.num_hidden_layers * cfg.num_attention_heads * n * n * 4 / 2**30


def _naive_eager(model, ids):
    """Scores the naive way: eager attention with ``output_attentions=True`` (every layer's weights kept),
    the ``"v"`` and ``"z"`` capture points, plain tensor ops."""
    import torch

    from analysis.core.score_functions import ordered_stats
    from extract.engine import hooks
    from extract.engine.scores import scores_from_stats

    _, H, KV, _ = hooks.head_shape(model)
    with hooks.capture(model, "v") as vals, hooks.capture(model, "z") as outs, torch.inference_mode():
        attentions = model.base_model(input_ids=torch.tensor([ids], device=model.device), output_attentions=True,
                                      use_cache=False).attentions
    stats = []
    for i, A in enumerate(attentions):
        A = A[0]  # (H, S, S)
        V = vals[i][0].repeat_interleave(H // KV, 1)  # (S, H, head_dim)
        O = outs[i][0]
        ent = -(A * torch.log(A.clamp_min(1e-30))).sum(-1).mean(-1)
        on, vn = O.norm(dim=-1), V.norm(dim=-1)
        W = hooks.decoder_layers(model)[i].self_attn.o_proj.weight.detach()  # (d_model, H * head_dim)
        full = torch.stack([(O[:, h] @ W[:, h * O.shape[-1]:(h + 1) * O.shape[-1]].T).norm(dim=-1)
                            for h in range(H)], 1)  # (S, H): ‖O_h W_O^h‖
        by_name = {"p_first": A[:, :, 0].mean(-1), "entropy": ent, "v_first_norm": vn[0], "v_norm": vn.mean(0),
                   "o_last_norm": on[-1], "o_norm": on.mean(0), "o_full_norm": full.mean(0),
                   "p_sink": (1 - A.sum(-1)).mean(-1) if hasattr(hooks.decoder_layers(model)[i].self_attn, "sinks")
                   else torch.zeros(H, dtype=A.dtype, device=A.device)}
        stats.append(torch.stack(ordered_stats(by_name), -1).double())
    return scores_from_stats(torch.stack(stats))


def _runner(model, tok, method: str, n: int):
    """A zero-argument callable running ``method`` once on ``n`` tokens of real text."""
    import torch

    from extract.engine.scores import score_heads

    ids = _text_ids(tok, n)
    x = torch.tensor([ids], device=model.device)

    def attn(name):
        if model.config._attn_implementation != name:
            model.set_attn_implementation(name)

    if method in ("sdpa_lm", "sdpa_decoder"):
        net = model if method == "sdpa_lm" else model.base_model

        def run():
            attn("sdpa")
            with torch.inference_mode():
                net(input_ids=x, use_cache=False)
    elif method == "score_heads":
        def run():
            score_heads(model, [ids], batch_tokens=n)
    elif method == "naive_eager":
        def run():
            attn("eager")
            _naive_eager(model, ids)
    else:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    return run


def worker(model_name: str, methods: list[str], n: int, repeats: int, device: str = "cpu") -> list[dict]:
    """Time ``methods`` interleaved in one process (each repetition runs every method once, in rotated
    order), so that background load hits all of them alike; one warm-up each."""
    import torch

    from extract.models.load import load_model

    torch.manual_seed(0)
    model, tok = load_model(model_name, progress=False, device=device)
    cuda = model.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    skipped = [m for m in methods if m == "naive_eager" and naive_gib(model, n) > NAIVE_MAX_GIB]
    methods = [m for m in methods if m not in skipped]
    runs = {m: _runner(model, tok, m, n) for m in methods}
    for m in methods:
        runs[m]()
    times = {m: [] for m in methods}
    for r in range(repeats):
        order = methods[r % len(methods):] + methods[: r % len(methods)]
        for m in order:
            sync()
            t0 = time.perf_counter()
            runs[m]()
            sync()
            times[m].append(time.perf_counter() - t0)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_mib = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    rows = [{"method": m, "tokens": n, "median_s": statistics.median(times[m]), "times_s": times[m],
             "peak_rss_mib": peak_mib if len(methods) == 1 else None, "threads": torch.get_num_threads(),
             "device": str(model.device), "peak_gpu_mib": gpu_mib if len(methods) == 1 else None}
            for m in methods]
    return rows + [{"method": m, "tokens": n, "median_s": float("nan"), "times_s": [], "peak_rss_mib": float("nan"),
                    "threads": torch.get_num_threads(), "skipped": f"needs {naive_gib(model, n):.0f} GiB of weights"}
                   for m in skipped]


def _spawn(model_name: str, methods: list[str], n: int, repeats: int, device: str = "cpu") -> list[dict]:
    cmd = [sys.executable, "-m", "extract.cli", "bench", "--worker", "--model", model_name, "--lengths", str(n),
           "--repeats", str(repeats), "--device", device, "--methods", *methods]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy())
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_all(model_name: str, lengths: list[int], repeats: int, methods=METHODS, device: str = "cpu") -> list[dict]:
    """Times: one process per length, methods interleaved. Peak RSS: one fresh process per (method,
    length) running the method once after a warm-up."""
    rows = []
    for n in lengths:
        timed = {r["method"]: r for r in _spawn(model_name, list(methods), n, repeats, device)}
        for m in methods:
            if not timed[m].get("skipped"):
                alone = _spawn(model_name, [m], n, 1, device)[0]
                timed[m]["peak_rss_mib"], timed[m]["peak_gpu_mib"] = alone["peak_rss_mib"], alone["peak_gpu_mib"]
            rows.append(timed[m])
            print(f"  {m:13s} {n:5d} tok  median {timed[m]['median_s']:.3f} s  peak RSS "
                  f"{timed[m]['peak_rss_mib']:.0f} MiB", file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    by = {(r["method"], r["tokens"]): r for r in rows}
    lines = ["| tokens | sdpa LM (s) | sdpa decoder (s) | score_heads (s) | naive eager (s) | score/sdpa LM | "
             "score/sdpa decoder | naive/score | peak RSS score/sdpa LM | peak RSS score/sdpa decoder | "
             "peak RSS naive/score |", "|" + "---|" * 11]
    for n in sorted({r["tokens"] for r in rows}):
        g = {m: by.get((m, n)) for m in METHODS}
        t = {m: (g[m]["median_s"] if g[m] else float("nan")) for m in METHODS}
        p = {m: (g[m]["peak_rss_mib"] if g[m] else float("nan")) for m in METHODS}
        lines.append(f"| {n} | {t['sdpa_lm']:.3f} | {t['sdpa_decoder']:.3f} | {t['score_heads']:.3f} | "
                     f"{t['naive_eager']:.3f} | {t['score_heads'] / t['sdpa_lm']:.2f}x | "
                     f"{t['score_heads'] / t['sdpa_decoder']:.2f}x | {t['naive_eager'] / t['score_heads']:.2f}x | "
                     f"{p['score_heads'] / p['sdpa_lm']:.2f}x | {p['score_heads'] / p['sdpa_decoder']:.2f}x | "
                     f"{p['naive_eager'] / p['score_heads']:.2f}x |")
    return "\n".join(lines)
