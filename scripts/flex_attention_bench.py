"""FlexAttention against the engine's attention path on a padded sliding-window batch (issue #19 §3).

One layer's attention, fp32, B=2, H=4, D=64, window 512, sequences of S and S/2 tokens right-padded to S:

* ``sdpa``: ``scaled_dot_product_attention`` with the dense ``(B, 1, S, S)`` mask transformers builds (the
  baseline: output only, no statistics).
* ``engine``: the attention function's path, the lazy mask's per-row intervals (``_mask_layout``) as
  :class:`~extract.engine.masks.Blocks` and ``attend_lse`` on ``flash_cpu`` (output, first-key weight, entropy).
* ``flex_eager``: ``flex_attention`` with a ``BlockMask`` and ``return_aux=AuxRequest(lse=True)``, not compiled,
  plus a second call with the keys as values for the entropy (the engine's derivation of the statistics).
* ``flex_compiled``: ``torch.compile(flex_attention)`` with the same ``BlockMask``, output only: on CPU the
  compiled kernel refuses ``return_lse`` (PyTorch 2.13), so it cannot give the statistics.

Masks are built once before timing (a forward builds one per layer type, shared by the layers); the
``mask s`` column is that build. ``time`` is the median over ``--repeats`` interleaved rounds of the kernel
alone, ``peak MiB`` the peak resident memory the kernel call adds (VmHWM reset before it), both also as ratios to
``sdpa`` in the same run. Exactness: the largest error over valid rows against the exact chunked kernel
(``kernels.exact``), relative to the largest magnitude of each statistic (``out``, ``lse``, ``p_first``, ``entropy``).

    OMP_NUM_THREADS=1 python scripts/flex_attention_bench.py --lengths 2048 8192
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

B, H, D, WINDOW = 2, 4, 64, 512


def _rss_mib(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def _peak_extra_mib(fn) -> float:
    """Peak resident memory ``fn()`` adds (the peak counter is reset first)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _rss_mib()
    fn()
    return _rss_mib("VmHWM") - before


def setup(S: int):
    import torch
    from transformers.masking_utils import sliding_window_causal_mask_function

    from extract.engine import attention, masks

    g = torch.Generator().manual_seed(S)
    q, k, v = (torch.randn(B, H, S, D, generator=g) for _ in range(3))
    valid = torch.arange(S)[None] < torch.tensor([[S], [S // 2]])
    lazy = masks.lazy_mask(batch_size=B, q_length=S, kv_length=S, attention_mask=valid, local_size=WINDOW,
                           mask_function=sliding_window_causal_mask_function(WINDOW), device=q.device)
    return dict(q=q, k=k, v=v, valid=valid, lazy=lazy, scale=D ** -0.5,
                layout=lambda: attention._mask_layout(lazy, B, S, q, None))


def methods(x: dict, compiled):
    """name -> (build the mask, run the kernel on it); every run returns (out, p_first, entropy, lse) or (out,)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention

    from extract.engine import kernels

    q, k, v, valid, scale = x["q"], x["k"], x["v"], x["valid"], x["scale"]
    S = q.shape[2]

    def engine(layout):
        ok, first, _, blocks = layout
        return kernels.attend_lse(q, k, v, blocks, scale, first, valid=ok, backend="flash_cpu")

    def block_mask():
        def mod(b, h, qi, ki):
            return valid[b, ki] & (ki <= qi) & (ki > qi - WINDOW)
        return create_block_mask(mod, B, None, S, S, device=q.device)

    def flex_stats(bm):  # the engine's statistics from flex's (out, lse) and A·K
        out, aux = flex_attention(q, k, v, block_mask=bm, scale=scale, return_aux=AuxRequest(lse=True))
        ak = flex_attention(q, k, k, block_mask=bm, scale=scale)
        lse = aux.lse.double()
        first_seen = torch.arange(S) < WINDOW  # key 0, every example's first, is in row t's window
        s_first = scale * (q @ k[:, :, :1].transpose(-1, -2)).squeeze(-1).double()
        p_first = torch.where(first_seen, torch.exp(s_first - lse), torch.zeros_like(lse))
        entropy = lse - scale * (q * ak).sum(-1).double()
        return out, p_first, entropy, lse

    return {
        "sdpa": (x["lazy"].dense, lambda m: (F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale),)),
        "engine": (x["layout"], engine),
        "flex_eager": (block_mask, flex_stats),
        "flex_compiled": (block_mask, lambda bm: (compiled(q, k, v, block_mask=bm, scale=scale),)),
    }


def errors(got, ref, valid) -> str:
    """Largest error over valid rows relative to the largest |reference|, per statistic."""
    parts = []
    for name, a, b in zip(("out", "p_first", "entropy", "lse"), got, ref):
        sel = valid[:, None, :].expand(a.shape[:3])  # (B, H, S): rows of the 3-D stats and of out (B, H, S, D)
        a, b = a[sel].double(), b[sel].double()
        parts.append(f"{name} {float((a - b).abs().max() / b.abs().max()):.1e}")
    return ", ".join(parts)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", nargs="+", default=["sdpa", "engine", "flex_eager", "flex_compiled"])
    args = ap.parse_args(argv)
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    from extract.engine import kernels

    compiled = torch.compile(flex_attention, dynamic=False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), B={B} H={H} D={D} window={WINDOW}")
    rows = []
    with torch.inference_mode():
        for S in args.lengths:
            x = setup(S)
            ok, first, _, blocks = x["layout"]()
            ref = kernels._exact(x["q"], x["k"], x["v"], blocks, x["scale"], first, None, 256)
            runs = {n: f for n, f in methods(x, compiled).items() if n in args.methods}
            built, mask_s, exact, peak, times = {}, {}, {}, {}, {n: [] for n in runs}
            for name, (build, run) in runs.items():
                t0 = time.perf_counter()
                built[name] = build()
                mask_s[name] = time.perf_counter() - t0
                t0 = time.perf_counter()
                res = run(built[name])  # warm-up (compiles flex_compiled)
                first_s = time.perf_counter() - t0
                exact[name] = errors(res, ref, x["valid"]) if name != "sdpa" else "(baseline)"
                del res
                peak[name] = _peak_extra_mib(lambda: run(built[name]))
                print(f"S={S} {name}: mask {mask_s[name]:.2f} s, first call {first_s:.1f} s, {exact[name]}", flush=True)
            for _ in range(args.repeats):
                for name, (_, run) in runs.items():
                    t0 = time.perf_counter()
                    run(built[name])
                    times[name].append(time.perf_counter() - t0)
            for name in runs:
                rows.append((S, name, mask_s[name], statistics.median(times[name]), peak[name], exact[name]))
    base = {S: r for S, n, *r in rows if n == "sdpa"}
    print("\n| S | method | mask s | time s | time / sdpa | peak MiB | peak / sdpa | max rel err vs exact (valid rows) |")
    print("|---|---|---|---|---|---|---|---|")
    for S, name, mask_s, t, p, e in rows:
        bt, bp = (base[S][1], base[S][2]) if S in base else (float("nan"), float("nan"))
        print(f"| {S} | {name} | {mask_s:.2f} | {t:.3f} | {t / bt:.2f} | {p:.0f} | {p / max(bp, 1):.2f} | {e} |")


if __name__ == "__main__":
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # freed tensors go back to the system: peaks are live memory
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
