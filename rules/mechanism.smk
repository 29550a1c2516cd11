# The active-dormant mechanism (SPEC §7): Bigram-Backcopy toy transformers and dormant-by-domain heads.
#   default target: the `core` toy runs (1-layer softmax AdamW) with their figures, and the domain analysis
#   snakemake --cores all toy_all     # every toy run (AdamW vs SGD, softmax vs ReLU, 1 vs 3 layers) + bb_metrics DB
#   snakemake --cores all toy_seeds   # the same runs with the extra seeds of mechanism.toy.seeds: claims per seed
# Config: the `mechanism` section (config/schema.yaml).
import re as _re

MECH = config.get("mechanism")
if MECH:
    TOY = MECH["toy"]
    DOM = MECH["domains"]
    TOY_SETS = {s: list(runs) for s, runs in TOY["sets"].items()}
    for _s, _runs in TOY_SETS.items():
        for _r in _runs:
            if _r not in TOY["runs"]:
                raise ValueError(f"config key mechanism.toy.sets.{_s} names run {_r!r}, which is not in "
                                 f"mechanism.toy.runs ({', '.join(TOY['runs'])})")
    # `mechanism.toy.seeds`: every run of the `all` set again with each of these seeds, as <run>_seed<n>
    TOY_SEED_RUNS = list(TOY_SETS["all"])
    for _r in TOY_SETS["all"]:
        _own = {**TOY["defaults"], **TOY["runs"][_r]}["seed"]
        for _sd in TOY.get("seeds", []):
            if _sd == _own:
                raise ValueError(f"config key mechanism.toy.seeds: seed {_sd} is run {_r!r}'s own seed; "
                                 "list only the extra seeds")
            if f"{_r}_seed{_sd}" in TOY["runs"]:
                raise ValueError(f"config key mechanism.toy.runs: {_r}_seed{_sd} is the name mechanism.toy.seeds "
                                 f"gives run {_r!r} with seed {_sd}; rename that run")
            TOY["runs"][f"{_r}_seed{_sd}"] = {**TOY["runs"][_r], "seed": _sd}
            TOY_SEED_RUNS.append(f"{_r}_seed{_sd}")
    for _m in DOM["ablate_models"]:
        if _m not in config["models"]:
            raise ValueError(f"config key mechanism.domains.ablate_models: {_m!r} is not in `models`; add it there too")
    TOY_TABLES = ["claims", "final", "interventions"]
    TOY_FIGURES = ["dynamics", "compare", "interventions"]
    DOMAIN_MODELS = {key(m): m for m in DOM["ablate_models"]}

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

    rule domain_candidates:
        """Heads dormant on one domain and active on another: table, one figure per model, candidates."""
        input: CORE_DB
        output:
            cands="results/domains/candidates.parquet",
            tables=multiext("results/tables/domain_heads", ".csv", ".md", ".tex"),
            figures=[report(f, category="Active-dormant mechanism") if f.endswith(".png") else f
                     for f in expand("results/figures/domain_heads_{model}.{ext}", model=MODELS, ext=["png", "svg"])],
        params:
            models=" ".join(f"{m!r}" for m in MODELS.values()),
            d=DOM,
        log: "results/logs/domain_candidates.log"
        benchmark: "results/benchmarks/domain_candidates.tsv"
        shell:
            "{DORMANT} domains candidates --db {input:q} --out results --score-fn {params.d[score_fn]} "
            "--top {params.d[top]} --fraction {params.d[fraction]} --models {params.models} > {log:q} 2>&1"

    rule domain_ablate:
        """Per-example loss change from zeroing (and mean-ablating) each of one model's top candidate heads."""
        input:
            cands="results/domains/candidates.parquet",
            data=expand("results/data/corpora/{corpus}.jsonl", corpus=CORPORA),
        output: "results/domains/{model}/head_ablation.parquet"
        wildcard_constraints: model="|".join(_re.escape(k) for k in DOMAIN_MODELS) or "^$"
        params:
            name=lambda w: DOMAIN_MODELS[w.model],
            d=DOM,
            limit=f"--limit {DOM['limit']}" if DOM.get("limit") else "",
            max_tokens=f"--max-tokens {DOM['max_tokens']}" if DOM.get("max_tokens") else "",
            bos="" if config["scoring"]["prepend_bos"] else "--no-bos",
            mean="--mean" if DOM.get("mean_ablation") else "",
        threads: DOM["threads"]
        resources: mem_mb=config["resources"]["mem_mb"], gpu=config["resources"]["gpu"]
        log: "results/logs/domain_ablate/{model}.log"
        benchmark: "results/benchmarks/domain_ablate/{model}.tsv"
        shell:
            "OMP_NUM_THREADS={threads} {DORMANT} domains ablate --model {params.name:q} --candidates {input.cands:q} "
            "--data {input.data:q} --heads {params.d[heads]} {params.limit} {params.max_tokens} {params.bos} {params.mean} "
            "--threads {threads} --dtype {config[scoring][dtype]} --device {config[scoring][device]} "
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

    EXTRA_TABLES.setdefault("bb_metrics", []).extend(
        expand("results/toy/{run}/metrics.parquet", run=TOY_SETS[TOY["database_set"]]))
    if DOMAIN_MODELS:
        EXTRA_TABLES.setdefault("domain_head_ablation", []).extend(rules.domain_scatter.input.abl)
        EXTRA_TARGETS.extend(rules.domain_scatter.output)
    EXTRA_TARGETS.extend(_toy_outputs("core"))
    EXTRA_TARGETS.extend(rules.domain_candidates.output)
