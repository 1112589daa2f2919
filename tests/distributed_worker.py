"""The distributed side of tests/test_distributed.py: run under ``torchrun`` (gloo, CPU, float64).

Usage: ``torchrun --nproc-per-node 2 tests/distributed_worker.py OUT_DIR``. For each optimizer (DDCAdam,
DDCMuon, SymmetryCompatible) it trains the tiny language model below for ``STEPS`` steps under DDP and
under FSDP2 (``fully_shard``), each rank on its half of every batch, and writes the final parameters
to ``OUT_DIR`` (rank 0); DDCAdam also with ``stack_parameters=True`` under DDP. The FSDP2 run also saves a ``torch.distributed.checkpoint`` after
``CHECKPOINT_STEP`` steps, records the placement of every optimizer state tensor, and resumes a fresh
2-rank run from that checkpoint. It puts a NaN into one rank's shard of a gradient that the other rank
steps, under ``nonfinite="skip"`` and ``"raise"``. Finally it runs
:func:`gaugeopt.testing.check_equivariance` under FSDP2 for DDCAdam and AdamW. Rank 0 writes
``OUT_DIR/results.json``; the test compares everything with single-process training.

The model, batches, loss and optimizer settings are defined here once and imported by the test.
"""

from __future__ import annotations

import json
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

import gaugeopt
from gaugeopt.gauges import GaugeSet
from gaugeopt.models import TransformerLM, TransformerLMConfig
from gaugeopt.optim import (
    DDCAdam,
    DDCMuon,
    NonFiniteGradientError,
    SymmetryCompatible,
    gauge_invariant_grad_norm,
    symmetry_param_groups,
)
from gaugeopt.optim.distributed import collective_traffic, full_tensor
from gaugeopt.optim.storage import stacked_view
from gaugeopt.testing import check_equivariance

VOCAB = 11  # the embedding and LM head have 11 rows: uneven shards over 2 ranks
STEPS = 10
CHECKPOINT_STEP = 5
BATCH = 4  # sequences per step, split evenly over the ranks


def make_model() -> nn.Module:
    """RMSNorm, SwiGLU (d_ff 24), grouped-query attention (4 query heads on 2 kv heads), float64."""
    torch.manual_seed(0)
    return TransformerLM(TransformerLMConfig(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=4, n_kv_heads=2,
                                             d_ff=24, max_seq_len=8, init_std=0.3)).double()


def make_odd_model() -> nn.Module:
    """Shards that do not line up with the structure: 3 query heads of 6 dims on one kv head (q rows
    split 9/9, so head 1 straddles the shard boundary, and so does the kv head), d_ff 25 (gate and
    up rows split 13/12), vocabulary 11; two layers, float64."""
    torch.manual_seed(0)
    return TransformerLM(TransformerLMConfig(vocab_size=VOCAB, d_model=18, n_layers=2, n_heads=3, n_kv_heads=1,
                                             d_ff=25, max_seq_len=8, init_std=0.3)).double()


def make_traffic_model(n_layers: int) -> nn.Module:
    """The model whose step traffic is counted: d_model 64, float32, ``n_layers`` layers."""
    torch.manual_seed(0)
    return TransformerLM(TransformerLMConfig(vocab_size=64, d_model=64, n_layers=n_layers, n_heads=2, d_ff=256,
                                             max_seq_len=16))


TRAFFIC_LAYERS = (2, 4)


def find_gauges(model: nn.Module) -> GaugeSet:
    example = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    return gaugeopt.find_gauges(model, example, output="logits")


def batches(n: int = STEPS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, VOCAB, (BATCH, 7), generator=g) for _ in range(n)]


def lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


