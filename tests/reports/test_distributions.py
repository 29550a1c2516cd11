"""definitions §6 statistics against scipy and naive reimplementations; bootstrap coverage; null vs positive control;
the explorer in a headless browser; the perturbation and the finetune on real and tiny models."""
from __future__ import annotations

import re

import numpy as np
import polars as pl
import pytest
from scipy import stats as sps

from analysis.distributions.stats import (Settings, TwoSample, compare, depth_bins, head_stats, inactive, interval,
                                    resampling, triple_stats)
from analysis.distributions.score_matrix import ScoreMatrix, split_halves
from analysis.core.thresholds import threshold


def matrix(values, model="m", fn="ahon_ln", n_layers=None, n_heads=None, examples=None):
    values = np.asarray(values, dtype=np.float64)
    n_heads = n_heads or values.shape[1]
    n_layers = n_layers or values.shape[1] // n_heads
    examples = examples or tuple(f"ds/{i}" for i in range(values.shape[0]))
    return ScoreMatrix(model, fn, tuple(examples), n_layers, n_heads, values)


def clustered(rng, n_examples, n_heads, shift=0.0, between=0.5):
    """Scores x = mu_example + mu_head + noise; the pooled marginal is N(shift + mean of mu_head, ...)."""
    mu_e = rng.normal(0, np.sqrt(between), size=(n_examples, 1))
    return shift + mu_e + rng.normal(0, np.sqrt(1 - between), size=(n_examples, n_heads))


# ------------------------------------------------------------------------------------ pooled statistics

@pytest.mark.parametrize("ties", [False, True])
def test_ks_and_wasserstein_match_scipy_unweighted_and_weighted(ties):
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, (7, 5)), rng.normal(0.4, 1.3, (9, 4))
    if ties:
        a, b = np.round(a, 1), np.round(b, 1)
    two = TwoSample(a, b, tau=0.0, score_fn="ahon_ln")
    got = two.stats(np.ones((1, 16)), two.labels()[None])
    assert got["ks_d"][0] == pytest.approx(sps.ks_2samp(a.ravel(), b.ravel()).statistic, abs=1e-12)
    assert got["wasserstein"][0] == pytest.approx(sps.wasserstein_distance(a.ravel(), b.ravel()), rel=1e-10)
    assert got["wasserstein_sd"][0] == pytest.approx(got["wasserstein"][0] / a.std(), rel=1e-10)
    # bootstrap weights = integer counts per example: every score of an example repeated that often
    w = rng.integers(0, 4, size=(3, 16)).astype(float)
    w[:, 0] += 1
    w[:, 7] += 1
    got = two.stats(w, np.repeat(two.labels()[None], 3, 0))
    for r in range(3):
        ua, ub = np.repeat(w[r, :7], 5), np.repeat(w[r, 7:], 4)
        assert got["wasserstein"][r] == pytest.approx(
            sps.wasserstein_distance(a.ravel(), b.ravel(), ua, ub), rel=1e-9)
        xa, xb = np.repeat(a.ravel(), ua.astype(int)), np.repeat(b.ravel(), ub.astype(int))
        assert got["ks_d"][r] == pytest.approx(sps.ks_2samp(xa, xb).statistic, abs=1e-12)
        assert got["wasserstein_sd"][r] == pytest.approx(got["wasserstein"][r] / xa.std(), rel=1e-9)


