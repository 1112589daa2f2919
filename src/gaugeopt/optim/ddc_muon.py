"""DDCMuon: Muon for hidden matrices, DDCAdam for the rest, exactly equivariant under a model's gauges.

One ``torch.optim.Optimizer`` for the whole model (ddc.md section 5). Hidden matrices take a Muon
step; embeddings, the LM head and vectors take the rules of :class:`~gaugeopt.optim.ddc_adam.DDCAdam`
inside the same object.

**Muon** (``torch.optim.Muon``), for a matrix ``W`` with gradient ``G``, momentum ``mu``, learning rate
``lr`` and weight decay ``wd``::

    B <- mu B + (1 - mu) G,        U = (1 - mu) G + mu B  (nesterov)  or  U = B,
    O = NS(U),                     W <- (1 - lr wd) W - lr s(W) O,

where ``NS`` is the quintic Newton-Schulz iteration (``X <- a X + (b A + c A^2) X``, ``A = X X^T``,
``(a, b, c) = (3.4445, -4.7750, 2.0315)``, from ``X = U / max(|U|_F, eps)``, five steps), which maps
``U = P S Q^T`` to about ``P Q^T``, and ``s`` is the shape factor ``sqrt(max(1, rows / cols))``
(``adjust_lr="original"``) or ``0.2 sqrt(max(rows, cols))`` (``"match_rms_adamw"``).
:func:`muon_newton_schulz` is torch's iteration operation for operation, run in ``ns_dtype``
(torch always uses bfloat16; here the default is the parameters' own dtype).

**The gauge-equivariant orthogonaliser.** Every tensor is first put in its gauge frame, as in DDCAdam
(``gauge_frames``): decay shrinks the frame value, the base map sees invariant inputs only, and the
result is lifted back covariantly. Per family:

* *Norm scale: merge.* Muon works on the merged matrix ``W~ = C diag(g)`` with gradient
  ``G diag(1/g)``, both invariant, and writes back ``C = W~ diag(1/g)``.
* *Head rotation: nothing to do.* ``NS(Q U R^T) = Q NS(U) R^T`` for orthogonal ``Q``, ``R`` (the
  iteration is a polynomial in ``X X^T`` times ``X``, and ``|U|_F`` is invariant), so per-head
  rotations of query/key/value rows and output columns compose exactly with Muon, whole-matrix or
  head-wise (``head_wise=True``: each head's block, read from the rotation family, is orthogonalised
  on its own; the shape factor stays that of the whole matrix).
* *Logit or router shift: center.* Gradient, momentum and decay act on the centered part; ``NS`` of a
  matrix with centered columns has centered columns (its columns lie in the range of ``U``), and the
  result is centered again to drop rounding. The mean row never moves.
* *Neuron scaling: the invariant stack.* ``NS(D U) != D NS(U)`` for a diagonal ``D``, so for unit
  ``i`` with pair ``P_1`` (producer row and bias), ``P_2`` (consumer columns), in the merged frame,
  the chart of ``gauge_frames.pair_chart`` gives radii ``rho_k = |P_k|``, directions
  ``d_k = P_k / rho_k``, the radial mode ``h = (<G_1, P_1> + <G_2, P_2>) / sqrt 2`` and the tangential
  inputs ``x_k = rho_k (G_k - <G_k, d_k> d_k)``, all invariant. With an invariant per-unit scale
  ``c`` (the *pair frame*, below) the rows ``x_k / c`` form a stack ``X_k`` (units x n_k) that takes
  Muon's momentum and ``NS`` (oriented as the weight: units are the rows of the producer and the
  columns of the consumer), giving ``O_k``; ``u_k = O_k / c`` projected off ``d_k``. A scalar Adam per
  unit on ``h`` gives ``r``. With ``sigma = exp(-lr r / sqrt 2)`` the lift
  (``gauge_frames.pair_retract``) is

      P_k <- rho_k sigma (sigma d_k - lr s_k u_k) / |sigma d_k - lr s_k u_k|,

  the step ``sigma P_k - lr s_k rho_k u_k`` retracted so that ``|P_1| / |P_2|`` (the orbit coordinate)
  is held exactly. Every factor but ``rho_k`` is invariant, so the lift is covariant. Pair frames:

  - ``"balanced"`` (default): ``c = sqrt(rho_1 rho_2)``. The stack rows are ``sqrt(rho_k / rho_l)
    G_k``, projected: the gradient at the *balanced* point of the unit's orbit (``rho_1 = rho_2``),
    and the step ``-lr s_k sqrt(rho_k / rho_l) u_k`` is Muon's step taken there and carried back. On a
    balanced pair the step is Muon's (on the projected gradient), so Muon's learning rates carry over.
  - ``"radius"``: ``c = 1`` (ddc.md section 5 literally): the stack is the gradient with respect to
    the unit directions, the lift is ``rho_k * row``, and ``lr`` is a relative step (each direction
    turns by about ``lr s_k |u_k|`` radians per step).

  In both, the radius changes by the factor ``sigma`` per step (a relative step of about ``lr``).

Training from ``g . theta_0`` thus gives ``g . theta_t`` for every gauge element ``g``, to rounding,
with the default ``ns_dtype=None`` (Newton-Schulz in the parameters' dtype). With
``ns_dtype=torch.bfloat16`` the iteration's rounding is not equivariant and the two runs drift apart
(relative error ~0.4 after 50 steps on the tests' small float64 models). On parameters no gauge
touches the step is ``torch.optim.Muon``'s (hidden matrices; bit for bit with
``ns_dtype=torch.bfloat16``) or ``torch.optim.AdamW``'s (the rest).

**Which parameters take Muon.** Each group has a flag ``use_muon``. When a group does not set it,
:func:`muon_parameter_names` decides: every 2-D parameter except embedding tables and the weight of
a logit-shift family (the LM head), plus the vectors that sit in a neuron pair with such matrices
(a producer bias is charted with its unit). Without a ``GaugeSet`` (``gauges=None``) parameter names
are unknown and every 2-D parameter takes Muon: give the embedding and head a group with
``use_muon=False``. Muon parameters must be 2-D, except vectors inside a Muon neuron pair.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..gauges.families import HeadRotation, LogitShift, NeuronScaling
from ..gauges.gaugeset import GaugeSet
from ._guards import (
    compute_dtype,
    require,
    require_betas,
    require_choice,
    require_nonnegative,
    require_rate,
    require_unit_interval,
)
from .ddc_adam import DDCAdam, _Work, adam_denominator, adam_moments_
from .gauge_frames import center_rows, from_unit_slices, pair_chart, pair_retract, unit_slices
from .matrix_functions import MUON_NS_COEFFICIENTS

__all__ = [
    "DDCMuon",
    "muon_newton_schulz",
    "muon_lr_scale",
    "head_blocks_newton_schulz",
    "muon_parameter_names",
    "ADJUST_LR_CHOICES",
    "PAIR_FRAMES",
]

#: Shape factors of the Muon step, as in ``torch.optim.Muon``'s ``adjust_lr_fn``.
ADJUST_LR_CHOICES = ("original", "match_rms_adamw")

#: Group settings that the members of one neuron pair share (they form one update).
_PAIR_SHARED_KEYS = ("use_muon", "lr", "momentum", "nesterov", "adjust_lr", "ns_steps", "ns_coefficients",
                     "ns_eps", "ns_dtype", "pair_frame", "betas", "eps")

#: Per-unit scales of the neuron-pair stack (module docstring).
PAIR_FRAMES = ("balanced", "radius")

#: Keys a user group may set besides ``params`` and ``use_muon``: the Muon settings, and the Adam
#: part's settings under ``adam_*`` names (stored in the Adam groups under Adam's own names).
_MUON_KEYS = ("lr", "momentum", "nesterov", "weight_decay", "adjust_lr", "ns_steps", "ns_coefficients", "ns_eps",
              "ns_dtype", "head_wise", "pair_frame")
_ADAM_KEYS = {"adam_lr": "lr", "adam_betas": "betas", "adam_eps": "eps", "adam_weight_decay": "weight_decay"}


# --------------------------------------------------------------------------------------------------
# Pure maps
# --------------------------------------------------------------------------------------------------


def muon_newton_schulz(update: Tensor, steps: int = 5,
                       coefficients: tuple[float, float, float] = MUON_NS_COEFFICIENTS, eps: float = 1e-7,
                       dtype: torch.dtype | None = torch.bfloat16) -> Tensor:
    """Muon's quintic Newton-Schulz orthogonalisation of a matrix ``(m, n)`` or a batch ``(k, m, n)``.

    ``X_0 = U / max(|U|_F, eps)`` (transposed first when ``m > n``, so the Gram matrix is the smaller
    square), then ``steps`` times ``A = X X^T``, ``X <- a X + (b A + c A A) X``. For a single matrix
    this is ``torch.optim.Muon``'s iteration operation for operation (``addmm`` with the same
    operands), so with ``dtype=torch.bfloat16`` it returns torch's bits. ``dtype=None`` computes in
    ``update``'s dtype. Each matrix of a batch is normalised and iterated on its own. The result has
    dtype ``dtype`` (callers add it to higher-precision parameters, as torch does).
    """
    if update.ndim not in (2, 3):
        raise ValueError(f"Newton-Schulz takes a matrix (m, n) or a batch (k, m, n), got shape {tuple(update.shape)}")
    if not 0 <= steps < 100:
        raise ValueError(f"ns_steps must be in [0, 100), got {steps}")
    a, b, c = coefficients
    X = update.to(dtype or update.dtype, copy=True)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    if X.ndim == 2:
        fused, norm = torch.addmm, X.norm()
    else:
        fused, norm = torch.baddbmm, torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    X.div_(norm.clamp(min=eps))
    for _ in range(steps):
        gram = X @ X.mT
        X = fused(X, fused(gram, gram, gram, beta=b, alpha=c), X, beta=a)
    return X.mT if transposed else X


def muon_lr_scale(shape: tuple[int, int] | torch.Size, adjust_lr: str) -> float:
    """Muon's shape factor ``s``: the step is ``lr * s * NS(U)`` for a ``(rows, cols)`` matrix."""
    rows, cols = shape
    if adjust_lr == "original":
        return math.sqrt(max(1, rows / cols))
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"adjust_lr must be one of {ADJUST_LR_CHOICES}, got {adjust_lr!r}")


