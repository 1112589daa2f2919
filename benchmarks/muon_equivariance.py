"""``python -m benchmarks.muon_equivariance``: how exactly DDCMuon's trajectory follows a gauge element,
by Newton-Schulz dtype and coefficients, against ``torch.optim.Muon`` + AdamW (docs/ddc_muon.md).

Two float64 models (a 1-layer ``TransformerLM`` and a 1-layer ``ModularAdditionTransformer``, d_model
16, 2 heads, SwiGLU 32, the models of tests/test_ddc_muon.py), 50 steps at Muon lr 0.05, Adam lr 0.01,
weight decay 0.1. Per family: the relative error ``|g.theta_t - theta'_t| / |theta'_t|`` of
:func:`gaugeopt.testing.check_equivariance_per_family`, worst over the steps. Then, on the language
model, how the error under the product of all families grows with the number of steps, and how far
two runs from starts that differ by a relative 1e-15 end apart (the sensitivity of the training
dynamics themselves, which amplifies any rounding difference, equivariant or not). Prints markdown;
about four minutes on one CPU thread.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from gaugeopt import DDCMuon, find_gauges
from gaugeopt.models import (
    ModularAdditionConfig,
    ModularAdditionTransformer,
    TransformerLM,
    TransformerLMConfig,
    modular_addition_data,
)
from gaugeopt.optim.baselines import MuonWithAdamW
from gaugeopt.testing import check_equivariance, check_equivariance_per_family, relative_error

MUON_LR, ADAM_LR, DECAY, STEPS, VOCAB = 0.05, 1e-2, 0.1, 50, 17


def language_model():
    torch.manual_seed(0)
    model = TransformerLM(TransformerLMConfig(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, d_ff=32,
                                              max_seq_len=8)).double()
    tokens = list(torch.randint(0, VOCAB, (3, 4, 8), generator=torch.Generator().manual_seed(1)))

    def loss(m, batch):
        return F.cross_entropy(m(batch[:, :-1]).reshape(-1, VOCAB), batch[:, 1:].reshape(-1))

    return model, find_gauges(model, (tokens[0],), output="logits"), tokens, loss


def modular_addition():
    torch.manual_seed(0)
    model = ModularAdditionTransformer(ModularAdditionConfig(modulus=13, d_model=16, n_layers=1, n_heads=2,
                                                             d_ff=32)).double()
    inputs, labels = modular_addition_data(13)
    batches = [(inputs[i::3], labels[i::3]) for i in range(3)]
    return model, find_gauges(model, (inputs[:4],), output="logits"), batches, \
        lambda m, batch: F.cross_entropy(m(batch[0]), batch[1])


def ddc_muon(ns_dtype, ns_coefficients=None):
    extra = {} if ns_coefficients is None else {"ns_coefficients": ns_coefficients}
    return lambda m, g: DDCMuon(m.parameters(), g, lr=MUON_LR, weight_decay=DECAY, adam_lr=ADAM_LR,
                                ns_dtype=ns_dtype, **extra)


ARMS = {
    "DDCMuon, bfloat16 (default)": ddc_muon(torch.bfloat16),
    "DDCMuon, float32": ddc_muon(torch.float32),
    "DDCMuon, float64": ddc_muon(None),
    "DDCMuon, float64, Polar Express": ddc_muon(None, "polar_express"),
    "torch.optim.Muon + AdamW": lambda m, g: MuonWithAdamW(m, g, lr=MUON_LR, weight_decay=DECAY, adam_lr=ADAM_LR),
}


def apart_after(make, model, gauges, batches, loss, perturbation: float) -> float:
    """Relative distance after ``STEPS`` steps between runs from ``theta_0`` and from ``theta_0``
    with every entry scaled by ``1 + perturbation * N(0, 1)``."""
    runs = []
    for scale in (0.0, perturbation):
        m = copy.deepcopy(model)
        with torch.no_grad():
            noise = torch.Generator().manual_seed(5)
            for p in m.parameters():
                p.mul_(1 + scale * torch.randn(p.shape, generator=noise, dtype=p.dtype))
        optimizer = make(m, gauges.bind(m))
        for t in range(STEPS):
            optimizer.zero_grad()
            loss(m, batches[t % len(batches)]).backward()
            optimizer.step()
        runs.append(m)
    return relative_error(runs[0], runs[1])[0]


def main() -> None:
    torch.set_num_threads(1)
    for label, build in (("language model", language_model), ("modular addition", modular_addition)):
        model, gauges, batches, loss = build()
        rows = {name: check_equivariance_per_family(make, model, gauges, batches, loss, steps=STEPS)
                for name, make in ARMS.items()}
        kinds = list(next(iter(rows.values())))
        print(f"\n{label}, worst over {STEPS} steps\n")
        print("| optimizer | " + " | ".join(kinds) + " |\n|---|" + "---:|" * len(kinds))
        for name, results in rows.items():
            print(f"| {name} | " + " | ".join(f"{results[k].error:.2g}" for k in kinds) + " |")
    model, gauges, batches, loss = language_model()
    counts = (1, 5, 10, 20, 50)
    print(f"\nlanguage model, product of all families, worst up to step t; last column: two runs from "
          f"starts 1e-15 apart, after {STEPS} steps\n")
    print("| optimizer | " + " | ".join(f"t = {t}" for t in counts) + " | 1e-15 apart |\n|---|"
          + "---:|" * (len(counts) + 1))
    for name, make in list(ARMS.items())[:4]:
        errors = [check_equivariance(make, model, gauges, batches, loss, steps=t).error for t in counts]
        apart = apart_after(make, model, gauges, batches, loss, 1e-15)
        print(f"| {name} | " + " | ".join(f"{e:.2g}" for e in errors) + f" | {apart:.2g} |")


if __name__ == "__main__":
    main()
