"""Row shards (gaugeopt.optim.shards): FSDP2's split, the reductions a shard contributes, and the
sharded block mean of Adam's second moment against the whole-tensor one, with ranks simulated by
threads (the real process groups are tested in test_distributed.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gaugeopt.optim.symmetry import SharedAxis, group_mean
from gaugeopt.optim.rules import shared_row_mean
from gaugeopt.optim.shards import LOCAL, RowShard, global_units, local_rows


class ThreadRanks:
    """``world`` ranks as threads of this process: ``sum`` adds what every rank hands in."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world)
        self.inbox: dict[int, list[torch.Tensor]] = {}
        self.calls = 0

    def run(self, work: Callable[[int, ThreadRanks], torch.Tensor]) -> list[torch.Tensor]:
        out: list = [None] * self.world
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                out[rank] = work(rank, self._rank(rank))
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return out

    def _rank(self, rank: int):
        ranks = self

        class Rank:
            def sum(self, partials: Sequence[torch.Tensor]) -> list[torch.Tensor]:
                ranks.inbox[rank] = [p.clone() for p in partials]
                ranks.barrier.wait()
                totals = [sum(ranks.inbox[r][i] for r in range(ranks.world)) for i in range(len(partials))]
                ranks.barrier.wait()
                if rank == 0:
                    ranks.calls += 1
                return totals

            def whole(self, stack, shard, fn):
                raise NotImplementedError

        return Rank()


def test_row_shards_follow_torch_chunk():
    assert [RowShard.of(11, r, 2) for r in range(2)] == [RowShard(0, 6, 11, (0, 6, 11)), RowShard(6, 11, 11, (0, 6, 11))]
    # fewer rows than ranks: torch.chunk makes fewer pieces, the last ranks hold none
    assert [RowShard.of(2, r, 3).size for r in range(3)] == [1, 1, 0]
    # read in blocks of 4 rows (a frame that splits axis 0): 16 rows over 2 ranks are 2 blocks each
    assert RowShard.of(4, 1, 2, inner=4) == RowShard(2, 4, 4, (0, 2, 4))
    with pytest.raises(ValueError, match="cuts a block"):
        RowShard.of(3, 0, 2, inner=4)  # 12 rows split 6/6 cut the second block of 4


def test_a_shards_unit_sums_are_placed_and_its_row_vectors_sliced():
    shard = RowShard.of(5, 1, 2)  # rows 3:5
    values = torch.tensor([[1.0, 2.0]])
    assert torch.equal(global_units(values, 0, shard), torch.tensor([[0.0, 0.0, 0.0, 1.0, 2.0]]))
    assert global_units(values, 1, shard) is values  # a partial sum over the rows: summed as it is
    assert torch.equal(local_rows(torch.arange(5.0).unsqueeze(0), shard), torch.tensor([[3.0, 4.0]]))
    assert global_units(values, 0, None) is values and LOCAL.sum([values])[0] is values


@settings(max_examples=25, deadline=None)
@given(block=st.integers(1, 4), blocks=st.integers(1, 6), interleaved=st.booleans(), world=st.integers(1, 4),
       cols=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_the_sharded_block_mean_equals_the_whole_one(block, blocks, interleaved, world, cols, seed):
    """For contiguous blocks (heads) or interleaved ones (RoPE planes), any split over ``world`` ranks:
    every rank's rows of the block mean equal those of the whole tensor's, with one reduction round
    exactly when some block is cut by a shard boundary."""
    rows = block * blocks
    groups = torch.arange(rows) // block if not interleaved else torch.arange(rows) % blocks
    shared = SharedAxis("f", tuple(groups.tolist()), None)
    values = torch.randn(2, rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    expected = group_mean(values, shared, 1)
    ranks = ThreadRanks(world)
    shards = [RowShard.of(rows, r, world) for r in range(world)]
    found = ranks.run(lambda r, collectives: shared_row_mean(values[:, shards[r].start:shards[r].stop], shared,
                                                             shards[r], collectives))
    torch.testing.assert_close(torch.cat(found, dim=1), expected, rtol=1e-12, atol=1e-14)
    cut = any(len({next(r for r in range(world) if shards[r].start <= i < shards[r].stop) for i in range(rows)
                   if groups[i] == g}) > 1 for g in range(int(groups.max()) + 1))
    assert ranks.calls == int(cut)
