# Score distributions (definitions §6): base vs finetuned, across scales, null and positive-control calibration.
#   default target: the finetune and perturbed copy (DERIVED: scored like the config's models), then the
#   `distributions` rule: distribution_tests (-> results/scores.duckdb), tables, figures, HTML explorer.
# Config: the `distributions` section (config/schema.yaml; cross-checks in rules/common.smk); left out = no such rules.
DIST = config.get("distributions")
if DIST:
    _FT = DIST.get("finetune")
    _PT = DIST.get("perturb")
    FINETUNE_LOG = f"results/distributions/finetune_{_FT['name']}.parquet" if _FT else None

    if _FT:
        DERIVED[model_key(_FT["name"])] = f"results/derived/{model_key(_FT['name'])}"

        _FT_SETTINGS = settings_json({k: v for k, v in _FT.items() if k not in ("base", "name", "threads")})

        rule finetune:
            """Supervised finetune of the base model on BIG-bench natural_instructions (a base/finetuned pair)."""
            input:
                data="results/data/sources.txt",
            output:
                model=directory(DERIVED[model_key(_FT["name"])]),
                log=FINETUNE_LOG,
            params:
                f=_FT,
                settings=_FT_SETTINGS,
            threads: _FT["threads"]
            resources: mem_mb=config["resources"]["mem_mb"]
            log: f"results/logs/finetune/{_FT['name']}.log"
            benchmark: f"results/benchmarks/finetune/{_FT['name']}.tsv"
            shell:
                "OMP_NUM_THREADS={threads} {DORMANT} finetune --base {params.f[base]:q} --name {params.f[name]:q} "
                "--config {params.settings:q} --threads {threads} --out {output.model:q} --log {output.log:q} 2> {log:q}"

    if _PT:
        DERIVED[model_key(_PT["name"])] = f"results/derived/{model_key(_PT['name'])}"

        rule perturb:
            """The positive control: a copy of the base model with seeded noise on its q/k projections."""
            output: directory(DERIVED[model_key(_PT["name"])])
            params:
                p=_PT,
                settings=settings_json({k: _PT[k] for k in ("scale", "seed")}),
            threads: 1
            resources: mem_mb=config["resources"]["mem_mb"]
            log: f"results/logs/perturb/{_PT['name']}.log"
            benchmark: f"results/benchmarks/perturb/{_PT['name']}.tsv"
            shell:
                "OMP_NUM_THREADS={threads} {DORMANT} perturb --base {params.p[base]:q} --name {params.p[name]:q} "
                "--config {params.settings:q} --threads {threads} --out {output:q} 2> {log:q}"

    _DIST_FIGS = ["dist_effects", "dist_wasserstein_matrix"] + (["finetune_loss"] if _FT else [])

    rule distributions:
        """KS / Wasserstein / overlap comparisons with bootstrap CIs, figures and the interactive explorer."""
        input:
            db=CORE_DB,
            logs=[FINETUNE_LOG] if _FT else [],
        output:
            tests="results/distributions/distribution_tests.parquet",
            tables=[report(f, category="Finetuning and scale") if f.endswith("distribution_tests.csv") else f
                    for f in expand("results/tables/{t}.{ext}", t=["distribution_tests", "distribution_tests_full"],
                                    ext=["csv", "md", "tex"])],
            figures=[report(f, category="Finetuning and scale") if f.endswith(".png") else f
                     for f in expand("results/figures/{f}.{ext}", f=_DIST_FIGS, ext=["png", "svg"])],
            per_model=directory("results/figures/distributions"),
            explorer=report("results/distribution_explorer.html", category="Finetuning and scale"),
        params:
            settings=settings_json({k: DIST[k] for k in ("n_boot", "n_perm", "depth_bins",
                                                                          "target_fraction", "seed")}),
            series=" ".join("--series " + " ".join([s["kind"]] + [repr(m) for m in s["models"]])
                            for s in DIST["series"]),
            null=("--null " + " ".join(repr(m) for m in DIST["null_models"])) if DIST.get("null_models") is not None
                 else "",
            logs=f"--finetune-log {FINETUNE_LOG!r}" if _FT else "",
        threads: 1
        resources: mem_mb=config["resources"]["mem_mb"]
        log: "results/logs/distributions.log"
        benchmark: "results/benchmarks/distributions.tsv"
        shell:
            "OMP_NUM_THREADS={threads} {DORMANT} distributions --db {input.db:q} --out results {params.series} "
            "{params.null} --config {params.settings:q} {params.logs} "
            "--tests-out {output.tests:q} --explorer {output.explorer:q} > {log:q} 2>&1"

    EXTRA_TABLES.setdefault("distribution_tests", []).append(rules.distributions.output.tests)
    if _FT:
        EXTRA_TABLES.setdefault("finetune_log", []).append(FINETUNE_LOG)
    EXTRA_TARGETS.extend(rules.distributions.output)
