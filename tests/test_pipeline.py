"""The smoke profile end to end through Snakemake: outputs, rerun is a no-op, kill -9 then resume gives the
same database (row counts and checksum)."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from analysis.database import checksum, connect, row_counts

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def workdir(tmp_path: Path) -> Path:
    d = tmp_path / "wf"
    d.mkdir()
    for item in ("Snakefile", "rules", "config", "paper"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, d / item)
    return d


def snakemake(d: Path, *extra: str, **kw) -> subprocess.CompletedProcess:
    # targets and options first: --configfile takes every following word as another config file
    cmd = [sys.executable, "-m", "snakemake", *extra, "--cores", "2", "--rerun-incomplete",
           "--configfile", "config/smoke.yaml"]
    return subprocess.run(cmd, cwd=d, capture_output=True, text=True, **kw)


def db_state(d: Path, db: str = "results/scores.duckdb"):
    con = connect(d / db, read_only=True)
    try:
        return row_counts(con), checksum(con)
    finally:
        con.close()


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    d = workdir(tmp_path_factory.mktemp("smoke"))
    res = snakemake(d)
    assert res.returncode == 0, res.stderr[-3000:]
    return d


def test_smoke_outputs(first_run):
    d = first_run
    counts, _ = db_state(d)
    # smoke: 1 model (30 layers x 9 heads) plus its finetuned and perturbed copies, 2 corpora x 4 documents
    assert counts["models"] == 3 and counts["examples"] == 3 * 8
    assert counts["head_scores"] == 3 * 8 * 30 * 9
    assert counts["ablation_results"] == 1 + 3 * 3 + 2  # random@0, 3 fns x 3 fractions, random x 2 more
    assert counts["ablation_questions"] == (1 + 3 * 3 + 2) * 6  # each configuration's 2 tasks x 3 questions
    assert counts["calibration_scores"] == 6 * 30 * 9  # 2 tasks x 3 questions
    # the analysis modules (rules/*.smk) ran and their tables reached the final database
    for table in ("bb_metrics", "maps_scores", "distribution_tests"):
        assert counts[table] > 0, table
    for f in ("results/summary.md", "results/tables/table2.md", "results/tables/table2.tex", "results/tables/table2_kl.csv",
              "results/tables/score_summary.csv", "results/figures/figure3_auc_ranks.svg",
              "results/figures/figure4_top3.png", "results/figures/score_ecdf_ahon_ln.png",
              "results/paper/status.txt"):
        assert (d / f).is_file() and (d / f).stat().st_size > 0, f
    check_paper(d)
    rerun = snakemake(d)
    assert "Nothing to be done" in rerun.stdout + rerun.stderr  # rerun: no-op
    rep = subprocess.run([sys.executable, "-m", "snakemake", "--configfile", "config/smoke.yaml", "--report",
                          "results/report.html"], cwd=d, capture_output=True, text=True)
    assert rep.returncode == 0 and (d / "results" / "report.html").stat().st_size > 100_000, rep.stderr[-2000:]


def check_paper(d: Path) -> None:
    """With TeX installed (scripts/setup.sh, as root on Debian) the paper rule builds results/paper/main.pdf,
    and every table and figure the run had made when the build began is in it (read by TeX, per latexmk's
    .fls record; a table too long to print is listed by name); without TeX its status says what to install."""
    out = d / "results" / "paper"
    status = (out / "status.txt").read_text()
    if shutil.which("latexmk") is None or shutil.which("pdflatex") is None:
        assert status.startswith("skipped: latexmk/pdflatex not found"), status
        return
    assert status.strip() == f"built: {out.resolve() / 'main.pdf'}", status
    fls = (out / "main.fls").read_text().splitlines()
    cwd = Path(next(line[4:] for line in fls if line.startswith("PWD ")))
    read = {(cwd / line[6:]).resolve() for line in fls if line.startswith("INPUT ")}
    lists = (out / "genlists.tex").read_text()
    began = (out / "genlists.tex").stat().st_mtime
    made = [p for p in [*(d / "results" / "tables").glob("*.tex"), *(d / "results" / "figures").rglob("*.png")]
            if p.stat().st_mtime < began]
    assert len(made) > 20
    missing = [str(p.relative_to(d)) for p in made
               if p.resolve() not in read and f"\\genappendixlisted{{{p.stem}}}" not in lists]
    assert not missing, missing


def test_kill_and_resume_gives_the_same_database(first_run, tmp_path):
    core = "results/db/core.duckdb"  # the scoring part of the DAG (models, finetune, perturbed copy, shards)
    want = db_state(first_run, core)
    d = workdir(tmp_path)
    cmd = [sys.executable, "-m", "snakemake", core, "--cores", "2", "--configfile", "config/smoke.yaml"]
    proc = subprocess.Popen(cmd, cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and not list((d / "results" / "logs").glob("score/**/*.log")):
        time.sleep(0.5)
    time.sleep(3)  # inside a scoring job
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (d / core).exists()
    assert list((d / ".snakemake" / "locks").iterdir())  # the killed run left its lock
    # what scripts/run.sh does after a killed run: clear the stale lock, rerun incomplete jobs
    assert snakemake(d, "--unlock").returncode == 0
    res = snakemake(d, core)
    assert res.returncode == 0, res.stderr[-3000:]
    assert db_state(d, core) == want
