"""The smoke profile end to end through Snakemake: outputs, rerun is a no-op, kill -9 then resume gives the
same database (row counts and checksum)."""
import json
import os
import re
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
    check_provenance(d)
    rerun = snakemake(d)
    assert "Nothing to be done" in rerun.stdout + rerun.stderr  # rerun: no-op
    rep = subprocess.run([sys.executable, "-m", "snakemake", "--configfile", "config/smoke.yaml", "--report",
                          "results/report.html"], cwd=d, capture_output=True, text=True)
    assert rep.returncode == 0 and (d / "results" / "report.html").stat().st_size > 100_000, rep.stderr[-2000:]


def check_provenance(d: Path) -> None:
    """Every result row of the final database names the run that wrote it, and that run is in ``runs``: each
    table with a ``run_id`` column, head_scores through examples; every kind of job of the DAG is there."""
    from analysis.core import tables

    con = connect(d / "results" / "scores.duckdb", read_only=True)
    try:
        for t in tables.all_tables():
            if "run_id" not in t.column_names or t.name == "runs":
                continue
            n, orphans = con.execute(f"""SELECT count(*), count(*) FILTER (WHERE r.run_id IS NULL)
                                         FROM {t.name} LEFT JOIN runs r USING (run_id)""").fetchone()
            assert n > 0 and orphans == 0, (t.name, n, orphans)
        n, orphans = con.execute("""SELECT count(*), count(*) FILTER (WHERE r.run_id IS NULL) FROM head_scores
                                    JOIN examples USING (model, dataset, example) LEFT JOIN runs r USING (run_id)
                                 """).fetchone()
        assert n > 0 and orphans == 0
        kinds = {k for (k,) in con.execute("SELECT DISTINCT kind FROM runs").fetchall()}
        assert kinds == {"score", "sweep", "maps", "maps_report", "domain_ablate", "toy", "finetune",
                         "distributions"}, kinds
        # a run's row is the one the job wrote: the toy run's settings are its config
        (config,) = con.execute("SELECT config FROM runs WHERE model = 'toy:adam_1l'").fetchone()
        assert json.loads(config)["name"] == "adam_1l"
    finally:
        con.close()


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


SLURM_TOOLS = ("munged", "mungekey", "mariadbd", "mariadb-install-db", "slurmdbd", "slurmctld", "slurmd",
               "sbatch", "sacct", "sacctmgr")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A one-node SLURM cluster with accounting (scripts/slurm_cluster.sh), stopped after the module."""
    if os.geteuid() != 0:
        pytest.skip("the SLURM test starts a one-node cluster (scripts/slurm_cluster.sh) and needs root")
    missing = [t for t in SLURM_TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing): as root on Debian, "
                    "bash scripts/setup.sh --tests installs it")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "DORMANT_SLURM_DIR": str(state)}
    script = str(ROOT / "scripts" / "slurm_cluster.sh")
    up = subprocess.run(["bash", script, "start"], env=env, capture_output=True, text=True, timeout=300)
    assert up.returncode == 0, up.stdout + up.stderr  # installed but not starting is a failure, not a skip
    env["SLURM_CONF"] = str(state / "slurm.conf")
    yield env
    subprocess.run(["bash", script, "stop"], env=env, capture_output=True, timeout=120)


def test_smoke_scoring_on_slurm_equals_the_local_run(first_run, slurm, tmp_path):
    """The scoring part of the smoke DAG (models, finetune, perturbed copy, score shards, core database) runs
    as SLURM jobs through config/slurm: every job was submitted with sbatch, sacct (slurmdbd's accounting)
    knows each one as COMPLETED under its rule's name, and the database equals the local run's."""
    core = "results/db/core.duckdb"
    d = workdir(tmp_path)
    started = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() - 1))
    res = subprocess.run([sys.executable, "-m", "snakemake", core, "--workflow-profile", "config/slurm",
                          "--slurm-init-seconds-before-status-checks", "1", "--configfile", "config/smoke.yaml"],
                         cwd=d, env=slurm, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    acct = subprocess.run(["sacct", "-X", "-n", "-P", "-S", started, "-o", "JobID,JobName,Comment,State"], env=slurm,
                          capture_output=True, text=True, check=True)
    jobs = [line.split("|") for line in acct.stdout.splitlines() if line.strip()]
    # the plugin names each job by the workflow run and comments it with the rule (and wildcards)
    rules = sorted(re.fullmatch(r"rule_(\w+?)(_wildcards_.*)?", comment).group(1) for _, _, comment, _ in jobs)
    submitted = sorted(re.findall(r"^rule (\w+):", res.stdout + res.stderr, flags=re.M))
    assert rules == submitted and {"score", "finetune", "perturb", "database_core"} <= set(rules), (acct.stdout, submitted)
    assert all(state == "COMPLETED" for *_, state in jobs) and len({name for _, name, _, _ in jobs}) == 1, acct.stdout
    ran_locally = re.findall(r"^localrule (\w+):", res.stdout + res.stderr, flags=re.M)
    assert db_state(d, core) == db_state(first_run, core), ran_locally  # same rows and checksum as the local run
