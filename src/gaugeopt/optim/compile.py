"""How a step's phases run: eagerly, or compiled by ``torch.compile``, decided once per optimizer.

:class:`StepRunner` runs the phases of :mod:`gaugeopt.optim.step` on a program. Compiled, every phase
is one graph per program (:class:`_CompiledPhase`): a read graph, the update and the isolated pairs'
rebalance (separate because inductor's CPU loop fusion fails on the write-after-read hazards of one).
Graphs are compiled for static shapes; the numbers a scheduler changes are tensor inputs, so a new
learning rate or beta does not recompile.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from typing import Any

import torch

from .program import StepProgram
from .step import Frames, StepTensors, read_frames, rebalance, write

__all__ = ["StepRunner"]


class StepRunner:
    """The phases of a step, eager (``compiled=False``) or compiled: ``read`` gives the frames,
    ``write`` steps every batch and rebalances the isolated pairs."""

    def __init__(self, compiled: bool):
        self.compiled = bool(compiled)
        if self.compiled:
            self._read, self._write, self._rebalance = _compiled("read"), _compiled("write"), _compiled("rebalance")
        else:
            self._read, self._write, self._rebalance = read_frames, write, rebalance

    def read(self, program: StepProgram, inputs: StepTensors) -> Frames:
        return self._read(program, inputs)

    def write(self, program: StepProgram, inputs: StepTensors, frames: Frames, masked: bool, clip: bool) -> None:
        held, factors = self._write(program, inputs, frames, masked=masked, clip=clip)
        if held:
            self._rebalance(program, inputs, frames, held, factors, masked=masked)


_PHASES = {"read": read_frames, "write": write, "rebalance": rebalance}


@functools.cache
def _compiled(name: str) -> _CompiledPhase:
    """The compiled phase ``name``, shared by every optimizer of the process (equal programs share graphs)."""
    return _CompiledPhase(functools.partial(_PHASES[name], traced=True), name)


class _CompiledPhase:
    """``torch.compile`` of a phase, per program (and flag) a function with a code object of its own,
    so each gets its own graph cache (torch keeps at most ``recompile_limit`` graphs per code object,
    past which it runs the function eagerly). A phase has no graph break, so the whole phase is one
    graph in that cache."""

    def __init__(self, phase: Callable, name: str):
        self.phase, self.name = phase, name
        self.kernels: dict[Any, Callable] = {}
        self._last: tuple[StepProgram, tuple, Callable] | None = None  # spares hashing the program each step

    def __call__(self, program: StepProgram, *args: Any, **flags: Any):
        key = tuple(sorted(flags.items()))
        if self._last is not None and self._last[0] is program and self._last[1] == key:
            return self._last[2](*args, **flags)
        kernel = self.kernels.get((program, key))
        if kernel is None:
            kernel = self.kernels[(program, key)] = torch.compile(_bound(self.phase, program, self.name), dynamic=False)
        self._last = (program, key, kernel)
        return kernel(*args, **flags)


def _bound(phase: Callable, program: StepProgram, name: str) -> Callable:
    """``phase`` with ``program`` bound, as a function with a code object of its own: torch keys its
    graph caches (and their recompile limit) on the code object of the function it compiles, so every
    program gets a cache. (A ``functools.partial`` would be compiled through one shared wrapper.)"""
    def bound(*args: Any, **flags: Any):
        return phase(program, *args, **flags)
    return types.FunctionType(bound.__code__.replace(), bound.__globals__, f"{name}_bound", None, bound.__closure__)
