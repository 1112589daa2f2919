"""DDCAdam: AdamW made exactly equivariant under a model's gauge groups (docs/ddc.md).

Every parameter with a gradient is stepped as frame -> Adam -> lift (:mod:`gaugeopt.optim.frames`,
:mod:`gaugeopt.optim.rules`, :mod:`gaugeopt.optim.batched_step`). With the gradient factor ``gamma``
of its frame (a product of per-axis scales: ``1 / g`` on a norm consumer's columns, ``g`` on a norm
bias, ``s^{+-1}`` on the two sides of a neuron scaling; 1 where no scaling acts), the step of a
parameter ``p`` of a group with ``lr, betas, eps, weight_decay`` is::

    G~ = P(G gamma)                                   canonical gradient (P: centring, if translated)
    m <- b1 m + (1 - b1) G~,   v <- b2 v + (1 - b2) S(G~ * G~)
    D  = P((m / c1) / (sqrt(v / c2) + eps))           c_k = 1 - b_k^t
    p <- (1 - lr wd) p - lr D gamma                   (the horizontal part of p, if translated)

where ``S`` averages over the blocks of a head rotation (so ``v`` is invariant and ``D`` rotates with
the gauge) and is the identity elsewhere. Training from ``g . theta_0`` thus gives ``g . theta_t``.
Around it:

* **Norm gains are frames.** A gain ``g`` is never stepped: its consumers are worked on merged
  (``C diag(g)``) and, with ``norm_scale_step``, each channel's scale takes AdamW's gain step instead:
  a scalar Adam (the gain's group settings) on the invariant ``h = g dL/dg (+ beta dL/dbeta)`` gives
  ``r`` and the consumers' column ``j`` is multiplied by ``e_j = exp(-lr r_j)``.
* **Isolated neuron pairs: a unit-scale step, and their orbit coordinates held.** For a pair linked
  to no other scaling (a transformer MLP's units), with ``unit_scale_step`` (default) each unit's
  scale takes its own scalar Adam step and the per-coordinate Adam acts on its direction only: with
  ``l = sqrt(u v)`` the unit's canonical side norm and ``h_k = <G~_k, P~_k>`` per side, Adam steps
  ``x_k = G~_k - (h_k / l^2) P~_k``, and a scalar Adam on ``(h_1 + h_2) / (sqrt2 l)`` gives ``r``;
  after the lift both sides' canonical norms are set to ``exp(-lr r / (sqrt2 l))`` times the
  geometric mean of their norms before it, which replaces the radial part of Adam's step.
  Without it the pair is stepped like any tensor and then rebalanced to equal canonical norms.
  Either way ``log(|in_i| / |out_i|)`` does not move; the logit shift's mean row and the gains do
  not move either. Chains of neuron scalings (a deep ReLU MLP) are exactly equivariant but their
  orbit coordinates move (docs/ddc.md lists which frames hold them).
* **Parameters no gauge touches** take Adam as it is: ``torch.optim.AdamW``'s update. So do
  parameters outside ``gauges.model`` (a learnable temperature, a loss's own parameter): one
  ``UserWarning`` lists them, and :meth:`~gaugeopt.optim.base.FramedOptimizer.split` prints every
  parameter with its frame.

Dead channels and units (a gain ``|g_j| <= dead_threshold``, or a unit with ``sqrt(u v) <=``
``dead_threshold``) are frozen: their entries are left exactly as they are, their gradients do not
enter the moments, and they are listed in :attr:`DDCAdam.frozen` (a ``RuntimeWarning`` when a new
one appears). A parameter without a gradient, or with ``requires_grad=False``, is not stepped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..gauges.gaugeset import GaugeSet
from .base import FramedOptimizer
from .guards import require_betas, require_nonnegative, require_rate
from .rules import Adam, Rule

__all__ = ["DDCAdam"]

ADAM = Adam()


def check_adam_settings(group: Mapping[str, Any], where: str) -> None:
    """``ValueError(f"{where}: <field> ...")`` for a bad ``lr``, ``betas``, ``eps`` or ``weight_decay``."""
    require_rate(where, group["lr"])
    require_betas(where, "betas", group["betas"])
    require_nonnegative(where, "eps", group["eps"])
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
        unit_scale_step: take the unit-scale step of each isolated neuron pair (module docstring);
            ``False`` steps the pairs per coordinate in their balanced frame.
        dead_threshold: a norm channel with ``|gain| <=`` this, or a neuron unit with
            ``sqrt(u v) <=`` this, is frozen and reported in :attr:`frozen`.
        nonfinite: ``"raise"`` (default): a NaN or Inf gradient raises
            :class:`~gaugeopt.optim.NonFiniteGradientError` naming the parameter; ``"skip"``: the
            step is skipped and counted in :attr:`skipped_steps`. Nothing changes in either case.
        compiled: run the step compiled by ``torch.compile`` (the same functions, equal to the eager
            step up to rounding; the first step compiles). Learning rates, betas and weight decay
            are graph inputs: schedulers do not recompile.

    Settings are checked at construction, on every step and on ``load_state_dict`` (``ValueError``
    naming the field); float16/bfloat16 parameters keep float32 state and are updated in float32;
    ``load_state_dict`` refuses checkpoints of another optimizer or model before changing anything
    (``docs/robustness.md``). Raises :class:`~gaugeopt.optim.frames.FrameConflictError` for gauge
    combinations no frame makes exact (``frames.compatible_gauges`` drops them).
    """

    _STATE_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq", "scale_exp_avg", "scale_exp_avg_sq", "unit_exp_avg",
                             "unit_exp_avg_sq"})
    _PARAM_SHAPED_STATE = frozenset({"exp_avg", "exp_avg_sq", "scale_exp_avg", "scale_exp_avg_sq"})

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
        unit_scale_step: bool = True,
        dead_threshold: float = 1e-12,
        nonfinite: str = "raise",
        compiled: bool = False,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        check_adam_settings(defaults, type(self).__name__)
        defaults["betas"] = tuple(betas)
        super().__init__(params, defaults, gauges, channel_step=norm_scale_step, unit_step=unit_scale_step,
                         dead_threshold=dead_threshold, nonfinite=nonfinite, compiled=compiled)

    @property
    def norm_scale_step(self) -> bool:
        return self.channel_step

    @property
    def unit_scale_step(self) -> bool:
        return self.unit_step

    def _validate_group(self, group: dict[str, Any], where: str) -> None:
        check_adam_settings(group, where)

    def rule_for(self, group: Mapping[str, Any]) -> Rule:
        return ADAM

    def rule_name(self, group: Mapping[str, Any]) -> str:
        return "adam"
