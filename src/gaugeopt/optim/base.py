"""The ``torch.optim.Optimizer`` shell shared by DDCAdam, DDCMuon and SymmetryCompatible.

:class:`FramedOptimizer` owns what an optimizer object owns (param groups, state, checks, checkpoints)
and delegates the step to :mod:`gaugeopt.optim.step` (its program: :mod:`gaugeopt.optim.program`; its
state: :mod:`gaugeopt.optim.storage`; eager or compiled: :mod:`gaugeopt.optim.compile`): a subclass only says which base rule
each param group takes (:meth:`FramedOptimizer.rule_for`) and validates its groups. The layout of
the step (which tensors are stepped as one batch) is built from the parameters that have gradients
and cached until that set, a shape or a rule changes; whenever it is built, every parameter's state
is checked against what the parameter keeps (:meth:`FramedOptimizer._state_kinds`), before
anything is written. The layout, the stacked state and the parameter ids are caches: copies and
pickles rebuild them.

**Parameters are bound by name.** Each parameter is recorded under its name in ``gauges.model`` when
its group is added; the frames read the model's parameters by those names. At the first step, and
whenever the tensors in the param groups change, the optimizer resolves the names again in the
model as it is then (:meth:`FramedOptimizer.rebind`), so wrapping that replaces the parameter
objects after the optimizer was built (accelerate's ``prepare``, FSDP2's ``fully_shard``) keeps every
frame, and a tensor that no longer matches its name is an error, never a silently unframed step.
Parameters that are not ``gauges.model``'s (a learnable temperature, a loss's own parameter) take
their group's rule without a frame; one warning lists them and :meth:`FramedOptimizer.split` prints
every parameter's rule.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..gauges.families import EDGE_SCALE
from ..gauges.gaugeset import GaugeSet
from .compile import CUDA_GRAPH_MODES, StepRunner, compile_mode
from .distributed import gradients_finite_on_every_rank, sharded_step, whole_by_name
from .frames import FramePlan, build_frame_plan, frozen_gains
from .guards import (GuardedOptimizer, check_gauges_cover, compute_dtype, require_positive,
                     user_stacklevel)
from .program import StepLayout, build_program
from .rules import Rule
from .shards import LOCAL
from .step import CHANNEL_STATE, step_inputs, with_state
from .storage import HeldGradients, ScalarTables, StackedState, move_into_stack, owns_its_memory, stacked_view

__all__ = ["FramedOptimizer", "FrozenUnits", "SplitRow"]

_EAGER = StepRunner(None)

FROZEN_GAIN = "zero gain: the channel's merged columns are zero whatever the gauge, so no frame carries a step"
FROZEN_UNIT_INCOMING = ("zero incoming side: the unit's orbit has no point with the section's incoming norm "
                        "(a ReLU unit there is dead under any optimizer)")
FROZEN_UNIT_BOTH = "incoming and outgoing sides zero: the gauge group does not act on the unit"


class FrozenUnits(NamedTuple):
    """Indices of one gauge family that a step left unchanged, and why (``optimizer.frozen_report()``)."""

    family: str
    indices: tuple[int, ...]
    reason: str


class SplitRow(NamedTuple):
    """One parameter in :meth:`FramedOptimizer.split`: its name (or place), shape, base rule, the
    learning rate and weight decay of its group, and which gauges act on it (``frame``)."""

    parameter: str
    shape: tuple[int, ...]
    rule: str
    lr: float
    weight_decay: float
    frame: str


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
        compiled: run the step's phases compiled by ``torch.compile`` (the same functions as the
            eager step; equal up to rounding): ``True`` in its default mode, or the name of a mode
            (:data:`~gaugeopt.optim.compile.COMPILE_MODES`; ``"reduce-overhead"`` captures CUDA
            graphs on CUDA devices, with every tensor that lives across steps marked static).
        stack_parameters: hold the parameters of each batch as slices of one buffer per batch
            (:mod:`gaugeopt.optim.storage`), so the step reads them where they are and updates them
            in place, in stacked operations, instead of stacking copies and copying back. Their
            gradients are held the same way where that costs nothing (gradients that persist from
            step to step: ``zero_grad(set_to_none=False)``, then backward accumulates into the
            buffer) and, compiled, copied in otherwise, so the compiled step is one program per
            shape, whatever the depth. ``zero_grad`` is torch's.
    """

    #: Caches rebuilt on demand: the step's layout and stacked state, parameter ids (new in a copy).
    _TRANSIENT = frozenset({"_layout", "_layout_key", "_held_grads", "_released", "_stacked", "_scalars", "_names",
                            "_bound_ids", "_runner"})

    def __init__(self, params, defaults: dict[str, Any], gauges: GaugeSet | None, *, channel_step: bool,
                 nonfinite: str, compiled: bool | str, edge_scale: float = EDGE_SCALE,
                 stack_parameters: bool = False):
        self._init_guards(nonfinite)
        mode = compile_mode(compiled)
        require_positive(type(self).__name__, "edge_scale", edge_scale)
        if gauges is not None and not isinstance(gauges, GaugeSet):
            raise TypeError("gauges must be a GaugeSet (from gaugeopt.find_gauges) or None, "
                            f"got {type(gauges).__name__}")
        self.gauges = gauges
        self.channel_step = bool(channel_step)
        self.edge_scale = float(edge_scale)
        self.plan: FramePlan = build_frame_plan(gauges) if gauges is not None else FramePlan({}, {})
        #: Per param group, each parameter's name in ``gauges.model`` (``None``: not one of its parameters).
        self._bound_names: list[list[str | None]] = []
        self._building = True
        super().__init__(params, defaults)  # adds the groups through add_param_group
        self._building = False
        self._check_configured()
        self.compile_mode = mode  # torch.compile's mode, None: eager
        self.compiled = mode is not None
        self.stack_parameters = bool(stack_parameters)
        self._warned_eager = False
        self._warned_savers = False
        self._lookup: dict[str, Tensor] = {}  # name -> the model's tensor, resolved at the first step
        #: Frozen norm channels and neuron units of the last step: family name -> indices
        #: (:meth:`frozen_report` says why).
        self.frozen: dict[str, tuple[int, ...]] = {}
        self._frozen_rows: list[FrozenUnits] = []
        self._reset_transient()
        self._notify_outside(range(len(self.param_groups)), stacklevel=4)  # the user's constructor call

    def _reset_transient(self) -> None:
        self._names: dict[int, str] = dict(self._known_names())  # id(parameter held) -> its name
        self._bound_ids: tuple[int, ...] | None = None  # the tensors the names were resolved for (rebind)
        self._layout: StepLayout | None = None
        self._layout_key: Any = None
        self._held_grads = HeldGradients([])  # the layout's lists held in one buffer each, and their gradients
        self._released = False  # release_parameters() gave them memory of their own: hold them again
        self._stacked = StackedState()
        self._scalars = ScalarTables()
        compiled = getattr(self, "compiled", False)  # all that one pickled before compile_mode existed says
        self._runner = StepRunner(getattr(self, "compile_mode", "default" if compiled else None))

    def _check_new_parameters(self, group: dict[str, Any], where: str) -> None:
        """Real floating-point tensors (parameters outside ``gauges.model`` take their rule without a frame)."""
        for p in group["params"]:
            if not p.is_floating_point() or p.is_complex():
                raise TypeError(f"{type(self).__name__} needs real floating-point parameters, got {p.dtype} in {where}")

    # ----- what subclasses say -----------------------------------------------------------------------
    def rule_for(self, group: Mapping[str, Any]) -> Rule:
        """The base rule of a param group."""
        raise NotImplementedError

    def rule_name(self, group: Mapping[str, Any]) -> str:
        """The name of a group's base rule, as :meth:`split` prints it."""
        raise NotImplementedError

    def _group_parts(self, param_group: dict[str, Any]) -> list[dict[str, Any]]:
        """The param groups that :meth:`add_param_group` adds for a group a user gives (DDCMuon
        splits it into its Muon and Adam parts): by default the group itself."""
        return [param_group]

    def _check_configured(self) -> None:
        """Refuse an optimizer whose parameters its configuration does not describe (here: a GaugeSet
        of another model, :func:`~gaugeopt.optim.guards.check_gauges_cover`)."""
        check_gauges_cover(self.gauges, self._bound_names)

    def _is_outside(self, group_index: int, param_index: int) -> bool:
        """Whether a parameter lies outside what configures the optimizer (here: not a parameter of
        ``gauges.model``), so that it takes its group's rule without a frame."""
        return self.gauges is not None and self._bound_names[group_index][param_index] is None

    def _outside_notice(self, listing: str, count: int) -> str:
        return (f"{type(self).__name__}: {count} parameter(s) are not parameters of gauges.model, so no gauge frame "
                f"applies to them: each takes its group's rule as it is ({listing}); "
                f"{type(self).__name__}.split() lists every parameter's rule")

    def _frame_of(self, group_index: int, param_index: int) -> str:
        """What :meth:`split` prints in its ``frame`` column: the kinds of the gauge families acting
        on the parameter, ``-`` for none, or that it lies outside ``gauges.model``."""
        if self._is_outside(group_index, param_index):
            return "none: outside gauges.model"
        name = self._bound_names[group_index][param_index]
        kinds = sorted({f.kind for f in self.gauges if name in f.parameters}) if self.gauges is not None else []
        frame = self.plan.frame(name) if name is not None else None
        gain = " (a norm gain: a frame, not stepped)" if frame is not None and frame.gain else ""
        return (", ".join(kinds) or "-") + gain

    def _known_names(self) -> Mapping[int, str]:
        return {id(p): name for group, names in zip(self.param_groups, self._bound_names)
                for p, name in zip(group["params"], names) if name is not None}

    # ----- groups ------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group``, with each parameter recorded under its name in
        ``gauges.model``; parameters outside it are listed in one warning (module docstring). A
        subclass may add a user's group as several groups (:meth:`_group_parts`); on any error none
        of them is added."""
        first = len(self.param_groups)
        try:
            for part in self._group_parts(param_group):
                super().add_param_group(part)  # the guards' checks: keys, duplicates, dtypes, settings
                self._bound_names.append(self._names_in_model(self.param_groups[-1]["params"]))
        except Exception:
            del self.param_groups[first:]
            del self._bound_names[first:]
            raise
        self._names = dict(self._known_names())
        if not self._building:
            self._notify_outside(range(first, len(self.param_groups)), stacklevel=3)

    def _names_in_model(self, params: Sequence[Tensor]) -> list[str | None]:
        if self.gauges is None:
            return [None] * len(params)
        names = {id(p): n for n, p in self.gauges.params().items()}
        return [names.get(id(p)) for p in params]

    def _notify_outside(self, groups: range, stacklevel: int) -> None:
        """One warning naming the parameters of ``groups`` that lie outside the model."""
        names = self.parameter_names()
        outside = [self.describe_parameter(gi, pi, names) for gi in groups
                   for pi in range(len(self.param_groups[gi]["params"])) if self._is_outside(gi, pi)]
        if outside:
            listing = "; ".join(outside[:10]) + ("; ..." if len(outside) > 10 else "")
            warnings.warn(self._outside_notice(listing, len(outside)), UserWarning, stacklevel=stacklevel)

    def split(self, *, print_table: bool = True) -> list[SplitRow]:
        """Every parameter with its base rule, learning rate, weight decay and frame (the gauge
        kinds acting on it, or ``none`` for a parameter outside ``gauges.model``), in param-group
        order; printed as a table unless ``print_table=False``."""
        names = self.parameter_names()
        rows = [SplitRow(names[gi][pi] or f"group {gi} entry {pi}", tuple(p.shape), self.rule_name(group),
                         float(group["lr"]), float(group["weight_decay"]), self._frame_of(gi, pi))
                for gi, group in enumerate(self.param_groups) for pi, p in enumerate(group["params"])]
        if print_table:
            header = SplitRow("parameter", "shape", "rule", "lr", "weight_decay", "frame")
            cells = [header] + [r._replace(shape=str(r.shape), lr=f"{r.lr:g}", weight_decay=f"{r.weight_decay:g}")
                                for r in rows]
            widths = [max(len(str(c[i])) for c in cells) for i in range(len(header))]
            for c in cells:
                print("  ".join(str(v).ljust(w) for v, w in zip(c, widths)).rstrip())
        return rows

    # ----- binding by name ---------------------------------------------------------------------------
    def rebind(self) -> None:
        """Resolve every parameter by its recorded name in ``gauges.model`` as the model is now.

        A tensor in the param groups that is the model's parameter of its name is kept. One that is
        not, while the model has another tensor under that name (the model's parameters were
        replaced after the optimizer was built, by ``fully_shard``, ``to_empty`` or
        ``load_state_dict(assign=True)``), is replaced by the model's, its optimizer state moved
        along when the two have the same type, shape, dtype and device. A name the model no longer
        has, or a tensor that is the model's parameter of another name, raises ``ValueError`` before
        anything changes. The step calls this itself at the first step and whenever the tensors in
        the param groups change (accelerate's ``prepare`` swaps them); call it after replacing the
        model's parameters later in training."""
        model = self.gauges.params() if self.gauges is not None else {}
        named = {id(t): n for n, t in model.items()}
        where = type(self).__name__
        if len(self._bound_names) != len(self.param_groups) or any(
                len(names) != len(group["params"]) for names, group in zip(self._bound_names, self.param_groups)):
            raise ValueError(f"{where}: the param groups were changed without add_param_group; the optimizer no "
                             f"longer knows which model parameter each entry is")
        replace: list[tuple[int, int, Tensor]] = []
        bound: list[list[str | None]] = []
        for gi, (group, names) in enumerate(zip(self.param_groups, self._bound_names)):
            bound.append([])
            for pi, (p, name) in enumerate(zip(group["params"], names)):
                now = named.get(id(p))
                if now is None and name is not None:
                    held = self.describe_parameter(gi, pi)
                    if name not in model:
                        raise ValueError(f"{where}: {held} was gauges.model's parameter {name!r}, which the model no "
                                         f"longer has; find the gauges on the model being trained")
                    new = model[name]
                    if tuple(new.shape) != tuple(p.shape):
                        raise ValueError(f"{where}: {held} was gauges.model's parameter {name!r}, which now has shape "
                                         f"{tuple(new.shape)}; find the gauges on the model being trained")
                    if self.state.get(p) and (type(new) is not type(p) or new.dtype != p.dtype
                                              or new.device != p.device):
                        raise ValueError(f"{where}: gauges.model's parameter {name!r} was replaced by a "
                                         f"{type(new).__name__} ({new.dtype}, {new.device}) after the optimizer had "
                                         f"state for it; build the optimizer after wrapping the model, or save its "
                                         f"state_dict and load it into one built after")
                    replace.append((gi, pi, new))
                    now = name
                elif now is not None and name is not None and now != name:
                    raise ValueError(f"{where}: {self.describe_parameter(gi, pi)} was gauges.model's parameter "
                                     f"{name!r} and is now its {now!r}; the param groups were reordered")
                bound[-1].append(now)
        self._stacked.release(self.state)  # every entry its own tensor before any moves
        for gi, pi, new in replace:
            old = self.param_groups[gi]["params"][pi]
            if old in self.state:
                self.state[new] = self.state.pop(old)
            self.param_groups[gi]["params"][pi] = new
        self._bound_names = bound
        self._lookup = model
        self._names = {id(p): name for group, names in zip(self.param_groups, bound)
                       for p, name in zip(group["params"], names) if name is not None}
        self._bound_ids = self._held_ids()
        self._layout, self._layout_key, self._held_grads = None, None, HeldGradients([])

    @property
    def _held(self) -> list[list[Tensor]]:
        """The parameter lists ``stack_parameters=True`` holds in one buffer each (:func:`_held_lists`)."""
        return self._held_grads.lists

    def _held_ids(self) -> tuple[int, ...]:
        return tuple(id(p) for group in self.param_groups for p in group["params"])

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
                                         stack=not self.compiled or self.stack_parameters or ranks is not None,
                                         ranks=ranks)
            self._layout_key = key
            self._held_grads = HeldGradients(_held_lists(self._layout, self._lookup)
                                             if self.stack_parameters and ranks is None else [])
            if _hold_stacked(self._held):
                self._warn_savers_of_shared_memory()
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
        if self._held_ids() != self._bound_ids:
            self.rebind()
        shards = sharded_step(self)
        if shards is not None and not gradients_finite_on_every_rank(self):
            return loss
        compiled = self.compiled and shards is None
        if self.compiled and shards is not None and not self._warned_eager:
            self._warned_eager = True
            warnings.warn(f"{type(self).__name__}(compiled=True) takes its steps on FSDP2 shards eagerly: the "
                          "compiled step covers single-process and DDP training", RuntimeWarning,
                          stacklevel=user_stacklevel())
        rules = [self.rule_for(group) for group in self.param_groups]
        layout = self._current_layout(rules, shards.ranks if shards is not None else None)
        gains = whole_by_name([f.gain for f in self.plan.norms], self._lookup, shards)  # {} in one process
        if self._released:
            _hold_stacked(self._held)
            self._released = False
        # compiled, every batch is one input of the graphs; a CUDA graph reads its buffers at one address
        self._held_grads.hold(copy=compiled, keep=compiled and self.compile_mode in CUDA_GRAPH_MODES)
        inputs = step_inputs(layout, self._lookup, gains, shards.collectives if shards is not None else LOCAL)
        runner = self._runner if compiled else _EAGER
        frames = runner.read(layout.program, inputs)
        finite, beyond, any_dead = frames.flags.tolist()  # the step's one host synchronisation
        if not finite:
            bad = self.nonfinite_parameters()
            if bad:
                self.apply_nonfinite_policy(bad)
                return loss
            beyond = True  # finite gradients: a canonical value or a probe's sum of squares overflowed; clip
        inputs = with_state(layout, inputs, self.param_groups, self.state, self._stacked, self._scalars)
        runner.write(layout.program, inputs, frames, masked=bool(any_dead), clip=bool(beyond))
        for members, tensors in zip(layout.tensors, inputs.tensors):
            if isinstance(tensors.params, Tensor):  # written through their buffer: each marked, as a copy marks it
                torch.autograd.graph.increment_version(members.params)
        self._stacked.settle()
        self._report_frozen(layout, frames if any_dead else None, gains)
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
            for members, dead, zero in zip(layout.neurons, read.neuron_dead, read.neuron_outgoing_zero):
                for name, row, outgoing_zero in zip(members.families, dead, zero):
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
                          f"step (left unchanged): {listing}", RuntimeWarning,
                          stacklevel=user_stacklevel())
        self.frozen = frozen
        self._frozen_rows = rows

    def frozen_report(self) -> list[FrozenUnits]:
        """The norm channels and neuron units the last step froze, one row per family and reason."""
        return list(self._frozen_rows)

    def _warn_savers_of_shared_memory(self) -> None:
        """Once: where Accelerate is loaded, say that its ``save_model`` drops tensors that share
        memory, and what to call before it (:meth:`release_parameters`)."""
        if "accelerate" in sys.modules and not getattr(self, "_warned_savers", False):
            self._warned_savers = True
            warnings.warn(f"{type(self).__name__}(stack_parameters=True) now holds each batch's parameters in one "
                          "buffer: Accelerate's save_model keeps one tensor per shared memory and drops the others "
                          "from the file. Call optimizer.release_parameters() before saving with it (torch.save of "
                          "the state dict and save_pretrained need no call)", RuntimeWarning,
                          stacklevel=user_stacklevel())

    @torch.no_grad()
    def release_parameters(self) -> None:
        """Give every parameter that ``stack_parameters=True`` holds in a buffer memory of its own
        again (a copy of its values; the next step holds them in a buffer again). Call it before a
        save that takes tensors sharing memory for copies of one tensor: Accelerate's ``save_model``
        keeps one tensor per buffer and drops the others from the file (with a warning), and
        ``safetensors.torch.save_model`` refuses them. (``torch.save`` of the state dict, Hugging
        Face's ``save_pretrained`` and ``safetensors.torch.save_file`` need no call.)"""
        for params in self._held:
            if stacked_view(params) is not None:
                for p in params:
                    p.data = p.detach().clone()
                self._released = True


