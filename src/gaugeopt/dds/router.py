"""Router and logit diagnostics for mixture-of-experts layers (one row per MoE layer).

For a layer with ``E`` experts and top-``k`` routing, over the ``T`` tokens of one forward pass,
with router logits ``z`` (``T x E``) and probabilities ``p = softmax(z)``:

* ``f_i``: fraction of the ``T k`` top-k assignments that go to expert ``i`` (sums to 1);
* ``P_i``: mean router probability of expert ``i`` (sums to 1);
* ``load_cv = std(f) / mean(f)`` (population std; 0 for perfect balance);
* ``max_load = max_i f_i`` and ``max_load_ratio = E max_i f_i`` (1 for perfect balance);
* ``dead_fraction``: share of experts with ``f_i < 0.1 / E``;
* ``z_loss = mean_t (logsumexp_i z_ti)^2`` (the ST-MoE router z-loss, before its weight);
* ``logit_rms = sqrt(mean z^2)`` and ``logit_max = max |z|``.

Logits are captured with forward hooks on each layer's ``router`` Linear
(:class:`gaugeopt.models.MoELayer`, or any module with a ``router`` Linear, a ``top_k`` and an
expert count), so the numbers are those of the routing the model actually performed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["router_diagnostics", "router_statistics"]


def router_statistics(logits: Tensor, top_k: int) -> dict[str, Any]:
    """The diagnostics above for router logits of shape ``(tokens, experts)`` (any leading shape)."""
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"router logits need an expert axis, got shape {tuple(logits.shape)}")
    n_experts = logits.shape[-1]
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k={top_k} must be in [1, {n_experts}]")
    z = logits.detach().reshape(-1, n_experts).to(torch.float64)
    tokens = z.shape[0]
    if tokens == 0:
        raise ValueError("router_statistics needs at least one token")
    probs = torch.softmax(z, dim=-1)
    chosen = z.topk(top_k, dim=-1).indices
    counts = torch.bincount(chosen.reshape(-1), minlength=n_experts).to(torch.float64)
    load = counts / (tokens * top_k)
    mean_prob = probs.mean(dim=0)
    lse = torch.logsumexp(z, dim=-1)
    return {
        "n_experts": n_experts,
        "top_k": top_k,
        "tokens": tokens,
        "f": load.tolist(),
        "P": mean_prob.tolist(),
        "load_cv": (load.std(unbiased=False) / load.mean()).item(),
        "max_load": load.max().item(),
        "max_load_ratio": (n_experts * load.max()).item(),
        "dead_fraction": (load < 0.1 / n_experts).to(torch.float64).mean().item(),
        "z_loss": (lse**2).mean().item(),
        "logit_rms": z.pow(2).mean().sqrt().item(),
        "logit_max": z.abs().max().item(),
    }


def _moe_layers(model: nn.Module) -> list[tuple[str, nn.Module, nn.Linear, int]]:
    layers = []
    for name, module in model.named_modules():
        router = getattr(module, "router", None)
        top_k = getattr(module, "top_k", None)
        if isinstance(router, nn.Linear) and isinstance(top_k, int):
            layers.append((name, module, router, top_k))
    return layers


def router_diagnostics(model: nn.Module, tokens: Tensor, **forward_kwargs: Any) -> list[dict[str, Any]]:
    """Run ``model(tokens, **forward_kwargs)`` once without gradients and report every MoE layer.

    Returns one dict per MoE layer, in module order, with ``"layer"`` (module name) and the keys of
    :func:`router_statistics`. Raises ``ValueError`` if the model has no MoE layer (a module with a
    ``router`` Linear and an integer ``top_k``), and ``RuntimeError`` if a router never ran.
    """
    layers = _moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layer (a module with a 'router' nn.Linear and 'top_k')")
    captured: dict[str, list[Tensor]] = {name: [] for name, *_ in layers}
    handles = [
        router.register_forward_hook(lambda mod, args, out, name=name: captured[name].append(out.detach()))
        for name, _, router, _ in layers
    ]
    try:
        with torch.no_grad():
            model(tokens, **forward_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    rows = []
    for name, _, router, top_k in layers:
        if not captured[name]:
            raise RuntimeError(f"router of MoE layer {name!r} did not run during the forward pass")
        logits = torch.cat([z.reshape(-1, router.out_features) for z in captured[name]])
        rows.append({"layer": name, **router_statistics(logits, top_k)})
    return rows