def test_overlap_and_inactive_fraction_naive():
    rng = np.random.default_rng(2)
    a, b = rng.normal(0, 1, (20, 6)), rng.normal(1.0, 1, (15, 6))
    tau = threshold(a.ravel(), 0.15, "ahon_ln")
    two = TwoSample(a, b, tau=tau, score_fn="ahon_ln", n_bins=10)
    got = two.stats(np.ones((1, 35)), two.labels()[None])
    edges = np.unique(np.quantile(np.concatenate([a.ravel(), b.ravel()]), np.linspace(0, 1, 11)))
    ha, hb = np.histogram(a.ravel(), edges)[0] / a.size, np.histogram(b.ravel(), edges)[0] / b.size
    assert got["overlap"][0] == pytest.approx(np.minimum(ha, hb).sum(), abs=1e-12)
    assert got["frac_inactive_b"][0] == pytest.approx(np.mean(b < tau), abs=1e-12)
    # hand-made: identical samples overlap fully, disjoint ones not at all
    same = TwoSample(a, a.copy(), tau=tau, score_fn="ahon_ln")
    assert same.stats(np.ones((1, 40)), same.labels()[None])["overlap"][0] == pytest.approx(1.0)
    far = TwoSample(a, a + 100, tau=tau, score_fn="ahon_ln")
    r = far.stats(np.ones((1, 40)), far.labels()[None])
    assert r["overlap"][0] == 0.0 and r["ks_d"][0] == 1.0 and r["wasserstein"][0] == pytest.approx(100.0)


def test_inactive_direction_follows_the_score_function():
    x = np.array([0.1, 0.5, 0.9])
    assert inactive(x, 0.5, "awft").tolist() == [False, False, True]  # awft: inactive when > tau
    assert inactive(x, 0.5, "ahon_ln").tolist() == [True, False, False]


def test_head_and_triple_statistics_naive():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(12, 10))
    b = a + rng.normal(scale=0.5, size=a.shape)
    ia, ib = a < -0.5, b < -0.5
    one = np.ones((1, 12))
    h = head_stats(a, b, ia, ib, one, one)
    assert h["spearman_heads"][0] == pytest.approx(sps.spearmanr(a.mean(0), b.mean(0)).statistic, abs=1e-12)
    assert h["flip_fraction"][0] == pytest.approx(np.mean((ia.mean(0) > 0.5) != (ib.mean(0) > 0.5)))
    t = triple_stats(ia, ib, one)
    sa, sb = set(zip(*np.nonzero(ia))), set(zip(*np.nonzero(ib)))
    assert t["iou_inactive"][0] == pytest.approx(len(sa & sb) / len(sa | sb))
    assert t["precision_inactive"][0] == pytest.approx(len(sa & sb) / len(sb))
    # weights = repeated examples
    w = np.zeros((1, 12))
    w[0, [0, 0, 3, 5]] = [2, 2, 1, 1]
    w[0, 0] = 2
    idx = [0, 0, 3, 5]
    h = head_stats(a, b, ia, ib, w, w)
    assert h["spearman_heads"][0] == pytest.approx(sps.spearmanr(a[idx].mean(0), b[idx].mean(0)).statistic, abs=1e-12)


def test_permutation_labels_reproduce_a_naive_permutation_test():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(10, 6))
    b = a + 0.3 + rng.normal(scale=0.3, size=a.shape)
    s = Settings(n_boot=5, n_perm=50)
    rs = resampling(10, 10, True, s, "x")
    two = TwoSample(a, b, tau=0.0, score_fn="ahon_ln")
    obs = two.stats(np.ones((1, 20)), two.labels()[None])
    perm = two.stats(np.ones((50, 20)), rs["perm"])
    for r in range(50):  # naive: swap the two models' rows of the examples the labels say
        swap = rs["perm"][r, 10:]
        pa, pb = np.where(swap[:, None], b, a), np.where(swap[:, None], a, b)
        assert perm["wasserstein"][r] == pytest.approx(sps.wasserstein_distance(pa.ravel(), pb.ravel()), rel=1e-9)
        assert perm["ks_d"][r] == pytest.approx(sps.ks_2samp(pa.ravel(), pb.ravel()).statistic, abs=1e-12)
    # the frame's p-value is (1 + #{perm >= obs}) / (1 + n_perm)
    df = compare({"ahon_ln": matrix(a)}, {"ahon_ln": matrix(b, model="n")}, comparison="x", kind="t",
                 settings=Settings(n_boot=5, n_perm=50, depth_bins=1))
    row = df.filter((pl.col("statistic") == "wasserstein") & (pl.col("depth_bin") == "all")).row(0, named=True)
    assert row["p_value"] == pytest.approx((1 + np.sum(perm["wasserstein"] >= obs["wasserstein"][0] - 1e-12)) / 51)


