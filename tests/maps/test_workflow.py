"""The MAPS targets of the workflow, by a Snakemake dry run in a copy of the workflow files: the default profile
runs all four zoo models under the three E' choices and its report writes table maps_inputs for the database."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _dry_run(tmp_path, *targets_and_options):
    for item in ("Snakefile", "rules", "config", "paper"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, tmp_path / item)
    cmd = [sys.executable, "-m", "snakemake", *targets_and_options, "-n", "--cores", "1", "--printshellcmds"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_default_profile_runs_every_zoo_model_under_three_inputs(tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / "default.yaml").read_text())
    assert cfg["maps"]["models"] == cfg["models"]
    assert cfg["maps"]["inputs"] == ["reference", "raw", "residual"]
    out = _dry_run(tmp_path, "results/maps/report.txt", "results/scores.duckdb")
    runs = re.findall(r"maps run --model (\S+) --config (\S+)", out)
    assert sorted(m.strip("'") for m, _ in runs) == sorted(cfg["models"])
    assert all('"inputs":["reference","raw","residual"]' in c for _, c in runs)
    assert "--inputs-parquet results/maps/inputs.parquet" in out
    assert re.search(r"--table maps_inputs=results/maps/inputs.parquet", out)  # into results/scores.duckdb


def test_smoke_profile_dry_run(tmp_path):
    out = _dry_run(tmp_path, "results/maps/report.txt", "--configfile", "config/smoke.yaml")
    assert len(re.findall(r"maps run --model", out)) == 1
