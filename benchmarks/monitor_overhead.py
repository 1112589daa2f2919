"""What the dead-direction monitor costs a training run: ``python -m benchmarks.monitor_overhead [--write]``.

The reference language model (float32, :func:`~benchmarks.optimizer_steps.reference_config`) trains on random
next-token batches of ``BATCH x SEQ`` tokens with ``torch.optim.AdamW(foreach=True)``, the cheapest step of
the benchmarks (so the largest ratio). Timed in rounds, interleaved so that a change in machine load hits
every measurement alike (medians over rounds):

* a training step: forward, backward and optimizer step on one batch;
* a reading of :class:`~gaugeopt.monitor.DeadDirectionMonitor` (DDS at its default sites on the probe, the
  orbit drift of every gauge family, the gauge-invariant gradient norm), for probes of 1, 2 and 4 sequences
  (4 is one training batch);
* a ``step()`` call that does not read (a counter and a comparison).

Between readings the monitor does nothing else, so at ``every = k`` its overhead is
``(reading + (k - 1) idle call) / (k step)``. An end-to-end check runs blocks of ``k`` steps with a monitor
(one reading per block) and without, alternating, and reports ``median(with) / median(without) - 1``: the
same figure with the machine's noise in it. ``--write`` puts the table into ``docs/monitor.md`` between
``<!-- overhead -->`` and ``<!-- /overhead -->``. Options: ``--widths``, ``--rounds``, ``--every``,
``--blocks`` (pairs of end-to-end blocks), ``--threads`` (default 1). About 3 minutes on the shared 2-core CPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import gaugeopt
from gaugeopt.experiments.common import per_token_cross_entropy
from gaugeopt.models import TransformerLM
from gaugeopt.monitor import DeadDirectionMonitor

from .optimizer_steps import BATCH, SEQ, VOCAB, adamw, parameter_count, reference_config
from .report import write_between_markers

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "monitor.md"
PROBES = (1, 2, 4)  # sequences of SEQ tokens in the probe


def _timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


class _Run:
    """The reference LM at one width, its gauges, AdamW and a source of batches."""

    def __init__(self, width: int):
        torch.manual_seed(0)
        self.model = TransformerLM(reference_config(width))
        self.data = torch.Generator().manual_seed(0)
        self.gauges = gaugeopt.find_gauges(self.model, self.tokens(1)[:, :16], output="logits")
        self.optimizer = adamw(self.model, self.gauges)

    def tokens(self, sequences: int) -> torch.Tensor:
        return torch.randint(0, VOCAB, (sequences, SEQ + 1), generator=self.data)

    def monitor(self, probe_sequences: int, every: int) -> DeadDirectionMonitor:
        probe = self.tokens(probe_sequences)
        return DeadDirectionMonitor(self.model, self.gauges, probe=(probe[:, :-1], probe[:, 1:]),
                                    loss=per_token_cross_entropy, every=every, optimizer=self.optimizer)

    def train_step(self) -> None:
        batch = self.tokens(BATCH)
        self.optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).backward()
        self.optimizer.step()


def measure(width: int, *, rounds: int, every: int, idle_calls: int = 2000) -> dict:
    """Median step, reading (per probe size) and idle-call times at one width, and the overheads."""
    run = _Run(width)
    monitors = {n: run.monitor(n, every) for n in PROBES}
    run.train_step()  # warm-up: allocations, the optimizer's state, the gradient norm's frame plan
    for monitor in monitors.values():
        monitor.read(0)
    step_s: list[float] = []
    reading_s: dict[int, list[float]] = {n: [] for n in PROBES}
    for r in range(1, rounds + 1):
        step_s.append(_timed(run.train_step))
        for n, monitor in monitors.items():
            reading_s[n].append(_timed(lambda: monitor.read(r)))
    idle = run.monitor(PROBES[0], every=10 ** 9)  # counts 1, 2, ..., none of them a multiple of `every`
    idle_s = _timed(lambda: [idle.step() for _ in range(idle_calls)]) / idle_calls
    step = statistics.median(step_s)
    rows = []
    for n in PROBES:
        reading = statistics.median(reading_s[n])
        rows.append({"probe_sequences": n, "probe_tokens": n * SEQ, "reading_s": reading,
                     "overhead": (reading + (every - 1) * idle_s) / (every * step)})
    return {"width": width, "parameters": parameter_count(run.model), "step_s": step, "idle_call_s": idle_s,
            "rounds": rounds, "probes": rows}


def end_to_end(width: int, probe_sequences: int, *, every: int, blocks: int) -> dict:
    """Blocks of ``every`` steps with a monitor (one reading each) and without, alternating."""
    run = _Run(width)
    monitor = run.monitor(probe_sequences, every)
    run.train_step()
    monitor.read(0)

    def block(watched: bool) -> None:
        for _ in range(every):
            run.train_step()
            if watched:
                monitor.step()

    plain_s, watched_s = [], []
    for _ in range(blocks):
        plain_s.append(_timed(lambda: block(False)))
        watched_s.append(_timed(lambda: block(True)))
    assert len(monitor.steps) == blocks + 1  # one reading per watched block, and the warm-up's
    return {"width": width, "probe_sequences": probe_sequences, "blocks": blocks, "plain_s": plain_s,
            "watched_s": watched_s, "overhead": statistics.median(watched_s) / statistics.median(plain_s) - 1}


def render(results: dict) -> str:
    every, env = results["every"], results["environment"]
    lines = [f"| d_model | parameters | training step | probe (tokens) | reading | overhead at every={every} |",
             "|---|---|---|---|---|---|"]
    for row in results["rows"]:
        for probe in row["probes"]:
            lines.append(f"| {row['width']} | {row['parameters'] / 1e6:.2f} M | {row['step_s'] * 1e3:.1f} ms "
                         f"| {probe['probe_sequences']} x {SEQ} ({probe['probe_tokens']}) "
                         f"| {probe['reading_s'] * 1e3:.1f} ms | {probe['overhead']:.2%} |")
    check = results["end_to_end"]
    pairs = sorted(w / p - 1 for w, p in zip(check["watched_s"], check["plain_s"]))
    lines += ["", f"End to end (d_model {check['width']}, probe {check['probe_sequences']} x {SEQ}): blocks of {every} "
              f"steps with the monitor took {check['overhead']:+.2%} against blocks without (medians of "
              f"{check['blocks']} alternating blocks each; the pairs ranged from {pairs[0]:+.1%} to {pairs[-1]:+.1%}: "
              f"the machine's noise is in this figure, not in the table, where every timed step follows readings). "
              f"A `step()` that does not read costs {results['rows'][0]['idle_call_s'] * 1e6:.1f} us.",
              "", f"Measured {env['date_utc']} at commit {env['commit']} by `{env['command']}`: {env['torch_threads']} "
              f"torch thread(s), training batch {BATCH} x {SEQ} tokens, AdamW (foreach), float32, load average "
              f"{env['load_start'][0]:.1f} at the start and {env['load_end'][0]:.1f} at the end."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .__main__ import _commit

    parser = argparse.ArgumentParser(prog="python -m benchmarks.monitor_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--blocks", type=int, default=6, help="pairs of end-to-end blocks")
    parser.add_argument("--end-to-end-width", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="put the table into docs/monitor.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start, commit = os.getloadavg(), _commit()
    rows = [measure(width, rounds=args.rounds, every=args.every) for width in args.widths]
    check = end_to_end(args.end_to_end_width, PROBES[-1], every=args.every, blocks=args.blocks)
    command = "python -m benchmarks.monitor_overhead " + " ".join(argv if argv is not None else sys.argv[1:])
    results = {"every": args.every, "rows": rows, "end_to_end": check, "environment": {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="minutes"), "commit": commit,
        "command": command.strip(), "torch_threads": torch.get_num_threads(), "load_start": load_start,
        "load_end": os.getloadavg()}}
    table = render(results)
    print(table)
    if args.write:
        write_between_markers(DOC, "overhead", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
