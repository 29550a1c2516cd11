"""A small supervised finetune (SFT) that makes a base → finetuned sibling offline (definitions §6).

Data: BIG-bench ``natural_instructions`` subtasks (read from the sdist). Each example becomes
``"{instruction}\\n\\n{input}\\nAnswer:"`` + ``" {target}<eos>"``; the instruction is the subtask's short
``Prompt:`` line (else its definition). The loss is next-token cross-entropy on the response tokens only
(the LM head runs on those positions only). Examples are drawn per subtask with a seeded generator and split
into disjoint train and held-out sets; sequences longer than ``max_tokens`` are skipped.

Training: full finetune of the decoder layers (embeddings, tied LM head and final norm frozen), AdamW with
linear warm-up and decay, fixed seed; the held-out loss is measured before training, every
``eval_every`` steps and at the end. The model is saved by ``extract.models.derived.save_derived`` as a local
Hugging Face directory (safetensors, config, tokenizer) with a ``source.json`` whose ``name`` becomes the
model id in the database.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import polars as pl
from tqdm.auto import tqdm

from extract.errors import DormantError

DEFAULT_SUBTASKS = ("subtask041_qasc_answer_generation", "subtask033_winogrande_answer_generation",
                    "subtask047_misc_answering_science_questions", "subtask013_mctaco_answer_generation_absolute_timepoint",
                    "subtask016_mctaco_answer_generation_frequency", "subtask037_qasc_generate_related_fact",
                    "subtask046_miscellaenous_question_typing", "subtask050_multirc_answerability")


@dataclass(frozen=True)
class SFTConfig:
    """Budget and hyper-parameters of :func:`finetune` (token counts are of the model's tokenizer)."""
    subtasks: tuple[str, ...] = DEFAULT_SUBTASKS
    n_train: int = 128          # training sequences (one epoch)
    n_heldout: int = 32         # held-out sequences (disjoint examples)
    max_tokens: int = 80        # longest sequence kept (prompt + response)
    batch_size: int = 8
    lr: float = 5e-5
    warmup: int = 3             # steps of linear warm-up
    weight_decay: float = 0.0
    eval_every: int = 8         # steps between held-out evaluations
    seed: int = 0


@dataclass
class SFTExample:
    ids: list[int]
    n_prompt: int               # tokens of the prompt; the loss covers ids[n_prompt:]
    subtask: str


@dataclass
class SFTResult:
    log: pl.DataFrame           # step, split ("train" / "heldout"), loss (nats per response token), tokens, lr, seconds
    heldout_before: float
    heldout_after: float
    seconds: float
    n_trainable: int
    info: dict = field(default_factory=dict)


def instruction(task: dict) -> str:
    """The short instruction of a natural_instructions subtask (its ``Prompt:`` line, else its definition)."""
    prefix = task.get("task_prefix") or task.get("description") or ""
    if "Prompt:" in prefix:
        return prefix.rsplit("Prompt:", 1)[1].strip()
    return prefix.removeprefix("Definition:").strip()


def format_example(instr: str, inp: str, target: str) -> tuple[str, str]:
    """(prompt, response) texts of one example."""
    return f"{instr}\n\n{inp.strip()}\nAnswer:", f" {target.strip()}"


def sft_examples(tok, cfg: SFTConfig, tasks: dict[str, dict] | None = None) -> tuple[list[SFTExample], list[SFTExample]]:
    """Disjoint (train, held-out) examples, round-robin over ``cfg.subtasks``, seeded.

    ``tasks``: subtask name -> parsed task.json (default: read from the BIG-bench sdist).
    """
    if tasks is None:
        from extract.data import bigbench

        paths = [f"natural_instructions/{s}" for s in cfg.subtasks]
        tasks = {p.split("/", 1)[1]: d for p, d in bigbench.read_tasks(paths).items()}
    rng = random.Random(f"sft|{cfg.seed}")
    pools = {}
    for name in cfg.subtasks:
        if name not in tasks:
            raise DormantError(f"natural_instructions subtask {name!r} not found; list them with "
                               f"`dormant data tasks --all | grep natural_instructions`")
        order = list(range(len(tasks[name]["examples"])))
        rng.shuffle(order)
        pools[name] = (instruction(tasks[name]), tasks[name]["examples"], order)
    need = cfg.n_train + cfg.n_heldout
    picked: list[SFTExample] = []
    cursor = {n: 0 for n in cfg.subtasks}
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    while len(picked) < need:
        progressed = False
        for name in cfg.subtasks:
            instr, examples, order = pools[name]
            while cursor[name] < len(order) and len(picked) < need:
                ex = examples[order[cursor[name]]]
                cursor[name] += 1
                target = ex["target"][0] if isinstance(ex.get("target"), list) else ex.get("target")
                if not target:
                    continue
                prompt, response = format_example(instr, ex["input"], str(target))
                p = bos + tok(prompt, add_special_tokens=False)["input_ids"]
                r = tok(response, add_special_tokens=False)["input_ids"] + eos
                if len(p) + len(r) <= cfg.max_tokens:
                    picked.append(SFTExample(p + r, len(p), name))
                    progressed = True
                    break
        if not progressed:
            raise DormantError(f"only {len(picked)} natural_instructions examples fit max_tokens={cfg.max_tokens}; "
                               f"raise max_tokens or lower n_train/n_heldout")
    rng.shuffle(picked)
    return picked[:cfg.n_train], picked[cfg.n_train:]


def _batch(examples: Sequence[SFTExample], pad_id: int):
    """Right-padded ``ids (B, S)``, ``attention_mask (B, S)`` and ``targets (B, S)`` (-100 = no loss)."""
    import torch

    S = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), S), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    tgt = torch.full_like(ids, -100)
    for i, e in enumerate(examples):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        mask[i, :n] = 1
        tgt[i, e.n_prompt - 1:n - 1] = torch.tensor(e.ids[e.n_prompt:])  # position t predicts token t+1
    return ids, mask, tgt


