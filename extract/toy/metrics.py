"""Bigram-Backcopy metrics of a toy model on a fixed evaluation batch (SPEC §7).

Positions: the prediction made at position ``n`` (of ``x_{n+1}``) is a *backcopy* position when ``x_n`` is a
trigger (``n >= 1``), a *bigram* position otherwise (``n >= 1``); position 0 (``<s>``) is in neither.

Metrics (one float each; per-layer ones end in ``_l<i>``):

* ``loss``: mean next-token cross-entropy on the batch (nats); ``backcopy_risk`` / ``bigram_risk``: mean
  exact excess risk KL(oracle ‖ model) over backcopy / bigram positions (nats, 0 = the oracle).
* ``attn_bos_l<i>``: ``Attn_<s>``, mean ``A[q, 0]`` over non-trigger queries ``q >= 1`` (the sink);
  ``attn_bos_trig_l<i>`` the same on trigger queries; ``attn_prev_trig_l<i>``: mean ``A[q, q-1]`` on trigger
  queries (the backcopy, "active"); ``delta_logit_l<i>``: mean over non-trigger queries of the attention
  logit of ``<s>`` minus the mean logit of the other visible keys; ``attn_self_bos_l<i>``: ``A[0, 0]``, the
  weight of ``<s>`` on itself (1 under softmax; unbounded under ReLU attention, where ``i = 1``).
* ``val_bos_l<i>``: ``‖Val_<s>‖ = ‖W_O v_0‖`` (batch mean); ``val_ratio_l<i>``: it over the mean ``‖W_O v_t‖``
  of positions ``t >= 1``.
* ``res_peak_l<i>``: norm of the block output (residual stream) at position 0; ``res_ratio_l<i>``: it over
  the mean norm at positions ``t >= 1``.
"""
from __future__ import annotations

import torch

from extract.engine import hooks
from extract.toy.data import BigramBackcopy


@torch.no_grad()
def risks(logits: torch.Tensor, x: torch.Tensor, task: BigramBackcopy) -> dict[str, float]:
    """Loss and excess risks from ``logits`` ``(B, S, V)`` on tokens ``x`` ``(B, S)``."""
    logits, x = logits.cpu(), x.cpu()
    logp = logits[:, :-1].double().log_softmax(-1)
    probs, backcopy = task.oracle(x)
    kl = (probs * (probs.clamp_min(1e-300).log() - logp)).sum(-1)  # (B, S-1); 0 log 0 = 0
    bigram = ~backcopy
    bigram[:, 0] = False
    nll = -logp.gather(-1, x[:, 1:, None]).squeeze(-1)
    return {"loss": float(nll.mean()), "backcopy_risk": float(kl[backcopy].mean()),
            "bigram_risk": float(kl[bigram].mean())}


@torch.no_grad()
def measure(model, task: BigramBackcopy, x: torch.Tensor) -> dict[str, float]:
    """Every metric of the module doc on the batch ``x`` ``(B, S)`` (starting with ``<s>``)."""
    with hooks.capture(model, "attn_in") as inputs, hooks.capture(model, "resid_post") as outputs:
        logits = model(x).logits
    out = risks(logits, x, task)
    trig = task.is_trigger(x)
    trig_q, plain_q = trig.clone(), ~trig
    trig_q[:, 0] = plain_q[:, 0] = False
    S = x.shape[1]
    for i, block in enumerate(hooks.decoder_layers(model)):
        attn = block.self_attn
        logit, A, v = attn.weights(inputs[i])
        A, logit = A.mean(1), logit.mean(1)  # one head: (B, S, S)
        out[f"attn_bos_l{i}"] = float(A[..., 0][plain_q].mean())
        out[f"attn_bos_trig_l{i}"] = float(A[..., 0][trig_q].mean())
        prev = torch.diagonal(A, offset=-1, dim1=1, dim2=2)  # (B, S-1): A[q, q-1] for q >= 1
        out[f"attn_prev_trig_l{i}"] = float(prev[trig_q[:, 1:]].mean())
        out[f"attn_self_bos_l{i}"] = float(A[:, 0, 0].mean())
        others = torch.where(torch.isfinite(logit), logit, 0.0)[..., 1:].sum(-1) / torch.arange(S, device=x.device).clamp_min(1)
        out[f"delta_logit_l{i}"] = float((logit[..., 0] - others)[plain_q].mean())
        wo_v = attn.o_proj(v.transpose(1, 2).flatten(2)).norm(dim=-1)  # (B, S)
        out[f"val_bos_l{i}"] = float(wo_v[:, 0].mean())
        out[f"val_ratio_l{i}"] = float(wo_v[:, 0].mean() / wo_v[:, 1:].mean())
        res = outputs[i].norm(dim=-1)
        out[f"res_peak_l{i}"] = float(res[:, 0].mean())
        out[f"res_ratio_l{i}"] = float(res[:, 0].mean() / res[:, 1:].mean())
    return out


def zeroed(model, part: str, layers: list[int] | None = None):
    """Zero the attention output (``part="attn"``: the input of ``o_proj``, SPEC §9) or the MLP output
    (``part="mlp"``) of ``layers`` (default all) inside the block. A context manager."""
    if part not in ("attn", "mlp"):
        raise ValueError(f"part={part!r}; choose 'attn' or 'mlp'")
    if part == "attn":
        H = hooks.head_shape(model)[1]
        every = range(len(hooks.decoder_layers(model))) if layers is None else layers
        return hooks.replace_heads(model, {i: list(range(H)) for i in every})
    return hooks.hooked(model, "mlp_out", lambda i, x: torch.zeros_like(x), layers)


@torch.no_grad()
def interventions(model, task: BigramBackcopy, x: torch.Tensor) -> dict[str, float]:
    """Excess risks with each layer's attention output or MLP zeroed: ``zero_<part>_l<i>.<risk>``."""
    out = {}
    for i in range(len(hooks.decoder_layers(model))):
        for part in ("attn", "mlp"):
            with zeroed(model, part, [i]):
                r = risks(model(x).logits, x, task)
            out.update({f"zero_{part}_l{i}.{k}": r[k] for k in ("backcopy_risk", "bigram_risk")})
    return out
