"""Two-sample comparisons of head-score distributions (definitions §6); examples are the independent unit.

Model A and model B each give a matrix of scores ``(examples, heads)`` for one score function
(:class:`analysis.distributions.score_matrix.ScoreMatrix`); the distribution of a model is every entry pooled. Statistics:

* ``ks_d``: two-sample Kolmogorov–Smirnov statistic D = max |F_A − F_B|.
* ``wasserstein``: 1-D Wasserstein-1 distance ∫ |F_A − F_B| dx, in score units; ``wasserstein_sd``: the same
  divided by the standard deviation of A's scores (comparable across functions).
* ``overlap``: overlap coefficient Σ_b min(p_A(b), p_B(b)) of shared-bin histograms; the bins are
  ``n_bins`` equal-mass bins of the pooled observed scores (so it is invariant to monotone rescaling of a
  score; 1 = identical binned densities, 0 = disjoint).
* ``frac_inactive_b``: fraction of B's scores on the inactive side of A's threshold τ_A (definitions §3: the
  p-quantile of A's pooled scores, the (1−p)-quantile for ``awft``/``awft_ln``); A's own fraction is p.
* example- and head-paired only (same documents, same architecture): ``iou_inactive`` and
  ``precision_inactive`` of the (example, layer, head) triples inactive under τ_A (precision: the share of
  B's inactive triples that are inactive in A too).
* head-paired only (same architecture): ``spearman_heads`` (Spearman correlation of per-head mean scores),
  ``flip_fraction`` (share of heads whose majority status — inactive on more than half the examples at τ_A
  — differs between A and B).
* ``ks_pvalue_naive``: scipy's asymptotic KS p-value treating every score as independent. Scores of one
  example are strongly correlated and there are up to millions of them, so this p-value is tiny for any
  visible difference and is **not evidence by itself**; it is reported only to show that.

Uncertainty: confidence intervals from a bootstrap over examples (each replicate resamples examples with
replacement and keeps all their heads; for paired comparisons the same examples for A and B): the
percentile interval re-centred on the estimate (see :func:`interval`); τ_A is held at its full-sample value. ``p_value`` of ``ks_d`` and ``wasserstein``: a
permutation test over examples — with both models on the same documents, the two models' rows of each
example are swapped with probability 1/2; for disjoint example sets (the null calibration of a model
against itself), examples are relabelled at random. p = (1 + #{T_perm ≥ T_obs}) / (1 + n_perm).
Depth bins: every statistic overall (``all``) and per relative-depth bin of layer / n_layers.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import polars as pl

from analysis.core import tables
from analysis.core.score_functions import get_score_function
from analysis.core.thresholds import threshold
from analysis.distributions.score_matrix import ScoreMatrix

POOLED = ("ks_d", "wasserstein", "wasserstein_sd", "overlap", "frac_inactive_b")
TRIPLES = ("iou_inactive", "precision_inactive")
HEADS = ("spearman_heads", "flip_fraction")
PERMUTED = ("ks_d", "wasserstein")
# the distribution_tests table's columns, in the order of this module's rows (and of the report tables)
SCHEMA = tables.polars_schema("distribution_tests", ("comparison", "kind", "model_a", "model_b", "score_fn",
                                                     "depth_bin", "statistic", "value", "ci_low", "ci_high",
                                                     "p_value", "n_examples"))


@dataclass(frozen=True)
class Settings:
    """Knobs of :func:`compare` (``n_boot``/``n_perm``: replicates; ``level``: CI coverage)."""
    n_boot: int = 200
    n_perm: int = 200
    level: float = 0.95
    depth_bins: int = 3
    n_bins: int = 50
    target_fraction: float = 0.15
    seed: int = 0


def inactive(x: np.ndarray, tau: float, score_fn: str) -> np.ndarray:
    """Boolean mask of scores on the inactive side of ``tau`` (definitions §2 direction of ``score_fn``)."""
    return get_score_function(score_fn).is_inactive(x, tau)


class TwoSample:
    """A's and B's scores pooled and sorted once; statistics for any example weights and A/B labels.

    a: ``(Ea, Ha)``, b: ``(Eb, Hb)``. Units (examples) ``0..Ea-1`` hold A's rows, ``Ea..Ea+Eb-1`` B's.
    """

    def __init__(self, a: np.ndarray, b: np.ndarray, *, tau: float, score_fn: str, n_bins: int = 50):
        ea, eb = a.shape[0], b.shape[0]
        x = np.concatenate([a.ravel(), b.ravel()])
        unit = np.concatenate([np.repeat(np.arange(ea), a.shape[1]), ea + np.repeat(np.arange(eb), b.shape[1])])
        order = np.argsort(x, kind="stable")
        self.x, self.unit = x[order], unit[order]
        self.xc = self.x - self.x.mean()
        self.gap = np.diff(self.x)
        self.last = np.r_[self.x[1:] != self.x[:-1], True]  # the last of each group of tied values
        edges = np.unique(np.quantile(x, np.linspace(0, 1, n_bins + 1)))
        bins = np.searchsorted(edges[1:-1], self.x, side="right")  # nondecreasing along the sorted values
        self.bin_starts = np.flatnonzero(np.r_[True, bins[1:] != bins[:-1]])
        self.inact = inactive(self.x, tau, score_fn).astype(np.float64)
        self.n_units, self.n_a = ea + eb, ea

    def labels(self) -> np.ndarray:
        """The observed labels: True for A's units."""
        return np.arange(self.n_units) < self.n_a

    def stats(self, w: np.ndarray, la: np.ndarray) -> dict[str, np.ndarray]:
        """Pooled statistics for unit weights ``w (R, U)`` and labels ``la (R, U)`` (True = A); each ``(R,)``."""
        out = {k: [] for k in POOLED}
        chunk = max(1, int(5e5 // max(len(self.x), 1)))
        for s in range(0, w.shape[0], chunk):
            pw = w[s:s + chunk][:, self.unit]
            wa = pw * la[s:s + chunk][:, self.unit]
            wb = pw - wa
            fa, fb = np.cumsum(wa, axis=1), np.cumsum(wb, axis=1)
            sa, sb = fa[:, -1:], fb[:, -1:]
            d = np.abs(fa / sa - fb / sb)
            out["ks_d"].append(d[:, self.last].max(axis=1))
            w1 = d[:, :-1] @ self.gap
            out["wasserstein"].append(w1)
            mean = (wa @ self.xc) / sa[:, 0]
            sd = np.sqrt(np.maximum((wa @ self.xc ** 2) / sa[:, 0] - mean ** 2, 0.0))
            with np.errstate(divide="ignore", invalid="ignore"):
                out["wasserstein_sd"].append(np.where(sd > 0, w1 / sd, np.where(w1 > 0, np.inf, 0.0)))
            pa = np.add.reduceat(wa, self.bin_starts, axis=1) / sa
            pb = np.add.reduceat(wb, self.bin_starts, axis=1) / sb
            out["overlap"].append(np.minimum(pa, pb).sum(axis=1))
            out["frac_inactive_b"].append((wb @ self.inact) / sb[:, 0])
        return {k: np.concatenate(v) for k, v in out.items()}


def head_stats(a: np.ndarray, b: np.ndarray, ia: np.ndarray, ib: np.ndarray, wa: np.ndarray,
               wb: np.ndarray) -> dict[str, np.ndarray]:
    """Head-paired statistics for example weights ``wa (R, Ea)``, ``wb (R, Eb)``; a, b: ``(E, H)`` scores,
    ia, ib: ``(E, H)`` inactive masks. Returns ``spearman_heads`` and ``flip_fraction``, each ``(R,)``."""
    from scipy.stats import rankdata

    sa, sb = wa.sum(1, keepdims=True), wb.sum(1, keepdims=True)
    ma, mb = (wa @ a) / sa, (wb @ b) / sb
    ra, rb = rankdata(ma, axis=1), rankdata(mb, axis=1)
    ra, rb = ra - ra.mean(1, keepdims=True), rb - rb.mean(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = (ra * rb).sum(1) / np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1))
    fa, fb = (wa @ ia) / sa > 0.5, (wb @ ib) / sb > 0.5
    return {"spearman_heads": rho, "flip_fraction": (fa != fb).mean(1)}


def triple_stats(ia: np.ndarray, ib: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """IoU and precision of inactive (example, head) triples for example weights ``w (R, E)``; ia, ib: ``(E, H)``."""
    inter, union, nb = (ia & ib).sum(1), (ia | ib).sum(1), ib.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"iou_inactive": (w @ inter) / (w @ union), "precision_inactive": (w @ inter) / (w @ nb)}


RANGES = {"wasserstein": (0.0, np.inf), "wasserstein_sd": (0.0, np.inf), "spearman_heads": (-1.0, 1.0)}


def interval(value: float, reps: np.ndarray, level: float = 0.95, bounds=(0.0, 1.0)) -> tuple[float, float]:
    """Bootstrap CI re-centred on the estimate: ``value + (quantiles(reps) − median(reps))``, clipped to the
    statistic's range. Distances (KS D, W1, 1 − overlap) are biased upward under resampling (duplicated
    examples add noise to a non-negative quantity), so the plain percentile interval of a near-zero distance
    can lie entirely above the estimate; re-centring removes that shift (the interval's width is unchanged)."""
    finite = reps[np.isfinite(reps)]
    if not len(finite) or not np.isfinite(value):
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    lo, mid, hi = np.quantile(finite, [alpha, 0.5, 1 - alpha])
    return float(np.clip(value + lo - mid, *bounds)), float(np.clip(value + hi - mid, *bounds))


def depth_bins(k: int) -> list[tuple[str, float, float]]:
    """``("all", 0, 1)`` and the k relative-depth bins ``("0.00-0.33", 0, 1/3)``, ..."""
    return [("all", 0.0, 1.0)] + [(f"{i / k:.2f}-{(i + 1) / k:.2f}", i / k, (i + 1) / k) for i in range(k)]


def _rng(seed: int, *parts: str) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(p.encode()) for p in parts)])


