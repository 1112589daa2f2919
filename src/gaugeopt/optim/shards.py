"""What the step needs to run on row shards: which rows a rank holds, and the two collectives it uses.

Under FSDP2 every parameter, gradient and state tensor is sharded on dim 0: each rank holds rows
``[start, stop)`` of ``rows`` (:class:`RowShard`). The step (:mod:`gaugeopt.optim.step`) runs
on those local rows. Elementwise work is local; what is not local is written against
:class:`Collectives`, so the same code runs in one process (:data:`LOCAL`) and on shards
(:class:`gaugeopt.optim.distributed.ProcessGroupCollectives`):

* every frame reduction over the rows is a sum. A rank computes its *partial* sum; a per-unit
  quantity whose units are the rows themselves is written at its global positions with zeros
  elsewhere (:func:`global_units`). :meth:`Collectives.sum` adds a list of such tensors over the
  ranks in one call, so a reduction *round* (every sum the next part of the step needs) costs one
  collective;
* a map that needs whole matrices (Newton-Schulz, the layerwise stack's spectral maps) is applied by
  :meth:`Collectives.whole`: each matrix of a stack is gathered to one rank, mapped there, and the
  result's rows are sent back to their ranks.

Nothing here touches ``torch.distributed``; in one process every shard is ``None`` and
:data:`LOCAL` hands its inputs back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

__all__ = ["RowShard", "Collectives", "LOCAL", "global_units", "local_rows", "local_tensor", "shard_like"]


@dataclass(frozen=True)
class RowShard:
    """This rank's rows ``[start, stop)`` of a member's axis 0, which has ``rows`` in all;
    ``bounds[r]:bounds[r + 1]`` are rank ``r``'s rows (FSDP2's ``torch.chunk`` split)."""

    start: int
    stop: int
    rows: int
    bounds: tuple[int, ...]

    @classmethod
    def of(cls, rows: int, rank: int, world: int, inner: int = 1) -> RowShard:
        """The shard of ``rank`` among ``world`` when ``rows * inner`` rows are chunked as FSDP2 does
        and read in blocks of ``inner`` rows (a frame that splits axis 0 into ``(rows, inner)``).
        ``ValueError`` when a block is cut by a shard boundary."""
        sizes = [len(c) for c in torch.arange(rows * inner).chunk(world)]
        sizes += [0] * (world - len(sizes))
        ends = [0]
        for size in sizes:
            ends.append(ends[-1] + size)
        if any(end % inner for end in ends):
            raise ValueError(f"a shard boundary cuts a block of {inner} rows (shard sizes {sizes})")
        bounds = tuple(end // inner for end in ends)
        return cls(bounds[rank], bounds[rank + 1], rows, bounds)

    @property
    def size(self) -> int:
        return self.stop - self.start


def local_tensor(t: Tensor) -> Tensor:
    """This rank's part of a ``DTensor`` (its storage: writes go through), or ``t`` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_like(local: Tensor, param: Tensor) -> Tensor:
    """``local`` (this rank's part of a tensor shaped like ``param``) as a ``DTensor`` placed like
    ``param`` on its mesh, sharing ``local``'s storage; ``local`` itself when ``param`` is no ``DTensor``."""
    if not isinstance(param, DTensor):
        return local
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


def local_rows(vector: Tensor, shard: RowShard | None) -> Tensor:
    """The entries of a per-row ``(L, rows)`` vector for this rank's rows (all of them without a shard)."""
    return vector if shard is None else vector[:, shard.start:shard.stop]


def global_units(values: Tensor, unit_axis: int, shard: RowShard | None) -> Tensor:
    """A per-unit reduction ``(L, units here)`` of a row shard at its global positions: zero-padded to
    ``(L, rows)`` when the units are the shard's rows (``unit_axis`` 0), else as it is (a partial sum
    over the rows). Summed over the ranks, either gives the whole reduction."""
    if shard is None or unit_axis != 0:
        return values
    return torch.nn.functional.pad(values, (shard.start, shard.rows - shard.stop))


class Collectives(Protocol):
    """The two collective operations a sharded step makes."""

    def sum(self, partials: Sequence[Tensor]) -> list[Tensor]:
        """Each tensor summed over the ranks (one round for the whole list)."""

    def whole(self, stack: Tensor, shard: RowShard | None, fn: Callable[[Tensor], Tensor],
              out_dtype: torch.dtype | None = None) -> Tensor:
        """``fn`` applied to whole members: ``stack`` holds this rank's rows (axis 1) of ``L`` members;
        ``fn`` maps a stack of whole members to a same-shaped stack in ``out_dtype`` (``None``:
        ``stack``'s); returned: this rank's rows of the result."""


class _Local:
    """One process: every tensor is whole."""

    def sum(self, partials: Sequence[Tensor]) -> list[Tensor]:
        return list(partials)

    def whole(self, stack: Tensor, shard: RowShard | None, fn: Callable[[Tensor], Tensor],
              out_dtype: torch.dtype | None = None) -> Tensor:
        return fn(stack)

    def __repr__(self) -> str:
        return "LOCAL"


#: The collectives of a step in one process (and of a tensor that is not sharded).
LOCAL: Collectives = _Local()