def test_bootstrap_ci_covers_the_true_value():
    """Clustered scores (examples correlated) with a known pooled shift: W1 = 0.3, KS D = 2Φ(0.15) − 1."""
    true = {"wasserstein": 0.3, "ks_d": 2 * sps.norm.cdf(0.15) - 1}
    hits = {k: 0 for k in true}
    n_sim = 80
    for i in range(n_sim):
        rng = np.random.default_rng(100 + i)
        a, b = clustered(rng, 40, 16), clustered(rng, 40, 16, shift=0.3)
        s = Settings(n_boot=300, n_perm=0, seed=i)
        rs = resampling(40, 40, False, s, "sim")
        two = TwoSample(a, b, tau=0.0, score_fn="ahon_ln")
        boot = two.stats(rs["boot"], np.repeat(two.labels()[None], 300, 0))
        obs = two.stats(np.ones((1, 80)), two.labels()[None])
        for k in true:
            lo, hi = interval(obs[k][0], boot[k], 0.95, (0, np.inf))
            hits[k] += lo <= true[k] <= hi
    for k in true:
        assert hits[k] / n_sim >= 0.85, (k, hits[k] / n_sim)


def test_null_and_positive_control_calibration():
    """A model against itself on two halves: small distance, permutation p-values roughly uniform; a
    perturbed copy: a distance far outside the null's CI."""
    rng = np.random.default_rng(5)
    head_means = rng.normal(0, 1, 24)
    e = 60
    base = head_means + clustered(rng, e, 24, between=0.3) * 0.5
    control = base + rng.normal(0, 0.6, 24)  # every head's level moved: a large per-head change
    m = matrix(base, n_layers=6, n_heads=4)
    s = Settings(n_boot=200, n_perm=99, depth_bins=3)
    h1, h2 = split_halves(m.examples, 0)
    assert len(set(h1) & set(h2)) == 0 and len(h1) + len(h2) == e
    null = compare({"ahon_ln": m.rows(h1)}, {"ahon_ln": m.rows(h2)}, comparison="null", kind="null", settings=s)
    pos = compare({"ahon_ln": m}, {"ahon_ln": matrix(control, model="c", n_layers=6, n_heads=4)},
                  comparison="control", kind="control", settings=s)

    def get(df, stat, depth="all"):
        return df.filter((pl.col("statistic") == stat) & (pl.col("depth_bin") == depth)).row(0, named=True)

    assert get(null, "wasserstein")["value"] * 3 < get(pos, "wasserstein")["ci_low"]
    assert get(pos, "wasserstein")["p_value"] == pytest.approx(1 / 100)  # nothing in 99 swaps comes close
    assert get(null, "spearman_heads")["value"] > 0.9 and get(null, "flip_fraction")["value"] <= 0.1
    assert get(pos, "spearman_heads")["ci_high"] < get(null, "spearman_heads")["ci_low"]
    assert get(null, "n_examples" if False else "ks_d")["n_examples"] == e
    assert {"iou_inactive", "precision_inactive"} <= set(pos["statistic"]) and "iou_inactive" not in set(null["statistic"])
    assert set(pos["depth_bin"]) == {"all", "0.00-0.33", "0.33-0.67", "0.67-1.00"}
    # the permutation test is calibrated under the null: about 5% of null splits reject at 0.05
    rejects = 0
    for i in range(40):
        r = np.random.default_rng(200 + i)
        x = matrix(head_means + clustered(r, 30, 24, between=0.3) * 0.5, n_layers=6, n_heads=4)
        g1, g2 = split_halves(x.examples, i)
        df = compare({"ahon_ln": x.rows(g1)}, {"ahon_ln": x.rows(g2)}, comparison=f"n{i}", kind="null",
                     settings=Settings(n_boot=2, n_perm=99, depth_bins=1, seed=i))
        rejects += get(df, "wasserstein")["p_value"] <= 0.05
    assert rejects <= 6  # binomial(40, 0.05): P(X > 6) < 0.01


