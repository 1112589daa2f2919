"""The benchmark report: ``docs/benchmarks.md`` and the step-time plot, written from the results dict
that :mod:`benchmarks.__main__` measured (nothing in them is typed by hand)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

LARGE = 1_000_000  # parameters: the large-width regime of the scaling fit
MUON = "torch.optim.Muon + AdamW"  # the peer of DDCMuon: gaugeopt.optim.baselines.MuonWithAdamW
STACKED, STACKED_MUON = "DDCAdam (stack_parameters)", "DDCMuon (stack_parameters)"
STACKED_COMPILED = "DDCAdam compiled (stack_parameters)"

TARGETS = {"ddc_adam_ratio": 2.0, "ddc_adam_compiled_ratio": 1.0, "ddc_muon_ratio": 1.15, "state_overhead": 0.02,
           "ops_growth": 1.3, "ops_over_adamw": 4.0, "llc_over_dds": 100.0, "bytes_over_peer": 1.2}
#: Each optimizer of the memory-traffic table and the peer its bytes are held against.
TRAFFIC_PEERS = {"DDCAdam": "AdamW (foreach)", STACKED: "AdamW (foreach)", "DDCMuon": MUON, STACKED_MUON: MUON}


def fitted_exponent(parameters: list[int], seconds: list[float]) -> float:
    """Least-squares slope of ``log(seconds)`` against ``log(parameters)``."""
    slope, _ = np.polyfit(np.log(parameters), np.log(seconds), 1)
    return float(slope)


def write_between_markers(doc: Path, marker: str, text: str) -> None:
    """Replace what stands between ``<!-- marker -->`` and ``<!-- /marker -->`` in ``doc`` by ``text``."""
    content = doc.read_text()
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    if start not in content or end not in content:
        raise SystemExit(f"{doc} has no {start} ... {end} markers")
    head, rest = content.split(start, 1)
    doc.write_text(f"{head}{start}\n{text}\n{end}{rest.split(end, 1)[1]}")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds < 10 else f"{seconds * 1e3:.0f}"


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.2f}"


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def _pair_table(rows: list[dict], base: str, ours: str, base_label: str, ours_label: str) -> list[str]:
    lines = [f"| d_model | parameters | {base_label} step (ms) | {ours_label} step (ms) | ratio | "
             f"{base_label} state (MiB) | {ours_label} state (MiB) | state overhead |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        b, o = row["optimizers"][base], row["optimizers"][ours]
        lines.append(f"| {row['width']} | {row['parameters']:,} | {_ms(b['median_s'])} | {_ms(o['median_s'])} | "
                     f"{o['median_s'] / b['median_s']:.2f} | {_mib(b['state_bytes'])} | {_mib(o['state_bytes'])} | "
                     f"{100 * (o['state_bytes'] / b['state_bytes'] - 1):+.2f} % |")
    return lines


def _compiled_table(rows: list[dict]) -> list[str]:
    lines = ["| d_model | parameters | AdamW step (ms) | DDCAdam step (ms) | ratio | DDCAdam compiled step (ms) | "
             "ratio | first compiled step (s) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        a, d, f = (row["optimizers"][n] for n in ("AdamW (foreach)", "DDCAdam", "DDCAdam compiled"))
        lines.append(f"| {row['width']} | {row['parameters']:,} | {_ms(a['median_s'])} | {_ms(d['median_s'])} | "
                     f"{d['median_s'] / a['median_s']:.2f} | {_ms(f['median_s'])} | "
                     f"{f['median_s'] / a['median_s']:.2f} | {f['first_step_s']:.1f} |")
    return lines


def _iteration_table(iteration: dict | None) -> list[str]:
    """Bytes per parameter of a whole training iteration, phase by phase, where the run measured it."""
    if not iteration:
        return []
    lines = ["What a whole training iteration moves, per parameter, phase by phase (the same count, "
             "`benchmarks.dispatch.iteration_traffic`: torch's `zero_grad()`, forward and backward of the "
             f"reference loss, the step; d_model {iteration['width']} x {iteration['layers']} layers). An "
             "optimizer's cost outside its step shows here: backward adds each gradient into one that "
             "`zero_grad` kept, where it otherwise hands over a new tensor.", "",
             "| optimizer | zero_grad | forward and backward | step | iteration |", "|---|---:|---:|---:|---:|"]
    for name, row in iteration["optimizers"].items():
        total = row["zero_grad"] + row["forward_backward"] + row["step"]
        lines.append(f"| {name} | {row['zero_grad']:.1f} | {row['forward_backward']:.1f} | {row['step']:.1f} "
                     f"| {total:.1f} |")
    return lines + ["", f"{_load(iteration)}.", ""]


def _stacked_rows(rows: list[dict]) -> list[str]:
    """A line on the eager step with ``stack_parameters=True``, where the run measured it."""
    if STACKED not in rows[0]["optimizers"]:
        return []
    def ratios(name: str) -> str:
        return ", ".join(f"{r['optimizers'][name]['median_s'] / r['optimizers']['AdamW (foreach)']['median_s']:.2f}x "
                         f"at d_model {r['width']}" for r in rows)

    line = (f"With `stack_parameters=True` (the same step, every batch's parameters held in one buffer per batch; "
            f"the timed steps keep their gradients, which the step then holds too) the eager step takes "
            f"{ratios(STACKED)} AdamW (foreach)'s time in the same rounds")
    if STACKED_COMPILED in rows[0]["optimizers"]:
        line += f", the compiled step {ratios(STACKED_COMPILED)}"
    return [line + ".", ""]


def _state_table(rows: list[dict], base: str, ours: str) -> list[str]:
    lines = [f"| d_model | {base} state (MiB) | {ours} state (MiB) | overhead |", "|---:|---:|---:|---:|"]
    for row in rows:
        b, o = row["optimizers"][base]["state_bytes"], row["optimizers"][ours]["state_bytes"]
        lines.append(f"| {row['width']} | {_mib(b)} | {_mib(o)} | {100 * (o / b - 1):+.2f} % |")
    return lines


def _load(section: dict) -> str:
    start, end = section["load_before"], section["load_after"]
    return (f"load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in start)}; "
            f"after: {', '.join(f'{x:.2f}' for x in end)}; wall time {section['wall_s']:.0f} s")


def _fault_line(results: dict) -> str:
    """The largest median of minor page faults per timed step, over the step-time sections' rows, per
    optimizer (runs that recorded them)."""
    worst: dict[str, tuple[float, int]] = {}
    for section in ("adam", "muon", "muon_fp32", "layerwise", "scaling"):
        for row in results.get(section, {}).get("rows", []):
            for name, timing in row["optimizers"].items():
                if timing.get("page_faults"):
                    median = float(np.median(timing["page_faults"]))
                    if median >= worst.get(name, (-1.0, 0))[0]:
                        worst[name] = (median, row["width"])
    if not worst:
        return ""
    return ("; minor page faults per timed step (median; the largest over widths): "
            + ", ".join(f"{name} {median:.0f} (d_model {width})" for name, (median, width) in worst.items())
            + ". A step that page-faults its temporaries back in pays the kernel's zeroing of each page.")


def plot_scaling(scaling: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    params = [row["parameters"] for row in scaling["rows"]]
    for name, style in (("AdamW (foreach)", "o-"), ("DDCAdam", "s-"), ("DDCAdam compiled", "^-")):
        if name not in scaling["exponents"]:
            continue
        seconds = [row["optimizers"][name]["median_s"] for row in scaling["rows"]]
        exponent = scaling["exponents"][name]
        ax.loglog(params, [s * 1e3 for s in seconds], style, label=f"{name}: fitted exponent {exponent:.2f}")
    ax.set_xlabel("parameters")
    ax.set_ylabel("median step time (ms)")
    ax.set_title("Optimizer step time vs parameter count (reference LM, CPU)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(results: dict, plot_name: str) -> str:
    env = results["environment"]
    cfg = results["config"]
    lines = ["# Benchmarks", "",
             f"Generated by `{env['command']}` from its own measurements; do not edit by hand. "
             f"{'**Quick development run: short and noisy, not the reference figures.** ' if cfg['quick'] else ''}"
             f"Full run: `python -m benchmarks` from the repository root (this run: {env['total_wall_s'] / 60:.1f} min "
             f"wall clock, {env['cpu_s'] / 60:.1f} min of CPU time for this process).",
             "",
             "## Machine and run", "",
             f"- date (UTC): {env['date_utc']}; commit: `{env['commit']}`",
             f"- CPU: {env['cpu']} ({env['logical_cpus']} logical CPUs); torch threads: {env['torch_threads']}",
             f"- python {env['python']}, torch {env['torch']}, {env['platform']}",
             f"- load average (1, 5, 15 min) at start: {', '.join(f'{x:.2f}' for x in env['load_start'])}; "
             f"at end: {', '.join(f'{x:.2f}' for x in env['load_end'])}. The load counts other processes "
             "sharing the machine; a load above the CPU count slows every optimizer alike (steps are "
             "interleaved), which leaves ratios less disturbed than absolute times.",
             f"- allocator: {env.get('allocator', 'not recorded')}" + _fault_line(results),
             f"- model: the reference `TransformerLM` (float32, {cfg['n_layers']} layers, RoPE, RMSNorm, SwiGLU, "
             f"heads of 32 dims, d_ff = 4 d_model, vocabulary {cfg['vocab']}); one set of gradients per width; "
             "each optimizer steps its own copy; steps interleaved (one of each per round) after "
             f"{cfg['warmup']} untimed rounds; medians over the timed rounds.",
             ""]

    summary = results["summary"]
    ops_shallow, ops_deep = summary["ops_depths"]
    lines += ["## Targets", "",
              "| target | measured | verdict |", "|---|---|---|",
              f"| DDCAdam step (eager, the default) <= {TARGETS['ddc_adam_ratio']}x AdamW (foreach) at the "
              f"largest width | {summary['ddc_adam_ratio']:.2f}x at d_model {summary['largest_width']} | "
              f"{_verdict(summary['ddc_adam_ratio'] <= TARGETS['ddc_adam_ratio'])} |",
              f"| DDCAdam step compiled (`compiled=True`) <= {TARGETS['ddc_adam_compiled_ratio']}x AdamW (foreach) | "
              f"{summary['ddc_adam_compiled_ratio']:.2f}x at d_model {summary['largest_width']} | "
              f"{_verdict(summary['ddc_adam_compiled_ratio'] <= TARGETS['ddc_adam_compiled_ratio'])} |"]
    if "ddc_adam_stacked_ratio" in summary:
        lines.append(f"| DDCAdam step with `stack_parameters=True` <= {TARGETS['ddc_adam_ratio']}x AdamW (foreach) | "
                     f"{summary['ddc_adam_stacked_ratio']:.2f}x at d_model {summary['largest_width']} | "
                     f"{_verdict(summary['ddc_adam_stacked_ratio'] <= TARGETS['ddc_adam_ratio'])} |")
    traffic = results.get("traffic")
    for name, peer in (TRAFFIC_PEERS.items() if traffic else ()):
        over = traffic["optimizers"][name]["bytes_per_parameter"] / traffic["optimizers"][peer]["bytes_per_parameter"]
        lines.append(f"| {name}: bytes per parameter of an eager step <= {TARGETS['bytes_over_peer']}x {peer}'s "
                     f"(d_model {traffic['width']} x {traffic['layers']}) | {over:.3f}x | "
                     f"{_verdict(over <= TARGETS['bytes_over_peer'])} |")
    for name in ("DDCAdam", "DDCMuon"):
        growth, over = summary["ops_growth"][name], summary["ops_over_adamw"][name]
        lines += [f"| {name}: dispatched ops per step at {ops_deep} layers <= {TARGETS['ops_growth']}x those at "
                  f"{ops_shallow} | {growth:.2f}x | {_verdict(growth <= TARGETS['ops_growth'])} |",
                  f"| {name}: dispatched ops per step at {ops_deep} layers <= {TARGETS['ops_over_adamw']:.0f}x "
                  f"AdamW (foreach)'s | {over:.2f}x | {_verdict(over <= TARGETS['ops_over_adamw'])} |"]
    lines += [f"| DDCMuon step <= {TARGETS['ddc_muon_ratio']}x torch.optim.Muon + AdamW (both defaults: bfloat16 "
              f"Newton-Schulz) | {summary['ddc_muon_ratio']:.2f}x at d_model {summary['largest_muon_width']} | "
              f"{_verdict(summary['ddc_muon_ratio'] <= TARGETS['ddc_muon_ratio'])} |",
              f"| DDCMuon step <= {TARGETS['ddc_muon_ratio']}x Muon + AdamW, both with float32 Newton-Schulz | "
              f"{summary['ddc_muon_fp32_ratio']:.2f}x at d_model {summary['largest_muon_width']} | "
              f"{_verdict(summary['ddc_muon_fp32_ratio'] <= TARGETS['ddc_muon_ratio'])} |",
              f"| optimizer state <= AdamW's + 2 % (DDCAdam, largest width) | "
              f"{100 * summary['ddc_adam_state_overhead']:+.2f} % | "
              f"{_verdict(summary['ddc_adam_state_overhead'] <= TARGETS['state_overhead'])} |",
              f"| DDS >= {TARGETS['llc_over_dds']:.0f}x cheaper than the LLC per checkpoint | "
              f"{summary['llc_over_dds_min']:.0f}x (smallest over checkpoints) | "
              f"{_verdict(summary['llc_over_dds_min'] >= TARGETS['llc_over_dds'])} |",
              f"| step time linear in parameter count | fitted exponent {summary['ddc_adam_exponent']:.2f} "
              f"(DDCAdam), {summary['ddc_adam_compiled_exponent']:.2f} (compiled), {summary['adamw_exponent']:.2f} "
              "(AdamW) | see the plot |",
              ""]

    ops = results["dispatch"]
    names = list(ops["rows"][0]["ops"])
    lines += ["## Dispatched operations per step", "",
              "Every tensor operation of an eager step reaches torch's dispatcher once; a `TorchDispatchMode` "
              "counts them (`benchmarks/dispatch.py`). The count does not depend on the device or the width; "
              "on a GPU each operation but a view costs at least one kernel launch. The optimizers step "
              "the reference LM at d_model "
              f"{ops['width']} after two untimed steps, each step on new gradients, as backward leaves them "
              "after torch's `zero_grad()`"
              + (f" ({', '.join(ops['kept'])}: on gradients kept from step to step, as after "
                 "`zero_grad(set_to_none=False)`, which the step then holds in one buffer per batch too)"
                 if ops.get("kept") else "") + ".", "",
              "| layers | parameters | " + " | ".join(names) + " |", "|---:|---:|" + "---:|" * len(names)]
    for row in ops["rows"]:
        lines.append(f"| {row['layers']} | {row['parameters']:,} | "
                     + " | ".join(str(row["ops"][n]) for n in names) + " |")
    if "launches" in ops["rows"][0]:
        lines += ["", "The kernels these operations launch on a CUDA device: none for views, allocations without "
                  "initial values and host reads, one for every other operation, but one per member for a "
                  "multi-tensor (`_foreach_`) operation whose lists torch's multi-tensor kernels cannot take "
                  "together (a factor broadcast to each member, a 0-d tensor per member, other strides or "
                  "dtypes: its CUDA fallback loops over the members; `benchmarks/dispatch.py`):", "",
                  "| layers | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
        for row in ops["rows"]:
            lines.append(f"| {row['layers']} | " + " | ".join(str(row["launches"][n]) for n in names) + " |")
    deep = ops["rows"][-1]
    lines += ["", f"The most frequent operations at {deep['layers']} layers:", ""]
    for name in names:
        lines.append(f"- {name}: " + ", ".join(f"`{op}` {count}" for op, count in deep["top"][name]))
    lines += ["", f"{_load(ops)}.", ""]

    if traffic:
        large = results.get("traffic_vocab")
        lines += ["## Memory traffic per step", "",
                  "What one eager step's operations read and write (the same `TorchDispatchMode`, "
                  "`benchmarks/dispatch.py`: each operation's tensor arguments and results, views moving "
                  "nothing), per parameter, on the reference LM at d_model "
                  f"{traffic['width']} x {traffic['layers']} layers ({traffic['parameters']:,} parameters, "
                  f"float32, its vocabulary of {traffic.get('vocab', cfg['vocab'])} tokens)"
                  + (f" and with a vocabulary of {large['vocab']:,} ({large['parameters']:,} parameters, of which "
                     f"the embedding and the LM head, which a logit shift translates, are "
                     f"{2 * large['vocab'] * large['width'] / large['parameters']:.0%}; in GPT-2 small with an untied head 48 %)"
                     if large else "")
                  + ". On a GPU an optimizer step is bound by this traffic; torch's fused AdamW moves 28 bytes per "
                  "parameter. Each step is taken on new gradients, as backward leaves them after torch's "
                  "`zero_grad()`. `stack_parameters=True` holds every batch's parameters in one buffer per batch "
                  "(docs/ddc.md).", "",
                  "| optimizer | bytes per parameter | operations | host reads |"
                  + (f" bytes per parameter, vocabulary {large['vocab']:,} |" if large else ""),
                  "|---|---:|---:|---:|" + ("---:|" if large else "")]
        for name, row in traffic["optimizers"].items():
            lines.append(f"| {name} | {row['bytes_per_parameter']:.1f} | {row['ops']} | {row['host_reads']} |"
                         + (f" {large['optimizers'][name]['bytes_per_parameter']:.1f} |" if large else ""))
        lines += ["", f"{_load(traffic)}.", ""]
        lines += _iteration_table(results.get("iteration"))

    adam = results["adam"]
    lines += ["## DDCAdam vs torch.optim.AdamW(foreach=True)", "",
              "DDCAdam's step reads every gradient into its frame, takes one Adam direction per batch of "
              "same-shaped components across layers and writes the lifted update back "
              "(`gaugeopt.optim.step`). `DDCAdam(compiled=True)` runs the same step program under "
              "`torch.compile`; lr, betas and weight decay enter as tensors, so a schedule does not recompile. "
              "Its first step compiles, or loads the kernels from torch's on-disk cache: that time is the last "
              "column, outside the medians.", "",
              *_compiled_table(adam["rows"]), "",
              *_stacked_rows(adam["rows"]),
              "Optimizer state (the eager and the compiled step keep the same state):", "",
              *_state_table(adam["rows"], "AdamW (foreach)", "DDCAdam"),
              "", f"{cfg['rounds']} timed rounds. {_load(adam)}.", ""]

    muon, fp32 = results["muon"], results["muon_fp32"]
    lines += ["## DDCMuon vs Muon + AdamW", "",
              "Both sides split the parameters alike (`muon_parameter_names`: hidden matrices take Muon, the "
              "embedding, the LM head and the gains AdamW).", "",
              "**The defaults: bfloat16 Newton-Schulz on both sides.** The peer is `torch.optim.Muon` itself "
              "with `torch.optim.AdamW` for the rest (`gaugeopt.optim.baselines.MuonWithAdamW`); "
              "`torch.optim.Muon` always iterates in bfloat16, and so does DDCMuon by default "
              "(`ns_dtype=torch.bfloat16`).", "",
              *_pair_table(muon["rows"], MUON, "DDCMuon", "torch Muon+AdamW", "DDCMuon"), "",
              f"{cfg['muon_rounds']} timed rounds. {_load(muon)}.", "",
              "**float32 Newton-Schulz on both sides** (`ns_dtype=torch.float32`, DDCMuon's setting for "
              "equivariance to float32 rounding). torch's Muon has no dtype setting, so the peer is Muon + "
              "AdamW without gauge frames (`DDCMuon(groups, gauges=None, ns_dtype=torch.float32)`: "
              "torch.optim.Muon's iteration operation for operation, bit for bit torch's in bfloat16, see "
              "tests/test_ddc_muon.py), with the same AdamW kernel for the rest.", "",
              *_pair_table(fp32["rows"], "Muon+AdamW fp32", "DDCMuon fp32", "Muon+AdamW", "DDCMuon"), "",
              f"{cfg['muon_rounds']} timed rounds. {_load(fp32)}.", ""]

    layer = results["layerwise"]
    lines += ["## The layerwise stack (SymmetryCompatible) vs AdamW", "",
              "`SymmetryCompatible(symmetry_param_groups(model))`: per-head Muon on attention, the SwiGLU "
              "rules on the MLP, AdamW on the embedding, head and vectors. No target; its layerwise maps "
              "run Newton-Schulz and polar iterations, so it is expected to cost more than AdamW.", "",
              *_pair_table(layer["rows"], "AdamW (foreach)", "SymmetryCompatible", "AdamW", "layerwise"), "",
              f"{cfg['layerwise_rounds']} timed rounds. {_load(layer)}.", ""]

    dds = results["dds_vs_llc"]
    sgld = dds["config"]["sgld"]
    lines += ["## DDS vs the devinterp LLC, per checkpoint", "",
              f"Reduced-rank regression checkpoints (M = {dds['config']['M']}, N = {dds['config']['N']}, "
              f"n = {dds['config']['samples']}); DDS reads sites {', '.join(dds['config']['sites'])} with one "
              f"forward and one backward pass (median of {dds['config']['dds_repeats']} readings); the LLC runs "
              f"devinterp SGLD with {sgld['num_chains']} chains x {sgld['num_draws']} draws of "
              f"{sgld['batch_size']} samples after {sgld.get('num_burnin_steps', 0)} burn-in steps (step size "
              f"{sgld['lr']}, localization {sgld['localization']}; the calibrated protocol of the `rrr` "
              "experiment, docs/dds.md).", "",
              "| H | r | DDS (ms) | LLC (s) | LLC / DDS | LLC forward-backward passes |",
              "|---:|---:|---:|---:|---:|---:|"]
    for cell in dds["cells"]:
        lines.append(f"| {cell['H']} | {cell['r']} | {cell['dds_s'] * 1e3:.2f} | {cell['llc_s']:.1f} | "
                     f"{cell['llc_over_dds']:.0f} | {cell['llc_forward_backward_passes']} |")
    lines += ["", f"{_load(dds)}.", ""]

    scaling = results["scaling"]
    lines += ["## Step time vs parameter count", "",
              f"![step time vs parameters]({plot_name})", "",
              "| d_model | parameters | AdamW (ms) | DDCAdam (ms) | ratio | DDCAdam compiled (ms) | ratio |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in scaling["rows"]:
        a, d, f = (row["optimizers"][n]["median_s"] for n in ("AdamW (foreach)", "DDCAdam", "DDCAdam compiled"))
        lines.append(f"| {row['width']} | {row['parameters']:,} | {_ms(a)} | {_ms(d)} | {d / a:.2f} | {_ms(f)} | "
                     f"{f / a:.2f} |")
    exps = scaling["exponents"]
    large = [row for row in scaling["rows"] if row["parameters"] >= LARGE]
    large_fit = ""
    if len(large) >= 2:
        large_exps = {name: fitted_exponent([row["parameters"] for row in large],
                                            [row["optimizers"][name]["median_s"] for row in large]) for name in exps}
        large_fit = (f"; widths with at least {LARGE:,} parameters ({len(large)} points) "
                     + ", ".join(f"{name} {value:.2f}" for name, value in large_exps.items()))
    lines += ["", "Fitted exponent of step time against parameter count (least squares on log-log): all widths "
              + ", ".join(f"{name} {value:.2f}" for name, value in exps.items()) + large_fit
              + ". An exponent of 1 is linear. Below 1, per-tensor overhead (Python and kernel launches) is a "
              "visible share of the step at small widths; above 1, the optimizer state outgrows the CPU caches "
              "and every pass over memory gets slower.",
              "", f"{cfg['scaling_rounds']} timed rounds. {_load(scaling)}.", ""]
    return "\n".join(lines)