def resampling(n_a: int, n_b: int, paired: bool, s: Settings, name: str) -> dict[str, np.ndarray]:
    """Bootstrap weights ``boot (n_boot, Ua+Ub)`` and permutation labels ``perm (n_perm, Ua+Ub)``, seeded by name."""
    rng = _rng(s.seed, name)
    if paired:
        c = rng.multinomial(n_a, np.full(n_a, 1.0 / n_a), size=s.n_boot).astype(np.float64)
        boot = np.concatenate([c, c], axis=1)
        swap = rng.random((s.n_perm, n_a)) < 0.5
        perm = np.concatenate([~swap, swap], axis=1)
    else:
        boot = np.concatenate([rng.multinomial(n_a, np.full(n_a, 1.0 / n_a), size=s.n_boot),
                               rng.multinomial(n_b, np.full(n_b, 1.0 / n_b), size=s.n_boot)], axis=1).astype(np.float64)
        base = np.arange(n_a + n_b) < n_a
        perm = np.stack([rng.permutation(base) for _ in range(s.n_perm)]) if s.n_perm else np.zeros((0, n_a + n_b), bool)
    return {"boot": boot, "perm": perm}


def align(a: ScoreMatrix, b: ScoreMatrix) -> tuple[ScoreMatrix, ScoreMatrix, bool]:
    """Restrict both to their shared examples when they have any (paired), else keep them as they are."""
    shared = sorted(set(a.examples) & set(b.examples))
    if not shared:
        return a, b, False
    ia, ib = {e: i for i, e in enumerate(a.examples)}, {e: i for i, e in enumerate(b.examples)}
    return a.rows([ia[e] for e in shared]), b.rows([ib[e] for e in shared]), True