def test_interval_is_recentred_and_clipped():
    reps = np.array([0.2, 0.3, 0.4, 0.5, 0.6])
    lo, hi = interval(0.1, reps, level=0.5, bounds=(0, 1))  # quartiles 0.3, 0.5; median 0.4
    assert (lo, hi) == pytest.approx((0.0, 0.2))
    assert interval(0.9, reps, level=0.5, bounds=(0, 1)) == pytest.approx((0.8, 1.0))
    assert np.isnan(interval(0.5, np.array([np.nan]))[0])


def test_depth_bins_and_columns():
    assert [b[0] for b in depth_bins(2)] == ["all", "0.00-0.50", "0.50-1.00"]
    m = matrix(np.zeros((2, 12)), n_layers=4, n_heads=3)
    assert m.depth_columns(0.0, 0.5).tolist() == [0, 1, 2, 3, 4, 5]  # layers 0, 1
    assert m.depth_columns(0.5, 1.0).tolist() == [6, 7, 8, 9, 10, 11]


def test_compare_is_deterministic_and_pairs_shared_examples():
    rng = np.random.default_rng(6)
    a = matrix(rng.normal(size=(8, 4)), n_layers=2, n_heads=2)
    b = matrix(rng.normal(size=(10, 4)), model="b", n_layers=2, n_heads=2,
               examples=tuple(f"ds/{i}" for i in range(10)))
    s = Settings(n_boot=20, n_perm=20)
    one = compare({"awft": a}, {"awft": b}, comparison="a vs b", kind="t", settings=s)
    two = compare({"awft": a}, {"awft": b}, comparison="a vs b", kind="t", settings=s)
    assert one.equals(two)
    assert set(one["n_examples"]) == {8}  # restricted to the 8 shared documents
    assert "iou_inactive" in set(one["statistic"])


# ------------------------------------------------------------------------------------ explorer (browser)

# Before the page's scripts run: keep the promise vega-embed returns (its view) as window.__embed.
_EMBED_HOOK = """(() => { let wrapped;
  Object.defineProperty(window, 'vegaEmbed', {configurable: true, get() { return wrapped; },
    set(f) { wrapped = function (...a) { const p = f.apply(this, a); window.__embed = p; return p; };
             Object.assign(wrapped, f); }}); })();"""
# What the page draws, read from its SVG elements (Vega's renderer keeps each element's scene item in
# __data__): the heatmap's rects and the ECDF's points with their data and pixel positions.
_STATE = """(async () => {
  const {view} = await window.__embed; await view.runAsync();
  const items = sel => [...document.querySelectorAll(sel)].map(e => e.__data__).filter(d => d && d.datum && 'layer' in d.datum);
  const row = d => ({model: d.datum.model, score_fn: d.datum.score_fn, layer: d.datum.layer, head: d.datum.head});
  return {model: view.signal('model'), fn: view.signal('fn'),
          heat: items('g.mark-rect path').map(d => ({...row(d), median: d.datum.median, opacity: d.opacity})),
          points: items('g.mark-symbol path').map(d => ({...row(d), score: d.datum.score, cdf: d.datum.cdf, x: d.x, y: d.y})),
          selects: [...document.querySelectorAll('select')].map(s => s.name)}; })()"""


def _pick(name, value):  # choose an option of a drop-down as a user does: set it, then the change event
    return f"""(async () => {{ const s = document.querySelector('select[name="{name}"]'); s.value = '{value}';
      s.dispatchEvent(new Event('change', {{bubbles: true}})); s.dispatchEvent(new Event('input', {{bubbles: true}}));
      const {{view}} = await window.__embed; await view.runAsync(); return view.signal('{name}'); }})()"""


def _head_center(layer, head):  # viewport coordinates of the head's rect in the heatmap
    return f"""(() => {{ const e = [...document.querySelectorAll('g.mark-rect path')].find(e => e.__data__ && e.__data__.datum
        && e.__data__.datum.layer === {layer} && e.__data__.datum.head === {head});
      e.scrollIntoView({{block: 'center', inline: 'center'}}); const r = e.getBoundingClientRect();
      return [r.left + r.width / 2, r.top + r.height / 2]; }})()"""


