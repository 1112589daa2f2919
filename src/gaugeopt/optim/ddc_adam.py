"""DDCAdam: AdamW made exactly equivariant under a model's gauge groups (docs/ddc.md).

Every parameter with a gradient is stepped as frame -> Adam -> lift (:mod:`gaugeopt.optim.frames`,
:mod:`gaugeopt.optim.rules`, :mod:`gaugeopt.optim.step`). With the gradient factor ``gamma``
of its frame (a product of per-axis scales: ``1 / g`` on a norm consumer's columns, ``g`` on a norm
bias, ``s^{+-1}`` on the two sides of a neuron scaling; 1 where no scaling acts), the step of a
parameter ``p`` of a group with ``lr, betas, eps, weight_decay`` is::

    G~ = P(G gamma)                                   canonical gradient (P: centring, if translated)
    m <- b1 m + (1 - b1) G~,   v <- b2 v + (1 - b2) S(G~ * G~)    (G~ clipped to 1.8e16 in float32)
    D  = P((m / c1) / (sqrt(v / c2) + eps))           c_k = 1 - b_k^t
    p <- (1 - lr wd) p - lr D gamma                   (the horizontal part of p, if translated)

where ``S`` averages over the blocks of a head rotation (so ``v`` is invariant and ``D`` rotates with
the gauge) and is the identity elsewhere. Training from ``g . theta_0`` thus gives ``g . theta_t``.
Around it:

* **Norm gains are frames.** A gain ``g`` is never stepped: its consumers are worked on merged
  (``C diag(g)``) and, with ``norm_scale_step``, each channel's scale takes AdamW's gain step instead:
  a scalar Adam (the gain's group settings) on the invariant ``h = g dL/dg (+ beta dL/dbeta)`` gives
  ``r`` and the consumers' column ``j`` is multiplied by ``e_j = exp(-lr r_j)``, with ``lr`` the
  smaller of the gain's and the consumer's group rates (a group with lr 0 does not move).
* **Neuron units are read at the section point of their orbit.** A unit's frame is
  ``s = |w_in| / |w~_in|`` with ``|w~_in|^2 = c^2 / 2 + sqrt(c^4 / 4 + l^4)``, ``l = sqrt(|w_in| |w_out|)``
  its gauge-invariant size and ``c = edge_scale`` (:func:`~gaugeopt.gauges.unit_section`): the
  balanced point ``|w~_in| = |w~_out| = l`` for ``l >> c``, and a canonical incoming side of norm
  ``c`` where the outgoing side is zero (a zero-initialised output projection, a LoRA ``B = 0``), so
  such units train, and a step moves a unit's incoming side by at most ``lr |D| / c`` relative.
  After the step an isolated pair (a transformer MLP's units) is put back on the section by a gauge
  element, so its orbit coordinate ``log(|w_in| / |w~_in|)`` does not move; the logit shift's mean
  row and the gains do not move either. Chains of neuron scalings (a deep ReLU MLP) are exactly
  equivariant but their orbit coordinates move (docs/ddc.md lists which frames hold them).
* **Parameters no gauge touches** take Adam as it is: ``torch.optim.AdamW``'s update. So do
  parameters outside ``gauges.model`` (a learnable temperature, a loss's own parameter): one
  ``UserWarning`` lists them, and :meth:`~gaugeopt.optim.base.FramedOptimizer.split` prints every
  parameter with its frame.

Only where no frame exists is anything frozen: a norm channel whose gain is zero, a unit whose
incoming side is zero. Their entries are left exactly as they are, their gradients do not enter the
moments, and they are listed in :attr:`DDCAdam.frozen` and :meth:`DDCAdam.frozen_report` with the
reason (a ``RuntimeWarning`` when a new one appears). A parameter without a gradient, or with
``requires_grad=False``, is not stepped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..gauges.families import EDGE_SCALE
from ..gauges.gaugeset import GaugeSet
from .base import FramedOptimizer
from .guards import require_betas, require_nonnegative, require_positive, require_rate
from .rules import Adam, Rule

__all__ = ["DDCAdam"]

ADAM = Adam()


def check_adam_settings(group: Mapping[str, Any], where: str) -> None:
    """``ValueError(f"{where}: <field> ...")`` for a bad ``lr``, ``betas``, ``eps`` or ``weight_decay``."""
    require_rate(where, group["lr"])
    require_betas(where, "betas", group["betas"])
    require_positive(where, "eps", group["eps"])
    require_nonnegative(where, "weight_decay", group["weight_decay"])


class DDCAdam(FramedOptimizer):
    """Adam with decoupled weight decay, exactly equivariant under the gauges of ``gauges``.

    Args:
        params: parameters or parameter-group dicts, as for any ``torch.optim.Optimizer``; groups may
            set ``lr``, ``betas``, ``eps``, ``weight_decay``.
        gauges: the :class:`~gaugeopt.gauges.GaugeSet` of the model these parameters belong to (from
            :func:`gaugeopt.find_gauges`), or ``None`` for none (then this is AdamW). Parameters are
            matched to gauge families by their names in ``gauges.model``, resolved again at the
            first step (:meth:`~gaugeopt.optim.base.FramedOptimizer.rebind`), so wrapping the model
            after the optimizer is built (accelerate, FSDP2) keeps the frames.
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW``.
        norm_scale_step: take the channel-scale step of each norm family (module docstring);
            ``False`` leaves channel scales to the per-coordinate steps of the merged consumers.
        edge_scale: the section constant ``c`` of the neuron frames (module docstring): the norm of a
            unit's canonical incoming side where its outgoing side is zero, in the units of the
            weights (about the row norm of the initialisation); it must be ``> 0``.
        nonfinite: ``"raise"`` (default): a NaN or Inf gradient raises
            :class:`~gaugeopt.optim.NonFiniteGradientError` naming the parameter; ``"skip"``: the
            step is skipped and counted in :attr:`skipped_steps`. Nothing changes in either case.
        compiled: run the step compiled by ``torch.compile`` (the same functions, equal to the eager
            step up to rounding; the first step compiles). Learning rates, betas and weight decay
            are graph inputs: schedulers do not recompile. ``True`` compiles in torch's default
            mode; a mode's name (``"reduce-overhead"``, ``"max-autotune"``, ...) in that mode: on a
            CUDA device ``"reduce-overhead"`` replays each of the step's graphs as a CUDA graph,
            every tensor that lives across steps marked static (best with ``stack_parameters=True``,
            whose gradients keep their addresses: gradients backward allocates anew are copied in).
        stack_parameters: hold the parameters the step computes on as a stack (each isolated neuron
            pair's two sides, translated tensors such as a logit-shift head; DDCMuon: also Muon's
            matrices) as slices of one buffer per batch, their ``.data`` re-pointed at the first
            step, so the eager step updates them in place instead of stacking a copy and copying
            the new values back (docs/ddc.md: what that changes for saving them).

    Settings are checked at construction, on every step and on ``load_state_dict`` (``ValueError``
    naming the field); float16/bfloat16 parameters keep float32 state and are updated in float32;
    ``load_state_dict`` refuses checkpoints of another optimizer or model before changing anything
    (``docs/robustness.md``). Raises :class:`~gaugeopt.optim.frames.FrameConflictError` for gauge
    combinations no frame makes exact (``frames.compatible_gauges`` drops them).
    """

    def __init__(
        self,
        params,
        gauges: GaugeSet | None,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        norm_scale_step: bool = True,
        edge_scale: float = EDGE_SCALE,
        nonfinite: str = "raise",
        compiled: bool | str = False,
        stack_parameters: bool = False,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        check_adam_settings(defaults, type(self).__name__)
        defaults["betas"] = tuple(betas)
        super().__init__(params, defaults, gauges, channel_step=norm_scale_step,
                         edge_scale=edge_scale, nonfinite=nonfinite, compiled=compiled,
                         stack_parameters=stack_parameters)

    @property
    def norm_scale_step(self) -> bool:
        return self.channel_step

    def _validate_group(self, group: dict[str, Any], where: str) -> None:
        check_adam_settings(group, where)

    def rule_for(self, group: Mapping[str, Any]) -> Rule:
        return ADAM

    def rule_name(self, group: Mapping[str, Any]) -> str:
        return "adam"
