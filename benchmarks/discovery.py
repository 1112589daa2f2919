"""``python -m benchmarks.discovery``: the time ``find_gauges`` takes against width and depth.

The model is the reference :class:`~gaugeopt.models.TransformerLM` (float32, RoPE, RMSNorm, SwiGLU,
heads of 64 dims, ``d_ff = 4 d_model``, vocabulary 256), the example one sequence of 8 tokens. Each
point is one call of ``find_gauges`` on a freshly built model, timed by the wall clock and by the
process's CPU time (the machine may be shared: the load average is recorded around each point),
and its families are checked against the known answer for that configuration
(:func:`expected_lm_families`): a timing of a discovery that found something else would mean nothing.

``--llama SIZE`` adds a Hugging Face ``LlamaForCausalLM`` built from a config with random weights (no
download): ``1b`` is Llama 3.2 1B's shape (1.24B parameters, 16 layers, d_model 2048, 32 query and 8
key/value heads of 64 dims, llama3 RoPE scaling, tied embeddings), ``tiny`` the same layout at toy
size (what the tests run). It is built in ``--llama-dtype`` (bfloat16 by default, as such models are
used) directly on ``--device``; before timing it, the tiny Llama's families on that device are
checked against those on the CPU. Writes ``discovery.json`` and ``discovery.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

import gaugeopt
from gaugeopt.models import TransformerLM, TransformerLMConfig

VOCAB, SEQ, HEAD_DIM = 256, 8, 64
WIDTHS, DEPTHS, FULL = (128, 256, 512, 768), (1, 2, 4, 8, 12), (768, 12)


def lm_config(width: int, layers: int) -> TransformerLMConfig:
    return TransformerLMConfig(vocab_size=VOCAB, d_model=width, n_layers=layers, n_heads=width // HEAD_DIM,
                               d_ff=4 * width, max_seq_len=SEQ)


def expected_lm_families(config: TransformerLMConfig) -> dict[str, int]:
    """Family name -> group dimension that discovery must find on the reference LM (full RoPE with
    distinct frequencies, RMSNorm, SwiGLU, untied head): per layer both norms' channel scalings, the
    SwiGLU units, the query/key rotations (one plane generator per RoPE frequency and head) and the
    value/output rotations (so(head_dim) per head); the final norm and the head's logit shift."""
    d, hd, heads = config.d_model, config.d_model // config.n_heads, config.n_heads
    families = {"norm_scale:norm": d, "logit_shift:head": d}
    for i in range(config.n_layers):
        families.update({f"norm_scale:blocks.{i}.norm1": d, f"norm_scale:blocks.{i}.norm2": d,
                         f"neuron_scale:blocks.{i}.ffn.up": config.d_ff,
                         f"qk_rotation:blocks.{i}.attn": heads * hd // 2,
                         f"vo_rotation:blocks.{i}.attn": heads * hd * (hd - 1) // 2})
    return families


def llama_config(size: str):
    """A ``transformers.LlamaConfig``: ``"1b"`` has Llama 3.2 1B's shape, ``"tiny"`` its layout at toy size."""
    import transformers

    rope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    shape = {"1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64),
             "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16)}[size]
    return transformers.LlamaConfig(**shape, max_position_embeddings=131072, rope_parameters=rope,
                                    tie_word_embeddings=True)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_discovery(model: torch.nn.Module, example, device: torch.device) -> tuple[gaugeopt.GaugeSet, dict]:
    """``find_gauges(model, example, output="logits")`` with its wall and CPU time and the load
    average before and after; the coverage warnings it gives are recorded, not printed."""
    load_before = os.getloadavg()
    _synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gauges = gaugeopt.find_gauges(model, example, output="logits")
    _synchronize(device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return gauges, {"wall_s": wall, "cpu_s": cpu, "load_before": load_before, "load_after": os.getloadavg(),
                    "families": len(gauges), "group_dimension": sum(f.dim for f in gauges),
                    "warnings": [str(w.message) for w in caught]}


def _families(gauges: gaugeopt.GaugeSet) -> dict[str, int]:
    return {f.name: f.dim for f in gauges}


def lm_point(width: int, layers: int, device: torch.device) -> dict:
    """Discovery on the reference LM at one width and depth, checked against its known families."""
    config = lm_config(width, layers)
    torch.manual_seed(0)
    model = TransformerLM(config).to(device)
    example = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(0)).to(device)
    gauges, row = timed_discovery(model, example, device)
    expected = expected_lm_families(config)
    if _families(gauges) != expected:
        wrong = sorted(set(_families(gauges).items()) ^ set(expected.items()))[:6]
        raise AssertionError(f"d_model {width} x {layers} layers: discovery found other families than "
                             f"the known answer (differences: {wrong})")
    return {"width": width, "layers": layers, "heads": config.n_heads, "head_dim": HEAD_DIM,
            "parameters": sum(p.numel() for p in model.parameters()), **row}


def llama_point(size: str, dtype: torch.dtype, device: torch.device) -> dict:
    """Discovery on a random-weight Llama of ``size`` in ``dtype`` on ``device``, after checking that
    the tiny Llama gives the same families there as on the CPU."""
    import transformers

    def build(which: str, where: torch.device, precision: torch.dtype):
        torch.manual_seed(0)
        with torch.device(where):
            model = transformers.LlamaForCausalLM(llama_config(which))
        return model.to(precision).eval()

    def example(where: torch.device) -> dict:
        ids = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(0))
        return {"input_ids": ids.to(where), "use_cache": False}

    cpu = torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied head's missing logit shift: recorded for the timed run below
        on_cpu = _families(gaugeopt.find_gauges(build("tiny", cpu, dtype), example(cpu), output="logits"))
        on_device = _families(gaugeopt.find_gauges(build("tiny", device, dtype), example(device), output="logits"))
    if on_device != on_cpu:
        raise AssertionError(f"the tiny Llama's families on {device} differ from those on the CPU: "
                             f"{sorted(set(on_device.items()) ^ set(on_cpu.items()))[:6]}")
    model = build(size, device, dtype)
    gauges, row = timed_discovery(model, example(device), device)
    kinds = dict(Counter(f.kind for f in gauges))
    config = llama_config(size)
    layers = config.num_hidden_layers  # both norms, the SwiGLU units and both rotations of every layer
    expected = {"norm_scale": 2 * layers, "neuron_scale": layers, "qk_rotation": layers, "vo_rotation": layers}
    if kinds != expected:  # (the final norm feeds the tied head: no family, and no logit shift)
        raise AssertionError(f"Llama {size}: found {kinds}, expected {expected}")
    return {"size": size, "dtype": str(dtype).removeprefix("torch."), "layers": config.num_hidden_layers,
            "width": config.hidden_size, "parameters": sum(p.numel() for p in model.parameters()),
            "kinds": kinds, "tiny_same_on_cpu": True, **row}


def render(results: dict) -> str:
    env = results["environment"]
    lines = ["# find_gauges: time against width and depth", "",
             f"Generated by `{env['command']}` on {env['device_name']} ({env['logical_cpus']} logical CPUs, "
             f"torch threads {env['torch_threads']}); python {env['python']}, torch {env['torch']}; "
             f"{env['date_utc']}. Wall and CPU time of one `find_gauges` call per point; load average "
             "(1 min) before and after each; every point found exactly its known families.", "",
             "| d_model | layers | heads | parameters | families | wall (s) | CPU (s) | load |",
             "|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in results["lm"]:
        lines.append(f"| {row['width']} | {row['layers']} | {row['heads']} | {row['parameters']:,} | {row['families']} | "
                     f"{row['wall_s']:.1f} | {row['cpu_s']:.1f} | {row['load_before'][0]:.1f} / "
                     f"{row['load_after'][0]:.1f} |")
    if results.get("llama"):
        row = results["llama"]
        lines += ["", f"Llama ({row['size']}, random weights, {row['dtype']}, {row['parameters']:,} parameters, "
                      f"{row['layers']} layers, d_model {row['width']}) on {env['device']}: "
                      f"**{row['wall_s']:.1f} s** wall ({row['cpu_s']:.1f} s CPU), {row['families']} families "
                      f"({', '.join(f'{n} {k}' for k, n in row['kinds'].items())}); the tiny Llama gives the same "
                      "families there as on the CPU."]
        lines += [f"- warning: {w}" for w in row["warnings"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.discovery", description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS),
                        help=f"d_model values at {FULL[1]} layers (multiples of {HEAD_DIM})")
    parser.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS), help=f"layer counts at d_model {FULL[0]}")
    parser.add_argument("--width-for-depths", type=int, default=FULL[0], help="d_model of the depth sweep")
    parser.add_argument("--layers-for-widths", type=int, default=FULL[1], help="layers of the width sweep")
    parser.add_argument("--device", default="cpu", help="where the models live and discovery probes them")
    parser.add_argument("--llama", choices=("1b", "tiny"), help="also time a random-weight Llama of this size")
    parser.add_argument("--llama-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for discovery.json and discovery.md")
    args = parser.parse_args(argv)
    if any(w % HEAD_DIM for w in [*args.widths, args.width_for_depths]):
        parser.error(f"widths must be multiples of the head dimension {HEAD_DIM}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda needs a CUDA device; none is available", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    points = [(w, args.layers_for_widths) for w in args.widths] + [(args.width_for_depths, n) for n in args.depths]
    lm_point(HEAD_DIM, 1, device)  # untimed: the first call imports what discovery uses
    lm = []
    for width, layers in sorted(set(points), key=lambda p: (p[1], p[0])):
        lm.append(lm_point(width, layers, device))
        print(f"d_model {width:5d} x {layers:2d} layers: {lm[-1]['wall_s']:6.1f} s wall, {lm[-1]['cpu_s']:6.1f} s CPU",
              file=sys.stderr, flush=True)
    llama = llama_point(args.llama, getattr(torch, args.llama_dtype), device) if args.llama else None
    environment = {
        "command": "python -m benchmarks.discovery" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__,
    }
    results = {"environment": environment, "lm": lm, "llama": llama}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "discovery.json").write_text(json.dumps(results, indent=1))
    report = render(results)
    (args.out / "discovery.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