def _held_lists(layout: StepLayout, lookup: Mapping[str, Tensor]) -> list[list[Tensor]]:
    """The parameter lists ``stack_parameters=True`` holds in one buffer each: every tensor batch of
    more than one member, the gains and biases of every norm batch and the gains only read as frames
    (no channel step); each in the dtype the step computes in (a float16 or bfloat16 batch is
    stepped on a float32 stack, a copy, anyway)."""
    lists = [members.params for batch, members in zip(layout.program.tensors, layout.tensors)
             if batch.members > 1 and batch.dtype == batch.param_dtype]
    for batch, members in zip(layout.program.norms, layout.norms):
        if batch.members > 1:
            lists.append(members.gains)
            if batch.bias:
                lists.append([lookup[f.bias] for f in members.families])
    lists += [params for params in layout.checked if len(params) > 1]
    return [params for params in lists if all(compute_dtype(p) == p.dtype for p in params)]


def _hold_stacked(held: list[list[Tensor]]) -> bool:
    """Give each list of :func:`_held_lists` one buffer (:func:`~gaugeopt.optim.storage.move_into_stack`),
    unless it lies in one already. Only parameters that own their memory whole are moved: one that
    is a view of memory someone else holds (FSDP1's flat parameters, a user's own buffer) keeps it,
    and its batch is stacked as a copy. Returns whether any list was moved."""
    moved = False
    for params in held:
        if len({(tuple(p.shape), p.dtype, p.device) for p in params}) == 1 and stacked_view(params) is None and \
                all(owns_its_memory(p) for p in params):
            move_into_stack(params)
            moved = True
    return moved


def _kind(keys: tuple[str, ...], shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """A kind of state: ``keys`` shaped ``shape``, but the step count, a 0-d tensor."""
    return {key: () if key == "step" else shape for key in keys}
