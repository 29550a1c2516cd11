# Last: the final database (the core plus every module's EXTRA_TABLES), the summary and the paper.
import shutil

HAVE_TEX = shutil.which("latexmk") is not None and shutil.which("pdflatex") is not None  # the paper rule's engine

rule database:
    """results/scores.duckdb: the core database plus every analysis table (copied, ingested, renamed)."""
    input:
        core=CORE_DB,
        extra=[f for files in EXTRA_TABLES.values() for f in files],
    output: "results/scores.duckdb"
    params: tables=" ".join(f"--table {t}={f}" for t, files in EXTRA_TABLES.items() for f in files)
    log: "results/logs/database.log"
    shell: "{DORMANT} db build --db {output:q} --base {input.core:q} {params.tables} > {log:q} 2>&1"


rule summarize:
    """Score-distribution tables, figures and the human-readable run summary."""
    input: "results/scores.duckdb"
    output:
        summary="results/summary.md",
        table=report("results/tables/score_summary.csv", category="Tables"),
        tables=multiext("results/tables/score_summary", ".md", ".tex"),
        figures=[report(f, category="Score distributions") if f.endswith(".png") else f for f in SCORE_FIGURES],
    log: "results/logs/summarize.log"
    shell: "{DORMANT} report --db {input:q} --out results > {log:q} 2>&1 && cat {output.summary:q}"


rule paper:
    """The manuscript: paper/main.tex with the generated tables and figures (latexmk when installed; the
    results/paper/main.pdf beside status.txt). The engine is a parameter, so a run skipped for want of TeX
    is redone once TeX is installed."""
    input:
        tex="paper/main.tex",
        tables=rules.summarize.output.tables,
        figures=rules.summarize.output.figures,
        ablation=rules.ablation_report.output,
        analyses=EXTRA_TARGETS,  # every analysis the manuscript includes (domains, toy, MAPS, distributions)
    output: "results/paper/status.txt"
    params: tex=HAVE_TEX
    log: "results/logs/paper.log"
    shell: "{DORMANT} paper --tex {input.tex:q} --out results/paper > {log:q} 2>&1"
