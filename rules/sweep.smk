# The ablation sweep (definitions §3-5): calibration, thresholds and every score function x target fraction under
# dynamic ablation, per model of `evaluation.models`; then Table 2, the AUC ranks and Figures 3/4/10.
ABLATION_TABLES = (expand("results/tables/{t}.csv", t=sorted(["table2", "auc_ranks", "auc_rank_correlation", "top5_iou"]))
                   if SWEEP_MODELS else [])
ABLATION_FIGURES = (expand("results/figures/{f}.{ext}", f=["figure3_auc_ranks", "figure4_top3", "figure10_all"],
                           ext=["png", "svg"]) if SWEEP_MODELS else [])


SWEEP = settings_json({"tasks": EV["tasks"], "task_name": EV["task_name"], "limit": EV["limit"],
                                "k_shot": EV["k_shot"], "seed": EV["seed"], "score_functions": EV["score_functions"],
                                "fractions": EV["fractions"], "batch_tokens": EV["batch_tokens"],
                                "dtype": config["scoring"]["dtype"], "device": config["scoring"]["device"]})


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
        settings=SWEEP,
        name=lambda w: MODELS[w.model],
        dir=lambda w: f"{SWEEP_DIR}/{w.model}",
    threads: THREADS
    resources: mem_mb=config["resources"]["mem_mb"], gpu=config["resources"]["gpu"]
    log: f"results/logs/sweep/{{model}}.log"
    benchmark: f"results/benchmarks/sweep/{{model}}.tsv"
    shell:
        "OMP_NUM_THREADS={threads} {DORMANT} sweep --model {params.name:q} --config {params.settings:q} "
        "--out-dir {params.dir:q} 2> {log:q}"


# the sweep's outputs join the analysis tables of the final database
for _part, _table in [("ablation_results", "ablation_results"), ("thresholds", "thresholds"),
                      ("calibration", "calibration_scores")]:
    EXTRA_TABLES.setdefault(_table, []).extend(expand(f"{SWEEP_DIR}/{{model}}/{_part}.parquet", model=SWEEP_MODELS))


rule ablation_report:
    """Table 2, AUC ranks, Figures 3/4/10, agreement and overlap analyses, threshold stability, sweep cost."""
    input:
        db="results/scores.duckdb",
        timings=expand(f"{SWEEP_DIR}/{{model}}/timing.json", model=SWEEP_MODELS),
    output:
        tables=[report(f, category="Ablation") if f.endswith("table2.csv") else f for f in ABLATION_TABLES],
        figures=[report(f, category="Ablation") if f.endswith(".png") else f for f in ABLATION_FIGURES],
    log: "results/logs/ablation_report.log"
    shell: "{DORMANT} ablation-report --db {input.db:q} --out results --timings {input.timings:q} > {log:q} 2>&1"
