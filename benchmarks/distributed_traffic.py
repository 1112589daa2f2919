"""Collective traffic of one optimizer step under FSDP2: ``python -m benchmarks.distributed_traffic``.

Launches ``torchrun`` (2 ranks, gloo, CPU) on itself. Each rank builds the reference language model
(``d_model`` 128, float32, 4 and 8 layers), shards every block and then the root with ``fully_shard``,
computes the gradients of one next-token loss on its half of a batch, takes one untimed step (the
state is created there) and counts the second step of DDCAdam, DDCMuon, SymmetryCompatible, torch's
sharded AdamW and torch's ``torch.optim.Muon`` (with AdamW off the hidden matrices) with
:func:`gaugeopt.optim.distributed.collective_traffic`: the calls into ``torch.distributed`` collectives
and their bytes (per call the larger of what the rank hands in and gets out). Counts are exact and do
not depend on the machine. Rank 0 prints a table; ``--write`` also puts it into ``docs/distributed.md``
between the markers ``<!-- traffic -->`` and ``<!-- /traffic -->``.

Options: ``--layers 4 8``, ``--world 2``, ``--write``. About 20 s of wall time on two shared CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .report import write_between_markers

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "distributed.md"
WIDTH = 128
OPTIMIZERS = ("adamw", "torch_muon", "ddc_adam", "ddc_muon", "ddc_muon_fp32", "symmetry_compatible")


class _TorchMuon:
    """torch's own ``torch.optim.Muon`` on the hidden matrices (run on the DTensor shards as they are,
    so DTensor redistributes what Newton-Schulz needs) and AdamW on the rest: the FSDP2 Muon path
    torch offers, stepped as one optimizer."""

    def __init__(self, model):
        matrices = [p for n, p in model.named_parameters() if p.ndim == 2 and "blocks" in n]
        rest = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "blocks" in n)]
        self.optimizers = (torch.optim.Muon(matrices, lr=0.02, weight_decay=0.1),
                           torch.optim.AdamW(rest, lr=1e-3, weight_decay=0.1))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()


def _worker(out: Path, layers: list[int]) -> None:
    """One rank: count one step of every optimizer at every depth; rank 0 writes ``out``."""
    from datetime import timedelta

    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import gaugeopt
    from gaugeopt.models import TransformerLM
    from gaugeopt.optim.distributed import collective_traffic

    from .optimizer_steps import BATCH, SEQ, VOCAB, adamw, ddc_adam, ddc_muon, reference_config, symmetry_compatible

    factories = {"adamw": adamw, "torch_muon": lambda model, gauges: _TorchMuon(model), "ddc_adam": ddc_adam, "ddc_muon": ddc_muon(),
                 "ddc_muon_fp32": ddc_muon(None),
                 "symmetry_compatible": symmetry_compatible}
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    rows = []
    for n_layers in layers:
        torch.manual_seed(0)
        plain = TransformerLM(reference_config(WIDTH, n_layers=n_layers))
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
        gauges = gaugeopt.find_gauges(plain, tokens[:1, :16], output="logits")
        model_bytes = sum(p.numel() * p.element_size() for p in plain.parameters())
        for label in OPTIMIZERS:
            torch.manual_seed(0)
            model = TransformerLM(reference_config(WIDTH, n_layers=n_layers))
            bound = gauges.bind(model)
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            optimizer = factories[label](model, bound)
            part = tokens.chunk(world)[rank]
            for counted in (False, True):
                optimizer.zero_grad(set_to_none=True)
                logits = model(part[:, :-1])
                F.cross_entropy(logits.flatten(0, 1), part[:, 1:].flatten()).backward()
                if counted:
                    with collective_traffic() as traffic:
                        optimizer.step()
                else:
                    optimizer.step()
            counts = [None] * world
            dist.all_gather_object(counts, (traffic.calls, traffic.bytes))
            rows.append({"optimizer": label, "layers": n_layers, "model_bytes": model_bytes,
                         "calls": [c for c, _ in counts], "bytes": [b for _, b in counts], "ops": traffic.ops})
    if rank == 0:
        out.write_text(json.dumps({"world": world, "width": WIDTH, "rows": rows}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


NAMES = {"adamw": "AdamW (torch, sharded)", "torch_muon": "torch.optim.Muon + AdamW (torch, sharded)", "ddc_adam": "DDCAdam",
         "ddc_muon": "DDCMuon (bfloat16 Newton-Schulz, the default)", "ddc_muon_fp32": "DDCMuon (ns_dtype=None: float32)",
         "symmetry_compatible": "SymmetryCompatible"}


def render(result: dict) -> str:
    """A markdown table: calls and bytes per step (the most of any rank) and bytes / model bytes."""
    lines = ["| optimizer | layers | model MB | calls per step | MB per step (per rank, max) | / model bytes |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        calls, moved = max(row["calls"]), max(row["bytes"])
        lines.append(f"| {NAMES[row['optimizer']]} | {row['layers']} | {row['model_bytes'] / 1e6:.2f} | {calls} "
                     f"| {moved / 1e6:.2f} | {moved / row['model_bytes']:.3f} |")
    return "\n".join(lines)


def write_doc(table: str, doc: Path = DOC) -> None:
    write_between_markers(doc, "traffic", table)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="put the table into docs/distributed.md")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        return _worker(args.worker, args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "traffic.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.world}",
                   "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "benchmarks.distributed_traffic",
                   "--worker", str(out), "--layers", *map(str, args.layers)]
        subprocess.run(command, check=True, cwd=ROOT, env=env)
        result = json.loads(out.read_text())
    table = render(result)
    print(table)
    for row in result["rows"]:
        print(f"{row['optimizer']:>20} {row['layers']} layers: {row['ops']}")
    if args.write:
        write_doc(table)


if __name__ == "__main__":
    main()
