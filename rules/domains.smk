# Dormant-by-domain heads and the active-dormant scatter (definitions §7).
#   default target: the candidate heads per model (table, figures) and, for `ablate_models`, the per-example
#   loss change from zeroing (and mean-ablating) each candidate, with the scatter against its awft.
# Config: `mechanism.domains` (config/schema.yaml; cross-checks in rules/common.smk); the ablation's run
# settings go to its job's inline --config JSON (a params value), which `domains ablate` reads.
import re as _re

if config.get("mechanism"):
    DOM = config["mechanism"]["domains"]
    DOMAIN_MODELS = {model_key(m): m for m in DOM["ablate_models"]}
    # the ablation run settings (extract/domains.py DomainAblationSettings): the section minus what the
    # candidates use, the model list and the job's threads, plus the scorer's BOS choice
    DOMAIN_ABLATE = settings_json({
        **{k: v for k, v in DOM.items() if k not in ("score_fn", "fraction", "top", "ablate_models", "threads", "dtype")},
        "prepend_bos": config["scoring"]["prepend_bos"]})

    rule domain_candidates:
        """Heads dormant on one domain and active on another: table, one figure per model, candidates."""
        input:
            db=CORE_DB,
        output:
            cands="results/domains/candidates.parquet",
            tables=multiext("results/tables/domain_heads", ".csv", ".md", ".tex"),
            figures=[report(f, category="Active-dormant mechanism") if f.endswith(".png") else f
                     for f in expand("results/figures/domain_heads_{model}.{ext}", model=MODELS, ext=["png", "svg"])],
        params:
            models=" ".join(f"{m!r}" for m in MODELS.values()),
            settings=settings_json({k: DOM[k] for k in ("score_fn", "fraction", "top")}),
        log: "results/logs/domain_candidates.log"
        benchmark: "results/benchmarks/domain_candidates.tsv"
        shell:
            "{DORMANT} domains candidates --db {input.db:q} --config {params.settings:q} --out results "
            "--models {params.models} > {log:q} 2>&1"

    rule domain_ablate:
        """Per-example loss change from zeroing (and mean-ablating) each of one model's top candidate heads."""
        input:
            cands="results/domains/candidates.parquet",
            data=expand("results/data/corpora/{corpus}.jsonl", corpus=CORPORA),
        output: "results/domains/{model}/head_ablation.parquet"
        wildcard_constraints: model="|".join(_re.escape(k) for k in DOMAIN_MODELS) or "^$"
        params:
            settings=DOMAIN_ABLATE,
            name=lambda w: DOMAIN_MODELS[w.model],
            dtype=DOM.get("dtype", config["scoring"]["dtype"]),
        threads: DOM["threads"]
        resources: mem_mb=config["resources"]["mem_mb"], gpu=config["resources"]["gpu"]
        log: "results/logs/domain_ablate/{model}.log"
        benchmark: "results/benchmarks/domain_ablate/{model}.tsv"
        shell:
            "OMP_NUM_THREADS={threads} {DORMANT} domains ablate --model {params.name:q} --candidates {input.cands:q} "
            "--data {input.data:q} --config {params.settings:q} "
            "--threads {threads} --dtype {params.dtype} --device {config[scoring][device]} "
            "--out {output:q} 2> {log:q}"

    rule domain_scatter:
        """Active-dormant scatter per model (loss change vs per-example awft) and its summary table."""
        input:
            abl=expand("results/domains/{model}/head_ablation.parquet", model=DOMAIN_MODELS),
            cands="results/domains/candidates.parquet",
        output:
            tables=multiext("results/tables/domain_scatter", ".csv", ".md", ".tex"),
            figures=[report(f, category="Active-dormant mechanism") if f.endswith(".png") else f
                     for f in expand("results/figures/domain_scatter_{model}.{ext}", model=DOMAIN_MODELS,
                                     ext=["png", "svg"])],
        log: "results/logs/domain_scatter.log"
        benchmark: "results/benchmarks/domain_scatter.tsv"
        params: cands=lambda w, input: f"--candidates {input.cands}" if DOM["score_fn"] == "awft" else ""
        shell: "{DORMANT} domains scatter --ablation {input.abl:q} {params.cands} --out results > {log:q} 2>&1"

    if DOMAIN_MODELS:
        EXTRA_TABLES.setdefault("domain_head_ablation", []).extend(rules.domain_scatter.input.abl)
        EXTRA_TARGETS.extend(rules.domain_scatter.output)
    EXTRA_TARGETS.extend(rules.domain_candidates.output)
