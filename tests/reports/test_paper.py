"""The manuscript (paper/main.tex, analysis/paper.py) built with latexmk from a small fixture set of generated
tables and figures (one for every table and figure the manuscript includes: a table longer than a page, one
wider than a landscape page, per-model figures matched by a glob, a figure taller than a page) and read back
with poppler: page count, every table's first and last row and every figure in the PDF, nothing outside the
page, no placeholder, no unresolved reference, no blank page."""
from __future__ import annotations

import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import polars as pl
import pytest

from analysis.paper import build_paper, figure_lists
from analysis.render import latex

ROOT = Path(__file__).resolve().parents[2]
MAIN = ROOT / "paper" / "main.tex"
_INCLUDE = re.compile(r"\\gen(table|figure)(?:\[[^\]]*\])?\{([^}]*)\}")
_GLOB = re.compile(r"\\genfigures\{([^}]*)\}")
OPTIONAL = "toy_seeds_robustness"  # left out of the fixture: its placeholder names the target that builds it
APPENDIX_TABLES = ("auc_ranks", "zz_listed_only")  # the second: 250 rows, listed by name and size
APPENDIX_FIGURES = ("figure10_all", "distributions/ecdf_model-a-1b_half_1_vs_half_2")


def png(path: Path, width: int, height: int) -> None:
    """An RGB PNG (a gradient; the width tells the figures apart in the PDF)."""
    row = bytes(b for x in range(width) for b in (x * 255 // max(width - 1, 1), 90, 160))
    raw = b"".join(b"\x00" + row for _ in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def table_frame(i: int, name: str) -> pl.DataFrame:
    """Table ``i``: rows tagged tNNfirst ... tNNlast; score_summary is longer than a page, maps_inputs wider
    than a landscape page at \\scriptsize (19 columns with long names), distribution_tests has long cells."""
    n_rows, n_cols = {"score_summary": (120, 10), "maps_inputs": (14, 19), "distribution_tests": (12, 12),
                      "zz_listed_only": (250, 3)}.get(name, (4, 5))
    tags = [f"t{i:02d}first"] + [f"t{i:02d}row{r}" for r in range(1, n_rows - 1)] + [f"t{i:02d}last"]
    cols = {"row": tags}
    for c in range(n_cols - 1):
        col = f"value_{c}_of_{name}" if name == "maps_inputs" else f"col_{c}"
        cols[col] = [round(0.001 * (r + 1) * (c + 1), 4) for r in range(n_rows)]
    df = pl.DataFrame(cols)
    if name == "distribution_tests":  # long text cells
        df = df.with_columns(pl.lit("qwen2.5-coder-0.5b-instruct vs qwen2.5-coder-1.5b-instruct").alias("comparison"))
    if name.startswith("toy"):  # the characters the toy tables hold (T1 prints < and > as themselves)
        df = df.with_columns(pl.lit("‖Val_<s>‖ >= 0.5 τ ✓ 50% a&b").alias("claim"))
    return df


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if shutil.which("latexmk") is None or shutil.which("pdflatex") is None:
        pytest.skip("no latexmk/pdflatex (as root on Debian, scripts/setup.sh installs latexmk texlive-latex-base "
                    "texlive-latex-recommended lmodern); the manuscript is not built")
    if shutil.which("pdftotext") is None or shutil.which("pdfimages") is None or shutil.which("pdftoppm") is None:
        pytest.skip("no pdftotext/pdfimages/pdftoppm (Debian: poppler-utils; scripts/setup.sh --tests installs it); "
                    "the PDF is not checked")
    d = tmp_path_factory.mktemp("paper")
    (d / "paper").mkdir()
    shutil.copy2(MAIN, d / "paper" / "main.tex")
    tables, figures = {}, {}
    text = re.sub(r"(?<!\\)%.*", "", MAIN.read_text().split("\\begin{document}", 1)[1])  # the body, no comments
    for kind, names in _INCLUDE.findall(text):
        name = names.split(",")[-1]  # a fallback list: the last name (the first is checked by the others)
        if kind == "table" and name != OPTIONAL:
            tables[name] = len(tables)
            (d / "results" / "tables").mkdir(parents=True, exist_ok=True)
            (d / "results" / "tables" / f"{name}.tex").write_text(latex(table_frame(tables[name], name)))
        elif kind == "figure":
            figures[name] = 300 + 7 * len(figures)
    for pattern in _GLOB.findall(text):
        for model in ("model-a-1b", "model_b-2.5b"):
            figures[pattern.replace("*", model)] = 300 + 7 * len(figures)
    # generated but not named in the body: the appendix shows them (a table of more than 200 rows by name)
    for name in APPENDIX_TABLES:
        tables[name] = len(tables)
        (d / "results" / "tables" / f"{name}.tex").write_text(latex(table_frame(tables[name], name)))
    for name in APPENDIX_FIGURES:
        figures[name] = 300 + 7 * len(figures)
    for name, width in figures.items():
        png(d / "results" / "figures" / f"{name}.png", width, 2400 if name == "dist_effects" else 200)
    status = build_paper(d / "paper" / "main.tex", d / "results" / "paper")
    pdf = d / "results" / "paper" / "main.pdf"
    assert status == f"built: {pdf}" and pdf.is_file()
    return {"dir": d, "pdf": pdf, "tables": tables, "figures": figures,
            "log": (d / "results" / "paper" / "main.log").read_text(errors="replace")}


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def _pages(pdf: Path) -> int:
    return int(re.search(r"^Pages:\s+(\d+)", _run("pdfinfo", str(pdf)), re.M).group(1))


def test_paper_page_count_and_no_blank_page(built, tmp_path):
    pdf = built["pdf"]
    n = _pages(pdf)
    # 19 with TeX Live 2022 (Debian 12): score_summary's 120 rows over 4 pages, 2 landscape pages (maps_inputs,
    # distribution_tests), 25 small figures 3-5 to a page, 6 sections and the appendix each starting a page.
    # Far more would be runaway floats or empty pages, fewer lost content.
    assert 16 <= n <= 23, n
    _run("pdftoppm", "-gray", "-r", "12", str(pdf), str(tmp_path / "p"))
    rendered = sorted(tmp_path.glob("p-*.pgm"))
    assert len(rendered) == n
    for f in rendered:
        data = f.read_bytes()
        pixels = data.split(b"\n", 3)[3] if data.startswith(b"P5") else data
        assert min(pixels) < 128, f"page {f.stem} is blank"


def test_paper_holds_every_table_row_and_no_placeholder(built):
    text = _run("pdftotext", str(built["pdf"]), "-")
    for name, i in built["tables"].items():
        if name == "zz_listed_only":  # too long for the appendix: named with its size, not printed
            assert re.search(r"zz_listed_only: 250 rows, too many to print here", text)
            assert f"t{i:02d}first" not in text
            continue
        for tag in (f"t{i:02d}first", f"t{i:02d}last"):
            assert tag in text, tag
    assert "Every other generated table and figure" in text
    # the longtable breaks across pages and repeats its header; < and > print as themselves (T1)
    pages = text.split("\f")
    summary = built["tables"]["score_summary"]
    assert sum(f"t{summary:02d}row" in p for p in pages) >= 2 and "(continued)" in text
    assert sum("col_8" in p and f"t{summary:02d}row" in p for p in pages) >= 2
    assert "Val_<s>" in text and ">= 0.5" in text
    # the optional table's placeholder names its target; nothing else is missing; no unresolved reference
    assert text.count("not generated yet") == 1
    assert re.search(rf"\(table {OPTIONAL} not generated yet;\s+snakemake toy_seeds builds it\)", text)
    assert "??" not in text
    assert "Reference" not in built["log"] and "undefined" not in built["log"]
    assert len(set(re.findall(r"Table (\d+):", text))) == len(built["tables"]) - 1  # each one captioned once


def test_paper_holds_every_figure_inside_the_text_area(built):
    listing = _run("pdfimages", "-list", str(built["pdf"])).splitlines()[2:]
    # page num type width height color comp bpc enc interp object ID x-ppi y-ppi size ratio
    images = [line.split() for line in listing if line.split()[2] == "image"]
    widths = sorted(int(r[3]) for r in images)
    assert widths == sorted(built["figures"].values()), "every figure exactly once (body or appendix)"
    for r in images:
        width_pt, height_pt = int(r[3]) / float(r[12]) * 72, int(r[4]) / float(r[13]) * 72
        assert width_pt <= 6.5 * 72 + 1 and height_pt <= 0.8 * 9 * 72 + 1, r  # text width; 80% of its height
    text = _run("pdftotext", str(built["pdf"]), "-")
    assert len(set(re.findall(r"Figure (\d+):", text))) == len(built["figures"])


def test_paper_text_stays_on_the_page(built):
    """No overfull line or table: every word but the page number within the 1-inch margins."""
    pdf = built["pdf"]
    bbox = _run("pdftotext", "-bbox", str(pdf), "-")
    info = _run("pdfinfo", "-f", "1", "-l", str(_pages(pdf)), str(pdf))
    rotated = {int(n) for n, r in re.findall(r"^Page\s+(\d+) rot:\s+(\d+)", info, re.M) if int(r) % 180}
    assert rotated, "the wide tables are on landscape pages"
    out = []
    for page, (w, h, body) in enumerate(re.findall(r'<page width="([\d.]+)" height="([\d.]+)">(.*?)</page>', bbox,
                                                   re.S), 1):
        w, h = (float(h), float(w)) if page in rotated else (float(w), float(h))  # words: as the page is shown
        for x0, y0, x1, y1, word in re.findall(
                r'<word xMin="([\d.]+)" yMin="([\d.]+)" xMax="([\d.]+)" yMax="([\d.]+)">(.*?)</word>', body):
            x0, y0, x1, y1 = map(float, (x0, y0, x1, y1))
            if word == str(page):  # the page number, in the bottom margin (the left one on a landscape page)
                continue
            if x0 < 72 - 2 or x1 > w - 72 + 2 or y0 < 72 - 12 or y1 > h - 72 + 2:
                out.append((page, word, round(x0), round(x1), round(y0), round(y1)))
    assert not out, out[:20]
    assert "Overfull \\hbox" not in built["log"]


# ------------------------------------------------------------------------------------ without TeX

def test_figure_lists_match_globs_in_name_order(tmp_path):
    tex = tmp_path / "paper" / "main.tex"
    tex.parent.mkdir()
    tex.write_text("\\graphicspath{{../results/figures/}}\n\\genfigures{maps_heatmap_*}{x}\n"
                   "\\genfigures{distributions/ecdf_*_vs_*-sft}{y}\n\\genfigures{none_*}{z}\n")
    figs = tmp_path / "results" / "figures"
    for name in ("maps_heatmap_b", "maps_heatmap_a-1.5b", "maps_heatmap_a.svg", "maps_heatmap_{bad}",
                 "distributions/ecdf_m_vs_m-sft", "distributions/ecdf_m_half_1_vs_half_2"):
        png(figs / (name if name.endswith(".svg") else f"{name}.png"), 2, 2)
    assert figure_lists(tex) == {"maps_heatmap_*": [("maps_heatmap_a-1.5b", "a-1.5b"), ("maps_heatmap_b", "b")],
                                 "distributions/ecdf_*_vs_*-sft": [("distributions/ecdf_m_vs_m-sft", "m")],
                                 "none_*": []}


def test_build_paper_without_tex_says_what_to_install(tmp_path, monkeypatch):
    import analysis.paper as paper

    monkeypatch.setattr(paper.shutil, "which", lambda name: None)
    status = build_paper(MAIN, tmp_path / "out")
    assert status.startswith("skipped: latexmk/pdflatex not found") and paper.TEX_PACKAGES in status
    assert (tmp_path / "out" / "status.txt").read_text() == status + "\n"
