"""``python -m benchmarks``: measure everything and write ``docs/benchmarks.md`` and its plot.

Options: ``--quick`` (small widths, few rounds: a smoke run for development, marked as such in the
report), ``--out DIR`` (where the report, plot and raw ``benchmarks.json`` go; default ``docs``),
``--threads N`` (torch CPU threads, default 1), ``--adaptive-malloc`` (leave glibc's ``malloc`` at
its history-dependent defaults instead of :func:`~benchmarks.optimizer_steps.keep_freed_memory`),
``--render-only`` (rewrite the report and plot from ``DIR/benchmarks.json`` without measuring). The
full run took 3.9 minutes of wall clock (3.4 of CPU time) on the shared 2-core machine, with torch's
compile cache warm; a fresh machine adds a few minutes of compilation. ``--quick`` takes two to
three minutes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import dds_vs_llc, dispatch, optimizer_steps
from .optimizer_steps import (
    adamw,
    adamw_fused,
    compare,
    ddc_adam,
    ddc_adam_compiled,
    ddc_adam_compiled_stacked,
    ddc_adam_stacked,
    ddc_muon,
    keep_freed_memory,
    muon_with_adamw_reference,
    muon_with_adamw_torch,
    symmetry_compatible,
)
from .report import MUON, STACKED, STACKED_COMPILED, STACKED_MUON, fitted_exponent, plot_scaling, render

FULL = dict(quick=False, widths=(128, 256, 512), warmup=2, rounds=15, layerwise_rounds=5,
            muon_widths=(128, 256, 512), muon_rounds=5,
            scaling_widths=(64, 96, 128, 192, 256, 384, 512, 768), scaling_rounds=7,
            llc_cells=((3, 2), (5, 3)), llc_draws=1000, dds_repeats=20, dispatch_width=64, dispatch_depths=(2, 8),
            traffic_width=256, traffic_layers=4, traffic_vocab=8192)
QUICK = dict(quick=True, widths=(64, 128), warmup=1, rounds=5, layerwise_rounds=3,
             muon_widths=(64, 128), muon_rounds=2,
             scaling_widths=(64, 96, 128), scaling_rounds=3,
             llc_cells=((3, 2),), llc_draws=100, dds_repeats=5, dispatch_width=32, dispatch_depths=(2, 8),
             traffic_width=32, traffic_layers=2, traffic_vocab=2048)
PLOT = "benchmarks_step_time.png"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" (with uncommitted changes)" if dirty else "")


def _section(run) -> dict:
    """Run one measurement, recording the machine load around it and its wall time."""
    before, start = os.getloadavg(), time.perf_counter()
    result = run()
    return {**result, "load_before": before, "load_after": os.getloadavg(), "wall_s": time.perf_counter() - start}


def _log(message: str) -> None:
    print(f"[{dt.datetime.now().strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small and short: a development smoke run")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="directory for the report and plot")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--adaptive-malloc", action="store_true",
                        help="leave glibc's malloc at its defaults, which return freed memory to the kernel "
                             "depending on the process's history (timings then depend on what ran before)")
    parser.add_argument("--render-only", action="store_true",
                        help="measure nothing: rewrite the report and plot from DIR/benchmarks.json")
    args = parser.parse_args(argv)
    if args.render_only:
        results = json.loads((args.out / "benchmarks.json").read_text())
        _write_report(results, args.out)
        return 0
    cfg = dict(QUICK if args.quick else FULL)
    torch.set_num_threads(args.threads)
    allocator = None if args.adaptive_malloc else keep_freed_memory()
    started, load_start, commit = time.perf_counter(), os.getloadavg(), _commit()  # the code measured
    warmup = cfg["warmup"]

    def rows(widths, factories, rounds):
        return {"rows": [compare(w, factories, warmup=warmup, rounds=rounds) for w in widths]}

    _log("dispatched operations per step")
    ops = _section(lambda: dispatch.count_at_depths({
        "AdamW (foreach)": adamw, "DDCAdam": ddc_adam, STACKED: ddc_adam_stacked, "DDCMuon": ddc_muon(),
        STACKED_MUON: ddc_muon(stack_parameters=True), MUON: muon_with_adamw_torch},
        width=cfg["dispatch_width"], depths=cfg["dispatch_depths"], kept=frozenset({STACKED, STACKED_MUON})))
    _log("memory traffic per step")
    traffic_factories = {
        "AdamW (fused)": adamw_fused, "AdamW (foreach)": adamw, "DDCAdam": ddc_adam, STACKED: ddc_adam_stacked,
        MUON: muon_with_adamw_torch, "DDCMuon": ddc_muon(), STACKED_MUON: ddc_muon(stack_parameters=True)}
    traffic = _section(lambda: dispatch.step_traffic(traffic_factories, width=cfg["traffic_width"],
                                                     layers=cfg["traffic_layers"]))
    traffic_vocab = _section(lambda: dispatch.step_traffic(traffic_factories, width=cfg["traffic_width"],
                                                           layers=cfg["traffic_layers"], vocab=cfg["traffic_vocab"]))
    _log("memory traffic per training iteration")
    iteration = _section(lambda: dispatch.iterations_traffic(traffic_factories, width=cfg["traffic_width"],
                                                             layers=cfg["traffic_layers"]))
    _log("DDCAdam vs AdamW")
    adam = _section(lambda: rows(cfg["widths"], {"AdamW (foreach)": adamw, "DDCAdam": ddc_adam, STACKED: ddc_adam_stacked,
                                                 "DDCAdam compiled": ddc_adam_compiled,
                                                 STACKED_COMPILED: ddc_adam_compiled_stacked}, cfg["rounds"]))
    _log("DDCMuon vs torch.optim.Muon + AdamW (bfloat16 Newton-Schulz, both defaults)")
    muon = _section(lambda: rows(cfg["muon_widths"], {MUON: muon_with_adamw_torch, "DDCMuon": ddc_muon()},
                                 cfg["muon_rounds"]))
    _log("DDCMuon vs Muon + AdamW (float32 Newton-Schulz)")
    fp32 = _section(lambda: rows(cfg["muon_widths"], {"Muon+AdamW fp32": muon_with_adamw_reference(torch.float32),
                                                     "DDCMuon fp32": ddc_muon(torch.float32)}, cfg["muon_rounds"]))
    _log("SymmetryCompatible vs AdamW")
    layer = _section(lambda: rows(cfg["widths"], {"AdamW (foreach)": adamw, "SymmetryCompatible": symmetry_compatible},
                                  cfg["layerwise_rounds"]))
    _log("step time vs parameter count")
    scaling = _section(lambda: rows(cfg["scaling_widths"], {"AdamW (foreach)": adamw, "DDCAdam": ddc_adam,
                                                            "DDCAdam compiled": ddc_adam_compiled},
                                    cfg["scaling_rounds"]))
    scaling["exponents"] = {name: fitted_exponent([r["parameters"] for r in scaling["rows"]],
                                                  [r["optimizers"][name]["median_s"] for r in scaling["rows"]])
                            for name in ("AdamW (foreach)", "DDCAdam", "DDCAdam compiled")}
    _log("DDS vs LLC")
    dds = _section(lambda: dds_vs_llc.compare_per_checkpoint(list(cfg["llc_cells"]), dds_repeats=cfg["dds_repeats"],
                                                             sgld={"num_draws": cfg["llc_draws"]}))

    largest, largest_muon, largest_fp32 = adam["rows"][-1], muon["rows"][-1], fp32["rows"][-1]

    def ratio(row: dict, ours: str, base: str) -> float:
        return row["optimizers"][ours]["median_s"] / row["optimizers"][base]["median_s"]

    shallow, deep = ops["rows"][0]["ops"], ops["rows"][-1]["ops"]

    summary = {
        "largest_width": largest["width"], "largest_muon_width": largest_muon["width"],
        "ddc_adam_ratio": ratio(largest, "DDCAdam", "AdamW (foreach)"),
        "ddc_adam_compiled_ratio": ratio(largest, "DDCAdam compiled", "AdamW (foreach)"),
        "ddc_adam_stacked_ratio": ratio(largest, STACKED, "AdamW (foreach)"),
        "ddc_adam_compiled_stacked_ratio": ratio(largest, STACKED_COMPILED, "AdamW (foreach)"),
        "ddc_muon_ratio": ratio(largest_muon, "DDCMuon", MUON),
        "ddc_muon_fp32_ratio": ratio(largest_fp32, "DDCMuon fp32", "Muon+AdamW fp32"),
        "ddc_adam_state_overhead": largest["optimizers"]["DDCAdam"]["state_bytes"]
        / largest["optimizers"]["AdamW (foreach)"]["state_bytes"] - 1,
        "llc_over_dds_min": min(cell["llc_over_dds"] for cell in dds["cells"]),
        "ddc_adam_exponent": scaling["exponents"]["DDCAdam"],
        "ddc_adam_compiled_exponent": scaling["exponents"]["DDCAdam compiled"],
        "adamw_exponent": scaling["exponents"]["AdamW (foreach)"],
        "ops_depths": [ops["rows"][0]["layers"], ops["rows"][-1]["layers"]],
        "ops_growth": {name: deep[name] / shallow[name] for name in ("DDCAdam", "DDCMuon")},
        "ops_over_adamw": {name: deep[name] / deep["AdamW (foreach)"] for name in ("DDCAdam", "DDCMuon")},
    }
    environment = {
        "command": "python -m benchmarks" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip(),
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "commit": commit,
        "cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "allocator": allocator or "the C library's malloc at its defaults",
        "load_start": load_start, "load_end": os.getloadavg(), "total_wall_s": time.perf_counter() - started,
        "cpu_s": time.process_time(),
    }
    config = {**cfg, "vocab": optimizer_steps.VOCAB, "n_layers": optimizer_steps.reference_config(64).n_layers}
    results = {"environment": environment, "config": config, "summary": summary, "dispatch": ops, "traffic": traffic,
               "traffic_vocab": traffic_vocab, "iteration": iteration, "adam": adam, "muon": muon,
               "muon_fp32": fp32, "layerwise": layer, "scaling": scaling, "dds_vs_llc": dds}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmarks.json").write_text(json.dumps(results, indent=1))
    _write_report(results, args.out)
    return 0


def _write_report(results: dict, out: Path) -> None:
    plot_scaling(results["scaling"], out / PLOT)
    (out / "benchmarks.md").write_text(render(results, PLOT) + "\n")
    _log(f"wrote {out / 'benchmarks.md'} and {out / PLOT} from the measurements in {out / 'benchmarks.json'}")


if __name__ == "__main__":
    raise SystemExit(main())
