"""The ``torch.optim.Optimizer`` shell shared by DDCAdam, DDCMuon and SymmetryCompatible.

:class:`FramedOptimizer` owns what an optimizer object owns (param groups, state, checks, checkpoints)
and delegates the step to :mod:`gaugeopt.optim.batched_step`: a subclass only says which base rule
each param group takes (:meth:`FramedOptimizer.rule_for`) and validates its groups. The layout of
the step (which tensors are stepped as one batch) is built from the parameters that have gradients
and cached until that set, a shape or a rule changes; whenever it is built, every parameter's state
is checked against what the parameter keeps (:meth:`FramedOptimizer._state_kinds`), before
anything is written. The layout, the stacked state and the parameter ids are caches: copies and
pickles rebuild them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..gauges.families import EDGE_SCALE
from ..gauges.gaugeset import GaugeSet
from .batched_step import (
    CHANNEL_STATE,
    StackedState,
    StepLayout,
    build_program,
    compiled_phase,
    read_phase,
    write_phase,
)
from .distributed import gradients_finite_on_every_rank, sharded_step, whole_by_name
from .frames import FramePlan, build_frame_plan, frozen_gains
from .guards import GuardedOptimizer, check_gauges_cover, require_positive
from .rules import Rule
from .shards import LOCAL

__all__ = ["FramedOptimizer", "FrozenUnits"]

FROZEN_GAIN = "zero gain: the channel's merged columns are zero whatever the gauge, so no frame carries a step"
FROZEN_UNIT_INCOMING = ("zero incoming side: the unit's orbit has no point with the section's incoming norm "
                        "(a ReLU unit there is dead under any optimizer)")
FROZEN_UNIT_BOTH = "incoming and outgoing sides zero: the gauge group does not act on the unit"


class FrozenUnits(NamedTuple):
    """Indices of one gauge family that a step left unchanged, and why (``optimizer.frozen_report()``)."""

    family: str
    indices: tuple[int, ...]
    reason: str


class FramedOptimizer(GuardedOptimizer):
    """Base of the optimizers stepped as frame -> base rule -> lift (module docstring).

    Args (for subclasses):
        params, defaults: as for ``torch.optim.Optimizer``.
        gauges: the model's :class:`~gaugeopt.gauges.GaugeSet`, or ``None`` (no frames: every tensor
            takes its rule as it is).
        channel_step: take the norm channel-scale step (DDCAdam's ``norm_scale_step``).
        edge_scale: the section constant ``c`` of the neuron frames (docs/ddc.md): a unit's canonical
            incoming side has norm ``c`` where its outgoing side is zero.
        nonfinite: ``"raise"`` or ``"skip"`` (:mod:`gaugeopt.optim.guards`).
        compiled: run the step's two phases compiled by ``torch.compile`` (the same functions as the
            eager step; equal up to rounding).
    """

    #: Caches rebuilt on demand: the step's layout and stacked state, parameter ids (new in a copy).
    _TRANSIENT = frozenset({"_layout", "_layout_key", "_stacked", "_names"})

    def __init__(self, params, defaults: dict[str, Any], gauges: GaugeSet | None, *, channel_step: bool,
                 nonfinite: str, compiled: bool, edge_scale: float = EDGE_SCALE):
        self._init_guards(nonfinite)
        require_positive(type(self).__name__, "edge_scale", edge_scale)
        if gauges is not None and not isinstance(gauges, GaugeSet):
            raise TypeError("gauges must be a GaugeSet (from gaugeopt.find_gauges) or None, "
                            f"got {type(gauges).__name__}")
        self.gauges = gauges  # before the groups are added: their parameters are checked against it
        self.channel_step = bool(channel_step)
        self.edge_scale = float(edge_scale)
        self.plan: FramePlan = build_frame_plan(gauges) if gauges is not None else FramePlan({}, {})
        super().__init__(params, defaults)
        model_params = check_gauges_cover(gauges, self.param_groups)
        self.compiled = bool(compiled)
        self._warned_eager = False
        self._lookup: dict[str, Tensor] = dict(model_params)
        #: Frozen norm channels and neuron units of the last step: family name -> indices
        #: (:meth:`frozen_report` says why).
        self.frozen: dict[str, tuple[int, ...]] = {}
        self._frozen_rows: list[FrozenUnits] = []
        self._reset_transient()

    def _reset_transient(self) -> None:
        self._names: dict[int, str] = {id(p): n for n, p in self._lookup.items()}
        self._layout: StepLayout | None = None
        self._layout_key: Any = None
        self._stacked = StackedState()

    def _check_new_parameters(self, group: dict[str, Any], where: str) -> None:
        """Real floating-point tensors of ``gauges.model`` (:func:`~gaugeopt.optim.guards.check_gauges_cover`)."""
        for p in group["params"]:
            if not p.is_floating_point() or p.is_complex():
                raise TypeError(f"{type(self).__name__} needs real floating-point parameters, got {p.dtype} in {where}")
        check_gauges_cover(self.gauges, self.param_groups)  # the new group is the last one

    # ----- what subclasses say -----------------------------------------------------------------------
    def rule_for(self, group: Mapping[str, Any]) -> Rule:
        """The base rule of a param group."""
        raise NotImplementedError

    def _known_names(self) -> Mapping[int, str]:
        return self._names

    def _state_kinds(self, group: Mapping[str, Any], p: Tensor) -> tuple[Mapping[str, tuple[int, ...]], ...]:
        """A norm gain holds the channel-scale step's state (when that step is taken); every other
        parameter its rule's."""
        name = self._names.get(id(p))
        frame = self.plan.frame(name) if name is not None else None
        shape = tuple(p.shape)
        if frame is not None and frame.gain:
            return (_kind(CHANNEL_STATE, shape),) if self.channel_step else ()
        return (_kind(self.rule_for(group).state_keys, shape),)

    # ----- the step ----------------------------------------------------------------------------------
    def _current_layout(self, rules: list[Rule], ranks: tuple[int, int] | None) -> StepLayout:
        key = (tuple((id(p), tuple(p.shape), p.dtype, p.device, p.grad is not None and p.requires_grad)
                     for group in self.param_groups for p in group["params"]),
               tuple(len(group["params"]) for group in self.param_groups), tuple(rules), ranks)
        if key != self._layout_key:
            self._check_state()  # a parameter changed shape, or state was loaded: nothing moved yet
            self._stacked.release(self.state)
            self._layout = build_program(self.param_groups, self._names, self._lookup, self.plan, rules,
                                         channel_step=self.channel_step,
                                         edge_scale=self.edge_scale,
                                         stack=not self.compiled or ranks is not None, ranks=ranks)
            self._layout_key = key
        return self._layout

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One step (the subclass's docstring gives the math). Returns the closure's loss.

        Under FSDP2 each rank steps its rows of every tensor (:mod:`gaugeopt.optim.distributed`)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_step_inputs()
        shards = sharded_step(self)
        if shards is not None and not gradients_finite_on_every_rank(self):
            return loss
        compiled = self.compiled and shards is None
        if self.compiled and shards is not None and not self._warned_eager:
            self._warned_eager = True
            warnings.warn(f"{type(self).__name__}(compiled=True) takes its steps on FSDP2 shards eagerly: the "
                          "compiled step covers single-process and DDP training", RuntimeWarning, stacklevel=3)
        rules = [self.rule_for(group) for group in self.param_groups]
        layout = self._current_layout(rules, shards.ranks if shards is not None else None)
        gains = whole_by_name([f.gain for f in self.plan.norms], self._lookup, shards)  # {} in one process
        inputs = layout.inputs(self._lookup, gains, shards.collectives if shards is not None else LOCAL)
        read = (compiled_phase(read_phase) if compiled else read_phase)(layout.program, inputs)
        finite, any_dead = read.flags.tolist()  # the step's one host synchronisation
        if not finite:
            self.apply_nonfinite_policy(self.nonfinite_parameters())
            return loss
        inputs = layout.for_writing(inputs, self.param_groups, self.state, self._stacked)
        write_phase(layout.program, inputs, read, masked=bool(any_dead), compiled=compiled)
        self._stacked.settle()
        self._report_frozen(layout, read if any_dead else None, gains)
        return loss

    def _report_frozen(self, layout: StepLayout, read, gains: Mapping[str, Tensor]) -> None:
        """Record the frozen channels and units of this step in :attr:`frozen` and
        :meth:`frozen_report`; warn when one is new."""
        rows: list[FrozenUnits] = []
        if read is not None:
            for family in self.plan.norms:
                gain = gains.get(family.gain, self._lookup[family.gain])
                dead = frozen_gains(gain.detach()).nonzero().flatten()
                if len(dead):
                    rows.append(FrozenUnits(family.name, tuple(dead.tolist()), FROZEN_GAIN))
            for families, dead, zero in zip(layout.neuron_families, read.neuron_dead, read.neuron_outgoing_zero):
                for name, row, outgoing_zero in zip(families, dead, zero):
                    for reason, mask in ((FROZEN_UNIT_BOTH, row & outgoing_zero),
                                         (FROZEN_UNIT_INCOMING, row & ~outgoing_zero)):
                        units = mask.nonzero().flatten()
                        if len(units):
                            rows.append(FrozenUnits(name, tuple(units.tolist()), reason))
        frozen: dict[str, tuple[int, ...]] = {}
        for row in rows:
            frozen[row.family] = tuple(sorted((*frozen.get(row.family, ()), *row.indices)))
        new = [(row, sorted(set(row.indices) - set(self.frozen.get(row.family, ())))) for row in rows]
        new = [(row, idx) for row, idx in new if idx]
        if new:
            listing = "; ".join(f"{row.family} {idx} ({row.reason})" for row, idx in new)
            warnings.warn(f"{type(self).__name__} froze norm channels / neuron units where no frame can carry a "
                          f"step (left unchanged): {listing}", RuntimeWarning, stacklevel=3)
        self.frozen = frozen
        self._frozen_rows = rows

    def frozen_report(self) -> list[FrozenUnits]:
        """The norm channels and neuron units the last step froze, one row per family and reason."""
        return list(self._frozen_rows)


def _kind(keys: tuple[str, ...], shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """A kind of state: ``keys`` shaped ``shape``, but the step count, a 0-d tensor."""
    return {key: () if key == "step" else shape for key in keys}