def compare(a: dict[str, ScoreMatrix], b: dict[str, ScoreMatrix], *, comparison: str, kind: str,
            settings: Settings = Settings(), paired: bool | None = None) -> pl.DataFrame:
    """Every statistic of the module docstring for A vs B, per score function and depth bin (long format).

    a, b: score function -> matrix (the same functions). ``paired``: force example pairing off (False);
    by default the comparison is paired when the two share examples (restricted to the shared ones).
    """
    from scipy.stats import ks_2samp

    s = settings
    rows = []
    first = next(iter(a))
    a0, b0, is_paired = align(a[first], b[first])
    if paired is False:
        a0, b0, is_paired = a[first], b[first], False
    n_a, n_b = a0.values.shape[0], b0.values.shape[0]
    if min(n_a, n_b) < 2:
        raise ValueError(f"{comparison}: needs at least 2 examples per model, got {n_a} and {n_b}")
    rs = resampling(n_a, n_b, is_paired, s, comparison)
    wa_boot, wb_boot = rs["boot"][:, :n_a], rs["boot"][:, n_a:]
    n_examples = n_a if is_paired else n_a + n_b
    head_paired = a0.same_architecture(b0)
    for fn in a:
        ma, mb = (align(a[fn], b[fn])[:2] if is_paired else (a[fn], b[fn]))
        tau = threshold(ma.values.ravel(), s.target_fraction, fn)
        for label, lo, hi in depth_bins(s.depth_bins):
            ca, cb = ma.depth_columns(lo, hi), mb.depth_columns(lo, hi)
            if len(ca) == 0 or len(cb) == 0:
                continue
            xa, xb = ma.values[:, ca], mb.values[:, cb]
            two = TwoSample(xa, xb, tau=tau, score_fn=fn, n_bins=s.n_bins)
            obs_la = two.labels()[None]
            obs = two.stats(np.ones((1, two.n_units)), obs_la)
            boot = two.stats(rs["boot"], np.repeat(obs_la, s.n_boot, axis=0))
            perm = two.stats(np.ones((s.n_perm, two.n_units)), rs["perm"]) if s.n_perm else None
            stats = {k: (obs[k][0], boot[k]) for k in POOLED}
            pvals = {k: float((1 + np.sum(perm[k] >= obs[k][0] - 1e-12)) / (1 + s.n_perm)) for k in PERMUTED
                     } if perm is not None else {}
            if head_paired:
                ia, ib = inactive(xa, tau, fn), inactive(xb, tau, fn)
                one_a, one_b = np.ones((1, n_a)), np.ones((1, n_b))
                h_obs = head_stats(xa, xb, ia, ib, one_a, one_b)
                h_boot = head_stats(xa, xb, ia, ib, wa_boot, wb_boot)
                stats |= {k: (h_obs[k][0], h_boot[k]) for k in HEADS}
                if is_paired:
                    t_obs, t_boot = triple_stats(ia, ib, one_a), triple_stats(ia, ib, wa_boot)
                    stats |= {k: (t_obs[k][0], t_boot[k]) for k in TRIPLES}
            for stat, (value, reps) in stats.items():
                lo_ci, hi_ci = interval(value, reps, s.level, RANGES.get(stat, (0.0, 1.0)))
                rows.append((comparison, kind, a0.model, b0.model, fn, label, stat, float(value), float(lo_ci),
                             float(hi_ci), pvals.get(stat), n_examples))
            naive = ks_2samp(xa.ravel(), xb.ravel(), method="asymp").pvalue
            rows.append((comparison, kind, a0.model, b0.model, fn, label, "ks_pvalue_naive", float(naive), None,
                         None, float(naive), n_examples))
    return pl.DataFrame(rows, schema=SCHEMA, orient="row")
