# The ablation sweep (definitions §3-5): calibration, thresholds and every score function x target fraction under
# dynamic ablation, per model of `evaluation.models`; then Table 2, the AUC ranks and Figures 3/4/10.
ABLATION_TABLES = (expand("results/tables/{t}.csv", t=sorted(["table2", "table2_kl", "auc_ranks", "auc_rank_correlation",
                                                              "top5_iou"]))
                   if SWEEP_MODELS else [])
ABLATION_FIGURES = (expand("results/figures/{f}.{ext}", f=["figure3_auc_ranks", "figure4_top3", "figure10_all"],
                           ext=["png", "svg"]) if SWEEP_MODELS else [])


from analysis.core.bootstrap import N_BOOT
from analysis.sweep.uncertainty import KL_BUDGET

# the sweep's settings (extract.sweep.SweepSettings): the `evaluation` keys it has, plus the scoring dtype/device
SWEEP = settings_json({**{k: EV[k] for k in ("tasks", "task_name", "limit", "k_shot", "seed", "score_functions",
                                               "fractions", "batch_tokens", "scoring", "n_boot", "chat_format",
                                               "tokenization", "chat_delimiter") if k in EV},
                       "dtype": config["scoring"]["dtype"], "device": config["scoring"]["device"]})


rule sweep:
    """Calibration (baseline + head scores on the prompts), thresholds, and the ablation sweep of one model."""
    input:
        info="results/models/{model}.json",
        data=rules.fetch_data.output,
    output:
        results=f"{SWEEP_DIR}/{{model}}/ablation_results.parquet",
        questions=f"{SWEEP_DIR}/{{model}}/ablation_questions.parquet",
        thresholds=f"{SWEEP_DIR}/{{model}}/thresholds.parquet",
        calibration=f"{SWEEP_DIR}/{{model}}/calibration.parquet",
        timing=f"{SWEEP_DIR}/{{model}}/timing.json",
        runs=f"{SWEEP_DIR}/{{model}}/runs.parquet",
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


# the sweep's outputs join the analysis tables of the final database (runs: its provenance, joined by run_id)
for _part, _table in [("ablation_results", "ablation_results"), ("ablation_questions", "ablation_questions"),
                      ("thresholds", "thresholds"), ("calibration", "calibration_scores"), ("runs", "runs")]:
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
    params: boot=f"--n-boot {EV.get('n_boot', N_BOOT)} --seed {EV['seed']} --kl-budget {EV.get('kl_budget', KL_BUDGET)}"
    shell: "{DORMANT} ablation-report --db {input.db:q} --out results --timings {input.timings:q} {params.boot} "
           "> {log:q} 2>&1"


# The screen of candidate offline tasks (`snakemake task_candidates`, not in the default target): each model's
# accuracy per task and scoring against chance, to choose a sweep suite the models can do (definitions §5).
CANDIDATES = EV.get("candidates")
if CANDIDATES:
    rule task_candidates_eval:
        """Per-question predictions of one model on one screen's tasks under one scoring mode."""
        input:
            info="results/models/{model}.json",
            data=rules.fetch_data.output,
        output: "results/candidates/{model}/{screen}-{scoring}.parquet"
        params:
            name=lambda w: MODELS[w.model],
            tasks=lambda w: " ".join(f"--task {t}" for t in CANDIDATES["screens"][w.screen]["tasks"]),
            limit=lambda w: CANDIDATES["screens"][w.screen]["limit"],
        threads: THREADS
        log: "results/logs/task_candidates/{model}-{screen}-{scoring}.log"
        benchmark: "results/benchmarks/task_candidates/{model}-{screen}-{scoring}.tsv"
        wildcard_constraints:
            scoring="letter|cloze",
        shell:
            "OMP_NUM_THREADS={threads} {DORMANT} eval --model {params.name:q} {params.tasks} --limit {params.limit} "
            "--k-shot {CANDIDATES[k_shot]} --seed {EV[seed]} --scoring {wildcards.scoring} --chat-format {EV[chat_format]} "
            "--tokenization {EV[tokenization]} --chat-delimiter {EV[chat_delimiter]} "
            "--batch-tokens {EV[batch_tokens]} --out {output:q} > {log:q} 2>&1"

    rule task_candidates:
        """The table of candidate tasks: accuracy with its CI, chance, and which tasks qualify for the sweep."""
        input:
            [f"results/candidates/{model_key(m)}/{screen}-{scoring}.parquet"
             for screen, spec in CANDIDATES["screens"].items() for m in spec.get("models", CANDIDATES["models"])
             for scoring in CANDIDATES["scorings"]],
        output:
            expand("results/tables/task_candidates{part}.{ext}", part=["", "_wide"], ext=["csv", "md", "tex"]),
        log: "results/logs/task_candidates.log"
        shell: "{DORMANT} task-candidates --predictions {input:q} --out results/tables/task_candidates "
               "--seed {EV[seed]} > {log:q} 2>&1"
