"""What a compiled step costs to build and what inductor makes of it: ``python -m benchmarks.compiled [--write]``.

For each optimizer and model size, one process with an empty inductor cache (``TORCHINDUCTOR_CACHE_DIR`` a
fresh directory, so every graph is traced, lowered and code-generated, as on a new machine) takes one step
on the reference language model (:func:`~benchmarks.optimizer_steps.model_with_gradients`) and reports:

* **kernels**: ``torch._inductor.metrics.generated_kernel_count`` over the step's graphs. A step whose count
  grows with depth launches more kernels per layer on a GPU (on a CPU inductor emits loop nests, counted
  alike);
* **estimated bytes per parameter**: inductor's own estimate of what its scheduled nodes read and write
  (``metrics.num_bytes_accessed``, recorded when the ``inductor_metrics`` log is on), over the parameter
  count. torch's fused AdamW moves 28 bytes per float32 parameter (``benchmarks.dispatch``), the reference
  for the compiled step;
* **first step**: wall time of that first ``step()`` with the cold cache (tracing, lowering, C++ or Triton
  compilation and the step itself).

The peers: DDCAdam and DDCMuon with ``compiled=True`` (and with ``stack_parameters=True`` too: every batch
one graph input, its parameters and gradients held in one buffer), and ``torch.optim.AdamW(foreach=True)`` whose
``step`` is wrapped in ``torch.compile`` (:class:`~benchmarks.optimizer_steps.CompiledAdamW`, the
peer of ``benchmarks.cuda`` too: the usual way to compile torch's optimizers). Each process runs one
thread. ``--write`` puts the table into ``docs/ddc.md`` between ``<!-- compiled -->`` and
``<!-- /compiled -->``. Options: ``--width`` and ``--depths`` (kernels and bytes; default 256 and 2, 8),
``--cold-width`` and ``--cold-depth`` (the cold first step; default 512 x 2), ``--optimizers``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .__main__ import _commit
from .optimizer_steps import (CompiledAdamW, ddc_adam_compiled, ddc_adam_compiled_stacked, ddc_muon_compiled,
                              ddc_muon_compiled_stacked, model_with_gradients, parameter_count)

#: The compiled steps measured, by name.
COMPILED = {"AdamW compiled": CompiledAdamW, "DDCAdam compiled": ddc_adam_compiled,
            "DDCAdam compiled, stack_parameters": ddc_adam_compiled_stacked,
            "DDCMuon compiled": ddc_muon_compiled, "DDCMuon compiled, stack_parameters": ddc_muon_compiled_stacked}
OPTIMIZERS = tuple(COMPILED)
MARKERS = ("<!-- compiled -->", "<!-- /compiled -->")


def measure_here(name: str, width: int, layers: int) -> dict:
    """One cold compiled step of ``name`` in this process (whose inductor cache the caller made empty)."""
    from torch._inductor import metrics

    torch.set_num_threads(1)
    torch._logging.set_logs(inductor_metrics=True)  # makes inductor estimate each graph's bytes
    logging.getLogger("torch._inductor.compile_fx").setLevel(logging.WARNING)  # ...without printing them
    model, gauges = model_with_gradients(width, n_layers=layers)
    optimizer = COMPILED[name](model, gauges)
    metrics.reset()
    start = time.perf_counter()
    optimizer.step()
    first = time.perf_counter() - start
    n = parameter_count(model)
    return {"optimizer": name, "width": width, "layers": layers, "parameters": n,
            "kernels": metrics.generated_kernel_count, "bytes_per_parameter": metrics.num_bytes_accessed / n,
            "first_step_s": first}


def measure(name: str, width: int, layers: int) -> dict:
    """:func:`measure_here` in a fresh process with an empty inductor cache of its own."""
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="inductor-cold-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(root), str(root / "src"), os.environ.get("PYTHONPATH")]))}
        before = os.getloadavg()
        done = subprocess.run([sys.executable, "-m", "benchmarks.compiled", "--one", name, str(width), str(layers)],
                              cwd=root, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} at {width} x {layers} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "load_before": before, "load_after": os.getloadavg()}


def render(results: dict) -> str:
    env, rows = results["environment"], results["rows"]
    depths = sorted({r["layers"] for r in rows if r["width"] == results["width"]})
    lines = [f"Measured {env['date_utc']} at commit {env['commit']} (`{env['command']}`, torch {env['torch']}, "
             f"one thread per process; load average {env['load_start'][0]:.1f} at the start, "
             f"{env['load_end'][0]:.1f} at the end). Each figure is one process with an empty inductor cache.", "",
             f"| optimizer | kernels ({' / '.join(f'{d} layers' for d in depths)}) | inductor's estimated bytes "
             f"per parameter ({' / '.join(str(d) for d in depths)} layers) | first step, cold cache, "
             f"d_model {results['width']} ({' / '.join(str(d) for d in depths)} layers) |",
             "|---|---|---|---|"]
    for name in results["optimizers"]:
        own = {r["layers"]: r for r in rows if r["optimizer"] == name and r["width"] == results["width"]}
        lines.append(f"| {name} | {' / '.join(str(own[d]['kernels']) for d in depths)} | "
                     f"{' / '.join(format(own[d]['bytes_per_parameter'], '.1f') for d in depths)} | "
                     f"{' / '.join(format(own[d]['first_step_s'], '.0f') + ' s' for d in depths)} |")
    cold = [r for r in rows if (r["width"], r["layers"]) == (results["cold_width"], results["cold_depth"])]
    if cold:
        lines += ["", f"First step with a cold cache at d_model {results['cold_width']} x {results['cold_depth']} "
                      "layers: " + ", ".join(f"{r['optimizer']} {r['first_step_s']:.0f} s" for r in cold) + "."]
    lines += ["", "torch's fused AdamW moves 28 bytes per parameter (`benchmarks.dispatch`); 1.5x of it is 42."]
    return "\n".join(lines)


def _write(text: str, path: Path) -> None:
    doc = path.read_text()
    start, end = MARKERS
    if doc.count(start) != 1 or doc.count(end) != 1:
        raise SystemExit(f"{path} must hold {start} and {end} once each")
    head, rest = doc.split(start)
    _, tail = rest.split(end)
    path.write_text(f"{head}{start}\n{text}\n{end}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compiled", description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--cold-width", type=int, default=512)
    parser.add_argument("--cold-depth", type=int, default=2)
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--write", action="store_true", help="put the table into docs/ddc.md")
    parser.add_argument("--one", nargs=3, metavar=("OPTIMIZER", "WIDTH", "LAYERS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # the child process of measure()
        print(json.dumps(measure_here(args.one[0], int(args.one[1]), int(args.one[2]))))
        return 0
    load_start, commit = os.getloadavg(), _commit()
    sizes = [(args.width, d) for d in args.depths]
    if (args.cold_width, args.cold_depth) not in sizes:
        sizes.append((args.cold_width, args.cold_depth))
    rows = []
    for name in args.optimizers:
        for width, layers in sizes:
            rows.append(measure(name, width, layers))
            r = rows[-1]
            print(f"{name} d{width} x {layers}: {r['kernels']} kernels, {r['bytes_per_parameter']:.1f} B/param, "
                  f"first step {r['first_step_s']:.0f} s", file=sys.stderr, flush=True)
    results = {"environment": {"command": "python -m benchmarks.compiled " + " ".join(argv or sys.argv[1:]),
                               "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                               "commit": commit, "torch": torch.__version__, "load_start": load_start,
                               "load_end": os.getloadavg()},
               "width": args.width, "cold_width": args.cold_width, "cold_depth": args.cold_depth,
               "optimizers": args.optimizers, "rows": rows}
    text = render(results)
    print(text)
    if args.write:
        _write(text, Path(__file__).resolve().parent.parent / "docs" / "ddc.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
