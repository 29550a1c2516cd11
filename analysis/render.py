"""Writers for generated tables (CSV, Markdown, LaTeX) and figures (PNG and SVG via vl-convert)."""
from __future__ import annotations

import re
from pathlib import Path

import polars as pl

from analysis.core.io import write_bytes


def _fmt(v, digits: int) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}".rstrip("0").rstrip(".") or "0"
    return str(v)


def markdown(df: pl.DataFrame, digits: int = 4) -> str:
    rows = [[_fmt(v, digits) for v in r] for r in df.iter_rows()]
    head = "| " + " | ".join(df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    return "\n".join([head, sep] + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


_LATEX_SPECIAL = {"\\": "\\textbackslash{}", "_": "\\_", "%": "\\%", "&": "\\&", "#": "\\#", "$": "\\$",
                  "{": "\\{", "}": "\\}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}"}
_LATEX_SPECIAL_RE = re.compile("|".join(re.escape(c) for c in _LATEX_SPECIAL))


def _latex_escape(s: str) -> str:
    """Text as LaTeX prints it (T1 encoding: < and > print as themselves)."""
    return _LATEX_SPECIAL_RE.sub(lambda m: _LATEX_SPECIAL[m.group()], s)


def latex_header(name: str, width: int = 10) -> str:
    """A column name as a LaTeX header cell: a name longer than ``width`` characters breaks after its
    underscores into stacked lines (``\\shortstack``), so that a header is about as wide as its values."""
    if len(name) <= width or "_" not in name.strip("_"):
        return _latex_escape(name)
    lines, cur = [], ""
    for piece in re.split(r"(?<=_)", name):  # each piece keeps its trailing underscore
        if cur and len(cur) + len(piece) > width:
            lines.append(cur)
            cur = piece
        else:
            cur += piece
    lines.append(cur)
    if len(lines) == 1:
        return _latex_escape(name)
    return "\\shortstack[l]{" + "\\\\".join(_latex_escape(x) for x in lines) + "}"


def latex(df: pl.DataFrame, digits: int = 4, caption: str | None = None) -> str:
    """One booktabs tabular: ``\\toprule``, the header row, ``\\midrule``, the rows, ``\\bottomrule`` (the
    manuscript's table layout reads that structure, paper/main.tex)."""
    esc = _latex_escape
    cols = "l" * len(df.columns)
    lines = [f"\\begin{{tabular}}{{{cols}}}", "\\toprule", " & ".join(latex_header(c) for c in df.columns) + " \\\\",
             "\\midrule"]
    lines += [" & ".join(esc(_fmt(v, digits)) for v in r) + " \\\\" for r in df.iter_rows()]
    lines += ["\\bottomrule", "\\end{tabular}"]
    if caption:
        lines.append(f"% {caption}")
    return "\n".join(lines) + "\n"


def write_table(df: pl.DataFrame, stem: str | Path, digits: int = 4, display: pl.DataFrame | None = None) -> list[Path]:
    """Write ``stem``.csv, .md and .tex; returns the paths. ``display``: a compact form of ``df`` for the
    Markdown and LaTeX files (e.g. ``value [low, high]`` cells); the CSV always holds ``df`` itself."""
    stem = Path(stem)
    out = [stem.with_name(stem.name + ext) for ext in (".csv", ".md", ".tex")]  # stems may hold dots (qwen2.5)
    shown = df if display is None else display
    write_bytes(out[0], df.write_csv())
    write_bytes(out[1], markdown(shown, digits))
    write_bytes(out[2], latex(shown, digits))
    return out


def with_ci(value: float | None, low: float | None, high: float | None, digits: int = 1) -> str:
    """``"4.6 [2.1, 7.9]"`` (empty for a missing value; no interval when its bounds are missing)."""
    if value is None:
        return ""
    if low is None or high is None or low != low or high != high:  # NaN: no replicates
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def write_figure(chart, stem: str | Path, scale: float = 2.0) -> list[Path]:
    """Render an altair chart to ``stem``.png and .svg with vl-convert (offline, system fonts). The data are
    embedded whatever their size: altair's 5000-row guard runs when the spec is written, after the figure
    modules chose what to plot (one row per head and score function: 16 functions x 336 heads pass it)."""
    import altair as alt
    import vl_convert as vlc

    stem = Path(stem)
    with alt.data_transformers.disable_max_rows():
        spec = chart.to_json()
    png, svg = stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".svg")
    write_bytes(png, vlc.vegalite_to_png(spec, scale=scale))
    write_bytes(svg, vlc.vegalite_to_svg(spec))
    return [png, svg]