def rank_part(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's equal share of the sequences: the mean of the ranks' losses is the full-batch loss."""
    return batch.chunk(world)[rank]


OPTIMIZERS = {
    "ddc_adam": lambda model, gauges: DDCAdam(model.parameters(), gauges, lr=1e-2, weight_decay=0.1),
    "ddc_muon": lambda model, gauges: DDCMuon(model.parameters(), gauges, lr=2e-2, weight_decay=0.1,
                                              head_wise=True, adam_lr=1e-2),
    "symmetry_compatible": lambda model, gauges: SymmetryCompatible(symmetry_param_groups(model, verbose=False),
                                                                    weight_decay=0.1),
}


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: list[torch.Tensor], rank: int = 0,
          world: int = 1) -> None:
    for batch in steps:
        optimizer.zero_grad(set_to_none=True)
        lm_loss(model, rank_part(batch, rank, world)).backward()
        optimizer.step()


def full_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: full_tensor(p).clone() for name, p in model.named_parameters()}


def kill_unit(model: nn.Module, unit: int = 3) -> None:
    """Zero hidden unit ``unit`` of the MLP on both sides of its neuron pair (a dead unit)."""
    ffn = model.blocks[0].ffn
    ffn.up.weight[unit] = 0.0
    ffn.down.weight[:, unit] = 0.0


def load_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Load a ``torch.distributed.checkpoint`` of model and optimizer (any number of ranks, or none)."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def state_placements(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, list]:
    """For every parameter: (state key, is DTensor, same placements as the parameter) of its param-shaped state."""
    names = {id(p): n for n, p in model.named_parameters()}
    report = {}
    for p, state in optimizer.state.items():
        entries = []
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape == p.shape:
                sharded = isinstance(value, DTensor)
                entries.append([key, sharded, sharded and value.placements == p.placements])
        report[names[id(p)]] = entries
    return report


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    gauges = find_gauges(make_model())
    data = batches()
    results: dict = {"world": world, "placements": {}, "uneven": []}

    for label, make_optimizer in OPTIMIZERS.items():
        model = make_model()
        ddp = DistributedDataParallel(model)
        train(ddp, make_optimizer(model, gauges.bind(model)), data, rank, world)
        if rank == 0:
            torch.save(full_parameters(model), out / f"ddp_{label}.pt")

        model = make_model()
        bound = gauges.bind(model)
        fully_shard(model, mesh=mesh)
        optimizer = make_optimizer(model, bound)
        train(model, optimizer, data[:CHECKPOINT_STEP], rank, world)
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=out / f"checkpoint_{label}")
        results["placements"][label] = state_placements(model, optimizer)
        train(model, optimizer, data[CHECKPOINT_STEP:], rank, world)
        parameters = full_parameters(model)
        if rank == 0:
            torch.save(parameters, out / f"fsdp_{label}.pt")
        results["uneven"] = sorted(n for n, p in model.named_parameters() if p.shape[0] % world)

        model = make_model()  # a fresh run on 2 ranks resumed from the checkpoint
        bound = gauges.bind(model)
        fully_shard(model, mesh=mesh)
        optimizer = make_optimizer(model, bound)
        load_checkpoint(model, optimizer, out / f"checkpoint_{label}")
        train(model, optimizer, data[CHECKPOINT_STEP:], rank, world)
        parameters = full_parameters(model)
        if rank == 0:
            torch.save(parameters, out / f"fsdp_resumed_{label}.pt")

    # DDCAdam with stack_parameters=True under DDP, on the two-layer model (batches of two members):
    # parameters held in buffers of its own, while DDP's reducer copies gradients into its buckets
    # and back (or, with gradient_as_bucket_view, puts views of its buckets in their place at every
    # step, which the step leaves there).
    for bucket_view in (False, True):
        model = make_odd_model()
        ddp = DistributedDataParallel(model, gradient_as_bucket_view=bucket_view)
        optimizer = DDCAdam(model.parameters(), find_gauges(make_odd_model()).bind(model), lr=1e-2, weight_decay=0.1,
                            stack_parameters=True)
        train(ddp, optimizer, data, rank, world)
        ups = [block.ffn.up.weight for block in model.blocks]
        results.setdefault("ddp_held", {})[str(bucket_view)] = [stacked_view(ups) is not None,
                                                                stacked_view([p.grad for p in ups]) is not None]
        if rank == 0:
            torch.save(full_parameters(model), out / f"ddp_ddc_adam_held{'_bucket_view' * bucket_view}.pt")

    # compiled=True under FSDP2: the sharded step runs eagerly, with one warning.
    model = make_model()
    bound = gauges.bind(model)
    fully_shard(model, mesh=mesh)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(model, DDCAdam(model.parameters(), bound, lr=1e-2, weight_decay=0.1, compiled=True), data, rank, world)
    results["compiled_warnings"] = [str(w.message) for w in caught if "compiled=True" in str(w.message)]
    parameters = full_parameters(model)
    if rank == 0:
        torch.save(parameters, out / "fsdp_compiled_ddc_adam.pt")

    # Uneven shards and heads across shard boundaries: parity only.
    odd_gauges = find_gauges(make_odd_model())
    results["odd_uneven"] = sorted(n for n, p in make_odd_model().named_parameters() if p.shape[0] % world)
    for label, make_optimizer in OPTIMIZERS.items():
        model = make_odd_model()
        bound = odd_gauges.bind(model)
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        train(model, make_optimizer(model, bound), data, rank, world)
        parameters = full_parameters(model)
        if rank == 0:
            torch.save(parameters, out / f"fsdp_odd_{label}.pt")

    # Collective calls and bytes of one (second) step, per optimizer and depth.
    results["traffic"] = {}
    for n_layers in TRAFFIC_LAYERS:
        plain = make_traffic_model(n_layers)
        traffic_gauges = find_gauges(plain)
        model_bytes = sum(p.numel() * p.element_size() for p in plain.parameters())
        for label, make_optimizer in OPTIMIZERS.items():
            model = make_traffic_model(n_layers)
            bound = traffic_gauges.bind(model)
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            optimizer = make_optimizer(model, bound)
            train(model, optimizer, data[:1], rank, world)
            optimizer.zero_grad(set_to_none=True)
            lm_loss(model, rank_part(data[1], rank, world)).backward()
            with collective_traffic() as traffic:
                optimizer.step()
            counts: list = [None] * world
            dist.all_gather_object(counts, [traffic.calls, traffic.bytes, traffic.ops])
            results["traffic"][f"{label}/{n_layers}"] = {"counts": counts, "model_bytes": model_bytes}

    # The gauge-invariant gradient norm of gaugeopt.clip_grad_norm_ on the shards (odd model: cut heads).
    results["clip_norms"] = {}
    odd = make_odd_model()
    bound = odd_gauges.bind(odd)
    for block in odd.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(odd, mesh=mesh)
    lm_loss(odd, rank_part(data[0], rank, world)).backward()
    for norm_type in (2.0, 1.0, float("inf")):
        results["clip_norms"][str(norm_type)] = float(gauge_invariant_grad_norm(odd.parameters(), bound, norm_type))
    before = full_tensor(odd.head.weight.grad).clone()
    total = gaugeopt.clip_grad_norm_(odd.parameters(), 0.5, bound)
    results["clipped_head_grad"] = {"total": float(total),
                                    "ratio": float(full_tensor(odd.head.weight.grad).norm() / before.norm())}

    # HSDP (a 2-D mesh) is refused on every rank, before any collective of the step.
    model = make_model()
    bound = gauges.bind(model)
    fully_shard(model, mesh=init_device_mesh("cpu", (1, world), mesh_dim_names=("replicate", "shard")))
    optimizer = OPTIMIZERS["ddc_adam"](model, bound)
    lm_loss(model, rank_part(data[0], rank, world)).backward()
    try:
        optimizer.step()
        refusal = "stepped"
    except NotImplementedError as error:
        refusal = str(error)
    refusals: list = [None] * world
    dist.all_gather_object(refusals, refusal)
    results["hsdp"] = refusals

    model = make_model()  # a dead neuron unit: DDCAdam freezes it, and every rank must report it
    with torch.no_grad():
        kill_unit(model)
    bound = gauges.bind(model)
    fully_shard(model, mesh=mesh)
    optimizer = OPTIMIZERS["ddc_adam"](model, bound)
    train(model, optimizer, data[:2], rank, world)
    reports: list = [None] * world
    dist.all_gather_object(reports, {k: list(v) for k, v in optimizer.frozen.items()})
    results["frozen"] = reports

    # A NaN in rank 0's shard of one gradient: both ranks must apply the policy.
    results["nonfinite"] = {}
    for policy in ("skip", "raise"):
        model = make_model()
        bound = gauges.bind(model)
        fully_shard(model, mesh=mesh)
        optimizer = DDCAdam(model.parameters(), bound, lr=1e-2, nonfinite=policy)
        lm_loss(model, rank_part(data[0], rank, world)).backward()
        target = next(n for n, p in model.named_parameters() if p.ndim == 2)
        if rank == 0:
            with torch.no_grad():
                model.get_parameter(target).grad.to_local()[0, 0] = float("nan")
        before = full_parameters(model)
        try:
            optimizer.step()
            outcome = "stepped"
        except NonFiniteGradientError as error:
            outcome = f"raised: {error}"
        after = full_parameters(model)
        outcomes: list = [None] * world
        dist.all_gather_object(outcomes, {"outcome": outcome, "skipped_steps": optimizer.skipped_steps,
                                          "unchanged": all(torch.equal(before[n], after[n]) for n in before),
                                          "state": len(optimizer.state), "target": target})
        results["nonfinite"][policy] = outcomes

    def shard(m: nn.Module) -> None:
        fully_shard(m, mesh=mesh)

    def sharded_loss(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return lm_loss(m, rank_part(batch, rank, world))

    model = make_model()
    for label, make_optimizer in (("ddc_adam", OPTIMIZERS["ddc_adam"]),
                                  ("adamw", lambda m, g: torch.optim.AdamW(m.parameters(), lr=1e-2,
                                                                           weight_decay=0.1))):
        result = check_equivariance(make_optimizer, model, gauges.bind(model), data, sharded_loss, steps=STEPS,
                                    prepare=shard)
        results[f"equivariance_{label}"] = {"error": result.error, "displacement": result.displacement}

    if rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
