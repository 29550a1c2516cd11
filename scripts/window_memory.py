"""Peak memory of a padded sliding-window batch: the plain sdpa forward vs the scoring forward, per length.

``score_heads_banded`` is the scoring forward with the masks' intervals read band by band from the mask function
(O(S²) time, what every mask took before :func:`extract.engine.masks.derived_intervals`), for before/after times.

Each (method, length) runs in a fresh subprocess (its peak resident memory is its own); the row reports the
peak RSS and the RSS before the forward (model and inputs built), both in MiB, and ``extra_mib`` = peak - before.
Model: a random-init 2-layer Mistral (64 wide, 4 heads of 16, 2 KV heads, sliding window 512 on every layer,
vocab 128); batch: two sequences of ``length`` and ``length // 2`` tokens, right-padded to ``length``.
``--cap-gib`` stops a run whose RSS passes the cap (reported as ``over cap``) so that a quadratic run cannot
take the machine down.

    MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=1 python scripts/window_memory.py --lengths 2048 8192 32768 --repeats 3

Without a fixed mmap threshold glibc's heap keeps freed blocks of many sizes mapped (its dynamic threshold
grows to 32 MiB), and peak RSS then measures fragmentation as much as live tensors.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

METHODS = ("sdpa", "score_heads", "score_heads_banded")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _watch(cap_mib: float) -> None:
    """Exit the process (code 3) as soon as its RSS passes ``cap_mib``."""
    def loop():
        while True:
            if _rss_mib() > cap_mib:
                os._exit(3)
            time.sleep(0.01)
    threading.Thread(target=loop, daemon=True).start()


def worker(method: str, n: int, cap_gib: float) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, MistralConfig

    from extract.engine.scores import pad_right, score_heads

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=512,
                        max_position_embeddings=2 * n, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(1)
    seqs = [[1] + torch.randint(3, 128, (L - 1,), generator=g).tolist() for L in (n, n // 2)]
    ids, am = pad_right(seqs, 0, "cpu")
    before = _rss_mib()
    _watch(cap_gib * 1024)
    t0 = time.perf_counter()
    if method == "sdpa":
        with torch.inference_mode():
            model.base_model(input_ids=ids, attention_mask=am, use_cache=False)
    elif method in ("score_heads", "score_heads_banded"):
        if method == "score_heads_banded":
            from extract.engine import masks

            masks.derived_intervals = lambda mask: None
        score_heads(model, seqs, batch_tokens=2 * n)
    else:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": method, "tokens": n, "batch": 2, "before_mib": before, "peak_mib": peak,
            "extra_mib": peak - before, "seconds": seconds}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--cap-gib", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "N"))
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.cap_gib)))
        return
    rows = []
    for n in args.lengths:
        runs = {m: [] for m in args.methods}
        for _ in range(args.repeats):  # rounds interleave the methods; the row keeps the median seconds
            for m in args.methods:
                p = subprocess.run([sys.executable, __file__, "--worker", m, str(n), "--cap-gib", str(args.cap_gib)],
                                   capture_output=True, text=True)
                if p.returncode == 3:
                    row = {"method": m, "tokens": n, "batch": 2, "over_cap_gib": args.cap_gib}
                elif p.returncode:
                    raise RuntimeError(f"{m} at {n} tokens failed:\n{p.stderr[-3000:]}")
                else:
                    row = json.loads(p.stdout.strip().splitlines()[-1])
                runs[m].append(row)
                print(json.dumps(row), flush=True)
        for m, done in runs.items():
            over = [r for r in done if "peak_mib" not in r]
            rows.append(over[0] if over else dict(done[0], seconds=statistics.median(r["seconds"] for r in done)))
    base = {r["tokens"]: r for r in rows if r["method"] == "sdpa" and "peak_mib" in r}
    print("\n| tokens | method | peak RSS MiB | extra over the forward's start MiB | over sdpa peak MiB | s | s / sdpa |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "peak_mib" not in r:
            print(f"| {r['tokens']} | {r['method']} | > {r['over_cap_gib']} GiB cap | | | | |")
            continue
        over = r["peak_mib"] - base[r["tokens"]]["peak_mib"] if r["tokens"] in base else float("nan")
        ratio = r["seconds"] / base[r["tokens"]]["seconds"] if r["tokens"] in base else float("nan")
        print(f"| {r['tokens']} | {r['method']} | {r['peak_mib']:.0f} | {r['extra_mib']:.0f} | {over:.0f} | "
              f"{r['seconds']:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