def response_loss(model, examples: Sequence[SFTExample], pad_id: int):
    """(summed cross-entropy in nats over the response tokens of ``examples`` (a tensor), their count)."""
    import torch

    ids, mask, tgt = _batch(examples, pad_id)
    hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    sel = tgt != -100
    logits = model.lm_head(hidden[sel]).float()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.nn.functional.cross_entropy(logits, tgt[sel], reduction="sum"), int(sel.sum())


def heldout_loss(model, examples: Sequence[SFTExample], pad_id: int, batch_size: int) -> float:
    """Mean cross-entropy per response token (nats) on ``examples``, no gradients."""
    import torch

    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            s, k = response_loss(model, examples[i:i + batch_size], pad_id)
            total, n = total + float(s), n + k
    return total / max(n, 1)


def trainable_parameters(model) -> list:
    """Freeze everything but the decoder layers; returns the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    from extract.engine.hooks import decoder_layers

    params = list(decoder_layers(model).parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def finetune(model, tok, train: Sequence[SFTExample], heldout: Sequence[SFTExample], cfg: SFTConfig,
             progress: bool = True) -> SFTResult:
    """One epoch of SFT over ``train`` (in place); logs train loss per step and held-out loss."""
    import torch

    if not train:
        raise DormantError("no training examples; raise n_train")
    torch.manual_seed(cfg.seed)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    params = trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))
    steps = math.ceil(len(train) / cfg.batch_size)

    def lr_at(step: int) -> float:  # step 1..steps
        if step <= cfg.warmup:
            return cfg.lr * step / max(cfg.warmup, 1)
        return cfg.lr * max(0.0, (steps - step + 1) / max(steps - cfg.warmup, 1))

    rows = []
    t0 = time.perf_counter()
    model.eval()  # no dropout either way; eval() keeps the forward identical to scoring
    before = heldout_loss(model, heldout, pad_id, cfg.batch_size)
    rows.append((0, "heldout", before, 0, 0.0, time.perf_counter() - t0))
    for step in tqdm(range(1, steps + 1), desc="finetune", disable=not progress):
        chunk = train[(step - 1) * cfg.batch_size:step * cfg.batch_size]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        s, n = response_loss(model, chunk, pad_id)
        (s / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rows.append((step, "train", s.item() / n, n, lr_at(step), time.perf_counter() - t0))
        if step % cfg.eval_every == 0 or step == steps:
            rows.append((step, "heldout", heldout_loss(model, heldout, pad_id, cfg.batch_size), 0, lr_at(step),
                         time.perf_counter() - t0))
    for p in model.parameters():
        p.requires_grad_(False)
    log = pl.DataFrame(rows, schema={"step": pl.Int64, "split": pl.String, "loss": pl.Float64, "tokens": pl.Int64,
                                     "lr": pl.Float64, "seconds": pl.Float64}, orient="row")
    after = log.filter(pl.col("split") == "heldout")["loss"][-1]
    return SFTResult(log, before, after, time.perf_counter() - t0, sum(p.numel() for p in params),
                     {"steps": steps, "train_examples": len(train), "heldout_examples": len(heldout),
                      "train_tokens": int(log["tokens"].sum())})


def config_dict(cfg: SFTConfig) -> dict:
    d = asdict(cfg)
    d["subtasks"] = list(cfg.subtasks)
    return d
