# Shared by every rule module: the `dormant` command, model keys, every check of the config as a whole (the
# schema checks each value; these check how values refer to each other), the lists several modules use, and
# a study's settings as the inline JSON its command reads with --config.
import json
import os
import sys
from pathlib import Path

from analysis.core.names import model_key
from analysis.core.score_functions import check_score_key, load_plugins
from extract.data.tasks import get_task  # no torch: cheap at DAG start
from extract.errors import DormantError
from extract.models.zoo import model_name_problem  # standard library only: cheap at DAG start

DORMANT = f"{sys.executable} -m extract.cli"


load_plugins()  # score functions registered by $DORMANT_PLUGINS modules (the jobs load them too)


def check_config(cfg):
    """Every cross-reference of the config, checked before any job starts (ValueError naming the key)."""
    models = cfg["models"]
    for i, fn in enumerate(cfg["evaluation"]["score_functions"]):
        try:
            check_score_key(fn)
        except ValueError as e:
            raise ValueError(f"config key evaluation.score_functions[{i}]: {e}") from None
    for i, m in enumerate(models):
        if problem := model_name_problem(m):
            raise ValueError(f"config key models[{i}] = {m!r}: {problem}")
    for i, m in enumerate(cfg["evaluation"]["models"]):
        if m not in models:
            raise ValueError(f"config key evaluation.models[{i}] = {m!r} is not in `models`; add it there too")
    cand = cfg["evaluation"].get("candidates") or {}
    screened = [("evaluation.candidates.models", m) for m in cand.get("models", [])]
    screened += [(f"evaluation.candidates.screens.{s}.models", m) for s, v in cand.get("screens", {}).items()
                 for m in v.get("models", [])]
    for where, m in screened:
        if m not in models:
            raise ValueError(f"config key {where}: {m!r} is not in `models`; add it there too")
    named = [("evaluation.tasks", t) for t in cfg["evaluation"]["tasks"]]
    named += [(f"evaluation.candidates.screens.{s}.tasks", t) for s, v in cand.get("screens", {}).items() for t in v["tasks"]]
    for where, t in named:
        try:
            get_task(t)
        except DormantError as e:
            raise ValueError(f"config key {where}: {e}") from None
    if 0.0 not in cfg["evaluation"]["fractions"]:
        raise ValueError("config key evaluation.fractions must contain 0.0 (the baseline)")
    c = cfg["corpora"]
    if c["min_tokens"] > c["max_tokens"]:
        raise ValueError(f"config keys corpora.min_tokens ({c['min_tokens']}) > corpora.max_tokens "
                         f"({c['max_tokens']})")
    keys = [model_key(m) for m in models]
    if len(set(keys)) < len(keys):
        raise ValueError(f"config key models: two models share a file key ({keys}); rename one")
    derived = []
    dist = cfg.get("distributions")
    if dist:
        for part in ("finetune", "perturb"):
            d = dist.get(part)
            if not d:
                continue
            if d["base"] not in models:
                raise ValueError(f"config key distributions.{part}.base = {d['base']!r} is not in `models`; add it there")
            if model_key(d["name"]) in keys + [model_key(n) for n in derived]:
                raise ValueError(f"config key distributions.{part}.name = {d['name']!r} is already a model key; rename it")
            derived.append(d["name"])
        known = list(models) + derived
        for i, s in enumerate(dist["series"]):
            for m in s["models"]:
                if m not in known:
                    raise ValueError(f"config key distributions.series[{i}].models: {m!r} is neither in `models` nor "
                                     f"a derived model ({', '.join(derived) or 'none'}); add it or fix the name")
        for m in dist.get("null_models") or []:
            if m not in known:
                raise ValueError(f"config key distributions.null_models: {m!r} is not a configured or derived model")
    mech = cfg.get("mechanism")
    if mech:
        toy = mech["toy"]
        for s, runs in toy["sets"].items():
            for r in runs:
                if r not in toy["runs"]:
                    raise ValueError(f"config key mechanism.toy.sets.{s} names run {r!r}, which is not in "
                                     f"mechanism.toy.runs ({', '.join(toy['runs'])})")
        for r in toy["sets"]["all"]:
            own = {**toy["defaults"], **toy["runs"][r]}["seed"]
            for sd in toy.get("seeds", []):
                if sd == own:
                    raise ValueError(f"config key mechanism.toy.seeds: seed {sd} is run {r!r}'s own seed; "
                                     "list only the extra seeds")
                if f"{r}_seed{sd}" in toy["runs"]:
                    raise ValueError(f"config key mechanism.toy.runs: {r}_seed{sd} is the name mechanism.toy.seeds "
                                     f"gives run {r!r} with seed {sd}; rename that run")
        try:
            check_score_key(mech["domains"]["score_fn"])
        except ValueError as e:
            raise ValueError(f"config key mechanism.domains.score_fn: {e}") from None
        for m in mech["domains"]["ablate_models"]:
            if m not in models:
                raise ValueError(f"config key mechanism.domains.ablate_models: {m!r} is not in `models`; add it there too")
    if cfg.get("maps"):
        for m in cfg["maps"]["models"]:
            if m not in models:
                raise ValueError(f"config key maps.models: {m!r} is not in `models`; add it there too")


check_config(config)


def settings_json(settings):
    """A study's settings (a dict of its config section) as the inline JSON its command reads with --config.
    Passed as a rule's params, so a job reruns when its settings change (Snakemake's params trigger) and only
    then: no settings file whose timestamp a dry run of another profile could renew."""
    return json.dumps(settings, sort_keys=True, separators=(",", ":"))


MODELS = {model_key(m): m for m in config["models"]}  # key -> the name given in the config
CORPORA = config["corpora"]["names"]
NSHARDS = config["scoring"]["shards"]
SHARDS = [f"{i}-of-{NSHARDS}" for i in range(NSHARDS)]
THREADS = config["scoring"].get("threads") or os.cpu_count() or 1  # snakemake caps it at --cores
EV = config["evaluation"]
SWEEP_MODELS = [model_key(m) for m in EV["models"]]
SWEEP_DIR = f"results/ablation/{EV['task_name']}"
CORE_DB = "results/db/core.duckdb"  # models, examples, head_scores: what the analyses read (no cycle, no wait)
EXTRA_TABLES = {}   # database table -> Parquet files that the final `database` rule upserts
EXTRA_TARGETS = []  # inputs of `all`
DERIVED = {}        # model key -> local model directory made by a rule, scored like the config's models

wildcard_constraints:
    model="[A-Za-z0-9_-]+",
    corpus="[a-z0-9_]+",
    shard=r"\d+-of-\d+",
