"""One-pass CPU attention with the per-query statistics, compiled on first use.

:func:`attend_stats` returns what :func:`extract.engine.kernels.attend_lse` needs from backend ``"flash_cpu"``
(output, weight on the first valid key, row entropy, row log-sum-exp) from ONE flash-attention pass: an online
softmax over key blocks of 512 (query blocks of 64, or 256 from 768 queries on, as PyTorch's CPU flash kernel)
whose row accumulators are, with ``m`` the running row max, ``l = Σ exp(s - m)`` and ``t = Σ exp(s - m) (s - m)``
(both rescaled when ``m`` grows: ``t <- α (t + (m_old - m) l)``, ``l <- α l`` with ``α = exp(m_old - m)``), so
that ``lse = m + log l`` and ``H = log l - t / l``. Every term of ``t`` is <= 0 and ``log l >= 0``: the entropy
is a sum of non-negative parts, without the cancellation of ``lse - scale * q·(A·K)``. The entries at the row
max (``exp(0) = 1``) are counted apart and ``l`` is summed in float64, so ``log l`` keeps its relative precision
for nearly one-hot rows (``l = 1 + rest``). The logits and ``A·V`` are float32 (the matrix products are BLAS
``sgemm`` calls, exp is SLEEF's 1-ulp ``expf``); ``lse``, ``p_first = exp(s_first - lse)`` and the entropy are
float64. Its cost is that of one PyTorch flash call; the two-call path costs two.

Why not one PyTorch call with the values extended by the keys, ``v' = [V | K]``: PyTorch's CPU flash kernel
refuses a value head size different from the query's, and padding q and k with zeros to ``2D`` costs 2.1x one
call at 2048 tokens (SmolLM2's shapes), no better than two calls.

:func:`row_norms` gives the head output norms of :func:`extract.engine.attention.head_stats` (``‖o‖`` and
``sqrt(o G_h oᵀ)``) in one pass over the output instead of a ``(B, H, S, D)`` product and its temporaries.

Inputs: q ``(B, H, S_q, D)`` float32, k and v ``(B, KV, S_k, D)`` (query head h reads KV head ``h // (H / KV)``,
no repeated copy); ``mask`` None (causal, the last query aligned with the last key) or additive
``(B or 1, 1 or H, S_q, S_k)`` float32; ``first (B,)`` key index. Output ``out`` is ``(B, H, S_q, D)`` as a
transposed view of ``(B, S_q, H, D)`` storage (as PyTorch's kernel returns it).

The extension is built with ``torch.utils.cpp_extension.load_inline`` (cached under ``TORCH_EXTENSIONS_DIR``,
one build per CPU capability, ~30 s); without a compiler or a BLAS ``sgemm_`` in PyTorch's library, or on any
build error, :func:`available` is False (warned once) and the callers keep their PyTorch paths.
``DORMANT_FUSED_CPU=0`` turns it off.
"""
from __future__ import annotations

import os
import threading
import warnings

import torch

ENV = "DORMANT_FUSED_CPU"

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
#include <cmath>
#include <limits>
#include <vector>

extern "C" void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                       const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// column-major C (m x n) = alpha op(A) op(B) + beta C
inline void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  int mi = m, ni = n, ki = k, la = lda, lb = ldb, lc = ldc;
  sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
}

// row max of x[0:n]
inline float row_max(const float* x, int64_t n) {
  int64_t j = 0;
  Vec vm(NEG_INF);
  for (; j + Vec::size() <= n; j += Vec::size()) vm = at::vec::maximum(vm, Vec::loadu(x + j));
  float out = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vm);
  for (; j < n; ++j) out = std::max(out, x[j]);
  return out;
}

// x <- exp(x - mx); sum_e = sum of e (float64), sum_ed = sum of e (x - mx) (0 where e is 0). The entries at the
// max (e = 1 exactly) are counted apart from the others, so that float32 lanes keep the relative precision of
// the rest of a nearly one-hot row.
inline void exp_sums(float* x, int64_t n, float mx, double& sum_e, double& sum_ed) {
  const Vec vmx(mx), lowest(std::numeric_limits<float>::lowest()), zero(0.f), one(1.f);
  Vec ve(0.f), ved(0.f), vones(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec d = Vec::loadu(x + j) - vmx;
    Vec e = d.exp();
    Vec at_max = d == zero;
    ved = at::vec::fmadd(e, at::vec::maximum(d, lowest), ved);
    ve = ve + Vec::blendv(e, zero, at_max);
    vones = vones + (at_max & one);
    e.store(x + j);
  }
  alignas(64) float a[Vec::size()], b[Vec::size()], c[Vec::size()];
  ve.store(a);
  ved.store(b);
  vones.store(c);
  double se = 0.0, sed = 0.0, ones = 0.0;
  for (int u = 0; u < Vec::size(); ++u) {
    se += a[u];
    sed += b[u];
    ones += c[u];
  }
  for (; j < n; ++j) {
    float d = x[j] - mx;
    float e = std::exp(d);
    x[j] = e;
    if (d == 0.f) ones += 1.0; else se += (double)e;
    sed += e == 0.f ? 0.0 : (double)(e * d);
  }
  sum_e = ones + se;
  sum_ed = sed;
}

