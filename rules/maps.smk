# MAPS (definitions §8): head functions from parameters, checked against inference, joined with inactivity.
#   default target: `maps.models` (static + salient + dynamic + causal, under each E' choice of `maps.inputs`),
#   then tables and figures, among them maps_inputs (which E' predicts inference, beside the MAPS paper's numbers)
#   snakemake --cores all maps_all     # every model of `models` with the same settings
# Config: the `maps` section (config/schema.yaml); its run settings are the inline --config JSON of `maps run`
# (a params value). Tables maps_scores, maps_salient, maps_dynamic, maps_correlations, maps_causal and
# maps_inputs go into results/scores.duckdb.
MAPS_CFG = config.get("maps")
if MAPS_CFG:
    MAPS_MODELS = [model_key(m) for m in MAPS_CFG["models"]]
    MAPS_PARTS = ["scores", "salient", "dynamic", "correlations", "causal"]

    # the run settings (extract/maps/run.py MapsSettings): the section minus the models, the join (the report's)
    # and the job's threads
    MAPS_SETTINGS = settings_json({k: v for k, v in MAPS_CFG.items()
                                           if k not in ("models", "join", "threads")})

    for _p in MAPS_PARTS:
        EXTRA_TABLES.setdefault(f"maps_{_p}", []).extend(
            f"results/maps/{m}/{_p}.parquet" for m in MAPS_MODELS)
    EXTRA_TABLES.setdefault("maps_inputs", []).append("results/maps/inputs.parquet")
    EXTRA_TARGETS += ["results/maps/report.txt"]

    rule maps_run:
        """MAPS for one model: static and suppression scores, salient tokens, dynamic and causal checks."""
        input:
            info="results/models/{model}.json",
        output: [f"results/maps/{{model}}/{p}.parquet" for p in MAPS_PARTS] + ["results/maps/{model}/timing.json"]
        params:
            settings=MAPS_SETTINGS,
            name=lambda w: SCORED[w.model] if w.model in SCORED else MODELS[w.model],
            dir=lambda w: f"results/maps/{w.model}",
        threads: MAPS_CFG["threads"]
        resources: mem_mb=config["resources"]["mem_mb"], gpu=config["resources"]["gpu"]
        log: "results/logs/maps/{model}.log"
        benchmark: "results/benchmarks/maps/{model}.tsv"
        shell:
            "OMP_NUM_THREADS={threads} {DORMANT} maps run --model {params.name:q} --config {params.settings:q} "
            "--out-dir {params.dir:q} --threads {threads} --device {config[scoring][device]} > {log:q} 2>&1"

    MAPS_JOIN = settings_json(MAPS_CFG["join"])

    rule maps_report:
        """MAPS tables (correlations, causal, join with ahon_ln) and figures (heatmaps, join, causal)."""
        input:
            runs=[f"results/maps/{m}/{p}.parquet" for m in MAPS_MODELS for p in MAPS_PARTS],
            db=CORE_DB,
        output:
            report="results/maps/report.txt",
            inputs="results/maps/inputs.parquet",
            table="results/tables/maps_inputs.csv",
        params:
            settings=MAPS_JOIN,
            dirs=" ".join(f"results/maps/{m}" for m in MAPS_MODELS),
        log: "results/logs/maps_report.log"
        benchmark: "results/benchmarks/maps_report.tsv"
        resources: mem_mb=config["resources"]["mem_mb"]
        shell:
            "{DORMANT} maps report --maps-dirs {params.dirs} --core-db {input.db:q} --out results "
            "--inputs-parquet {output.inputs:q} --config {params.settings:q} > {output.report:q} 2> {log:q}"

    rule maps_all:
        """MAPS for every model of `models` (same settings), then the tables and figures over all of them."""
        input:
            runs=expand("results/maps/{model}/{part}.parquet", model=list(MODELS), part=MAPS_PARTS),
            db=CORE_DB,
        output: "results/maps/report_all.txt"
        params:
            settings=MAPS_JOIN,
            dirs=" ".join(f"results/maps/{m}" for m in MODELS),
        log: "results/logs/maps_all.log"
        benchmark: "results/benchmarks/maps_all.tsv"
        resources: mem_mb=config["resources"]["mem_mb"]
        shell:
            "{DORMANT} maps report --maps-dirs {params.dirs} --core-db {input.db:q} --out results "
            "--config {params.settings:q} > {output:q} 2> {log:q}"
