"""The distributed side of tests/test_monitor_distributed.py: run under ``torchrun`` (gloo, CPU, float64).

Usage: ``torchrun --nproc-per-node 2 tests/monitor_distributed_worker.py OUT_DIR``. Trains the tiny language
model of tests/distributed_worker.py with AdamW and with DDCAdam (one of its MLP units dead, so the
optimizer freezes it) under DDP and under FSDP2 (every block and the root sharded), each rank on its half
of every batch, with a :class:`~gaugeopt.monitor.DeadDirectionMonitor` reading every ``EVERY`` steps.
Every rank writes ``OUT_DIR/rank<r>.json``: what its logger received and which ``step()`` calls returned
a reading. The test compares rank 0's readings with the same training in one process.
"""

from __future__ import annotations

import json
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).parent))
from distributed_worker import VOCAB, batches, find_gauges, kill_unit, lm_loss, make_model, rank_part  # noqa: E402

from gaugeopt.optim import DDCAdam  # noqa: E402
from gaugeopt.monitor import DeadDirectionMonitor  # noqa: E402

EVERY = 2
OPTIMIZERS = {
    "adamw": lambda model, gauges: torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
    "ddc_adam": lambda model, gauges: DDCAdam(model.parameters(), gauges, lr=1e-2, weight_decay=0.1),
}


def probe() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(9))
    return tokens[:, :-1], tokens[:, 1:]


def per_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")


def fresh_model(label: str) -> nn.Module:
    model = make_model()
    if label == "ddc_adam":
        with torch.no_grad():
            kill_unit(model)
    return model


def monitored_run(label: str, wrap, rank: int = 0, world: int = 1) -> dict:
    """Train ``wrap(model)`` with a monitor; what its logger got and which steps read."""
    model = fresh_model(label)
    gauges = find_gauges(model)
    wrapped = wrap(model)
    optimizer = OPTIMIZERS[label](wrapped, gauges)
    logged: list = []
    monitor = DeadDirectionMonitor(wrapped, gauges, probe=probe(), loss=per_token_loss, every=EVERY,
                                   optimizer=optimizer, logger=lambda scalars, step: logged.append([step, scalars]))
    returned = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # DDCAdam says once that it froze the dead unit
        for batch in batches():
            optimizer.zero_grad(set_to_none=True)
            lm_loss(wrapped, rank_part(batch, rank, world)).backward()
            optimizer.step()
            returned.append(monitor.step() is not None)
    monitor.close()
    return {"logged": logged, "returned": returned, "table_rows": len(monitor.table())}


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # a hung collective fails, not blocks
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))

    def fsdp(model: nn.Module) -> nn.Module:
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    results = {}
    for label in OPTIMIZERS:
        results[f"ddp_{label}"] = monitored_run(label, DistributedDataParallel, rank, world)
        results[f"fsdp_{label}"] = monitored_run(label, fsdp, rank, world)
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