inline void scale_row(float* x, int64_t n, float a) {
  const Vec va(a);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) (Vec::loadu(x + j) * va).store(x + j);
  for (; j < n; ++j) x[j] *= a;
}

}  // namespace

// q (B,H,Sq,D), k/v (B,KV,Sk,D) float32 with unit last stride (query head h reads KV head h / (H / KV));
// mask: empty or (B or 1, 1 or H, Sq, Sk) float32 with unit last stride
std::vector<at::Tensor> attend_stats(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& mask, double scale_d, const at::Tensor& first_t,
                                     int64_t q_split, int64_t kv_split) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4);
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1);
  const int64_t B = q.size(0), H = q.size(1), Sq = q.size(2), D = q.size(3), Sk = k.size(2);
  const int64_t KV = k.size(1);
  TORCH_CHECK(k.size(0) == B && KV > 0 && H % KV == 0 && k.size(3) == D && v.sizes() == k.sizes());
  const int64_t group = H / KV;
  const bool has_mask = mask.defined() && mask.numel() > 0;
  const int64_t off = Sk - Sq;  // query i is key position off + i
  TORCH_CHECK(off >= 0);
  if (has_mask) {
    TORCH_CHECK(mask.scalar_type() == at::kFloat && mask.dim() == 4 && mask.size(2) == Sq && mask.size(3) == Sk);
    TORCH_CHECK(mask.stride(3) == 1 && (mask.size(0) == B || mask.size(0) == 1) &&
                (mask.size(1) == H || mask.size(1) == 1));
  }
  auto first_c = first_t.to(at::kLong).contiguous();
  TORCH_CHECK(first_c.numel() == B);
  const int64_t* first = first_c.data_ptr<int64_t>();

  auto out = at::empty({B, Sq, H, D}, q.options());
  auto f64 = q.options().dtype(at::kDouble);
  auto lse = at::empty({B, H, Sq}, f64), pfirst = at::empty({B, H, Sq}, f64), ent = at::empty({B, H, Sq}, f64);

  const float scale = (float)scale_d;
  const int64_t qS = std::min(q_split, Sq), kvS = std::min(kv_split, Sk);
  const int64_t qSlices = (Sq + qS - 1) / qS;
  const float* qd = q.data_ptr<float>();
  const float* kd = k.data_ptr<float>();
  const float* vd = v.data_ptr<float>();
  const float* md = has_mask ? mask.data_ptr<float>() : nullptr;
  float* od = out.data_ptr<float>();
  double* lsed = lse.data_ptr<double>();
  double* pfd = pfirst.data_ptr<double>();
  double* entd = ent.data_ptr<double>();
  const int64_t qsB = q.stride(0), qsH = q.stride(1), qsM = q.stride(2);
  const int64_t ksB = k.stride(0), ksH = k.stride(1), ksN = k.stride(2);
  const int64_t vsB = v.stride(0), vsH = v.stride(1), vsN = v.stride(2);
  const int64_t msB = has_mask && mask.size(0) > 1 ? mask.stride(0) : 0, msM = has_mask ? mask.stride(2) : 0;
  const int64_t msH = has_mask && mask.size(1) > 1 ? mask.stride(1) : 0;
  const int64_t osB = out.stride(0), osM = out.stride(1), osH = out.stride(2);

  at::parallel_for(0, B * H * qSlices, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qk(qS * kvS), dst(qS * D), mrow(qS), sfirst(qS);
    std::vector<double> lrow(qS), trow(qS);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / (H * qSlices), h = (idx / qSlices) % H, blk = idx % qSlices;
      const int64_t m0 = blk * qS, qB = std::min(qS, Sq - m0);
      const int64_t nkeys = has_mask ? Sk : std::min(off + m0 + qB, Sk);
      const int64_t fb = first[b];
      std::fill(mrow.begin(), mrow.begin() + qB, NEG_INF);
      std::fill(sfirst.begin(), sfirst.begin() + qB, NEG_INF);
      std::fill(lrow.begin(), lrow.begin() + qB, 0.0);
      std::fill(trow.begin(), trow.begin() + qB, 0.0);
      const float* qp = qd + b * qsB + h * qsH + m0 * qsM;
      const float* kp = kd + b * ksB + (h / group) * ksH;
      const float* vp = vd + b * vsB + (h / group) * vsH;
      for (int64_t n = 0; n < nkeys; n += kvS) {
        const int64_t kvB = std::min(kvS, nkeys - n);
        // qk (qB x kvB, row-major) = scale * Q_blk K_blk^T
        gemm('T', 'N', kvB, qB, D, scale, kp + n * ksN, ksN, qp, qsM, 0.f, qk.data(), kvB);
        for (int64_t r = 0; r < qB; ++r) {
          float* x = qk.data() + r * kvB;
          if (has_mask) {
            const float* mr = md + b * msB + h * msH + (m0 + r) * msM + n;
            int64_t j = 0;
            for (; j + Vec::size() <= kvB; j += Vec::size()) (Vec::loadu(x + j) + Vec::loadu(mr + j)).store(x + j);
            for (; j < kvB; ++j) x[j] += mr[j];
          } else {
            const int64_t last = off + m0 + r - n;  // last visible column of this row
            for (int64_t j = std::max<int64_t>(last + 1, 0); j < kvB; ++j) x[j] = NEG_INF;
          }
          if (fb >= n && fb < n + kvB) sfirst[r] = x[fb - n];
          const float mnew = std::max(mrow[r], row_max(x, kvB));
          if (mnew == NEG_INF) {  // nothing visible yet in this row
            std::fill(x, x + kvB, 0.f);
            continue;
          }
          double se, sed;
          exp_sums(x, kvB, mnew, se, sed);
          if (lrow[r] == 0.0) {
            lrow[r] = se;
            trow[r] = sed;
          } else {
            const double dm = (double)mrow[r] - (double)mnew;  // <= 0
            const double alpha = std::exp(dm);
            trow[r] = alpha * (trow[r] + dm * lrow[r]) + sed;
            lrow[r] = alpha * lrow[r] + se;
            if (dm != 0.0) scale_row(dst.data() + r * D, D, (float)alpha);
          }
          mrow[r] = mnew;
        }
        // dst (qB x D) (+)= P V_blk
        gemm('N', 'N', D, qB, kvB, 1.f, vp + n * vsN, vsN, qk.data(), kvB, n == 0 ? 0.f : 1.f,
             dst.data(), D);
      }
      for (int64_t r = 0; r < qB; ++r) {
        const int64_t row = (b * H + h) * Sq + m0 + r;
        const double l = lrow[r];
        float* o = od + b * osB + (m0 + r) * osM + h * osH;
        if (l > 0.0) {
          const double logl = std::log(l);
          const double ls = (double)mrow[r] + logl;
          lsed[row] = ls;
          entd[row] = logl - trow[r] / l;
          pfd[row] = std::exp((double)sfirst[r] - ls);
          const float inv = (float)(1.0 / l);
          for (int64_t d = 0; d < D; ++d) o[d] = dst[r * D + d] * inv;
        } else {  // a row that sees no key
          lsed[row] = -std::numeric_limits<double>::infinity();
          entd[row] = std::numeric_limits<double>::quiet_NaN();
          pfd[row] = 0.0;
          for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
        }
      }
    }
  });
  return {out.transpose(1, 2), pfirst, ent, lse};
}

