"""Build the manuscript (``paper/main.tex``) with latexmk when a TeX engine is installed; else say so.

TeX cannot list a directory, so the build first writes ``genlists.tex`` into the output directory (where
TeX finds it): for each ``\\genfigures{GLOB}{caption}`` of the manuscript the generated figures whose name
matches GLOB (per-model figures: their names depend on the profile's models), and the appendix: every other
generated table and figure, so that the PDF holds every one (a table of more than ``APPENDIX_MAX_ROWS``
rows is listed there by name and size instead, its CSV beside it).
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from analysis.core.io import write_bytes

# what scripts/setup.sh installs as root on Debian (its `paper` group)
TEX_PACKAGES = "latexmk texlive-latex-base texlive-latex-recommended lmodern"
APPENDIX_MAX_ROWS = 200
_INCLUDE = re.compile(r"\\gen(table|figure)(?:\[[^\]]*\])?\{([^}]*)\}")  # \gentable[target]{a,b}{caption}
_GLOB = re.compile(r"\\genfigures\{([^}]*)\}")
_GRAPHICS = re.compile(r"\\graphicspath\{\{([^}]*)\}")
_SAFE = re.compile(r"[A-Za-z0-9_.+\-/]+")  # names TeX reads as they are


def figure_dir(tex: Path) -> Path:
    """The generated figures' directory: ``\\graphicspath`` of ``tex``, relative to its directory."""
    m = _GRAPHICS.search(tex.read_text())
    return (tex.parent / m.group(1)) if m else tex.parent



def _text(tex: Path, body: bool = False) -> str:
    """The manuscript without its comments (``body``: only what follows ``\\begin{document}``)."""
    text = tex.read_text()
    if body and "\\begin{document}" in text:
        text = text.split("\\begin{document}", 1)[1]
    return re.sub(r"(?<!\\)%.*", "", text)


def table_dir(tex: Path) -> Path:
    """The generated tables' directory: ``tables`` beside the figures' directory (``results/``)."""
    return figure_dir(tex).parent / "tables"


def _rows(table: Path) -> int:
    lines = table.read_text().splitlines()
    try:
        return lines.index("\\bottomrule") - lines.index("\\midrule") - 1
    except ValueError:
        return len(lines)


def appendix(tex: Path) -> list[tuple[str, str, int]]:
    """Every generated table (``results/tables/*.tex``) and figure (``results/figures/**/*.png``) that the body
    of ``tex`` does not include by name, fallback or glob: (kind, name, rows of a table, 0 for a figure)."""
    body = _text(tex, body=True)
    named = {"table": set(), "figure": set()}
    for kind, names in _INCLUDE.findall(body):
        named[kind].update(names.split(","))
    globbed = {name for items in figure_lists(tex).values() for name, _ in items}
    tdir, fdir = table_dir(tex), figure_dir(tex)
    out = [("table", p.stem, _rows(p)) for p in sorted(tdir.glob("*.tex")) if p.stem not in named["table"]]
    out += [("figure", n, 0) for n in sorted(p.relative_to(fdir).as_posix()[:-4] for p in fdir.rglob("*.png"))
            if n not in named["figure"] and n not in globbed]
    return [o for o in out if _SAFE.fullmatch(o[1])]


def figure_lists(tex: Path) -> dict[str, list[tuple[str, str]]]:
    """For each ``\\genfigures{GLOB}`` of ``tex``: the matching figures as (name without .png, what the first
    ``*`` matched), in name order. Names TeX cannot take as they are (braces, spaces, ...) are left out."""
    text, fig_dir = _text(tex), figure_dir(tex)
    out = {}
    for pattern in dict.fromkeys(_GLOB.findall(text)):
        parts = [re.escape(p) for p in pattern.split("*")]
        rx = re.compile(parts[0] + "".join(("(.+?)" if i == 0 else "(.+)") + p for i, p in enumerate(parts[1:])))
        names = sorted(p.relative_to(fig_dir).as_posix()[:-4] for p in fig_dir.glob(pattern + ".png"))
        items = []
        for name in names:
            m = rx.fullmatch(name)
            if m and _SAFE.fullmatch(name):
                items.append((name, m.group(1) if m.groups() else name))
        out[pattern] = items
    return out


def write_lists(tex: Path, out_dir: Path) -> Path:
    """``out_dir/genlists.tex``: one ``genlist@GLOB`` macro per non-empty list of ``figure_lists`` and
    ``\\genappendix``, the appendix's items (``\\genappendixtable``, ``\\genappendixlisted`` for a table
    of more than ``APPENDIX_MAX_ROWS`` rows, ``\\genappendixfigure``)."""
    lines = ["% written by `dormant paper`: the figures each \\genfigures{GLOB} of the manuscript includes and the"
             " appendix (every other generated table and figure)"]
    for pattern, items in figure_lists(tex).items():
        if items:
            body = "".join(f"\\genitem{{{name}}}{{{label}}}" for name, label in items)
            lines.append(f"\\expandafter\\def\\csname genlist@{pattern}\\endcsname{{{body}}}")
    items = []
    for kind, name, rows in appendix(tex):
        shown = re.sub(r"([/_-])", r"\1\\allowbreak{}", name).replace("_", "\\_")  # breaks after / _ -
        if kind == "figure":
            items.append(f"\\genappendixfigure{{{name}}}{{{shown}}}")
        elif rows > APPENDIX_MAX_ROWS:
            items.append(f"\\genappendixlisted{{{name}}}{{{shown}}}{{{rows}}}")
        else:
            items.append(f"\\genappendixtable{{{name}}}{{{shown}}}")
    lines.append("\\def\\genappendix{%\n" + "\n".join(items) + "}")
    return write_bytes(out_dir / "genlists.tex", "\n".join(lines) + "\n")


def build_paper(tex: Path, out_dir: Path) -> str:
    """Run latexmk on ``tex`` (in its directory) into ``out_dir``; returns a one-line status (also written
    to ``out_dir/status.txt``). Missing latexmk is not an error: the status says how to install it."""
    tex = Path(tex).resolve()
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if shutil.which("latexmk") is None or shutil.which("pdflatex") is None:
        status = (f"skipped: latexmk/pdflatex not found; install Debian's {TEX_PACKAGES} "
                  "(bash scripts/setup.sh does, as root) and rerun")
    else:
        write_lists(tex, out_dir)
        res = subprocess.run(["latexmk", "-pdf", "-interaction=nonstopmode", "-halt-on-error",
                              f"-outdir={out_dir}", tex.name], cwd=tex.parent, capture_output=True, text=True)
        pdf = out_dir / tex.with_suffix(".pdf").name
        if res.returncode != 0 or not pdf.is_file():
            tail = "\n".join(res.stdout.splitlines()[-20:])
            raise RuntimeError(f"latexmk failed on {tex} (see {out_dir}/{tex.stem}.log):\n{tail}")
        status = f"built: {pdf}"
    write_bytes(out_dir / "status.txt", status + "\n")
    return status
