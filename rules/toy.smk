# Bigram-Backcopy toy transformers (SPEC §7).
#   default target: the `core` toy runs (1-layer softmax AdamW) with their tables and figures
#   snakemake --cores all toy_all     # every toy run (AdamW vs SGD, softmax vs ReLU, 1 vs 3 layers) + bb_metrics DB
#   snakemake --cores all toy_seeds   # the same runs with the extra seeds of mechanism.toy.seeds: claims per seed
# Config: `mechanism.toy` (config/schema.yaml; cross-checks in rules/common.smk).
import re as _re

MECH = config.get("mechanism")
if MECH:
    TOY = MECH["toy"]
    TOY_SETS = {s: list(runs) for s, runs in TOY["sets"].items()}
    # `mechanism.toy.seeds`: every run of the `all` set again with each of these seeds, as <run>_seed<n>
    TOY_SEED_RUNS = list(TOY_SETS["all"])
    for _r in TOY_SETS["all"]:
        for _sd in TOY.get("seeds", []):
            TOY["runs"][f"{_r}_seed{_sd}"] = {**TOY["runs"][_r], "seed": _sd}
            TOY_SEED_RUNS.append(f"{_r}_seed{_sd}")
    TOY_TABLES = ["claims", "final", "interventions"]
    TOY_FIGURES = ["dynamics", "compare", "interventions"]

    def _toy_run(run):
        r = {**TOY["defaults"], **TOY["runs"][run]}
        betas = " ".join(str(b) for b in r["betas"])
        return (f"--layers {r['layers']} --attention {r['attention']} --optimizer {r['optimizer']} "
                f"--width {r['width']} --length {r['length']} --batch {r['batch']} --steps {r['steps']} "
                f"--lr {r['lr']} --weight-decay {r['weight_decay']} --betas {betas} --momentum {r['momentum']} "
                f"--checkpoints {r['checkpoints']} --eval-batch {r['eval_batch']} --seed {r['seed']} "
                f"--init {r.get('init', 'normal')}"
                + ("" if r.get("bos_loss", True) else " --no-bos-loss"))

    def _toy_outputs(toy_set):
        return (expand("results/tables/toy_{s}_{t}.{ext}", s=toy_set, t=TOY_TABLES, ext=["csv", "md", "tex"])
                + expand("results/figures/toy_{s}_{f}.{ext}", s=toy_set, f=TOY_FIGURES, ext=["png", "svg"]))

    _TOY_RUN = "|".join(_re.escape(r) for r in TOY["runs"])
    _TOY_SET = "|".join(_re.escape(s) for s in TOY_SETS)

    rule toy_train:
        """Train one Bigram-Backcopy toy model: checkpoints at log-spaced steps, metrics (bb_metrics rows)."""
        input: "results/data/sources.txt"
        output: "results/toy/{toyrun}/metrics.parquet"
        wildcard_constraints: toyrun=_TOY_RUN
        params:
            args=lambda w: _toy_run(w.toyrun),
            dir=lambda w: f"results/toy/{w.toyrun}",
            t={k: TOY[k] for k in ("corpus", "triggers", "min_count", "device")},  # not the other runs' settings
        threads: TOY["threads"]
        resources: mem_mb=config["resources"]["mem_mb"], gpu=config["resources"]["gpu"] if TOY["device"] != "cpu" else 0
        log: "results/logs/toy_train/{toyrun}.log"
        benchmark: "results/benchmarks/toy_train/{toyrun}.tsv"
        shell:
            "OMP_NUM_THREADS={threads} {DORMANT} toy train --run {wildcards.toyrun} --out-dir {params.dir:q} "
            "{params.args} --corpus {params.t[corpus]} --triggers {params.t[triggers]} "
            "--min-count {params.t[min_count]} --threads {threads} --device {params.t[device]} --quiet "
            "2> {log:q}"

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
