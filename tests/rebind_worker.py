"""The distributed side of tests/test_rebinding.py: run under ``torchrun`` (gloo, CPU, float64).

Usage: ``torchrun --nproc-per-node 2 tests/rebind_worker.py OUT_DIR``. For DDCAdam and DDCMuon it
trains the model of tests/distributed_worker.py under FSDP2 three ways:

* ``sharded_first``: ``fully_shard``, then the optimizer (the order docs/distributed.md asks for);
* ``accelerate``: the optimizer first, then what accelerate's ``prepare`` does under FSDP2 (its
  ``_prepare_fsdp2``): the optimizer's parameters swapped for placeholders that remember their
  ``data_ptr``, ``fully_shard``, and accelerate's own ``fsdp2_switch_optimizer_parameters`` putting
  the sharded parameters in their place;
* ``optimizer_first``: the optimizer first, then ``fully_shard`` alone (the optimizer still holds the
  replaced tensors until its first step resolves them by name).

Rank 0 writes ``OUT_DIR/results.json``: per optimizer and way, the full parameters' largest
difference from ``sharded_first`` and how many parameters the optimizer bound by name.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils.fsdp_utils import fsdp2_switch_optimizer_parameters
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402

STEPS = 4
LABELS = ("ddc_adam", "ddc_muon")


def accelerate_prepare(model: torch.nn.Module, optimizer: torch.optim.Optimizer, mesh) -> None:
    """The parameter handling of accelerate's ``Accelerator._prepare_fsdp2`` (accelerate 1.15)."""
    old = {name: p.data_ptr() for name, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            placeholder = torch.empty(1, dtype=p.dtype, device=p.device)
            placeholder.data_ptr = p.data_ptr()
            group["params"][i] = placeholder
    fully_shard(model, mesh=mesh)
    new = dict(model.named_parameters())
    fsdp2_switch_optimizer_parameters(optimizer, {old[name]: new[name] for name in old})


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    gauges = worker.find_gauges(worker.make_model())
    data = worker.batches(STEPS)
    results: dict = {}
    for label in LABELS:
        make_optimizer = worker.OPTIMIZERS[label]
        runs, bound_names = {}, {}
        for way in ("sharded_first", "accelerate", "optimizer_first"):
            model = worker.make_model()
            bound = gauges.bind(model)
            if way == "sharded_first":
                fully_shard(model, mesh=mesh)
            optimizer = make_optimizer(model, bound)
            if way == "accelerate":
                accelerate_prepare(model, optimizer, mesh)
            elif way == "optimizer_first":
                fully_shard(model, mesh=mesh)
            worker.train(model, optimizer, data, rank, world)
            runs[way] = worker.full_parameters(model)
            held = [p for group in optimizer.param_groups for p in group["params"]]
            bound_names[way] = {"bound": sum(1 for p in held if id(p) in optimizer._names),
                                "held_are_the_models": all(any(p is q for q in model.parameters()) for p in held),
                                "parameters": len(held)}
        results[label] = {way: {"difference": max(float((runs[way][n] - runs["sharded_first"][n]).abs().max())
                                                  for n in runs[way]),
                                "moved": max(float((runs[way][n] - start.detach()).abs().max())
                                             for n, start in worker.full_parameters(worker.make_model()).items()),
                                **bound_names[way]}
                          for way in runs}
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
