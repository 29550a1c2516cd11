# The dormant-heads workflow: models -> corpora -> per-shard head scores -> DuckDB -> tables and figures.
#   snakemake --cores all                                    # embedded default profile (config/default.yaml)
#   snakemake --cores all --configfile config/smoke.yaml     # another profile
#   snakemake --report results/report.html                   # HTML report of the figures and tables
# Every rule is one `dormant` CLI call; outputs live under results/, logs under results/logs/.
# The config is validated against config/schema.yaml, then checked as a whole (rules/common.smk), before any job.
from snakemake.utils import validate

configfile: "config/default.yaml"
validate(config, "config/schema.yaml")

# Included in this order: each module may read what the ones before it defined. A module appends
#   EXTRA_TABLES[table] += Parquet files (upserted into results/scores.duckdb by the final `database` rule),
#   EXTRA_TARGETS += its default outputs (inputs of `all`), DERIVED[key] = a local model directory it makes
#   (a finetune, a perturbed copy), scored on every corpus like the configured models.
include: "rules/common.smk"          # model keys, every config check, shared lists, settings files
include: "rules/distributions.smk"   # finetune / perturbed copy (DERIVED, scored below) and definitions §6 statistics
include: "rules/scores.smk"          # models, corpora, per-shard head scores, the core database (definitions §2)
include: "rules/sweep.smk"           # calibration, thresholds, ablation sweep, Table 2 (definitions §3-5)
include: "rules/toy.smk"             # Bigram-Backcopy toy models (definitions §7)
include: "rules/domains.smk"         # dormant-by-domain heads and the active-dormant scatter (definitions §7)
include: "rules/maps.smk"            # MAPS: head functions from parameters (definitions §8)
include: "rules/report.smk"          # last: the final database, the summary, the paper (read every module)


rule all:
    default_target: True
    input:
        "results/scores.duckdb",
        "results/summary.md",
        "results/tables/score_summary.csv",
        SCORE_FIGURES,
        "results/paper/status.txt",
        ABLATION_TABLES,
        ABLATION_FIGURES,
        EXTRA_TARGETS,