def _wait_for_head(layer, head):
    return f"""(async () => {{ for (let i = 0; i < 200; i++) {{
        const p = [...document.querySelectorAll('g.mark-symbol path')].map(e => e.__data__).filter(d => d && d.datum);
        if (p.length && p.every(d => d.datum.layer === {layer} && d.datum.head === {head})) return true;
        await new Promise(r => setTimeout(r, 50)); }} return false; }})()"""


def _quantiles(x, probs):
    """Type-7 quantiles (linear between order statistics), written out here independently of the explorer."""
    v = sorted(float(a) for a in x)
    out = []
    for p in probs:
        h = (len(v) - 1) * p
        lo = int(np.floor(h))
        hi = min(lo + 1, len(v) - 1)
        out.append(v[lo] + (h - lo) * (v[hi] - v[lo]))
    return np.array(out)


def _check_ecdf(points, values, model, fn, layer, head, n_heads):
    assert {(p["model"], p["score_fn"], p["layer"], p["head"]) for p in points} == {(model, fn, layer, head)}
    pts = sorted(points, key=lambda p: p["cdf"])
    cdf, score = np.array([p["cdf"] for p in pts]), np.array([p["score"] for p in pts])
    np.testing.assert_allclose(cdf, np.linspace(0, 1, 21), atol=1e-12)
    want = _quantiles(values[:, layer * n_heads + head], cdf)
    np.testing.assert_allclose(score, want, rtol=1e-4, atol=1e-9)  # the page's data: 5 significant figures
    # what is drawn is that data: x linear and increasing in the score, y linear and decreasing in the cdf
    x, y = np.array([p["x"] for p in pts]), np.array([p["y"] for p in pts])
    for px, v, sign in ((x, score, 1), (y, cdf, -1)):
        slope, icpt = np.polyfit(v, px, 1)
        assert sign * slope > 0 and np.abs(px - (slope * v + icpt)).max() < 0.5, (px, v)


def test_explorer_in_a_headless_browser_draws_the_ecdf_of_the_clicked_head(tmp_path):
    """The explorer in headless Chromium (Chrome DevTools Protocol over a pipe): the default model's heatmap
    and ECDF are drawn; pick another model and function in the drop-downs, click a head, and the ECDF's
    points read back from the page (data and pixel positions) are the 21 quantiles of that head's scores,
    computed here from the same input."""
    from analysis.distributions.explorer import write_explorer
    from browser import Browser, find_chromium

    exe = find_chromium()
    if exe is None:
        pytest.skip("no chromium on PATH (as root on Debian, scripts/setup.sh --tests installs it: "
                    "apt-get install chromium); the explorer is not checked in a browser")
    rng = np.random.default_rng(7)
    values = {("m1", "ahon_ln"): rng.normal(size=(5, 12)), ("m1", "awft"): rng.random(size=(5, 12)),
              ("m2", "ahon_ln"): rng.normal(size=(9, 6)), ("m2", "awft"): rng.random(size=(9, 6))}
    shape = {"m1": (4, 3), "m2": (2, 3)}
    scores = {m: {f: matrix(v, model=m, fn=f, n_layers=shape[m][0], n_heads=shape[m][1])
                  for (mm, f), v in values.items() if mm == m} for m in shape}
    page = write_explorer(scores, tmp_path / "explorer.html")
    html = page.read_text()
    assert "cdn.jsdelivr" not in html and "https://" not in html.split("const spec")[0].split("vega-embed")[0]

    with Browser(exe, tmp_path / "profile") as b:
        b.open(page.as_uri(), init_script=_EMBED_HOOK)
        s = b.evaluate(_STATE)
        assert s["selects"] == ["model", "fn"] and (s["model"], s["fn"]) == ("m1", "ahon_ln")
        # the default: m1's 4 x 3 heads, and the ECDF of the preselected head (layer 0, head 0)
        assert sorted((h["layer"], h["head"]) for h in s["heat"]) == [(l, h) for l in range(4) for h in range(3)]
        _check_ecdf(s["points"], values["m1", "ahon_ln"], "m1", "ahon_ln", 0, 0, 3)

        assert b.evaluate(_pick("model", "m2")) == "m2"
        assert b.evaluate(_pick("fn", "awft")) == "awft"
        s = b.evaluate(_STATE)
        assert {(h["model"], h["score_fn"]) for h in s["heat"]} == {("m2", "awft")}
        heat = {(h["layer"], h["head"]): h for h in s["heat"]}
        assert sorted(heat) == [(l, h) for l in range(2) for h in range(3)]
        med = np.median(values["m2", "awft"], axis=0)
        for (l, h), item in heat.items():
            assert item["median"] == pytest.approx(med[l * 3 + h], rel=1e-4)

        b.click(*b.evaluate(_head_center(1, 2)))
        assert b.evaluate(_wait_for_head(1, 2)), "the click on layer 1 head 2 did not redraw the ECDF"
        s = b.evaluate(_STATE)
        _check_ecdf(s["points"], values["m2", "awft"], "m2", "awft", 1, 2, 3)
        opacity = {(h["layer"], h["head"]): h["opacity"] for h in s["heat"]}  # the clicked head is highlighted
        assert opacity.pop((1, 2)) == 1.0 and set(opacity.values()) == {0.55}
        assert not b.console_errors(), b.console_errors()


