"""Bigram-Backcopy metrics of a toy model on a fixed evaluation batch (definitions §7).

Positions: the prediction made at position ``n`` (of ``x_{n+1}``) is a *backcopy* position when ``x_n`` is a
trigger (``n >= 1``), a *bigram* position otherwise (``n >= 1``); position 0 (``<s>``) is in neither.

Every value is keyed by ``(metric, layer, part)`` (:data:`Key`): ``layer`` is None for a metric of the whole
model, ``part`` None except for the interventions, where it names the zeroed part (``attn`` / ``mlp``) of
``layer``. These are the ``metric, layer, part`` columns of the ``bb_metrics`` rows.

* ``loss``: mean next-token cross-entropy on the batch (nats); ``backcopy_risk`` / ``bigram_risk``: mean
  exact excess risk KL(oracle ‖ model) over backcopy / bigram positions (nats, 0 = the oracle).
* per layer ``i``: ``attn_bos``: ``Attn_<s>``, mean ``A[q, 0]`` over non-trigger queries ``q >= 1`` (the
  sink); ``attn_bos_trig`` the same on trigger queries; ``attn_prev_trig``: mean ``A[q, q-1]`` on trigger
  queries (the backcopy, "active"); ``delta_logit``: mean over non-trigger queries of the attention logit of
  ``<s>`` minus the mean logit of the other visible keys; ``attn_self_bos``: ``A[0, 0]``, the weight of
  ``<s>`` on itself (1 under softmax; unbounded under ReLU attention, where ``i = 1``).
* per layer: ``val_bos``: ``‖Val_<s>‖ = ‖W_O v_0‖`` (batch mean); ``val_ratio``: it over the mean
  ``‖W_O v_t‖`` of positions ``t >= 1``.
* per layer: ``res_peak``: norm of the block output (residual stream) at position 0; ``res_ratio``: it over
  the mean norm at positions ``t >= 1``.
* :func:`interventions`: ``backcopy_risk`` and ``bigram_risk`` with layer ``i``'s ``attn`` or ``mlp`` zeroed.
"""
from __future__ import annotations

import torch

from extract.engine import hooks
from extract.toy.data import BigramBackcopy

Key = tuple[str, int | None, str | None]  # (metric, layer, part)
PARTS = ("attn", "mlp")
RISKS = ("backcopy_risk", "bigram_risk")


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
def measure(model, task: BigramBackcopy, x: torch.Tensor) -> dict[Key, float]:
    """Every metric of the module doc on the batch ``x`` ``(B, S)`` (starting with ``<s>``), keyed by
    ``(metric, layer, part)``: the model's risks first, then each layer's metrics."""
    with hooks.capture(model, "attn_in") as inputs, hooks.capture(model, "resid_post") as outputs:
        logits = model(x).logits
    out: dict[Key, float] = {(k, None, None): v for k, v in risks(logits, x, task).items()}
    trig = task.is_trigger(x)
    trig_q, plain_q = trig.clone(), ~trig
    trig_q[:, 0] = plain_q[:, 0] = False
    S = x.shape[1]
    for i, block in enumerate(hooks.decoder_layers(model)):
        attn = block.self_attn
        logit, A, v = attn.weights(inputs[i])
        A, logit = A.mean(1), logit.mean(1)  # one head: (B, S, S)
        layer: dict[str, float] = {}
        layer["attn_bos"] = float(A[..., 0][plain_q].mean())
        layer["attn_bos_trig"] = float(A[..., 0][trig_q].mean())
        prev = torch.diagonal(A, offset=-1, dim1=1, dim2=2)  # (B, S-1): A[q, q-1] for q >= 1
        layer["attn_prev_trig"] = float(prev[trig_q[:, 1:]].mean())
        layer["attn_self_bos"] = float(A[:, 0, 0].mean())
        others = torch.where(torch.isfinite(logit), logit, 0.0)[..., 1:].sum(-1) / torch.arange(S, device=x.device).clamp_min(1)
        layer["delta_logit"] = float((logit[..., 0] - others)[plain_q].mean())
        wo_v = attn.o_proj(v.transpose(1, 2).flatten(2)).norm(dim=-1)  # (B, S)
        layer["val_bos"] = float(wo_v[:, 0].mean())
        layer["val_ratio"] = float(wo_v[:, 0].mean() / wo_v[:, 1:].mean())
        res = outputs[i].norm(dim=-1)
        layer["res_peak"] = float(res[:, 0].mean())
        layer["res_ratio"] = float(res[:, 0].mean() / res[:, 1:].mean())
        out.update({(k, i, None): v for k, v in layer.items()})
    return out


def zeroed(model, part: str, layers: list[int] | None = None):
    """Zero the attention output (``part="attn"``: the input of ``o_proj``, definitions §9) or the MLP output
    (``part="mlp"``) of ``layers`` (default all) inside the block. A context manager."""
    if part not in PARTS:
        raise ValueError(f"part={part!r}; choose 'attn' or 'mlp'")
    if part == "attn":
        H = hooks.head_shape(model)[1]
        every = range(len(hooks.decoder_layers(model))) if layers is None else layers
        return hooks.replace_heads(model, {i: list(range(H)) for i in every})
    return hooks.hooked(model, "mlp_out", lambda i, x: torch.zeros_like(x), layers)


@torch.no_grad()
def interventions(model, task: BigramBackcopy, x: torch.Tensor) -> dict[Key, float]:
    """Excess risks with each layer's attention output or MLP zeroed: ``(risk, layer, part)`` keys."""
    out: dict[Key, float] = {}
    for i in range(len(hooks.decoder_layers(model))):
        for part in PARTS:
            with zeroed(model, part, [i]):
                r = risks(model(x).logits, x, task)
            out.update({(k, i, part): r[k] for k in RISKS})
    return out
