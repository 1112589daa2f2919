"""DDCAdam: AdamW made exactly equivariant under a model's gauge groups (ddc.md sections 3-4).

Per step, for a parameter group with learning rate ``lr``, betas ``(b1, b2)``, ``eps`` and weight
decay ``wd``, with ``t`` the step count, ``c1 = 1 - b1^t`` and ``c2 = 1 - b2^t``, the per-coordinate
Adam map on an input ``x`` with first/second moments ``m, v`` is::

    m <- b1 m + (1 - b1) x,    v <- b2 v + (1 - b2) S(x * x),    A(x) = (m / c1) / (sqrt(v / c2) + eps)

where ``S`` is the identity except on rotated blocks (below). Every parameter gets the decoupled
weight decay ``p <- (1 - lr wd) p`` first, then:

* **No gauge** (R4): ``p <- p - lr A(grad)`` -- exactly ``torch.optim.AdamW``: these parameters are
  stepped together by torch's multi-tensor kernel, bit for bit ``AdamW(foreach=True)``.
* **Norm gain g** (and LayerNorm bias beta): the gain is the frame of its channels and is *not*
  stepped (nor decayed); consumer weights C are stepped as ``W~ = C diag(g)`` with gradient
  ``G_C diag(1/g)`` and written back as ``C = W~ diag(1/g)``; the bias as ``beta^ = beta / g`` with
  gradient ``g * G_beta``, written back as ``beta = g * beta^``. Decay acts on ``W~`` and ``beta^``.
  With ``norm_scale_step``, each channel's scale takes AdamW's gain step instead of the gain: a
  scalar Adam (gain's group) on the invariant ``h_j = sum <G~[:, j], W~[:, j]> = g_j dL/dg_j`` gives
  ``r_j`` and every merged consumer column j is multiplied by ``exp(-lr r_j)``.
* **Logit / router shift** ``W -> W + 1 a^T``: the mean row (and mean bias) is held fixed; gradient,
  decay and the update ``A`` act on the centered part and the update is centered over the rows.
* **Head rotation** on row (or column) blocks: ``S`` averages ``x * x`` over each rotated block (per
  column for row blocks, per row for column blocks), so ``v`` is invariant and ``A`` rotates with
  the gauge.
* **Neuron scaling** unit i with pair ``P1`` (producer row and bias), ``P2`` (consumer columns), in
  the merged/centered frames above: ``rho_k = |P_k|``, ``h_k = <G_k, P_k>``, and an invariant unit
  length ``l`` (``pair_frame="balanced"``: ``l = sqrt(rho_1 rho_2)``; ``"radius"``: ``l = 1``). A
  scalar Adam per unit on ``(h_1 + h_2) / (sqrt 2 l)`` gives ``r``; the per-coordinate Adam on
  ``x_k = (rho_k G_k - (h_k / rho_k) P_k) / l`` gives ``u_k``, projected orthogonal to
  ``d_k = P_k / rho_k``. With ``q_k = exp(-lr r / (sqrt 2 l)) d_k - (lr / l) u_k``:
  ``P_k <- rho_k sqrt(|q_1| |q_2|) q_k / |q_k|``, i.e. the step ``rho_k q_k`` of ddc.md section 4
  with its second-order drift along the orbit removed, so ``log(rho_1 / rho_2)`` is held exactly.
  The gauge mode ``(h_1 - h_2) / sqrt 2`` is not stepped. In the balanced frame this is AdamW's step
  taken at the orbit's balanced point (``rho_1 = rho_2``) and carried back by the gauge,
  so ``lr`` has the same meaning as for every other parameter; the radius frame (ddc.md section 4 as
  written) makes ``lr`` a relative rate for the pairs. If a norm-scale step changed ``|P1|``, the
  neuron gauge element restoring ``log(rho_1 / rho_2)`` is applied at the end of the step (it is
  computed from invariants and does not change the function).

Every input of a moment update is invariant under the gauges (or rotates with them) and every
write-back is covariant, so training from ``g . theta_0`` gives ``g . theta_t`` (R2) and the orbit
coordinates never move (R3). The pure maps live in :mod:`gaugeopt.optim.gauge_frames`.

Dead channels and units: a norm channel with ``|g_j| <= dead_threshold``, or a neuron pair with
``sqrt(rho_1 rho_2) <= dead_threshold`` (or a side whose square underflows), is *frozen*: its slices
are left exactly as they are, its inputs to the moments are zero, and it is listed in
:attr:`DDCAdam.frozen` (a ``RuntimeWarning`` is issued when a new one appears). Nothing is divided by
a dead scale, so no NaN is produced.

Hyperparameters of coupled tensors: a neuron pair couples its producer weight and bias and its
consumer weights into one update; they must share ``lr``, ``betas``, ``eps`` and ``pair_frame``
(checked each step, so a scheduler may change them together). Weight decay is taken per tensor from
its own group; a pair whose tensors decay at different rates moves its orbit coordinate through the
decay alone (that objective is not gauge invariant), while the step is still equivariant.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim.adamw import adamw as _adamw_functional

from ..gauges.families import NeuronScaling, NormScaling
from ..gauges.gaugeset import GaugeSet
from ._guards import (
    GuardedOptimizer,
    all_finite,
    check_gauges_cover,
    compute_dtype,
    require_betas,
    require_choice,
    require_nonnegative,
    require_rate,
    state_zeros,
)
from .distributed import sharded_step
from .fused_updates import (
    AdamScalars,
    PairMember,
    column_inner,
    compiled,
    framed_adam_update_,
    pair_adam_update_,
    pair_entry_sums,
)
from .gauge_frames import (
    FrameEntry,
    adam_moments_,
    FramePlan,
    PairFrame,
    TensorFrame,
    build_frame_plan,
    center_rows,
    enter_frame,
    from_unit_slices,
    leave_frame,
    pair_chart,
    pair_retract,
    unit_slices,
)

__all__ = ["DDCAdam", "adam_moments_", "adam_denominator"]


# --------------------------------------------------------------------------------------------------
# Adam's moment maps (shared with the plain AdamW path, in torch.optim.AdamW's operation order)
# --------------------------------------------------------------------------------------------------


def adam_denominator(exp_avg_sq: Tensor, step: float, beta2: float, eps: float) -> Tensor:
    """``sqrt(v / (1 - b2^t)) + eps``."""
    return exp_avg_sq.sqrt().div_(math.sqrt(1 - beta2**step)).add_(eps)


def _adam_direction(exp_avg: Tensor, exp_avg_sq: Tensor, step: float, beta1: float, beta2: float,
                    eps: float) -> Tensor:
    """The bias-corrected Adam direction ``(m / c1) / (sqrt(v / c2) + eps)``."""
    return torch.div(exp_avg, adam_denominator(exp_avg_sq, step, beta2, eps)).div_(1 - beta1**step)


# --------------------------------------------------------------------------------------------------
# Working copies in the invariant frames
# --------------------------------------------------------------------------------------------------


_Stepped = tuple[Tensor, dict, TensorFrame, Tensor]  # a gauge-carrying tensor to step: param, group, frame, grad


@dataclass
class _Work:
    """One gauge-carrying parameter in its frame while a step runs: ``value`` and ``grad`` start as
    ``entry``'s (:func:`~gaugeopt.optim.gauge_frames.enter_frame`) and ``value`` is replaced by each
    update; ``frozen`` adds the entries of dead neuron units to the entry's dead channels."""

    param: Tensor
    group: dict
    frame: TensorFrame
    entry: FrameEntry
    value: Tensor
    grad: Tensor
    frozen: Tensor | None = None


