"""Every table of the score database, declared once: ordered columns with their types, primary key, a doc.

``analysis.database`` builds the DuckDB DDL and the migrations from these declarations, and producers that
build a frame for a table take its polars schema from here (:func:`polars_schema`), so a table's columns are
written in one place. Column types use one small vocabulary (:data:`TYPES`) that maps to both DuckDB SQL
types and polars dtypes: ``str``, ``int32``, ``int64``, ``float64``, ``bool``.

The score columns of ``head_scores`` and ``calibration_scores`` (one DOUBLE per score function, after the
key columns) are not listed here: they are the registered score functions of
:mod:`analysis.core.score_functions`, read each time a table's columns are asked for, so a function
registered later appears too. ``added``: columns added after the table first shipped; a database built
before gets them on its next writable open (``analysis.database.migrations``). ``null_as``: a key column
that is NULL in the producers' frames where it does not apply (``bb_metrics.layer`` of a model-level
metric) is stored as this sentinel in the database, since a primary key cannot hold NULL; ingestion maps
NULL to it (``analysis.database.ingest``).

Standard library only (polars is imported inside :func:`polars_dtype`): importable anywhere.
``python -m analysis.core.tables`` prints every table with its columns.
"""
from __future__ import annotations

from dataclasses import dataclass

from analysis.core.score_functions import score_keys

# vocabulary type -> (DuckDB SQL type, polars dtype name)
TYPES: dict[str, tuple[str, str]] = {
    "str": ("VARCHAR", "String"),
    "int32": ("INTEGER", "Int32"),
    "int64": ("BIGINT", "Int64"),
    "float64": ("DOUBLE", "Float64"),
    "bool": ("BOOLEAN", "Boolean"),
}
RUN_KEY = "dormant_heads.run"  # Parquet key-value metadata of a score shard: its ``runs`` row as JSON
SCORES = "*scores"  # in a column list: one float64 column per registered score function, in registry order


def sql_type(type_: str) -> str:
    """The DuckDB type of a vocabulary type (``"int32"`` -> ``"INTEGER"``)."""
    return TYPES[type_][0]


def polars_dtype(type_: str):
    """The polars dtype of a vocabulary type (``"int32"`` -> ``pl.Int32``)."""
    import polars as pl

    return getattr(pl, TYPES[type_][1])


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # a TYPES key
    doc: str = ""
    null_as: str | int | None = None  # a key column's stored value for NULL in a frame (None: never NULL)

    def __post_init__(self):
        if self.type not in TYPES:
            raise ValueError(f"column {self.name}: type {self.type!r} is not one of {', '.join(TYPES)}")

    @property
    def sql_type(self) -> str:
        return sql_type(self.type)


@dataclass(frozen=True)
class Table:
    """One table: ``spec`` holds its :class:`Column` s in order (and :data:`SCORES` where the score columns go)."""
    name: str
    key: tuple[str, ...]
    doc: str
    spec: tuple[Column | str, ...]
    added: tuple[str, ...] = ()

    def __post_init__(self):
        fixed = [c.name for c in self.spec if isinstance(c, Column)]
        if any(c != SCORES for c in self.spec if not isinstance(c, Column)):
            raise ValueError(f"table {self.name}: a column spec is a Column or SCORES")
        if len(set(fixed)) != len(fixed):
            raise ValueError(f"table {self.name}: repeated column names")
        for what, names in (("key", self.key), ("added", self.added)):
            if missing := [n for n in names if n not in fixed]:
                raise ValueError(f"table {self.name}: {what} column(s) {missing} are not columns")
        if loose := [c.name for c in self.spec if isinstance(c, Column) and c.null_as is not None
                     and c.name not in self.key]:
            raise ValueError(f"table {self.name}: null_as on non-key column(s) {loose} (only a key needs one)")

    @property
    def columns(self) -> tuple[Column, ...]:
        """Every column in order, the score columns as registered now."""
        out: list[Column] = []
        for c in self.spec:
            if isinstance(c, Column):
                out.append(c)
            else:
                out += [Column(k, "float64", "raw score (analysis.core.score_functions)") for k in score_keys()]
        return tuple(out)

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def has_scores(self) -> bool:
        return SCORES in self.spec


