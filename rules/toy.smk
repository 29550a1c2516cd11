# Bigram-Backcopy toy transformers (definitions §7).
#   default target: the `core` toy runs (1-layer softmax AdamW) with their tables and figures
#   snakemake --cores all toy_all     # every toy run (AdamW vs SGD, softmax vs ReLU, 1 vs 3 layers) + bb_metrics DB
#   snakemake --cores all toy_seeds   # the same runs with the extra seeds of mechanism.toy.seeds: claims per seed
# Config: `mechanism.toy` (config/schema.yaml; cross-checks in rules/common.smk). Each run's settings
# (extract/toy/spec.py RunSpec, every field) are the inline --config JSON (a params value) that its
# training job reads with --config: only that run's settings, so adding or changing a run retrains only it.
import re as _re

from extract.toy.spec import run_settings, seed_variants  # standard library only

MECH = config.get("mechanism")
if MECH:
    TOY = MECH["toy"]
    TOY_SETS = {s: list(runs) for s, runs in TOY["sets"].items()}
    # `mechanism.toy.seeds`: every run of the `all` set again with each of these seeds, as <run>_seed<n>
    # (its run.json holds its base run and seed, which the robustness report groups by)
    TOY_SEED_RUNS = list(TOY_SETS["all"]) + list(seed_variants(TOY))
    TOY_RUNS = list(TOY["runs"]) + list(seed_variants(TOY))
    TOY_SETTINGS = {r: settings_json(run_settings(TOY, r)) for r in TOY_RUNS}
    TOY_TABLES = ["claims", "final", "interventions"]
    TOY_FIGURES = ["dynamics", "compare", "interventions"]

    def _toy_outputs(toy_set):
        return (expand("results/tables/toy_{s}_{t}.{ext}", s=toy_set, t=TOY_TABLES, ext=["csv", "md", "tex"])
                + expand("results/figures/toy_{s}_{f}.{ext}", s=toy_set, f=TOY_FIGURES, ext=["png", "svg"]))

    _TOY_RUN = "|".join(_re.escape(r) for r in TOY_RUNS)
    _TOY_SET = "|".join(_re.escape(s) for s in TOY_SETS)

    rule toy_train:
        """Train one Bigram-Backcopy toy model: checkpoints at log-spaced steps, metrics (bb_metrics rows)."""
        input:
            sources="results/data/sources.txt",
        output: "results/toy/{toyrun}/metrics.parquet"
        wildcard_constraints: toyrun=_TOY_RUN
        params:
            settings=lambda w: TOY_SETTINGS[w.toyrun],
            dir=lambda w: f"results/toy/{w.toyrun}",
            device=TOY["device"],
        threads: TOY["threads"]
        resources: mem_mb=config["resources"]["mem_mb"], gpu=config["resources"]["gpu"] if TOY["device"] != "cpu" else 0
        log: "results/logs/toy_train/{toyrun}.log"
        benchmark: "results/benchmarks/toy_train/{toyrun}.tsv"
        shell:
            "OMP_NUM_THREADS={threads} {DORMANT} toy train --config {params.settings:q} --out-dir {params.dir:q} "
            "--threads {threads} --device {params.device} --quiet 2> {log:q}"

    rule toy_report:
        """Claims table, final metrics, interventions, and the training-dynamics figures of one set of runs."""
        input: lambda w: expand("results/toy/{run}/metrics.parquet", run=TOY_SETS[w.toyset])
        output:
            [report(f, category="Active-dormant mechanism") if f.endswith((".png", "claims.csv")) else f
             for f in _toy_outputs("{toyset}")]
        wildcard_constraints: toyset=_TOY_SET
        log: "results/logs/toy_report/{toyset}.log"
        benchmark: "results/benchmarks/toy_report/{toyset}.tsv"
        shell: "{DORMANT} toy report --metrics {input:q} --out results --name toy_{wildcards.toyset} > {log:q} 2>&1"

    rule toy_db:
        """bb_metrics of every toy run of the `all` set in a database of its own (the toy_all target)."""
        input: expand("results/toy/{run}/metrics.parquet", run=TOY_SETS["all"])
        output: "results/toy/bb_metrics.duckdb"
        params: tables=lambda w, input: " ".join(f"bb_metrics={f}" for f in input)
        log: "results/logs/toy_db.log"
        shell: "{DORMANT} db build --db {output:q} --table {params.tables} > {log:q} 2>&1"

    rule toy_all:
        """Target: every toy run, its report and results/toy/bb_metrics.duckdb."""
        input: _toy_outputs("all"), "results/toy/bb_metrics.duckdb"

    rule toy_robustness:
        """Every claim of every `all` run over the seeds it was trained with (its own and `mechanism.toy.seeds`)."""
        input: expand("results/toy/{run}/metrics.parquet", run=TOY_SEED_RUNS)
        output:
            [report(f, category="Active-dormant mechanism") if f.endswith(".csv") else f
             for f in multiext("results/tables/toy_seeds_robustness", ".csv", ".md", ".tex")]
        log: "results/logs/toy_robustness.log"
        benchmark: "results/benchmarks/toy_robustness.tsv"
        shell: "{DORMANT} toy robustness --metrics {input:q} --out results --name toy_seeds > {log:q} 2>&1"

    rule toy_seeds:
        """Target: the `all` runs again with every seed of `mechanism.toy.seeds`, and the robustness table."""
        input: rules.toy_robustness.output

    EXTRA_TABLES.setdefault("bb_metrics", []).extend(
        expand("results/toy/{run}/metrics.parquet", run=TOY_SETS[TOY["database_set"]]))
    EXTRA_TARGETS.extend(_toy_outputs("core"))
