# Scoring (definitions §2): fetch and describe each model, sample the corpora, score every head of every document
# (one job per model x corpus x shard), and load the shards into the core database.
SCORED = {**MODELS, **DERIVED}  # every model scored on every corpus (DERIVED: rules/distributions.smk)
SCORE_FIGURES = expand("results/figures/score_ecdf_{fn}.{ext}", fn=["ahon_ln", "awft", "aeqd"], ext=["png", "svg"])


def _derived_input(w):
    return [DERIVED[w.model]] if w.model in DERIVED else []


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


CORPUS = settings_json({k: config["corpora"][k] for k in ("n", "min_tokens", "max_tokens", "seed")})


rule corpus:
    """N documents of a corpus with seeded lengths in [min_tokens, max_tokens]."""
    input:
        sources=rules.fetch_data.output,
    output: "results/data/corpora/{corpus}.jsonl"
    params:
        settings=CORPUS,
    log: "results/logs/corpus/{corpus}.log"
    shell: "{DORMANT} data corpus {wildcards.corpus} --config {params.settings:q} --out {output:q} 2> {log:q}"


SCORING = settings_json({k: config["scoring"][k] for k in ("batch_tokens", "dtype", "device",
                                                                      "prepend_bos")})


rule score:
    """The head scores of every head on one shard of a corpus (atomic Parquet)."""
    input:
        info="results/models/{model}.json",
        data="results/data/corpora/{corpus}.jsonl",
    output: "results/scores/{model}/{corpus}/shard-{shard}.parquet"
    params:
        settings=SCORING,
        name=lambda w: SCORED[w.model],
        i=lambda w: w.shard.split("-of-")[0],
    threads: THREADS
    resources: mem_mb=config["resources"]["mem_mb"], gpu=config["resources"]["gpu"]
    log: "results/logs/score/{model}/{corpus}/{shard}.log"
    benchmark: "results/benchmarks/score/{model}/{corpus}/{shard}.tsv"
    shell:
        "OMP_NUM_THREADS={threads} {DORMANT} score --model {params.name:q} --data {input.data:q} "
        "--dataset {wildcards.corpus} --shard {params.i} --num-shards {NSHARDS} --config {params.settings:q} "
        "--out {output:q} 2> {log:q}"


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