# ------------------------------------------------------------------------------------ derived models

def test_perturbation_of_real_gemma_changes_only_attention_patterns():
    """q/k noise of relative norm `scale`; every other weight bit-identical; layer 0's value vectors (ftvvn,
    avvn) unchanged, its attention (awft) changed."""
    import torch

    from extract.models.load import load_model
    from extract.models.derived import perturb_attention
    from extract.engine.scores import score_texts

    torch.manual_seed(0)
    model, tok = load_model("gemma-3-270m")
    texts = ["The committee met on Tuesday to discuss the budget for next year.", "def add(a, b):\n    return a + b\n"]
    before = score_texts(model, tok, texts)
    ref = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith(("q_proj.weight", "k_proj.weight"))}
    rel = perturb_attention(model, 0.5, seed=1)
    assert len(rel) == 2 * model.config.num_hidden_layers
    assert all(abs(r - 0.5) < 0.02 for r in rel.values())
    assert all(torch.equal(p, ref[n]) for n, p in model.named_parameters() if n in ref)
    after = score_texts(model, tok, texts)
    l0b, l0a = before.filter(pl.col("layer") == 0), after.filter(pl.col("layer") == 0)
    np.testing.assert_array_equal(l0a["ftvvn"].to_numpy(), l0b["ftvvn"].to_numpy())
    np.testing.assert_allclose(l0a["avvn"].to_numpy(), l0b["avvn"].to_numpy(), rtol=1e-6)
    assert np.abs(l0a["awft"].to_numpy() - l0b["awft"].to_numpy()).max() > 0.01


def _tasks():
    return {"subtask_a": {"task_prefix": "Definition: long text. Prompt: Say yes.",
                          "examples": [{"input": f"Item {i}", "target": ["yes"]} for i in range(30)]},
            "subtask_b": {"description": "Definition: Answer no.",
                          "examples": [{"input": f"Thing {i}?", "target": ["no."]} for i in range(30)]}}


