"""``python -m benchmarks.cuda``: the optimizers' steps on a CUDA device, against torch's own.

Not part of ``python -m benchmarks`` (the CPU suite whose figures the CPU targets are judged on): run it
where a GPU is at hand (``scripts/gpu_check.sh`` runs it with the other device checks). Same protocol
as the CPU comparison (one set of gradients per point, each optimizer on its own copy, interleaved
steps, medians), with the device synchronised around each step. The timed steps keep their gradients
(as after ``zero_grad(set_to_none=False)``), so the ``stack_parameters=True`` peers hold them in their
buffers too. Per point (width, parameter dtype):

- discovery on the device (``find_gauges`` on the model as it will train), timed;
- peers: AdamW with torch's multi-tensor kernels (``foreach=True``), its single fused kernel
  (``fused=True``) and its step under ``torch.compile``; ``torch.optim.Muon`` + AdamW; DDCAdam and
  DDCMuon eager, each also with ``stack_parameters=True``, and with ``stack_parameters=True``
  compiled (``compiled=True``: one program per shape, whatever the depth) and compiled to replay
  CUDA graphs (``compiled="reduce-overhead"``). The compiled steps in the default layout (whose
  kernels grow with the depth) are offered too (``--peers``), not run by default;
- per optimizer: median step time, the first step (state allocation; compilation for the compiled
  ones, cold or warm as the machine's inductor cache is), the state's bytes, and the step's peak
  transient memory (``max_memory_allocated`` during a step above what was allocated before it).

Default: d_model 1024 with 12 layers (issue 31's target shape), float32 and bfloat16 parameters: ten
compilations, each new shape and dtype compiles afresh (``--widths`` adds widths, ``--peers`` picks
optimizers from :data:`PEERS`; the default, :data:`DEFAULT_PEERS`). Writes ``benchmarks_cuda.json``
and ``benchmarks_cuda.md`` to ``--out``.
``--device cpu`` runs the same script on the CPU (the test suite does, at toy size), without the
memory columns.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gaugeopt
from gaugeopt.gauges import GaugeSet
from gaugeopt.models import TransformerLM

from .optimizer_steps import (BATCH, SEQ, VOCAB, CompiledAdamW, adamw, adamw_fused, ddc_adam, ddc_adam_compiled,
                              ddc_adam_compiled_stacked, ddc_adam_cuda_graphs, ddc_adam_stacked, ddc_muon,
                              ddc_muon_compiled, ddc_muon_compiled_stacked, ddc_muon_cuda_graphs,
                              muon_with_adamw_torch, OptimizerFactory, parameter_count, reference_config, time_steps)


PEERS: dict[str, OptimizerFactory] = {
    "AdamW (foreach)": adamw,
    "AdamW (fused)": adamw_fused,
    "AdamW (compiled)": CompiledAdamW,
    "Muon+AdamW (torch)": muon_with_adamw_torch,
    "DDCAdam": ddc_adam,
    "DDCAdam compiled": ddc_adam_compiled,
    "DDCAdam (stack_parameters)": ddc_adam_stacked,
    "DDCMuon": ddc_muon(),
    "DDCMuon compiled": ddc_muon_compiled,
    "DDCMuon (stack_parameters)": ddc_muon(stack_parameters=True),
    "DDCAdam compiled (stack_parameters)": ddc_adam_compiled_stacked,
    "DDCMuon compiled (stack_parameters)": ddc_muon_compiled_stacked,
    "DDCAdam reduce-overhead (stack_parameters)": ddc_adam_cuda_graphs,
    "DDCMuon reduce-overhead (stack_parameters)": ddc_muon_cuda_graphs,
}
#: What a plain run measures: every peer but the compiled steps in the default layout.
DEFAULT_PEERS = tuple(name for name in PEERS if name not in ("DDCAdam compiled", "DDCMuon compiled"))


def model_on_device(width: int, layers: int, dtype: torch.dtype, device: torch.device
                    ) -> tuple[nn.Module, GaugeSet, float]:
    """The reference LM in ``dtype`` on ``device`` with one next-token loss's gradients, its gauges
    found there, and the seconds that discovery took (device synchronised)."""
    torch.manual_seed(0)
    model = TransformerLM(reference_config(width, n_layers=layers)).to(device=device, dtype=dtype)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0)).to(device)
    _synchronize(device)
    start = time.perf_counter()
    gauges = gaugeopt.find_gauges(model, tokens[:1, :16], output="logits")
    _synchronize(device)
    discovery_s = time.perf_counter() - start
    logits = model(tokens[:, :-1])
    F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()
    return model, gauges, discovery_s


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_point(width: int, layers: int, dtype: torch.dtype, device: torch.device, *, warmup: int, rounds: int,
              peers: dict[str, OptimizerFactory] = PEERS) -> dict:
    model, gauges, discovery_s = model_on_device(width, layers, dtype, device)
    timings = time_steps(model, gauges, peers, warmup=warmup, rounds=rounds)
    results = {name: {"median_s": t.median_s, "step_s": t.step_s, "first_step_s": t.first_step_s,
                      "state_bytes": t.state_bytes, "peak_step_bytes": t.peak_step_bytes} for name, t in timings.items()}
    return {"width": width, "layers": layers, "dtype": str(dtype).removeprefix("torch."),
            "parameters": parameter_count(model), "families": len(gauges), "discovery_s": discovery_s,
            "optimizers": results}


def render(results: dict) -> str:
    env = results["environment"]
    lines = ["# The optimizers' steps on a CUDA device", "",
             f"Generated by `{env['command']}` on {env['device_name']} (torch {env['torch']}, "
             f"{env['date_utc']}, commit `{env['commit']}`); medians over {env['rounds']} interleaved rounds "
             f"after {env['warmup']} untimed ones; the reference LM (RoPE, RMSNorm, SwiGLU, heads of 32 dims, "
             "d_ff = 4 d_model, vocabulary 256) with one set of gradients per row, kept by every step (so "
             "the `stack_parameters=True` rows hold them in their buffers). 'first' is an optimizer's "
             "first step (state allocation; compilation for the compiled ones). Peak: the most memory a "
             "step allocated above what was allocated before it.", ""]
    for row in results["points"]:
        ops = row["optimizers"]
        base, fused = ops["AdamW (foreach)"]["median_s"], ops.get("AdamW (fused)", {}).get("median_s")
        lines += [f"## d_model {row['width']} x {row['layers']} layers, {row['dtype']} parameters "
                  f"({row['parameters']:,} parameters)", "",
                  f"Discovery on the device: {row['discovery_s']:.1f} s, {row['families']} families.", "",
                  "| optimizer | step (ms) | vs AdamW (foreach) | vs AdamW (fused) | first step (s) | state (MiB) "
                  "| step peak (MiB) |", "|---|---:|---:|---:|---:|---:|---:|"]
        for name, t in ops.items():
            peak = "-" if t["peak_step_bytes"] is None else f"{t['peak_step_bytes'] / 2**20:.0f}"
            vs_fused = "-" if fused is None else f"{t['median_s'] / fused:.2f}"
            lines.append(f"| {name} | {t['median_s'] * 1e3:.2f} | {t['median_s'] / base:.2f} | {vs_fused} | "
                         f"{t['first_step_s']:.1f} | {t['state_bytes'] / 2**20:.0f} | {peak} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cuda", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for the report")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--widths", type=int, nargs="+", default=[1024])
    parser.add_argument("--layers", type=int, default=12, help="transformer layers of the reference LM")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"],
                        help="parameter dtypes")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--peers", nargs="+", choices=list(PEERS), default=list(DEFAULT_PEERS))
    args = parser.parse_args(argv)
    from .__main__ import _commit
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("python -m benchmarks.cuda: no CUDA device is available (pass --device cpu for a CPU run)",
              file=sys.stderr)
        return 2
    peers = {name: PEERS[name] for name in args.peers}
    if "AdamW (foreach)" not in peers:
        parser.error("--peers must include 'AdamW (foreach)', the baseline of the ratios")
    points = []
    for dtype in args.dtypes:
        for width in args.widths:
            points.append(run_point(width, args.layers, getattr(torch, dtype), device, warmup=args.warmup,
                                    rounds=args.rounds, peers=peers))
            print(f"d_model {width} {dtype}: done", file=sys.stderr, flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    results = {"environment": {"command": "python -m benchmarks.cuda " + " ".join(argv if argv is not None
                                                                                  else sys.argv[1:]),
                               "device_name": name, "torch": torch.__version__, "commit": _commit(),
                               "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                               "rounds": args.rounds, "warmup": args.warmup},
               "points": points}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmarks_cuda.json").write_text(json.dumps(results, indent=1))
    report = render(results)
    (args.out / "benchmarks_cuda.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