def head_blocks_newton_schulz(update: Tensor, axis: int, index: Tensor, **ns_options: Any) -> Tensor:
    """Newton-Schulz on each head block of a matrix: rows ``index[h]`` (``axis=0``) or columns
    ``index[h]`` (``axis=1``) form block ``h``; ``index`` (heads, head_dim) must partition that axis.

    Block-diagonal orthogonal maps on the split axis (per-head rotations) commute with this exactly.
    """
    index = index.to(update.device)
    if not torch.equal(index.flatten().sort().values, torch.arange(update.shape[axis], device=update.device)):
        raise ValueError(f"head blocks {tuple(index.shape)} do not partition axis {axis} of a {tuple(update.shape)} matrix")
    if axis == 0:
        ortho = muon_newton_schulz(update[index], **ns_options)  # (heads, head_dim, cols)
        out = ortho.new_empty(update.shape)
        out[index] = ortho
    else:
        ortho = muon_newton_schulz(update[:, index].movedim(1, 0), **ns_options)  # (heads, rows, head_dim)
        out = ortho.new_empty(update.shape)
        out[:, index] = ortho.movedim(0, 1)
    return out


def muon_parameter_names(model: nn.Module, gauges: GaugeSet | None = None) -> set[str]:
    """Names of the parameters that DDCMuon (and the Muon + AdamW baseline) give the Muon step.

    Every 2-D parameter except ``nn.Embedding`` tables and the weight of a ``logit_shift`` family (the
    LM head). A neuron pair is stepped as one unit: when all of its matrices are hidden matrices its
    vectors (a producer bias) join them; otherwise the whole pair takes the Adam rules.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    families = tuple(gauges) if gauges is not None else ()
    heads = {f.weight for f in families if isinstance(f, LogitShift) and f.kind == "logit_shift"}
    params = dict(model.named_parameters())
    names = {n for n, p in params.items() if p.ndim == 2 and id(p) not in embeddings and n not in heads}
    for family in families:
        if isinstance(family, NeuronScaling):
            members = set(family.parameters)
            if all(n in names for n in members if params[n].ndim == 2):
                names |= members
            else:
                names -= members
    return names


# --------------------------------------------------------------------------------------------------
# The optimizer
# --------------------------------------------------------------------------------------------------


class DDCMuon(DDCAdam):
    """Muon on hidden matrices and DDCAdam on the rest, exactly equivariant under ``gauges``.

    Args:
        params: parameters, ``(name, parameter)`` pairs or group dicts. A group may set any keyword
            below (the ``adam_*`` ones configure its Adam part) and ``use_muon`` to choose the rule
            for all its parameters; otherwise :func:`muon_parameter_names` splits it.
        gauges: the model's :class:`~gaugeopt.gauges.GaugeSet` (``gaugeopt.find_gauges``), or ``None``
            for none (then every 2-D parameter takes Muon unless its group sets ``use_muon=False``).
        lr, momentum, nesterov, weight_decay: Muon's, as in ``torch.optim.Muon`` (decay is
            ``W <- (1 - lr wd) W``). On neuron pairs the scale of ``lr`` depends on ``pair_frame``.
        adjust_lr: the shape factor, ``"original"`` or ``"match_rms_adamw"`` (torch's ``adjust_lr_fn``).
        ns_steps, ns_coefficients, ns_eps: the Newton-Schulz iteration.
        ns_dtype: its arithmetic dtype: ``None`` (default) uses the parameters' dtype, which keeps the
            equivariance exact; ``torch.bfloat16`` reproduces ``torch.optim.Muon`` bit for bit.
        head_wise: orthogonalise each attention head's block of the query/key/value rows and output
            columns separately (heads read from the model's rotation families).
        pair_frame: ``"balanced"`` or ``"radius"``: the per-unit scale of the neuron-pair stack
            (module docstring); ``"balanced"`` keeps Muon's learning-rate scale.
        adam_lr, adam_betas, adam_eps: DDCAdam's settings for embeddings, the head and vectors; the
            betas and eps also drive the scalar Adam of the neuron pairs' radial mode.
        adam_weight_decay: decay of the Adam part (default: ``weight_decay``).
        dead_threshold: as in DDCAdam: dead norm channels and neuron units are frozen and reported
            in :attr:`frozen`.
    """

    def __init__(
        self,
        params,
        gauges: GaugeSet | None,
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.1,
        adjust_lr: str = "original",
        ns_steps: int = 5,
        *,
        ns_coefficients: tuple[float, float, float] = MUON_NS_COEFFICIENTS,
        ns_eps: float = 1e-7,
        ns_dtype: torch.dtype | None = None,
        head_wise: bool = False,
        pair_frame: str = "balanced",
        adam_lr: float = 1e-3,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        adam_weight_decay: float | None = None,
        dead_threshold: float = 1e-12,
        nonfinite: str = "raise",
    ):
        require_betas(type(self).__name__, "adam_betas", adam_betas)  # before tuple() below
        require(isinstance(ns_coefficients, (tuple, list)), type(self).__name__,
                f"ns_coefficients must be three finite numbers (a, b, c), got {ns_coefficients!r}")
        adam_weight_decay = weight_decay if adam_weight_decay is None else adam_weight_decay
        muon_defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                             adjust_lr=adjust_lr, ns_steps=ns_steps, ns_coefficients=tuple(ns_coefficients),
                             ns_eps=ns_eps, ns_dtype=ns_dtype, head_wise=head_wise,
                             pair_frame=pair_frame)
        adam_defaults = dict(lr=adam_lr, betas=tuple(adam_betas), eps=adam_eps, weight_decay=adam_weight_decay)
        _check_muon_settings(muon_defaults, type(self).__name__)
        if gauges is not None and not isinstance(gauges, GaugeSet):
            raise TypeError(f"gauges must be a GaugeSet (from gaugeopt.find_gauges) or None, got {type(gauges).__name__}")
        names = {id(p): n for n, p in gauges.model.named_parameters()} if gauges is not None else {}
        hidden = muon_parameter_names(gauges.model, gauges) if gauges is not None else None
        groups = _split_groups(params, muon_defaults, adam_defaults, names, hidden)
        super().__init__(groups, gauges, lr=adam_lr, betas=adam_betas, eps=adam_eps,
                         weight_decay=adam_weight_decay, norm_scale_step=False, dead_threshold=dead_threshold,
                         nonfinite=nonfinite)
        self.defaults = {**muon_defaults, "betas": tuple(adam_betas), "eps": adam_eps, "use_muon": True}
        self._heads = _head_blocks(gauges) if gauges is not None else {}
        self._check_groups()

    # ----- construction checks ------------------------------------------------------------------
    _EXTRA_GROUP_KEYS = frozenset({*_MUON_KEYS, "use_muon"})
    _STATE_KEYS = DDCAdam._STATE_KEYS | {"momentum_buffer", "radial_step"}
    _PARAM_SHAPED_STATE = DDCAdam._PARAM_SHAPED_STATE | {"momentum_buffer"}

    def _validate_group(self, group: dict, where: str) -> None:
        """Muon settings and shapes where the group takes Muon; always the Adam part's (lr, betas, eps,
        decay). Runs on groups added, on every step and on groups a checkpoint loads."""
        if group.get("use_muon", False):
            _check_muon_settings(group, where)
            self._check_muon_shapes(group, where)
        super()._validate_group(group, where)

    def _check_muon_shapes(self, group: dict, where: str) -> None:
        """Muon takes matrices (and the vectors of a neuron pair whose matrices it takes). Which
        vectors belong to pairs is known once the frame plan is built: construction checks again then."""
        if not hasattr(self, "plan"):
            return
        for p in group["params"]:
            name = self._names.get(id(p))
            if p.ndim != 2 and name not in self._pair_members:
                raise ValueError(f"{where}: Muon needs 2-D parameters; {name or 'a parameter'} has shape "
                                 f"{tuple(p.shape)}: put it in a group with use_muon=False")

    def _check_groups(self) -> None:
        for index, group in enumerate(self.param_groups):
            if group["use_muon"]:
                self._check_muon_shapes(group, f"param group {index}")
        optimized = self._group_of
        for family in self.plan.pairs:
            names = [r.name for r in (*family.multiplied, *family.divided)]
            if all(n in optimized for n in names):
                self._pair_group(family, names)

    def _pair_group(self, family: NeuronScaling, names: list[str]) -> dict:
        """The group of a neuron pair's producer, after checking its members agree on the shared keys."""
        group_of = self._group_of
        groups = {n: group_of[n] for n in names if n in group_of}
        anchor = groups[family.multiplied[0].name]
        keys = _PAIR_SHARED_KEYS if anchor["use_muon"] else ("use_muon", "lr", "betas", "eps")
        for name, group in groups.items():
            differ = [k for k in keys if group.get(k) != anchor.get(k)]
            if differ:
                raise ValueError(
                    f"gauge family {family.name} couples {sorted(groups)} into one update, but "
                    f"{family.multiplied[0].name} and {name} are in groups with different {differ}; "
                    f"put them in groups that agree (a neuron pair takes Muon or Adam as a whole)")
        return anchor

    @property
    def _group_of(self) -> dict[str, dict]:
        return {self._names[id(p)]: g for g in self.param_groups for p in g["params"] if id(p) in self._names}

    # ----- Muon maps ------------------------------------------------------------------------------
    def _momentum_input(self, p: Tensor, x: Tensor, group: dict) -> Tensor:
        """Advance ``p``'s momentum buffer on ``x`` (torch.optim.Muon's order); return NS's input."""
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(x, memory_format=torch.preserve_format)
        buffer = state["momentum_buffer"]
        buffer.lerp_(x, 1 - group["momentum"])
        return x.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer

    @staticmethod
    def _ns_options(group: dict) -> dict[str, Any]:
        return dict(steps=group["ns_steps"], coefficients=group["ns_coefficients"], eps=group["ns_eps"],
                    dtype=group["ns_dtype"])

    def _orthogonalise(self, name: str | None, update: Tensor, group: dict) -> Tensor:
        """``NS(update)``, per attention head when the group asks for it and the heads are known."""
        if group["head_wise"] and name in self._heads:
            axis, index = self._heads[name]
            return head_blocks_newton_schulz(update, axis, index, **self._ns_options(group))
        return muon_newton_schulz(update, **self._ns_options(group))

    def _plain_muon_step(self, p: Tensor, group: dict) -> None:
        """torch.optim.Muon's update, operation for operation (a matrix no gauge touches); float16 and
        bfloat16 parameters keep a float32 momentum and are updated on a float32 copy."""
        work = p if compute_dtype(p) == p.dtype else p.to(compute_dtype(p))
        update = muon_newton_schulz(self._momentum_input(p, p.grad.to(work.dtype), group), **self._ns_options(group))
        adjusted_lr = group["lr"] * muon_lr_scale(p.shape, group["adjust_lr"])
        work.mul_(1 - group["lr"] * group["weight_decay"])
        work.add_(update, alpha=-adjusted_lr)
        if work is not p:
            p.copy_(work)

    def _muon_frame_step(self, name: str, w: _Work) -> None:
        """Muon on a gauge-carrying matrix in its frame (merged, centered, decayed)."""
        update = self._orthogonalise(name, self._momentum_input(w.param, w.grad, w.group), w.group)
        update = update.to(w.value.dtype)
        if w.frame.centered:
            update = center_rows(update)
        w.value = w.value - (w.group["lr"] * muon_lr_scale(w.value.shape, w.group["adjust_lr"])) * update

    def _radial_adam(self, anchor: Tensor, radial: Tensor, group: dict) -> Tensor:
        """Scalar Adam per unit on the radial mode; state kept with the producer weight."""
        state = self.state[anchor]
        if "radial_exp_avg" not in state:
            state["radial_step"] = 0
            state["radial_exp_avg"] = torch.zeros_like(radial)
            state["radial_exp_avg_sq"] = torch.zeros_like(radial)
        beta1, beta2 = group["betas"]
        state["radial_step"] += 1
        step = state["radial_step"]
        adam_moments_(radial, state["radial_exp_avg"], state["radial_exp_avg_sq"], beta1, beta2)
        denominator = adam_denominator(state["radial_exp_avg_sq"], step, beta2, group["eps"])
        return state["radial_exp_avg"] / denominator / (1 - beta1**step)

    def _muon_pair_step(self, family: NeuronScaling, work: dict[str, _Work]) -> tuple[int, ...]:
        """The invariant-stack Muon step for all units of ``family``; returns the dead units."""
        sides = (family.multiplied, family.divided)
        group = self._pair_group(family, [r.name for refs in sides for r in refs])

        (P1, widths1), (G1, _) = self._gather_side(work, sides[0], "value"), self._gather_side(work, sides[0], "grad")
        (P2, widths2), (G2, _) = self._gather_side(work, sides[1], "value"), self._gather_side(work, sides[1], "grad")
        chart = pair_chart(P1, G1, P2, G2, self.dead_threshold)
        unit_scale = torch.ones_like(chart.rho1)
        if group["pair_frame"] == "balanced":
            unit_scale = torch.where(chart.dead, unit_scale, torch.sqrt(chart.rho1) * torch.sqrt(chart.rho2))
        unit_scale = unit_scale.unsqueeze(1)

        tangent_updates = []
        for side, (refs, tangent, widths) in enumerate(((sides[0], chart.tangent1, widths1),
                                                         (sides[1], chart.tangent2, widths2))):
            stack = []
            for ref, x in zip(refs, (tangent / unit_scale).split(widths, dim=1)):
                w = work[ref.name]
                moment = self._momentum_input(w.param, from_unit_slices(x, ref.axis, w.value.shape), group)
                stack.append(unit_slices(moment, ref.axis))
            stack = torch.cat(stack, dim=1)  # (units, n_k)
            oriented = stack if side == 0 else stack.T  # the weights' layout: units are producer rows, consumer columns
            ortho = muon_newton_schulz(oriented, **self._ns_options(group)).to(stack.dtype)
            scale = muon_lr_scale(oriented.shape, group["adjust_lr"])
            tangent_updates.append(scale * (ortho if side == 0 else ortho.T) / unit_scale)

        radial = self._radial_adam(work[family.multiplied[0].name].param, chart.radial, group)
        new1, new2 = pair_retract(chart, radial, tangent_updates[0], tangent_updates[1], group["lr"])
        return self._write_pair(family, work, chart, (new1, widths1), (new2, widths2))

    # ----- DDCAdam's step hooks: Muon where the group asks for it -----------------------------------
    def _plain_steps(self, params: list[Tensor], group: dict) -> None:
        if not group["use_muon"]:
            return self._adamw_steps(params, group)
        for p in params:
            self._plain_muon_step(p, group)

    def _pair_update(self, family: NeuronScaling, work: dict[str, _Work]) -> tuple[int, ...]:
        muon = work[family.multiplied[0].name].group["use_muon"]
        return self._muon_pair_step(family, work) if muon else self._pair_step(family, work)

    def _framed_update(self, name: str, w: _Work) -> None:
        if w.group["use_muon"]:
            self._muon_frame_step(name, w)
        else:
            super()._framed_update(name, w)


# --------------------------------------------------------------------------------------------------
# Construction helpers
# --------------------------------------------------------------------------------------------------


def _check_muon_settings(group: dict, where: str) -> None:
    """``ValueError(f"{where}: <field> ...")`` for a bad Muon setting."""
    require_rate(where, group["lr"])
    require_unit_interval(where, "momentum", group["momentum"])
    require_nonnegative(where, "weight_decay", group["weight_decay"])
    require_choice(where, "adjust_lr", group["adjust_lr"], ADJUST_LR_CHOICES)
    steps = group["ns_steps"]
    require(isinstance(steps, int) and not isinstance(steps, bool) and 0 <= steps < 100, where,
            f"ns_steps must be an int in [0, 100), got {steps!r}")
    coefficients = group["ns_coefficients"]
    require(isinstance(coefficients, (tuple, list)) and len(coefficients) == 3
            and all(isinstance(c, (int, float)) and math.isfinite(c) for c in coefficients), where,
            f"ns_coefficients must be three finite numbers (a, b, c), got {coefficients!r}")
    require_nonnegative(where, "ns_eps", group["ns_eps"])
    require_choice(where, "pair_frame", group["pair_frame"], PAIR_FRAMES)
    dtype = group["ns_dtype"]
    require(dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point), where,
            f"ns_dtype must be a floating-point dtype or None, got {dtype!r}")