def _columns(spec: str, *, null_as: dict[str, str | int] | None = None, **docs: str) -> tuple[Column | str, ...]:
    """``"name type, name type, *scores, ..."`` -> column specs; ``docs``: column name -> doc; ``null_as``:
    column name -> its stored value for NULL."""
    out: list[Column | str] = []
    null_as = dict(null_as or {})
    for item in spec.split(","):
        item = item.strip()
        if item == SCORES:
            out.append(SCORES)
            continue
        name, type_ = item.split()
        out.append(Column(name, type_, docs.pop(name, ""), null_as.pop(name, None)))
    if docs or null_as:
        raise ValueError(f"docs or null_as for unknown columns: {', '.join([*docs, *null_as])}")
    return tuple(out)


def _key(names: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in names.split(","))


_RUN_ID = "the runs row of the sweep that wrote it; NULL in files written before this column"
_JOB_RUN = "the runs row of the job that wrote it (analysis.core.provenance); NULL in files written before this column"

# The tables, in the order they are created.
_TABLES: dict[str, Table] = {t.name: t for t in [
    Table("models", _key("model"), "the ``extract.models.load.model_info`` fields.", _columns(
        "model str, upstream str, family str, variant str, quantisation str, n_params int64, n_layers int32, "
        "n_heads int32, n_kv_heads int32, head_dim int32, d_model int32, source_sha256 str")),
    Table("examples", _key("model, dataset, example"),
          "domain, tokens seen by that model, BOS-first flag, content hash, longer than the trained context.",
          _columns("model str, dataset str, example str, domain str, n_tokens int32, max_tokens int32, "
                   "bos_first bool, sha256 str, beyond_context bool, run_id str",
                   beyond_context="n_tokens > the model's max_position_embeddings (scored anyway, with a warning); "
                                  "NULL for shards written before this column",
                   run_id="the runs row of the score shard that scored it (and its head_scores rows, joined by "
                          "model, dataset, example); NULL for shards written before this column"),
          added=("beyond_context", "run_id")),
    Table("head_scores", _key("model, dataset, example, layer, head"),
          "the raw scores, one column per score function (definitions §2).", _columns(
              "model str, dataset str, example str, layer int32, head int32, *scores")),
    Table("thresholds", _key("model, task, score_fn, target_fraction"), "τ per definitions §3.", _columns(
        "model str, task str, score_fn str, target_fraction float64, threshold float64, n_scores int64, run_id str",
        run_id=_RUN_ID), added=("run_id",)),
    Table("ablation_results", _key("model, task, score_fn, target_fraction"),
          "realized %, accuracy and mean KL per sweep configuration, with paired-bootstrap 95% CIs over the "
          "questions (definitions §4–5).", _columns(
              "model str, task str, score_fn str, target_fraction float64, threshold float64, "
              "realized_percent float64, accuracy float64, n_questions int32, chance float64, "
              "accuracy_ci_low float64, accuracy_ci_high float64, delta_ci_low float64, delta_ci_high float64, "
              "kl_mean float64, kl_ci_low float64, kl_ci_high float64, kl_choices_mean float64, run_id str",
              accuracy="points (0-100)", chance="mean of 1 / choices over the questions, in points",
              delta_ci_low="accuracy minus the baseline's, paired over questions (points)",
              kl_mean="mean over questions of KL(unablated || ablated) of the next-token distribution at the "
                      "answer position (nats)",
              kl_choices_mean="the same KL over the question's choices only (softmax of their log-likelihoods)",
              run_id=_RUN_ID),
          added=("chance", "accuracy_ci_low", "accuracy_ci_high", "delta_ci_low", "delta_ci_high", "kl_mean",
                 "kl_ci_low", "kl_ci_high", "kl_choices_mean", "run_id")),
    Table("ablation_questions", _key("model, task, score_fn, target_fraction, question"),
          "each question under each sweep configuration: the unit the bootstrap resamples (definitions §5).",
          _columns("model str, task str, score_fn str, target_fraction float64, question str, question_task str, "
                   "correct bool, kl float64, kl_choices float64, zeroed int32, triples int32, run_id str",
                   zeroed="(row, layer, head) triples zeroed on the question's forward rows",
                   triples="all (row, layer, head) triples of those rows", run_id=_RUN_ID),
          added=("run_id",)),
    Table("calibration_scores", _key("model, task, question, layer, head"),
          "the same scores on the evaluation prompts.", _columns(
              "model str, task str, question_task str, question str, layer int32, head int32, *scores, run_id str",
              run_id=_RUN_ID), added=("run_id",)),
    Table("distribution_tests", _key("comparison, score_fn, depth_bin, statistic"),
          "definitions §6 statistics with bootstrap CIs.", _columns(
              "comparison str, score_fn str, depth_bin str, statistic str, value float64, ci_low float64, "
              "ci_high float64, p_value float64, n_examples int32, kind str, model_a str, model_b str, run_id str",
              run_id=_JOB_RUN), added=("run_id",)),
    Table("finetune_log", _key("model, step, split"),
          "training / held-out loss of the definitions §6 finetune (nats per token).", _columns(
              "model str, step int32, split str, loss float64, tokens int32, lr float64, seconds float64, run_id str",
              run_id=_JOB_RUN), added=("run_id",)),
    Table("bb_metrics", _key("run, step, metric, layer, part"),
          "Bigram-Backcopy toy-model training metrics (definitions §7): ``layer`` -1 for a model-level metric, ``part`` "
          "the zeroed ``attn`` / ``mlp`` of an intervention, else '' (NULL in metrics.parquet).", _columns(
              "run str, step int32, metric str, layer int32, part str, value float64, run_id str",
              run_id=_JOB_RUN,
              layer="the layer of a per-layer metric or intervention; -1 (NULL in the frame): the whole model",
              part="an intervention's zeroed part of layer (attn, mlp); '' (NULL in the frame): none",
              null_as={"layer": -1, "part": ""}), added=("run_id",)),
    Table("domain_head_ablation", _key("model, dataset, example, layer, head"),
          "loss change (nats/token) from zeroing one dormant-by-domain candidate head, with its per-example "
          "``awft`` and ``ahon_ln`` (definitions §7).", _columns(
              "model str, dataset str, example str, domain str, n_tokens int32, layer int32, head int32, "
              "awft float64, ahon_ln float64, loss_base float64, loss_ablated float64, delta_loss float64, "
              "loss_mean_ablated float64, delta_loss_mean float64, run_id str",
              loss_mean_ablated="NULL unless mean ablation was run",
              delta_loss_mean="NULL unless mean ablation was run", run_id=_JOB_RUN),
          added=("loss_mean_ablated", "delta_loss_mean", "run_id")),
    Table("maps_scores", _key("model, inputs, layer, head, operation"),
          "MAPS static and suppression scores per E' choice (definitions §8).",
          _columns("model str, inputs str, layer int32, head int32, operation str, category str, k int32, "
                   "score float64, suppression_score float64, n_pairs int32, run_id str",
                   inputs="E' of the layers >= 1: reference, raw or residual (extract.maps.folding)",
                   run_id=_JOB_RUN), added=("run_id",)),
    Table("maps_salient", _key("model, layer, head, rank"),
          "each head's most salient tokens and their top targets (definitions §8).", _columns(
              "model str, layer int32, head int32, rank int32, token_id int64, token str, saliency float64, "
              "top_targets str, run_id str", run_id=_JOB_RUN), added=("run_id",)),
    Table("maps_dynamic", _key("model, layer, head, operation, template, context"),
          "MAPS dynamic scores from prompts.", _columns(
              "model str, layer int32, head int32, operation str, template int32, context str, score float64, "
              "n_prompts int32, run_id str", run_id=_JOB_RUN), added=("run_id",)),
    Table("maps_correlations", _key("model, inputs, operation, context"),
          "Pearson r of static (per E' choice) vs dynamic scores.",
          _columns("model str, inputs str, operation str, context str, pearson float64, n int32, "
                   "max_static float64, max_dynamic float64, run_id str",
                   run_id=_JOB_RUN), added=("run_id",)),
    Table("maps_causal", _key("model, inputs, operation, selection, n_heads, draw"),
          "accuracy with heads ablated at the last position (top heads per E' choice).", _columns(
              "model str, inputs str, operation str, selection str, n_heads int32, draw int32, accuracy float64, "
              "base_accuracy float64, n_prompts int32, run_id str",
              run_id=_JOB_RUN), added=("run_id",)),
    Table("maps_inputs", _key("source, model, inputs"),
          "per model and E' choice, the MAPS reference's summary form: median over operations of the "
          "static-vs-dynamic Pearson r and of the relative accuracy drop (top vs random heads), with "
          "bootstrap CIs over operations; the MAPS paper's own rows beside ours.", _columns(
              "source str, model str, inputs str, r_without float64, r_without_low float64, "
              "r_without_high float64, r_with float64, r_with_low float64, r_with_high float64, "
              "r_operations int32, r_undefined int32, n_heads int32, drop_top float64, drop_top_low float64, "
              "drop_top_high float64, drop_random float64, drop_random_low float64, drop_random_high float64, "
              "causal_operations int32, run_id str", run_id=_JOB_RUN,
              source="'this run' or the MAPS paper (Elhelo & Geva)",
              r_undefined="operations left out of the r medians: every head's static score the same (mostly 0)",
              n_heads="heads ablated in the causal columns (the largest count of the run)"), added=("run_id",)),
    Table("score_functions", _key("score_fn"),
          "each registered score function and its inactive side (``>`` or ``<``), written on every writable "
          "open.", _columns("score_fn str, inactive_when str")),
    Table("runs", _key("run_id"),
          "the provenance of each job that wrote results (``analysis.core.provenance``): head_scores join "
          "by ``examples.run_id``, every other result table by its own ``run_id``.", _columns(
              "run_id str, kind str, model str, package_version str, git_commit str, python_version str, "
              "torch_version str, transformers_version str, device str, dtype str, attention_backend str, "
              "model_sha256 str, prompt_format str, config_hash str, config str, start_time str, end_time str",
              run_id="first 16 hex digits of the sha256 of every other field but the times: a rerun of the "
                     "same job on the same code and machine keeps it",
              kind="the job: score, sweep, maps, maps_report, domain_ablate, toy, finetune or distributions", git_commit="HEAD of the checkout, -dirty if changed; or unknown",
              device="cpu, or cuda:N (GPU name)",
              attention_backend="extract.engine.kernels backend of the captured passes",
              model_sha256="the model's source sha256 (models.source_sha256); NULL for a model without one",
              prompt_format="how text became tokens (BOS, chat template and format, scoring, delimiter)",
              config="the job's settings as JSON", config_hash="sha256 of config",
              start_time="UTC, ISO 8601", end_time="UTC, ISO 8601")),
]}