@dataclass
class _FusedReads:
    """The fused step's read-only passes (``DDCAdam._fused_reads``): the scale input per norm family,
    pass-1 sums per neuron pair family, the parameters whose gradients they checked, and the verdict."""

    scale_inputs: dict[str, Tensor]
    firsts: dict[str, list[tuple[Tensor, ...]]]
    covered: set[int]
    finite: bool


def _pair_member(ref, frame: TensorFrame) -> PairMember:
    return PairMember(ref.axis, frame.merge is not None, frame.centered)


class DDCAdam(GuardedOptimizer):
    """Adam with decoupled weight decay, exactly equivariant under the gauges of ``gauges``.

    Args:
        params: parameters or parameter-group dicts, as for any ``torch.optim.Optimizer``; groups may
            set ``lr``, ``betas``, ``eps``, ``weight_decay``.
        gauges: the :class:`~gaugeopt.gauges.GaugeSet` of the model these parameters belong to (from
            :func:`gaugeopt.find_gauges`), or ``None`` for none (then this is exactly AdamW).
            Parameters are matched to gauge families by their names in ``gauges.model``.
        lr, betas, eps, weight_decay: as in ``torch.optim.AdamW``.
        pair_frame: ``"balanced"`` (default) or ``"radius"``: the unit length of the neuron-pair
            chart (module docstring); both are exactly equivariant.
        norm_scale_step: take a scalar Adam step on each norm channel's invariant log-scale (the
            common scale of its merged consumer columns), driven by the gain's group; ``False``
            leaves channel scales to the per-coordinate steps alone.
        dead_threshold: a norm channel with ``|gain| <=`` this, or a neuron pair with
            ``sqrt(|P1| |P2|) <=`` this, is frozen and reported in :attr:`frozen`.
        nonfinite: ``"raise"`` (default): a NaN or Inf gradient raises
            :class:`~gaugeopt.optim.NonFiniteGradientError` naming the parameter; ``"skip"``: the
            step is skipped and counted in :attr:`skipped_steps`. Nothing changes in either case.
        fused: step each gauge-carrying tensor, and each neuron pair family, with one function
            compiled by ``torch.compile`` (:mod:`gaugeopt.optim.fused_updates`): a few fused kernels
            instead of some thirty eager passes over memory. The same math as the eager step (equal up
            to rounding); the first steps compile (tens of seconds on a CPU, once per process and
            tensor structure). Neuron-pair members may carry a norm merge and centered rows besides the
            pair, not a rotation (``ValueError``); the parameters no gauge touches take torch's AdamW
            either way.

    Robustness (``docs/robustness.md``): settings are checked at construction, on every step and on
    ``load_state_dict`` (``ValueError`` naming the field); float16/bfloat16 parameters keep float32
    state and are updated in float32; ``load_state_dict`` refuses checkpoints of another optimizer
    or model before changing anything.

    The update math is in the module docstring (and ``docs/ddc.md``). Raises
    :class:`~gaugeopt.optim.gauge_frames.FrameConflictError` for gauge combinations no frame makes
    exact (neuron scalings on both axes of one matrix); ``gauge_frames.compatible_gauges`` drops them.
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
        pair_frame: PairFrame = "balanced",
        norm_scale_step: bool = True,
        dead_threshold: float = 1e-12,
        nonfinite: str = "raise",
        fused: bool = False,
    ):
        self._init_guards(nonfinite)
        self._validate_group(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, pair_frame=pair_frame),
                             type(self).__name__)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, pair_frame=pair_frame)
        require_nonnegative(type(self).__name__, "dead_threshold", dead_threshold)
        if gauges is not None and not isinstance(gauges, GaugeSet):
            raise TypeError("gauges must be a GaugeSet (from gaugeopt.find_gauges) or None, "
                            f"got {type(gauges).__name__}")
        super().__init__(params, defaults)
        self.gauges = gauges
        self.dead_threshold = dead_threshold
        self.norm_scale_step = bool(norm_scale_step)
        for g in self.param_groups:
            for p in g["params"]:
                if not p.is_floating_point() or p.is_complex():
                    raise TypeError(f"DDCAdam needs real floating-point parameters, got {p.dtype}")
        model_params = check_gauges_cover(gauges, self.param_groups)
        self.plan: FramePlan = build_frame_plan(gauges) if gauges is not None else FramePlan({}, (), ())
        self._names = {id(p): n for n, p in model_params.items()}
        self._params_by_name = model_params
        self._pair_members = {r.name for f in self.plan.pairs for r in (*f.multiplied, *f.divided)}
        self.fused = bool(fused)
        self._reads: _FusedReads | None = None  # the fused step's read-only passes, made by its guard
        if self.fused:
            _check_fusable(self.plan)
        #: Frozen (dead) norm channels and neuron units of the last step: family name -> indices.
        self.frozen: dict[str, tuple[int, ...]] = {}

    _STATE_KEYS = frozenset({"step", "exp_avg", "exp_avg_sq", "radial_exp_avg", "radial_exp_avg_sq",
                             "scale_exp_avg", "scale_exp_avg_sq"})
    _PARAM_SHAPED_STATE = frozenset({"exp_avg", "exp_avg_sq"})

    # ----- guards (gaugeopt.optim._guards) -------------------------------------------------------
    def _validate_group(self, group: dict, where: str) -> None:
        require_rate(where, group["lr"])
        require_betas(where, "betas", group["betas"])
        require_nonnegative(where, "eps", group["eps"])
        require_nonnegative(where, "weight_decay", group["weight_decay"])
        require_choice(where, "pair_frame", group["pair_frame"], ("balanced", "radius"))

    def _known_names(self) -> dict[int, str]:
        return getattr(self, "_names", {})

    # ----- helpers -----------------------------------------------------------------------------
    def _state(self, p: Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = state_zeros(p)
            state["exp_avg_sq"] = state_zeros(p)
        return state

    def _adamw_steps(self, params: list[Tensor], group: dict) -> None:
        """torch.optim.AdamW's update of ``params`` (parameters no gauge touches, with gradients).

        Parameters kept in their own dtype go all at once through torch's functional AdamW with
        ``foreach=True``: bit for bit ``torch.optim.AdamW(foreach=True)``. Float16 and bfloat16
        parameters, whose state is float32 (:func:`~gaugeopt.optim._guards.compute_dtype`), take the
        same operations one by one on a float32 copy that is written back at the end."""
        native = [p for p in params if compute_dtype(p) == p.dtype]
        if native:
            states = [self._state(p) for p in native]
            beta1, beta2 = group["betas"]
            _adamw_functional(native, [p.grad for p in native], [s["exp_avg"] for s in states],
                              [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states], foreach=True,
                              amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
        for p in params:
            if compute_dtype(p) != p.dtype:
                self._adamw_step_in_float32(p, group)

    def _adamw_step_in_float32(self, p: Tensor, group: dict) -> None:
        """AdamW's update of a float16/bfloat16 parameter computed in float32 against float32 state."""
        state = self._state(p)
        beta1, beta2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        state["step"] += 1
        step = float(state["step"])
        work = p.to(torch.float32)
        if wd != 0:
            work.mul_(1 - lr * wd)
        adam_moments_(p.grad.to(torch.float32), state["exp_avg"], state["exp_avg_sq"], beta1, beta2)
        denom = adam_denominator(state["exp_avg_sq"], step, beta2, group["eps"])
        work.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**step))
        p.copy_(work)

    def _enter_frame(self, p: Tensor, group: dict, frame: TensorFrame, grad: Tensor) -> _Work:
        """``p`` in its frame (:func:`~gaugeopt.optim.gauge_frames.enter_frame`): merged with its norm
        gain, centered, dead channels frozen, decayed; in float32 for float16/bfloat16 parameters."""
        entry = enter_frame(p, grad, self._gain_of(frame), role=frame.role, merged=frame.merge is not None,
                            centered=frame.centered, decay=1 - group["lr"] * group["weight_decay"],
                            threshold=self.dead_threshold, dtype=compute_dtype(p))
        return _Work(p, group, frame, entry, entry.value, entry.grad)

    @staticmethod
    def _leave_frame(w: _Work) -> None:
        """Write ``w.value`` (the optimizer's own tensor by now) back through the frame."""
        leave_frame(w.param, w.value, w.entry, w.frozen)

    def _advance_moments(self, w: _Work, x: Tensor) -> tuple[Tensor, Tensor]:
        """Advance the per-coordinate moments of ``w`` on input ``x``; return ``m`` and the
        denominator ``D = c1 (sqrt(v / c2) + eps)``, computed as ``sqrt(v) c1 / sqrt(c2) + eps c1`` (one
        pass less): the Adam direction is ``m / D``."""
        state = self._state(w.param)
        beta1, beta2 = w.group["betas"]
        state["step"] += 1
        step = float(state["step"])
        adam_moments_(x, state["exp_avg"], state["exp_avg_sq"], beta1, beta2, w.frame.shared_axes())
        c1 = 1 - beta1**step
        denominator = state["exp_avg_sq"].sqrt().mul_(c1 / math.sqrt(1 - beta2**step)).add_(w.group["eps"] * c1)
        return state["exp_avg"], denominator

    def _moments_direction(self, w: _Work, x: Tensor) -> Tensor:
        """Advance the per-coordinate moments of ``w`` on input ``x``; return the Adam direction
        (centered over rows when the parameter carries a translation)."""
        exp_avg, denominator = self._advance_moments(w, x)
        direction = torch.div(exp_avg, denominator, out=denominator)
        return center_rows(direction) if w.frame.centered else direction

    def _pair_step(self, family: NeuronScaling, work: dict[str, _Work]) -> tuple[int, ...]:
        """One neuron-pair chart step for all units of ``family``; returns the dead units."""
        sides = (family.multiplied, family.divided)
        anchor = work[family.multiplied[0].name]
        self._check_coupled_settings(family, {name: w.group for name, w in work.items()})
        lr, (beta1, beta2), eps = anchor.group["lr"], anchor.group["betas"], anchor.group["eps"]
        (P1, widths1), (G1, _) = self._gather_side(work, sides[0], "value"), self._gather_side(work, sides[0], "grad")
        (P2, widths2), (G2, _) = self._gather_side(work, sides[1], "value"), self._gather_side(work, sides[1], "grad")
        chart = pair_chart(P1, G1, P2, G2, self.dead_threshold, frame=anchor.group["pair_frame"])

        # Tangential Adam: per coordinate, in each member tensor's own shape.
        updates = []
        for refs, tangent, widths in ((sides[0], chart.tangent1, widths1), (sides[1], chart.tangent2, widths2)):
            parts = []
            for ref, x in zip(refs, tangent.split(widths, dim=1)):
                w = work[ref.name]
                x_full = from_unit_slices(x, ref.axis, w.value.shape)
                parts.append(unit_slices(self._moments_direction(w, x_full), ref.axis))
            updates.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))

        # Radial Adam: one scalar per unit, state kept with the producer weight.
        state = self.state[anchor.param]
        if "radial_exp_avg" not in state:
            state["radial_exp_avg"] = torch.zeros_like(chart.radial)
            state["radial_exp_avg_sq"] = torch.zeros_like(chart.radial)
        adam_moments_(chart.radial, state["radial_exp_avg"], state["radial_exp_avg_sq"], beta1, beta2)
        radial = _adam_direction(state["radial_exp_avg"], state["radial_exp_avg_sq"], float(state["step"]),
                                 beta1, beta2, eps)

        new1, new2 = pair_retract(chart, radial, updates[0], updates[1], lr)
        return self._write_pair(family, work, chart, (new1, widths1), (new2, widths2))

    @staticmethod
    def _gather_side(work: dict[str, _Work], refs, attr: str) -> tuple[Tensor, list[int]]:
        """One side of a neuron pair as a (units, n) stack of ``attr`` ("value" or "grad") slices,
        with the width each member tensor contributes (a view, not a copy, for a single member)."""
        parts = [unit_slices(getattr(work[r.name], attr), r.axis) for r in refs]
        widths = [part.shape[1] for part in parts]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), widths

    @staticmethod
    def _write_pair(family: NeuronScaling, work: dict[str, _Work], chart,
                    side1: tuple[Tensor, list[int]], side2: tuple[Tensor, list[int]]) -> tuple[int, ...]:
        """Scatter the new pair stacks back into the member tensors; freeze dead units; return them."""
        any_dead = bool(chart.dead.any())
        for refs, (new, widths) in ((family.multiplied, side1), (family.divided, side2)):
            for ref, part in zip(refs, new.split(widths, dim=1)):
                w = work[ref.name]
                w.value = from_unit_slices(part, ref.axis, w.value.shape)
                if any_dead:
                    dead = from_unit_slices(chart.dead.unsqueeze(1).expand_as(part), ref.axis, w.value.shape)
                    w.frozen = dead if w.frozen is None else (w.frozen | dead)
        return tuple(chart.dead.nonzero().flatten().tolist()) if any_dead else ()

    @staticmethod
    def _check_coupled_settings(family: NeuronScaling, groups: Mapping[str, dict]) -> None:
        """The tensors of a neuron pair share one update: their groups must agree on lr, betas, eps
        and pair_frame (``ValueError`` naming the tensors and the field otherwise)."""
        anchor = family.multiplied[0].name
        for ref in (*family.multiplied[1:], *family.divided):
            for key in ("lr", "betas", "eps", "pair_frame"):
                if groups[ref.name][key] != groups[anchor][key]:
                    raise ValueError(
                        f"gauge family {family.name} couples {anchor} and {ref.name} into one update, but "
                        f"their groups set different {key} ({groups[anchor][key]} vs {groups[ref.name][key]}); "
                        f"put them in groups that agree")

    def _dead_channels(self) -> dict[str, tuple[int, ...]]:
        """Norm families with dead channels (``|gain| <= dead_threshold``): family name -> indices."""
        frozen = {}
        for family in self.plan.norms:
            dead = (self._params_by_name[family.gain].detach().abs() <= self.dead_threshold).nonzero().flatten()
            if len(dead):
                frozen[family.name] = tuple(dead.tolist())
        return frozen

    def _norm_scale_steps(self, stepped: Collection[str], gain_groups: dict[str, dict],
                          scale_input: Callable[[NormScaling, list[str]], Tensor]
                          ) -> dict[str, tuple[list[str], Tensor]]:
        """Per norm family: its consumers and the factors ``exp(-lr r_j)`` for their merged columns.

        ``h_j = sum over consumers <G~[:, j], W~[:, j]>`` (equal to ``g_j dL/dg_j``;
        ``scale_input(family, consumers)`` gives it for the consumers in ``stepped``) is invariant under every gauge;
        a scalar Adam on it, with the gain's group settings, gives ``r_j``. At ``g = 1`` this is AdamW's
        step on the gain, taken as the common log-scale of the channel's merged columns (the gain
        itself stays the frame). Dead channels get factor 1.
        """
        steps = {}
        for family in self.plan.norms:
            consumers = [c for c in family.consumers if c in stepped]
            group = gain_groups.get(family.gain)
            if group is None or not consumers:
                continue
            gain = self._params_by_name[family.gain]
            h = scale_input(family, consumers)
            state = self.state[gain]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["scale_exp_avg"] = torch.zeros_like(h)
                state["scale_exp_avg_sq"] = torch.zeros_like(h)
            beta1, beta2 = group["betas"]
            state["step"] += 1
            adam_moments_(h, state["scale_exp_avg"], state["scale_exp_avg_sq"], beta1, beta2)
            r = _adam_direction(state["scale_exp_avg"], state["scale_exp_avg_sq"], float(state["step"]), beta1,
                                beta2, group["eps"])
            live = gain.detach().abs() > self.dead_threshold
            steps[family.name] = (consumers, torch.where(live, torch.exp(-group["lr"] * r), torch.ones_like(r)))
        return steps

    @staticmethod
    def _pair_sides(family: NeuronScaling, work: dict[str, _Work]) -> tuple[Tensor, Tensor]:
        """Squared side norms ``|P1|^2``, ``|P2|^2`` per unit, read from the working values."""
        def squared_rows(t: Tensor) -> Tensor:
            return torch.linalg.vecdot(t, t, dim=1)

        return tuple(sum(squared_rows(unit_slices(work[r.name].value, r.axis)) for r in refs)
                     for refs in (family.multiplied, family.divided))

    def _pair_log_ratio(self, family: NeuronScaling, work: dict[str, _Work]) -> Tensor:
        sq1, sq2 = self._pair_sides(family, work)
        return 0.5 * (torch.log(sq1) - torch.log(sq2))

    def _hold_pair_ratio(self, family: NeuronScaling, work: dict[str, _Work], held: Tensor) -> None:
        """Apply the neuron gauge element that puts ``log(|P1| / |P2|)`` back to ``held``.

        Other steps (the norm channel scales) may change ``|P1|``; the correction ``a`` is a group
        element computed from the invariant difference of two orbit coordinates, so it is
        equivariant, it does not change the function, and the orbit coordinate is held exactly."""
        now = self._pair_log_ratio(family, work)
        correction = torch.exp(0.5 * (held - now))
        correction = torch.where(torch.isfinite(correction), correction, torch.ones_like(correction))
        for refs, factors in ((family.multiplied, correction), (family.divided, 1 / correction)):
            for ref in refs:
                w = work[ref.name]
                shape = [1] * w.value.dim()
                shape[ref.axis] = -1
                w.value = w.value.mul_(factors.reshape(shape))  # the optimizer's own tensor by now

    # ----- the step ------------------------------------------------------------------------------
    # Three hooks a subclass with another base rule overrides (DDCMuon): the parameters no gauge touches
    # (one group at a time), a neuron pair, and any other gauge-carrying tensor in its frame.
    def _plain_steps(self, params: list[Tensor], group: dict) -> None:
        self._adamw_steps(params, group)

    def _pair_update(self, family: NeuronScaling, work: dict[str, _Work]) -> tuple[int, ...]:
        return self._pair_step(family, work)

    def _framed_update(self, name: str, w: _Work) -> None:
        if w.frame.centered:
            w.value = w.value - w.group["lr"] * self._moments_direction(w, w.grad)
        else:  # value - lr m / D, in one pass
            exp_avg, denominator = self._advance_moments(w, w.grad)
            w.value = torch.addcdiv(w.value, exp_avg, denominator, value=-w.group["lr"])

    # Hooks for sharded (FSDP2) parameters, used by gaugeopt.optim.distributed: the step reads every
    # norm gain by name (to merge, to find dead channels), couples the tensors of a norm family or a
    # neuron pair into one update, and reports the frozen units of the tensors it stepped.
    _rank_reports = ("frozen",)

    def _tensors_read(self) -> list[Tensor]:
        return [self._params_by_name[family.gain] for family in self.plan.norms]

    def _coupled_parameters(self) -> list[list[Tensor]]:
        families = [[f.gain, f.bias, *f.consumers] for f in self.plan.norms]
        families += [[r.name for r in (*f.multiplied, *f.divided)] for f in self.plan.pairs]
        return [[self._params_by_name[n] for n in names if n in self._params_by_name] for names in families]

    def _swap_parameters(self, stand_in: Mapping[int, Tensor]) -> None:
        """Read parameter ``p`` as ``stand_in[id(p)]`` where given (its gathered full tensor)."""
        self._params_by_name = {n: stand_in.get(id(p), p) for n, p in self._params_by_name.items()}
        self._names = {id(p): n for n, p in self._params_by_name.items()}

    @sharded_step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One DDCAdam step (see the module docstring for the math). Returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._reads = None
        if not self._gradients_ready():  # settings, sparse and non-finite gradients (nothing changed)
            return loss
        plain, stepped, gain_groups = self._sort_parameters()
        for group, params in zip(self.param_groups, plain):
            self._plain_steps(params, group)
        for name in gain_groups:  # set_state_dict (distributed checkpoints) wants an entry for each gain
            self.state.setdefault(self._params_by_name[name], {})
        frozen = self._dead_channels()
        if self.fused:
            frozen.update(self._fused_gauge_steps(stepped, gain_groups))
        else:
            frozen.update(self._gauge_steps(stepped, gain_groups))
        self._report_frozen(frozen)
        return loss

    def _sort_parameters(self) -> tuple[list[list[Tensor]], dict[str, _Stepped], dict[str, dict]]:
        """Per group, the parameters no gauge touches that have gradients (AdamW's); the gauge-carrying
        tensors to step (with a gradient, or in a neuron pair: zeros then), name -> (param, group,
        frame, grad); the norm gains' groups (a gain is the frame of its channels, never stepped)."""
        plain: list[list[Tensor]] = []
        stepped: dict[str, _Stepped] = {}
        gain_groups: dict[str, dict] = {}
        for group in self.param_groups:
            plain.append([])
            for p in group["params"]:
                name = self._names.get(id(p))
                frame = self.plan.frame(name) if name is not None else None
                if frame is None:
                    if p.grad is not None:
                        plain[-1].append(p)
                elif frame.role == "gain":
                    gain_groups[name] = group
                elif p.grad is not None or name in self._pair_members:
                    stepped[name] = (p, group, frame, p.grad if p.grad is not None else torch.zeros_like(p))
        return plain, stepped, gain_groups

    def _gauge_steps(self, stepped: dict[str, _Stepped],
                     gain_groups: dict[str, dict]) -> dict[str, tuple[int, ...]]:
        """The eager step of the gauge-carrying tensors; returns the dead neuron units per family."""
        work = {name: self._enter_frame(*entry) for name, entry in stepped.items()}
        channel_steps = {}
        if self.norm_scale_step:
            channel_steps = self._norm_scale_steps(
                work, gain_groups, lambda f, cs: sum(torch.linalg.vecdot(work[c].grad, work[c].value, dim=0) for c in cs))
        held_ratios = {f.name: self._pair_log_ratio(f, work) for f in self.plan.pairs
                       if channel_steps and all(r.name in work for r in (*f.multiplied, *f.divided))}
        charted, frozen = set(), {}
        for family in self.plan.pairs:
            names = [r.name for r in (*family.multiplied, *family.divided)]
            if not all(n in work for n in names):
                continue
            if all(work[n].param.grad is None for n in names):
                for n in names:
                    del work[n]
                continue
            dead_units = self._pair_update(family, work)
            charted.update(names)
            if dead_units:
                frozen[family.name] = dead_units
        for name, w in work.items():
            if name not in charted:
                self._framed_update(name, w)
        for consumers, factors in channel_steps.values():
            for name in consumers:
                work[name].value = work[name].value.mul_(factors.reshape(1, -1))  # in place: our own tensor
        for family in self.plan.pairs:
            if family.name in held_ratios and all(r.name in work for r in family.multiplied):
                self._hold_pair_ratio(family, work, held_ratios[family.name])
        for w in work.values():
            self._leave_frame(w)
        return frozen

    def _step_scalars(self, p: Tensor, group: dict) -> AdamScalars:
        """Advance ``p``'s step count; the scalars of its Adam step (:class:`AdamScalars`)."""
        state = self._state(p)
        state["step"] += 1
        return AdamScalars.at(float(state["step"]), group["lr"], group["weight_decay"], *group["betas"], group["eps"],
                              device=p.device)

    def _gain_of(self, frame: TensorFrame) -> Tensor | None:
        """The norm gain a tensor's frame merges with (or a norm bias is divided by), if any."""
        name = frame.gain if frame.role == "norm_bias" else (frame.merge.gain if frame.merge else None)
        return None if name is None else self._params_by_name[name]

    def _all_finite(self, params: list[Tensor]) -> bool:
        """With ``fused=True``, the gradients of neuron pairs are checked by the read-only pass the step
        makes over them before writing anything (:meth:`_fused_reads`), the others by
        :func:`~gaugeopt.optim._guards.all_finite`: each gradient is read once for both."""
        if not self.fused:
            return super()._all_finite(params)
        _, stepped, gain_groups = self._sort_parameters()
        self._reads = reads = self._fused_reads(stepped, gain_groups)
        return reads.finite and all_finite([p.grad for p in params if id(p) not in reads.covered])

    def _scale_input_from_columns(self, stepped: dict[str, _Stepped], consumers: list[str]) -> Tensor:
        """``h`` (before the dead channels' zeros) as the sum of its consumers' column sums."""
        total = 0
        for name in consumers:
            p, group, frame, grad = stepped[name]
            h = column_inner(p, grad, centered=frame.centered, dtype=compute_dtype(p))
            total = total + h * (1 - group["lr"] * group["weight_decay"])
        return total

    def _scale_input_from_gain(self, family: NormScaling, stepped: dict[str, _Stepped]) -> Tensor | None:
        """``h = decay (g dL/dg + beta dL/dbeta)``, read off the norm's own gradients, or ``None``
        where that is not the consumers' sum.

        For a norm output ``y = g n + beta`` feeding the consumers ``z = C y`` only (what a norm
        family is), ``sum_i G_C,ij C_ij = g_j dL/dg_j + beta_j dL/dbeta_j`` summed over consumers
        (Euler's identity for the scaling symmetry); a centered consumer's mean-row share is
        ``(sum_i G_ij)(sum_i C_ij) / rows``, zero for a shift-invariant loss. This holds when the
        gradients are the loss's own, every consumer is stepped here, the gain (and bias) have
        gradients and all consumers decay alike; otherwise ``None`` (the column sums are used)."""
        if not all(c in stepped for c in family.consumers):
            return None
        decays = {1 - stepped[c][1]["lr"] * stepped[c][1]["weight_decay"] for c in family.consumers}
        gain = self._params_by_name[family.gain]
        bias = self._params_by_name.get(family.bias) if family.bias else None
        if len(decays) != 1 or gain.grad is None or (family.bias and (bias is None or bias.grad is None)):
            return None
        dtype = compute_dtype(stepped[family.consumers[0]][0])
        h = gain.detach().to(dtype) * gain.grad.to(dtype)
        if bias is not None:
            h = h + bias.detach().to(dtype) * bias.grad.to(dtype)
        return h * decays.pop()

    def _fused_reads(self, stepped: dict[str, _Stepped], gain_groups: dict[str, dict]) -> _FusedReads:
        """The fused step's read-only passes, made before anything is written: each norm family's
        scale input (from the norm's own gradients, :meth:`_scale_input_from_gain`, else its consumers'
        column sums) and each neuron pair's pass 1 (:func:`~gaugeopt.optim.fused_updates.pair_entry_sums`),
        which also tells whether the pair's gradients are finite."""
        scale_inputs, firsts, covered, flags = {}, {}, set(), []
        if self.norm_scale_step:
            for family in self.plan.norms:
                consumers = [c for c in family.consumers if c in stepped] if family.gain in gain_groups else []
                if consumers:
                    h = self._scale_input_from_gain(family, stepped)
                    scale_inputs[family.name] = self._scale_input_from_columns(stepped, consumers) if h is None else h
        for family in self.plan.pairs:
            refs = (*family.multiplied, *family.divided)
            if not all(r.name in stepped for r in refs) or all(stepped[r.name][0].grad is None for r in refs):
                continue
            firsts[family.name] = []
            for ref in refs:
                p, group, frame, grad = stepped[ref.name]
                decay = torch.tensor(1 - group["lr"] * group["weight_decay"], dtype=torch.float64, device=p.device)
                sums = compiled(pair_entry_sums)(p, grad, self._gain_of(frame), decay,
                                                 **_pair_member(ref, frame)._asdict(), threshold=self.dead_threshold,
                                                 dtype=compute_dtype(p))
                firsts[family.name].append(sums)
                if p.grad is not None:
                    covered.add(id(p))
                    flags.append(sums[2])
        finite = not flags or bool(torch.stack(flags).all())
        return _FusedReads(scale_inputs, firsts, covered, finite)

    def _fused_gauge_steps(self, stepped: dict[str, _Stepped],
                           gain_groups: dict[str, dict]) -> dict[str, tuple[int, ...]]:
        """The gauge-carrying tensors stepped by the compiled functions of
        :mod:`gaugeopt.optim.fused_updates` (``fused=True``); returns the dead neuron units per family."""
        reads, self._reads = self._reads or self._fused_reads(stepped, gain_groups), None
        gain_of = self._gain_of

        def scale_input(family: NormScaling, consumers: list[str]) -> Tensor:  # h_j in the frame (read already)
            h = reads.scale_inputs[family.name]
            live = self._params_by_name[family.gain].detach().abs() > self.dead_threshold
            return torch.where(live, h, torch.zeros_like(h))

        channel_steps = self._norm_scale_steps(stepped, gain_groups, scale_input) if self.norm_scale_step else {}
        factors = {name: f for consumers, f in channel_steps.values() for name in consumers}
        charted, frozen = set(), {}
        groups_by_name = {name: entry[1] for name, entry in stepped.items()}
        for family in self.plan.pairs:
            refs = (*family.multiplied, *family.divided)
            if not all(r.name in stepped for r in refs):
                continue
            charted.update(r.name for r in refs)
            if all(stepped[r.name][0].grad is None for r in refs):
                continue
            self._check_coupled_settings(family, groups_by_name)
            params, groups, frames, grads = zip(*(stepped[r.name] for r in refs))
            states = [self._state(p) for p in params]
            scalars = [self._step_scalars(p, group) for p, group in zip(params, groups)]
            anchor = self.state[params[0]]
            if "radial_exp_avg" not in anchor:
                units = params[0].shape[refs[0].axis]
                anchor["radial_exp_avg"] = states[0]["exp_avg"].new_zeros(units)
                anchor["radial_exp_avg_sq"] = states[0]["exp_avg"].new_zeros(units)
            group = groups[0]
            dead = pair_adam_update_(
                list(params), list(grads), [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                [gain_of(f) for f in frames], [factors.get(r.name) for r in refs], scalars,
                anchor["radial_exp_avg"], anchor["radial_exp_avg_sq"], scalars[0],
                members=tuple(_pair_member(r, f) for r, f in zip(refs, frames)),
                n_multiplied=len(family.multiplied), betas=tuple(group["betas"]), threshold=self.dead_threshold,
                frame=group["pair_frame"], hold_ratio=bool(channel_steps), firsts=reads.firsts.get(family.name))
            if bool(dead.any()):
                frozen[family.name] = tuple(dead.nonzero().flatten().tolist())
        for name, (p, group, frame, grad) in stepped.items():
            if name in charted:
                continue
            state = self._state(p)
            compiled(framed_adam_update_)(
                p, grad, state["exp_avg"], state["exp_avg_sq"], gain_of(frame), factors.get(name),
                self._step_scalars(p, group), role=frame.role, merged=frame.merge is not None,
                centered=frame.centered, shared_axes=tuple(frame.shared_axes()), betas=tuple(group["betas"]),
                threshold=self.dead_threshold)
        return frozen

    def _report_frozen(self, frozen: dict[str, tuple[int, ...]]) -> None:
        new = {f: sorted(set(idx) - set(self.frozen.get(f, ()))) for f, idx in frozen.items()}
        new = {f: idx for f, idx in new.items() if idx}
        if new:
            listing = "; ".join(f"{f}: {idx}" for f, idx in new.items())
            warnings.warn(f"DDCAdam froze dead norm channels / neuron units (left unchanged): {listing}",
                          RuntimeWarning, stacklevel=3)
        self.frozen = frozen


def _check_fusable(plan: FramePlan) -> None:
    """``fused=True`` steps a neuron pair's members in the pair's frame plus a norm merge and centered
    rows: ``ValueError`` naming the first member that carries more (a rotation)."""
    for family in plan.pairs:
        for ref in (*family.multiplied, *family.divided):
            frame = plan.frame(ref.name)
            extra = sorted(a.kind for a in frame.axes.values() if a.kind not in ("pair", "merge", "center"))
            if frame.role != "tensor" or extra:
                raise ValueError(
                    f"fused=True: {ref.name} is in neuron pair {family.name} and also carries "
                    f"{', '.join(extra) or frame.role}; the fused path steps pair members with a norm merge and "
                    f"centered rows at most. Use fused=False (the eager step handles every frame).")