def _split_groups(params, muon_defaults: dict, adam_defaults: dict, names: dict[int, str],
                  hidden: set[str] | None) -> list[dict]:
    """Turn the user's params into Muon groups and Adam groups (every key filled in)."""
    if isinstance(params, Tensor):
        raise TypeError("params must be an iterable of tensors or of group dicts, got a single Tensor")
    params = list(params)
    if not params:
        raise ValueError("DDCMuon got an empty parameter list")
    user_groups = params if isinstance(params[0], dict) else [{"params": params}]
    groups = []
    for index, user in enumerate(user_groups):
        unknown = set(user) - {"params", "use_muon", *_MUON_KEYS, *_ADAM_KEYS}
        if unknown:
            raise ValueError(f"param group {index} has unknown option(s) {sorted(unknown)}")
        entries = [user["params"]] if isinstance(user["params"], Tensor) else list(user["params"])
        tensors = [e[1] if isinstance(e, tuple) else e for e in entries]
        if "use_muon" in user:
            muon_flags = [bool(user["use_muon"])] * len(tensors)
        elif hidden is not None:
            muon_flags = [names.get(id(p)) in hidden for p in tensors]
        else:
            muon_flags = [p.ndim == 2 for p in tensors]
        muon = {**muon_defaults, **{k: user[k] for k in _MUON_KEYS if k in user}}
        adam = {**muon_defaults, **adam_defaults, **{v: user[k] for k, v in _ADAM_KEYS.items() if k in user}}
        for settings, flag in ((muon, True), (adam, False)):
            chosen = [p for p, f in zip(tensors, muon_flags) if f == flag]
            if chosen:
                settings = dict(settings, ns_coefficients=tuple(settings["ns_coefficients"]))
                if flag:
                    settings.update(betas=adam["betas"], eps=adam["eps"])
                groups.append({**settings, "params": chosen, "use_muon": flag})
    return groups


def _head_blocks(gauges: GaugeSet) -> dict[str, tuple[int, Tensor]]:
    """Parameter name -> (axis, head index (heads, head_dim)) for the weights of rotation families."""
    blocks: dict[str, tuple[int, Tensor]] = {}
    for family in gauges:
        if isinstance(family, HeadRotation):
            for weight, _bias, rows, _by_query in family.left:
                blocks[weight] = (0, rows)
            for weight, cols in family.right:
                blocks[weight] = (1, cols)
    return blocks