def test_sft_examples_split_and_mask():
    from tiny_tokenizer import tiny_tokenizer

    from extract.finetune import SFTConfig, _batch, instruction, sft_examples

    tok = tiny_tokenizer(letter_tokens=False)
    assert instruction(_tasks()["subtask_a"]) == "Say yes." and instruction(_tasks()["subtask_b"]) == "Answer no."
    cfg = SFTConfig(subtasks=("subtask_a", "subtask_b"), n_train=20, n_heldout=10, max_tokens=40)
    train, held = sft_examples(tok, cfg, _tasks())
    assert len(train) == 20 and len(held) == 10
    assert not {tuple(e.ids) for e in train} & {tuple(e.ids) for e in held}  # disjoint examples
    e = train[0]
    text = "".join(tok.convert_ids_to_tokens(e.ids))
    prompt = "".join(tok.convert_ids_to_tokens(e.ids[:e.n_prompt]))
    assert re.fullmatch(r"<s>(Say yes\.\n\nItem|Answer no\.\n\nThing) \d+\??\nAnswer:", prompt), prompt
    assert text[len(prompt):] in (" yes</s>", " no.</s>")
    ids, mask, tgt = _batch(train[:3], tok.pad_token_id)
    for i, ex in enumerate(train[:3]):  # targets: the response tokens, at the positions that predict them
        want = [-100] * (ex.n_prompt - 1) + ex.ids[ex.n_prompt:] + [-100] * (ids.shape[1] - len(ex.ids) + 1)
        assert tgt[i].tolist() == want and mask[i].sum() == len(ex.ids)
    assert sft_examples(tok, cfg, _tasks())[0][0].ids == train[0].ids  # seeded


def test_response_loss_matches_naive_and_finetune_learns(tmp_path):
    import torch
    from tiny import tiny_model
    from tiny_tokenizer import tiny_tokenizer

    from extract.finetune import SFTConfig, finetune, response_loss, sft_examples
    from extract.models.derived import derived_source, save_derived
    from extract.models.load import load_model, model_info

    tok = tiny_tokenizer(letter_tokens=False)
    model = tiny_model("llama", seed=0)
    cfg = SFTConfig(subtasks=("subtask_a", "subtask_b"), n_train=40, n_heldout=10, max_tokens=40, batch_size=4,
                    lr=3e-3, warmup=1, eval_every=5)
    train, held = sft_examples(tok, cfg, _tasks())
    with torch.no_grad():
        s, n = response_loss(model, held[:4], tok.pad_token_id)
        naive, count = 0.0, 0
        for e in held[:4]:  # one sequence at a time, full logits, no padding
            logits = model(torch.tensor([e.ids])).logits[0]
            resp = torch.tensor(e.ids[e.n_prompt:])
            naive += torch.nn.functional.cross_entropy(logits[e.n_prompt - 1:len(e.ids) - 1], resp, reduction="sum")
            count += len(resp)
    assert n == count and float(s) == pytest.approx(float(naive), rel=1e-5)
    frozen = model.model.embed_tokens.weight.detach().clone()
    res = finetune(model, tok, train, held, cfg, progress=False)
    assert res.heldout_after < 0.85 * res.heldout_before
    assert torch.equal(model.model.embed_tokens.weight, frozen)  # embeddings frozen
    assert res.log.filter(pl.col("split") == "train").height == 10
    out = save_derived(model, tok, tmp_path / "derived", derived_source({"model": "tiny"}, "tiny-sft", "instruct", {}))
    loaded, _ = load_model(out)
    assert model_info(loaded)["model"] == "tiny-sft" and model_info(loaded)["variant"] == "instruct"
    ids = torch.tensor([train[0].ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-6, rtol=0)


def test_a_paired_difference_figure_larger_than_altairs_row_guard_is_drawn(tmp_path):
    """16 score functions x 336 heads (Qwen2.5-0.5B's 24 x 14) is 5376 rows, over altair's 5000-row guard: the
    figure is written with every head's cell in it."""
    from analysis.distributions.figures import paired_diff_chart, paired_diff_frame
    from analysis.render import write_figure

    rng = np.random.default_rng(0)
    ex = ("e0", "e1", "e2")
    a = {f"f{k}": ScoreMatrix("a", f"f{k}", ex, 24, 14, rng.random((3, 24 * 14))) for k in range(16)}
    b = {f: ScoreMatrix("b", f, ex, 24, 14, m.values + 1.0) for f, m in a.items()}
    df = paired_diff_frame(a, b)
    assert df.height == 5376 and np.allclose(df["diff"], 1.0)
    png, svg = write_figure(paired_diff_chart(df, "test"), tmp_path / "paired")
    assert png.stat().st_size > 0 and svg.read_text().count("<path") >= 5376