// out (B,H,S,D) float32 with unit last stride, gram empty or (H,D,D) float32 contiguous (symmetric) ->
// {||o|| (B,H,S), sqrt(max(0, o G_h o^T)) (B,H,S) or empty}, float32, one pass over out
std::vector<at::Tensor> row_norms(const at::Tensor& out, const at::Tensor& gram) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 4 && out.stride(3) == 1);
  const int64_t B = out.size(0), H = out.size(1), S = out.size(2), D = out.size(3);
  const bool with_full = gram.defined() && gram.numel() > 0;
  if (with_full) {
    TORCH_CHECK(gram.scalar_type() == at::kFloat && gram.is_contiguous() && gram.dim() == 3 && gram.size(0) == H &&
                gram.size(1) == D && gram.size(2) == D);
  }
  auto on = at::empty({B, H, S}, out.options());
  auto full = with_full ? at::empty({B, H, S}, out.options()) : at::empty({0}, out.options());
  const float* od = out.data_ptr<float>();
  const float* gd = with_full ? gram.data_ptr<float>() : nullptr;
  float* ond = on.data_ptr<float>();
  float* fd = with_full ? full.data_ptr<float>() : nullptr;
  const int64_t osB = out.stride(0), osH = out.stride(1), osM = out.stride(2);
  constexpr int64_t R = 64;
  const int64_t slices = (S + R - 1) / R;
  at::parallel_for(0, B * H * slices, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> y(R * D);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t b = idx / (H * slices), h = (idx / slices) % H, s0 = (idx % slices) * R;
      const int64_t rows = std::min(R, S - s0);
      const float* o = od + b * osB + h * osH + s0 * osM;
      if (with_full)  // y (rows x D, row-major) = O G_h (G symmetric)
        gemm('N', 'N', D, rows, D, 1.f, gd + h * D * D, D, o, osM, 0.f, y.data(), D);
      for (int64_t r = 0; r < rows; ++r) {
        const float* orow = o + r * osM;
        Vec a(0.f), c(0.f);
        int64_t d = 0;
        for (; d + Vec::size() <= D; d += Vec::size()) {
          Vec ov = Vec::loadu(orow + d);
          a = at::vec::fmadd(ov, ov, a);
          if (with_full) c = at::vec::fmadd(Vec::loadu(y.data() + r * D + d), ov, c);
        }
        float sa = at::vec::vec_reduce_all<float>([](Vec& x, Vec& z) { return x + z; }, a);
        float sc = with_full ? at::vec::vec_reduce_all<float>([](Vec& x, Vec& z) { return x + z; }, c) : 0.f;
        for (; d < D; ++d) {
          sa += orow[d] * orow[d];
          if (with_full) sc += y[r * D + d] * orow[d];
        }
        const int64_t row = (b * H + h) * S + s0 + r;
        ond[row] = std::sqrt(sa);
        if (with_full) fd[row] = std::sqrt(std::max(sc, 0.f));
      }
    }
  });
  return {on, full};
}
"""

_lock = threading.Lock()
_module = None
_tried = False


def _flags() -> list[str]:
    cap = torch.backends.cpu.get_cpu_capability()
    flags = ["-O3", "-fopenmp"]
    if cap == "AVX512":
        flags += ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
                  "-mavx512dq", "-mfma"]
    elif cap == "AVX2":
        flags += ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma"]
    else:
        flags += ["-DCPU_CAPABILITY=DEFAULT"]
    return flags


def load():
    """The compiled extension, or None (turned off, no compiler, no BLAS symbol, build error: warned once)."""
    global _module, _tried
    if os.environ.get(ENV, "1") == "0":
        return None
    if _tried:
        return _module
    with _lock:
        if not _tried:
            try:
                from torch.utils.cpp_extension import load_inline

                cap = torch.backends.cpu.get_cpu_capability().lower()
                _module = load_inline(f"dormant_fused_cpu_{cap}", cpp_sources=_SOURCE,
                                      functions=["attend_stats", "row_norms"], extra_cflags=_flags(),
                                      extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as e:  # no compiler, missing symbol, ...: the two-call path stays
                warnings.warn(f"fused CPU attention kernel unavailable ({type(e).__name__}: {str(e)[:200]}); "
                              "using two flash calls", RuntimeWarning, stacklevel=2)
                _module = None
            _tried = True
    return _module


def available() -> bool:
    return load() is not None


def row_norms(out: torch.Tensor, gram: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Per row of ``out (B, H, S, D)``: ``‖o‖`` and, with ``gram (H, D, D)``, ``sqrt(max(0, o G_h oᵀ))``, both
    ``(B, H, S)`` float32, in one pass over ``out``; None where it does not apply (not a float32 CPU tensor, one
    that needs gradients, or the extension is unavailable)."""
    if out.device.type != "cpu" or out.dtype != torch.float32 or out.stride(-1) != 1:
        return None
    if torch.is_grad_enabled() and (out.requires_grad or (gram is not None and gram.requires_grad)):
        return None
    mod = load()
    if mod is None:
        return None
    g = torch.empty(0) if gram is None else gram.to(torch.float32).contiguous()
    on, full = mod.row_norms(out, g)
    return on, None if gram is None else full


def attend_stats(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
                 first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, p_first, entropy, lse)`` of one pass (see module doc); inputs float32 CPU tensors."""
    mod = load()
    if mod is None:
        raise RuntimeError("fused CPU attention kernel unavailable")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if mask is None:
        m = torch.empty(0)
    else:
        m = mask if mask.stride(-1) == 1 else mask.contiguous()
    q_split = 256 if q.shape[2] >= 768 else 64
    return tuple(mod.attend_stats(q, k, v, m, float(scale), first, q_split, 512))
