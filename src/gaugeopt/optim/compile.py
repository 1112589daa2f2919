"""How a step's phases run: eagerly, or compiled by ``torch.compile``, decided once per optimizer.

:class:`StepRunner` runs the phases of :mod:`gaugeopt.optim.step` on a program. Compiled, every phase
is one graph per program (:class:`_CompiledPhase`): a read graph, the update and the isolated pairs'
rebalance (separate because inductor's CPU loop fusion fails on the write-after-read hazards of one).
Graphs are compiled for static shapes; the numbers a scheduler changes are tensor inputs, so a new
learning rate or beta does not recompile.

The optimizers' ``compiled`` takes ``True`` (torch.compile's default mode) or a mode name
(:data:`COMPILE_MODES`). The modes that capture CUDA graphs (:data:`CUDA_GRAPH_MODES`) replay each
graph at the addresses it was recorded with: inputs they do not know to be static are copied into
the graph's memory before every replay, and a graph that writes such an input is not captured at
all. So in those modes every input that lives across steps (parameters, their held buffers and
gradients, the rule state, the scalar tables, the channel rows) is marked static
(``torch._dynamo.mark_static_address``) before each call; what a step makes anew (gradients that
backward allocated, gains gathered from their buffer in another order) is not.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .program import StepProgram
from .step import Frames, Members, StepTensors, read_frames, rebalance, write

__all__ = ["COMPILE_MODES", "CUDA_GRAPH_MODES", "StepRunner", "compile_mode"]

#: ``torch.compile``'s modes, any of which the optimizers' ``compiled`` may name.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: The modes in which inductor captures CUDA graphs (on CUDA devices; elsewhere they compile as the default).
CUDA_GRAPH_MODES = frozenset({"reduce-overhead", "max-autotune"})


def compile_mode(compiled: bool | str) -> str | None:
    """The ``torch.compile`` mode an optimizer's ``compiled`` asks for: ``None`` (eager) for False,
    ``"default"`` for True, else the mode named; anything else is a ``ValueError``."""
    if compiled is False or compiled is True:
        return "default" if compiled else None
    if isinstance(compiled, str) and compiled in COMPILE_MODES:
        return compiled
    raise ValueError(f"compiled must be True, False or one of torch.compile's modes {COMPILE_MODES}, "
                     f"got {compiled!r}")


class StepRunner:
    """The phases of a step, eager (``mode=None``) or compiled in ``torch.compile``'s ``mode``: ``read``
    gives the frames, ``write`` steps every batch and rebalances the isolated pairs."""

    def __init__(self, mode: str | None):
        self.mode = mode
        self._static = mode in CUDA_GRAPH_MODES
        if mode is not None:
            self._read, self._write, self._rebalance = (_compiled(phase, mode) for phase in _PHASES)
        else:
            self._read, self._write, self._rebalance = read_frames, write, rebalance

    def read(self, program: StepProgram, inputs: StepTensors) -> Frames:
        if self._static:
            _mark_persistent(inputs)
        return self._read(program, inputs)

    def write(self, program: StepProgram, inputs: StepTensors, frames: Frames, masked: bool, clip: bool) -> None:
        if self._static:  # the rest of the inputs are the tensors the read marked
            _mark_static([t for batch in (*inputs.tensors, *inputs.norms)
                          for t in (*batch.state.values(), *_leaves(batch.scalars))])
        held, factors = self._write(program, inputs, frames, masked=masked, clip=clip)
        if held:
            self._rebalance(program, inputs, frames, held, factors, masked=masked)


def _mark_persistent(inputs: StepTensors) -> None:
    """Mark static (module docstring) every tensor of the read phase's ``inputs`` that lives across
    steps: parameters and gains in any form (a parameter, a view of one, the stacked view of a held
    buffer), gradients held in one buffer (their stacked view; a list is what backward made this
    step) and channel rows; not gains gathered in another order (this step's copies). (The write
    phase's state buffers and scalar-table slices are marked when it is given them.)"""
    kept: list[Tensor] = []

    def always(values: Members) -> None:
        kept.extend([values] if isinstance(values, Tensor) else values)

    def held(grads: Members) -> None:
        if isinstance(grads, Tensor):
            kept.append(grads)

    def gains(values: Members) -> None:
        if not isinstance(values, Tensor) or values._is_view():
            always(values)

    for t in inputs.tensors:
        always(t.params)
        held(t.grads)
        for g in t.gains:
            gains(g)
        if t.channel_rows is not None:
            kept.append(t.channel_rows)
    for n in inputs.norms:
        gains(n.gains)
        always(n.biases)
        held(n.gain_grads)
        held(n.bias_grads)
    for n in inputs.neurons:
        for role_params, role_gains in zip(n.params, n.gains):
            always(role_params)
            for g in role_gains:
                gains(g)
    for grads in inputs.checked:
        held(grads)
    _mark_static(kept)


def _mark_static(tensors: list[Tensor]) -> None:
    for t in tensors:
        torch._dynamo.mark_static_address(t, guard=False)


def _leaves(values: Any) -> list[Tensor]:
    """The tensors of a (nested) tuple of a step's scalars."""
    if isinstance(values, Tensor):
        return [values]
    if isinstance(values, (tuple, list)):
        return [t for v in values for t in _leaves(v)]
    return []


_PHASES = {"read": read_frames, "write": write, "rebalance": rebalance}


@functools.cache
def _compiled(name: str, mode: str) -> _CompiledPhase:
    """The compiled phase ``name`` in ``mode``, shared by every optimizer of the process (equal programs
    share graphs)."""
    return _CompiledPhase(functools.partial(_PHASES[name], traced=True), name, mode)


class _CompiledPhase:
    """``torch.compile`` of a phase, per program (and flag) a function with a code object of its own,
    so each gets its own graph cache (torch keeps at most ``recompile_limit`` graphs per code object,
    past which it runs the function eagerly). A phase has no graph break, so the whole phase is one
    graph in that cache."""

    def __init__(self, phase: Callable, name: str, mode: str):
        self.phase, self.name, self.mode = phase, name, mode
        self.kernels: dict[Any, Callable] = {}
        self._last: tuple[StepProgram, tuple, Callable] | None = None  # spares hashing the program each step

    def __call__(self, program: StepProgram, *args: Any, **flags: Any):
        key = tuple(sorted(flags.items()))
        if self._last is not None and self._last[0] is program and self._last[1] == key:
            return self._last[2](*args, **flags)
        kernel = self.kernels.get((program, key))
        if kernel is None:
            kernel = self.kernels[(program, key)] = torch.compile(_bound(self.phase, program, self.name),
                                                                  dynamic=False, mode=self.mode)
        self._last = (program, key, kernel)
        return kernel(*args, **flags)


def _bound(phase: Callable, program: StepProgram, name: str) -> Callable:
    """``phase`` with ``program`` bound, as a function with a code object of its own: torch keys its
    graph caches (and their recompile limit) on the code object of the function it compiles, so every
    program gets a cache. (A ``functools.partial`` would be compiled through one shared wrapper.)"""
    def bound(*args: Any, **flags: Any):
        return phase(program, *args, **flags)
    return types.FunctionType(bound.__code__.replace(), bound.__globals__, f"{name}_bound", None, bound.__closure__)