def all_tables() -> tuple[Table, ...]:
    """Every table, in creation order."""
    return tuple(_TABLES.values())


def names() -> tuple[str, ...]:
    return tuple(_TABLES)


def get(name: str) -> Table:
    if name not in _TABLES:
        raise ValueError(f"unknown table {name!r}; tables: {', '.join(_TABLES)}")
    return _TABLES[name]


def columns(name: str) -> tuple[Column, ...]:
    """The columns of table ``name`` in order (score columns as registered now)."""
    return get(name).columns


def column_names(name: str) -> list[str]:
    return list(get(name).column_names)


def polars_schema(name: str, columns: tuple[str, ...] | list[str] | None = None) -> dict:
    """``{column: polars dtype}`` of table ``name``, in table order, or of ``columns`` in the order given
    (for a frame that holds some of the table's columns, or holds them in another order)."""
    cols = {c.name: c for c in get(name).columns}
    picked = list(cols) if columns is None else list(columns)
    if missing := [c for c in picked if c not in cols]:
        raise ValueError(f"table {name} has no column(s) {', '.join(missing)}")
    return {c: polars_dtype(cols[c].type) for c in picked}


def computed_schema(name: str) -> dict:
    """:func:`polars_schema` of the columns a producer computes: every column but ``run_id``, which the job
    that writes the frame adds (``analysis.core.provenance.stamped``)."""
    return polars_schema(name, [c for c in column_names(name) if c != "run_id"])


def describe() -> str:
    """The list of tables as reStructuredText bullets: name, primary key in brackets, doc."""
    return "\n".join(f"* ``{t.name}`` [{', '.join(t.key)}]: {t.doc}" for t in _TABLES.values()) + "\n"


if __name__ == "__main__":
    for t in all_tables():
        print(f"{t.name} [{', '.join(t.key)}]: {t.doc}")
        for c in t.columns:
            print(f"    {c.name:<20} {c.type:<8} {c.doc}")
