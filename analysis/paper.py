"""Build the manuscript (``paper/main.tex``) with latexmk when a TeX engine is installed; else say so."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from analysis.core.io import write_bytes


def build_paper(tex: Path, out_dir: Path) -> str:
    """Run latexmk on ``tex`` (in its directory) into ``out_dir``; returns a one-line status (also written
    to ``out_dir/status.txt``). Missing latexmk is not an error: the status says how to install it."""
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if shutil.which("latexmk") is None or shutil.which("pdflatex") is None:
        status = ("skipped: latexmk/pdflatex not found; install Debian's latexmk texlive-latex-recommended "
                  "texlive-latex-extra and rerun")
    else:
        res = subprocess.run(["latexmk", "-pdf", "-interaction=nonstopmode", "-halt-on-error",
                              f"-outdir={out_dir}", tex.name], cwd=tex.parent, capture_output=True, text=True)
        pdf = out_dir / tex.with_suffix(".pdf").name
        if res.returncode != 0 or not pdf.is_file():
            tail = "\n".join(res.stdout.splitlines()[-20:])
            raise RuntimeError(f"latexmk failed on {tex} (see {out_dir}/{tex.stem}.log):\n{tail}")
        status = f"built: {pdf}"
    write_bytes(out_dir / "status.txt", status + "\n")
    return status
