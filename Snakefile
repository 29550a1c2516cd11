# The dormant-heads workflow: models -> corpora -> per-shard head scores -> DuckDB -> tables and figures.
#   snakemake --cores all                                    # embedded default profile (config/default.yaml)
#   snakemake --cores all --configfile config/smoke.yaml     # another profile
#   snakemake --report results/report.html                   # HTML report of the figures and tables
# Every rule is one `dormant` CLI call; outputs live under results/, logs under results/logs/.
import os
import re
import sys
from pathlib import Path

from snakemake.utils import validate

from extract.models.zoo import HUB_ID, ZOO  # standard library + tqdm only: cheap at DAG start

configfile: "config/default.yaml"
validate(config, "config/schema.yaml")

DORMANT = f"{sys.executable} -m extract.cli"


def _check_config(cfg):
    for i, m in enumerate(cfg["models"]):
        if not (m in ZOO or Path(m).expanduser().exists() or HUB_ID.match(m)):
            raise ValueError(f"config key models[{i}] = {m!r}: not a zoo name ({', '.join(ZOO)}), "
                             "an existing path, or a hub id (org/name)")
    for i, m in enumerate(cfg["evaluation"]["models"]):
        if m not in cfg["models"]:
            raise ValueError(f"config key evaluation.models[{i}] = {m!r} is not in `models`; add it there too")
    if 0.0 not in cfg["evaluation"]["fractions"]:
        raise ValueError("config key evaluation.fractions must contain 0.0 (the baseline)")
    c = cfg["corpora"]
    if c["min_tokens"] > c["max_tokens"]:
        raise ValueError(f"config keys corpora.min_tokens ({c['min_tokens']}) > corpora.max_tokens "
                         f"({c['max_tokens']})")


_check_config(config)


