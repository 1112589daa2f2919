"""Capture site activations and per-sample gradients with one forward and one backward pass.

A site names a tensor inside the model by a module and a side:

* ``"layers.1"`` or ``"layers.1:output"`` -- the module's output ``z``. ``X`` is ``z`` itself and
  ``D`` is ``d loss_n / d z_n``; for an ``nn.Linear`` this is the pre-activation gradient.
* ``"layers.1:input"`` -- the module's first positional input, with ``D = d loss_n / d input_n``.

Forward hooks keep a reference to each site tensor (making it require grad when nothing upstream
does, so frozen models and raw model inputs work too); then a single ``torch.autograd.grad`` of the
*summed* per-sample loss returns ``D`` for every site at once. Because sample n's loss depends only
on sample n's activations, the gradient of the sum restricted to row n is exactly the per-sample
gradient. Tokens of a sequence model count as samples: every leading dimension is flattened into
rows, the last dimension is the site width. (Attention couples tokens, so a token row's gradient
then also carries the other tokens' losses; this is the spec's convention.)

``torch.autograd.grad`` is used instead of ``.backward()`` so parameter ``.grad`` fields are left
untouched. The model's train/eval mode is not changed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

PerSampleLoss = Callable[[Any, Any], torch.Tensor]
"""``loss(outputs, targets) -> per-sample (or per-token) losses``, i.e. ``reduction="none"``."""

SIDES = ("output", "input")


@dataclass(frozen=True)
class SiteSpec:
    """A site: the input or output tensor of one named module."""

    module: str
    side: str = "output"

    @classmethod
    def parse(cls, spec: str) -> SiteSpec:
        """Parse ``"name"``, ``"name:output"`` or ``"name:input"``."""
        if not isinstance(spec, str) or not spec:
            raise ValueError(f"a site must be a non-empty module name string, got {spec!r}")
        module, _, side = spec.partition(":")
        side = side or "output"
        if side not in SIDES:
            raise ValueError(f"site {spec!r}: side must be one of {SIDES}, got {side!r}")
        return cls(module=module, side=side)

    def __str__(self) -> str:
        return f"{self.module}:{self.side}"


@dataclass
class CapturedSites:
    """Flattened ``(N, h)`` activations and per-sample gradients per site, and skipped sites."""

    activations: dict[str, torch.Tensor] = field(default_factory=dict)
    gradients: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # site -> reason


def resolve_sites(model: nn.Module, sites: Sequence[str]) -> dict[str, tuple[SiteSpec, nn.Module]]:
    """Map each site string (normalised to ``module:side``) to its spec and module.

    Raises ``ValueError`` for an empty list, duplicates or a module name the model does not have.
    """
    if isinstance(sites, str) or not isinstance(sites, Sequence) or len(sites) == 0:
        raise ValueError("sites must be a non-empty sequence of site strings such as 'layers.0'")
    modules = dict(model.named_modules())
    resolved: dict[str, tuple[SiteSpec, nn.Module]] = {}
    for spec_text in sites:
        spec = SiteSpec.parse(spec_text)
        if spec.module not in modules:
            known = ", ".join(name for name in modules if name) or "(none)"
            raise ValueError(f"site {spec_text!r}: the model has no module {spec.module!r}; "
                             f"modules are: {known}")
        key = str(spec)
        if key in resolved:
            raise ValueError(f"site {key!r} is listed twice")
        resolved[key] = (spec, modules[spec.module])
    return resolved


def _as_grad_leaf(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.requires_grad else tensor.detach().requires_grad_(True)


def capture_sites(
    model: nn.Module,
    inputs: torch.Tensor | tuple[Any, ...],
    targets: Any,
    loss: PerSampleLoss,
    sites: Sequence[str],
    positions: Sequence[int] | None = None,
) -> CapturedSites:
    """Run one forward and one backward of ``loss(model(*inputs), targets).sum()``.

    Returns the site tensors flattened to ``(rows, width)`` together with the gradient of the
    summed loss with respect to them (the per-sample gradients). A site is skipped, with the
    reason recorded, when its module is not called, is called more than once, produces something
    that is not a floating-point tensor, or does not influence the loss.

    ``positions`` keeps only those sequence positions (index 1 of a ``(batch, seq, ..., width)``
    site; negative values count from the end) as samples, e.g. ``[-1]`` for the one position whose
    output a classifier reads; a site without a sequence dimension is then skipped with the reason.
    """
    resolved = resolve_sites(model, sites)
    if positions is not None:
        positions = [int(p) for p in positions]
        if not positions or len(set(positions)) != len(positions):
            raise ValueError(f"positions must be a non-empty list of distinct sequence positions, got {positions}")
    captured: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {key: 0 for key in resolved}
    problems: dict[str, str] = {}

    def remember(key: str, value: Any) -> torch.Tensor | None:
        calls[key] += 1
        if calls[key] > 1:
            return None
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            problems[key] = f"the site is a {type(value).__name__}, not a floating-point tensor"
            return None
        if value.ndim == 0:
            problems[key] = "the site is a scalar; it has no feature dimension"
            return None
        tensor = _as_grad_leaf(value)
        captured[key] = tensor
        return tensor

    def output_hook(key: str):
        def hook(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
            tensor = remember(key, output)
            return tensor if tensor is not None and tensor is not output else None
        return hook

    def input_hook(key: str):
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> Any:
            if not args:
                remember(key, None)
                return None
            tensor = remember(key, args[0])
            return (tensor, *args[1:]) if tensor is not None and tensor is not args[0] else None
        return hook

    handles = []
    try:
        for key, (spec, module) in resolved.items():
            if spec.side == "output":
                handles.append(module.register_forward_hook(output_hook(key)))
            else:
                handles.append(module.register_forward_pre_hook(input_hook(key)))
        with torch.enable_grad():
            outputs = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
            per_sample = loss(outputs, targets)
            if not isinstance(per_sample, torch.Tensor) or per_sample.ndim == 0:
                raise ValueError(
                    "loss must return per-sample losses (e.g. reduction='none'), not a scalar: "
                    "the gradient of a mean would scale every per-sample gradient by 1/N"
                )
            if not torch.isfinite(per_sample).all():
                raise ValueError("loss returned non-finite per-sample losses")
            keys = list(captured)
            if keys and per_sample.requires_grad:
                grads = torch.autograd.grad(
                    per_sample.sum(), [captured[k] for k in keys], allow_unused=True
                )
            else:
                grads = (None,) * len(keys)
    finally:
        for handle in handles:
            handle.remove()

    result = CapturedSites()
    gradient_of = dict(zip(keys, grads))
    for key in resolved:
        if calls[key] == 0:
            result.skipped[key] = "the module was not called in the forward pass"
        elif calls[key] > 1:
            result.skipped[key] = (f"the module was called {calls[key]} times in one forward pass; "
                                   "a site must be a tensor computed once")
        elif key in problems:
            result.skipped[key] = problems[key]
        elif gradient_of.get(key) is None:
            result.skipped[key] = "the site does not influence the loss (no gradient reaches it)"
        elif positions is not None and captured[key].ndim < 3:
            result.skipped[key] = (f"positions {positions} were asked for, but the site has shape "
                                   f"{tuple(captured[key].shape)}: no sequence dimension")
        elif positions is not None and not all(-captured[key].shape[1] <= p < captured[key].shape[1]
                                               for p in positions):
            result.skipped[key] = f"positions {positions} lie outside the site's {captured[key].shape[1]} positions"
        else:
            tensor, grad = captured[key], gradient_of[key]
            if positions is not None:
                tensor, grad = tensor[:, positions], grad[:, positions]
            width = tensor.shape[-1]
            result.activations[key] = tensor.detach().reshape(-1, width)
            result.gradients[key] = grad.detach().reshape(-1, width)
    return result
