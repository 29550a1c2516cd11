# MAPS (SPEC §8): head functions from parameters, checked against inference, joined with inactivity.
#   default target: `maps.models` (static + salient + dynamic + causal), then tables and figures
#   snakemake --cores all maps_all     # every model of `models` with the same settings
# Config: the `maps` section (config/schema.yaml). Tables maps_scores, maps_salient, maps_dynamic,
# maps_correlations and maps_causal go into results/scores.duckdb.
MAPS_CFG = config.get("maps")
if MAPS_CFG:
    MAPS_MODELS = [model_key(m) for m in MAPS_CFG["models"]]
    MAPS_PARTS = ["scores", "salient", "dynamic", "correlations", "causal"]

    def _maps_args(c):
        ops = f"--operations {' '.join(c['operations'])} " if c["operations"] else ""
        dyn = c["dynamic"]
        dyn_ops = f"--dynamic-operations {' '.join(dyn['operations'])} " if dyn["operations"] else ""
        cau = c["causal"]
        return (f"{ops}--seed {c['seed']} --inputs {c.get('inputs', 'mlp')} --k-copy {c['k_copy']} --k-other {c['k_other']} "
                + (f"--max-pairs {c['max_pairs']} " if c["max_pairs"] is not None else "")
                + f"--salient-vocab {c['salient']['vocab'] or 0} --salient-tokens {c['salient']['tokens']} "
                f"--salient-targets {c['salient']['targets']} {dyn_ops}"
                f"--dynamic-pairs {-1 if dyn['pairs'] is None else dyn['pairs']} "
                f"--causal-operations {' '.join(cau['operations'])} --causal-counts {' '.join(map(str, cau['counts']))} "
                f"--causal-draws {cau['draws']} --causal-prompts {-1 if cau['prompts'] is None else cau['prompts']} "
                f"--causal-shots {cau['shots']}")

    for _p in MAPS_PARTS:
        EXTRA_TABLES.setdefault(f"maps_{_p}", []).extend(
            f"results/maps/{m}/{_p}.parquet" for m in MAPS_MODELS)
    EXTRA_TARGETS += ["results/maps/report.txt"]

    rule maps_run:
        """MAPS for one model: static and suppression scores, salient tokens, dynamic and causal checks."""
        input: "results/models/{model}.json"
        output: [f"results/maps/{{model}}/{p}.parquet" for p in MAPS_PARTS] + ["results/maps/{model}/timing.json"]
        params:
            name=lambda w: SCORED[w.model] if w.model in SCORED else MODELS[w.model],
            args=_maps_args(MAPS_CFG),
            dir=lambda w: f"results/maps/{w.model}",
        threads: MAPS_CFG["threads"]
        resources: mem_mb=config["resources"]["mem_mb"], gpu=config["resources"]["gpu"]
        log: "results/logs/maps/{model}.log"
        benchmark: "results/benchmarks/maps/{model}.tsv"
        shell:
            "OMP_NUM_THREADS={threads} {DORMANT} maps run --model {params.name:q} --out-dir {params.dir:q} "
            "{params.args} --device {config[scoring][device]} > {log:q} 2>&1"

    rule maps_report:
        """MAPS tables (correlations, causal, join with ahon_ln) and figures (heatmaps, join, causal)."""
        input:
            runs=[f"results/maps/{m}/{p}.parquet" for m in MAPS_MODELS for p in MAPS_PARTS],
            db=CORE_DB,
        output: "results/maps/report.txt"
        params:
            dirs=" ".join(f"results/maps/{m}" for m in MAPS_MODELS),
            j=MAPS_CFG["join"],
        log: "results/logs/maps_report.log"
        benchmark: "results/benchmarks/maps_report.tsv"
        resources: mem_mb=config["resources"]["mem_mb"]
        shell:
            "{DORMANT} maps report --maps-dirs {params.dirs} --core-db {input.db:q} --out results "
            "--inactive-below {params.j[inactive_below]} --salient-min {params.j[salient_min]} > {output:q} 2> {log:q}"

    rule maps_all:
        """MAPS for every model of `models` (same settings), then the tables and figures over all of them."""
        input:
            runs=expand("results/maps/{model}/{part}.parquet", model=list(MODELS), part=MAPS_PARTS),
            db=CORE_DB,
        output: "results/maps/report_all.txt"
        params:
            dirs=" ".join(f"results/maps/{m}" for m in MODELS),
            j=MAPS_CFG["join"],
        log: "results/logs/maps_all.log"
        benchmark: "results/benchmarks/maps_all.tsv"
        resources: mem_mb=config["resources"]["mem_mb"]
        shell:
            "{DORMANT} maps report --maps-dirs {params.dirs} --core-db {input.db:q} --out results "
            "--inactive-below {params.j[inactive_below]} --salient-min {params.j[salient_min]} > {output:q} 2> {log:q}"