def key(model):
    """A file-name-safe key for a model name (hub ids contain '/')."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "__", Path(model).name if Path(model).exists() else model)


MODELS = {key(m): m for m in config["models"]}
CORPORA = config["corpora"]["names"]
NSHARDS = config["scoring"]["shards"]
SHARDS = [f"{i}-of-{NSHARDS}" for i in range(NSHARDS)]
THREADS = config["scoring"].get("threads") or os.cpu_count() or 1  # snakemake caps it at --cores
EV = config["evaluation"]
SWEEP_MODELS = [key(m) for m in EV["models"]]
SWEEP_DIR = f"results/ablation/{EV['task_name']}"
ABLATION = {"table2", "auc_ranks", "auc_rank_correlation", "top5_iou"} if SWEEP_MODELS else set()
ABLATION_FIGURES = (expand("results/figures/{f}.{ext}", f=["figure3_auc_ranks", "figure4_top3", "figure10_all"],
                           ext=["png", "svg"]) if SWEEP_MODELS else [])
SCORE_FIGURES = expand("results/figures/score_ecdf_{fn}.{ext}", fn=["ahon_ln", "awft", "aeqd"], ext=["png", "svg"])

# Analysis modules live in rules/*.smk. Each may append to EXTRA_TABLES (database table -> Parquet files that
# the final `database` rule upserts into results/scores.duckdb) and to EXTRA_TARGETS (inputs of `all`).
# Rules that need the head scores read the core database results/db/core.duckdb (models, examples,
# head_scores; no cycle, and no wait for the ablation sweep).
# DERIVED: model key -> local model directory made by a rule (e.g. a finetune), scored like the config's models.
CORE_DB = "results/db/core.duckdb"
EXTRA_TABLES = {}
EXTRA_TARGETS = []
DERIVED = {}
for _smk in sorted(Path(workflow.basedir, "rules").glob("*.smk")):
    include: _smk
SCORED = {**MODELS, **DERIVED}


def _derived_input(w):
    return [DERIVED[w.model]] if w.model in DERIVED else []

wildcard_constraints:
    model="[A-Za-z0-9_.-]+",
    corpus="[a-z0-9_]+",
    shard=r"\d+-of-\d+",


rule all:
    input:
        "results/scores.duckdb",
        "results/summary.md",
        "results/tables/score_summary.csv",
        SCORE_FIGURES,
        "results/paper/status.txt",
        expand("results/tables/{t}.csv", t=sorted(ABLATION)),
        ABLATION_FIGURES,
        EXTRA_TARGETS,


rule model_info:
    """Fetch, verify and convert a model once (zoo) and record its description."""
    output: "results/models/{model}.json"
    input: _derived_input
    params: name=lambda w: SCORED[w.model]
    log: "results/logs/model_info/{model}.log"
    benchmark: "results/benchmarks/model_info/{model}.tsv"
    resources: mem_mb=config["resources"]["mem_mb"]
    shell: "{DORMANT} models info {params.name:q} > {output:q} 2> {log:q}"


rule fetch_data:
    """Download BIG-bench and the pinned code sdist into the cache (sha256-checked)."""
    output: "results/data/sources.txt"
    log: "results/logs/fetch_data.log"
    shell: "{DORMANT} data fetch > {output:q} 2> {log:q}"


rule corpus:
    """N documents of a corpus with seeded lengths in [min_tokens, max_tokens]."""
    input: rules.fetch_data.output
    output: "results/data/corpora/{corpus}.jsonl"
    params: c=config["corpora"]
    log: "results/logs/corpus/{corpus}.log"
    shell:
        "{DORMANT} data corpus {wildcards.corpus} --n {params.c[n]} --min-tokens {params.c[min_tokens]} "
        "--max-tokens {params.c[max_tokens]} --seed {params.c[seed]} --out {output:q} 2> {log:q}"


rule score:
    """The 13 scores of every head on one shard of a corpus (atomic Parquet)."""
    input:
        info="results/models/{model}.json",
        data="results/data/corpora/{corpus}.jsonl",
    output: "results/scores/{model}/{corpus}/shard-{shard}.parquet"
    params:
        name=lambda w: SCORED[w.model],
        i=lambda w: w.shard.split("-of-")[0],
        s=config["scoring"],
        bos=lambda w: "" if config["scoring"]["prepend_bos"] else "--no-bos",
    threads: THREADS
    resources: mem_mb=config["resources"]["mem_mb"], gpu=config["resources"]["gpu"]
    log: "results/logs/score/{model}/{corpus}/{shard}.log"
    benchmark: "results/benchmarks/score/{model}/{corpus}/{shard}.tsv"
    shell:
        "OMP_NUM_THREADS={threads} {DORMANT} score --model {params.name:q} --data {input.data:q} "
        "--dataset {wildcards.corpus} --shard {params.i} --num-shards {NSHARDS} --out {output:q} "
        "--batch-tokens {params.s[batch_tokens]} --dtype {params.s[dtype]} --device {params.s[device]} "
        "{params.bos} 2> {log:q}"


rule sweep:
    """Calibration (baseline + head scores on the prompts), thresholds, and the ablation sweep of one model."""
    input:
        info="results/models/{model}.json",
        data=rules.fetch_data.output,
    output:
        results=f"{SWEEP_DIR}/{{model}}/ablation_results.parquet",
        thresholds=f"{SWEEP_DIR}/{{model}}/thresholds.parquet",
        calibration=f"{SWEEP_DIR}/{{model}}/calibration.parquet",
        timing=f"{SWEEP_DIR}/{{model}}/timing.json",
    params:
        name=lambda w: MODELS[w.model],
        tasks=" ".join(EV["tasks"]),
        fns=" ".join(EV["score_functions"]),
        fractions=" ".join(str(f) for f in EV["fractions"]),
        dir=lambda w: f"{SWEEP_DIR}/{w.model}",
    threads: THREADS
    resources: mem_mb=config["resources"]["mem_mb"], gpu=config["resources"]["gpu"]
    log: f"results/logs/sweep/{{model}}.log"
    benchmark: f"results/benchmarks/sweep/{{model}}.tsv"
    shell:
        "OMP_NUM_THREADS={threads} {DORMANT} sweep --model {params.name:q} --tasks {params.tasks} "
        "--task-name {EV[task_name]} --limit {EV[limit]} --k-shot {EV[k_shot]} --seed {EV[seed]} "
        "--score-fns {params.fns} --fractions {params.fractions} --batch-tokens {EV[batch_tokens]} "
        "--dtype {config[scoring][dtype]} --device {config[scoring][device]} --out-dir {params.dir:q} 2> {log:q}"


rule database_core:
    """Model infos, corpora and every score shard in the core database (fresh file, renamed into place)."""
    input:
        models=expand("results/models/{model}.json", model=SCORED),
        shards=expand("results/scores/{model}/{corpus}/shard-{shard}.parquet", model=SCORED, corpus=CORPORA,
                      shard=SHARDS),
        corpora=expand("results/data/corpora/{corpus}.jsonl", corpus=CORPORA),
    output: CORE_DB
    params: corpora=" ".join(f"{c}=results/data/corpora/{c}.jsonl" for c in CORPORA)
    log: "results/logs/database_core.log"
    shell:
        "{DORMANT} db build --db {output:q} --models {input.models:q} --shards {input.shards:q} "
        "--corpus {params.corpora} > {log:q} 2>&1"


# the sweep's outputs join the analysis tables of the final database
for _part, _table in [("ablation_results", "ablation_results"), ("thresholds", "thresholds"),
                      ("calibration", "calibration_scores")]:
    EXTRA_TABLES.setdefault(_table, []).extend(expand(f"{SWEEP_DIR}/{{model}}/{_part}.parquet", model=SWEEP_MODELS))


rule database:
    """results/scores.duckdb: the core database plus every analysis table (copied, ingested, renamed)."""
    input:
        core=CORE_DB,
        extra=[f for files in EXTRA_TABLES.values() for f in files],
    output: "results/scores.duckdb"
    params: tables=" ".join(f"--table {t}={f}" for t, files in EXTRA_TABLES.items() for f in files)
    log: "results/logs/database.log"
    shell: "{DORMANT} db build --db {output:q} --base {input.core:q} {params.tables} > {log:q} 2>&1"


rule ablation_report:
    """Table 2, AUC ranks, Figures 3/4/10, agreement and overlap analyses, threshold stability, sweep cost."""
    input:
        db="results/scores.duckdb",
        timings=expand(f"{SWEEP_DIR}/{{model}}/timing.json", model=SWEEP_MODELS),
    output:
        tables=[report(f"results/tables/{t}.csv", category="Ablation") if t == "table2" else f"results/tables/{t}.csv"
                for t in sorted(ABLATION)],
        figures=[report(f, category="Ablation") if f.endswith(".png") else f for f in ABLATION_FIGURES],
    log: "results/logs/ablation_report.log"
    shell: "{DORMANT} ablation-report --db {input.db:q} --out results --timings {input.timings:q} > {log:q} 2>&1"


rule summarize:
    """Score-distribution tables, figures and the human-readable run summary."""
    input: "results/scores.duckdb"
    output:
        summary="results/summary.md",
        table=report("results/tables/score_summary.csv", category="Tables"),
        tables=multiext("results/tables/score_summary", ".md", ".tex"),
        figures=[report(f, category="Score distributions") if f.endswith(".png") else f for f in SCORE_FIGURES],
    log: "results/logs/summarize.log"
    shell: "{DORMANT} report --db {input:q} --out results > {log:q} 2>&1 && cat {output.summary:q}"


rule paper:
    """The manuscript: paper/main.tex with the generated tables and figures (latexmk when installed)."""
    input:
        tex="paper/main.tex",
        tables=rules.summarize.output.tables,
        figures=rules.summarize.output.figures,
        ablation=rules.ablation_report.output,
        analyses=EXTRA_TARGETS,  # every analysis the manuscript includes (domains, toy, MAPS, distributions)
    output: "results/paper/status.txt"
    log: "results/logs/paper.log"
    shell: "{DORMANT} paper --tex {input.tex:q} --out results/paper > {log:q} 2>&1"
