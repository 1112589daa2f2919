"""Composed scaling gauges: chains of neuron scalings that act on both axes of a matrix.

A deep ReLU MLP (every hidden layer's units rescalable, each weight scaled on its rows by one layer's
units and on its columns by the previous layer's) and a stack of SwiGLU blocks without residuals (the
``up`` units and every block output chained through the next block's ``gate`` and ``up``). DDCAdam
and DDCMuon step them in the two-sided closed-form frame of docs/ddc.md and must be equivariant in
float64 (relative error <= 1e-10 over 30 steps, weight decay on) where AdamW and torch's Muon + AdamW
fail the same check; they must also train.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

import gaugeopt
from gaugeopt import DDCAdam, DDCMuon
from gaugeopt.models import ReLUMLP, ReLUMLPConfig, SwiGLUMLP, SwiGLUMLPConfig
from gaugeopt.optim.baselines import MuonWithAdamW
from gaugeopt.testing import check_equivariance

STEPS = 30


@functools.cache
def _deep_relu():
    torch.manual_seed(0)
    model = ReLUMLP(ReLUMLPConfig(sizes=(5, 8, 8, 8, 8, 3))).double()
    x = torch.randn(64, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.sin(x @ torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    gauges = gaugeopt.find_gauges(model, x[:2], output="values")
    assert [f.kind for f in gauges] == ["neuron_scale"] * 4
    return model, gauges, [(x[i::4], y[i::4]) for i in range(4)]


@functools.cache
def _swiglu_stack():
    torch.manual_seed(0)
    model = SwiGLUMLP(SwiGLUMLPConfig(d_in=5, width=6, d_ff=8, depth=3, d_out=3)).double()
    x = torch.randn(64, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tanh(x @ torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    gauges = gaugeopt.find_gauges(model, x[:2], output="values")
    assert len(gauges) == 7 and set(gauges.kinds) == {"neuron_scale"}
    return model, gauges, [(x[i::4], y[i::4]) for i in range(4)]


MODELS = {"deep_relu": _deep_relu, "swiglu_stack": _swiglu_stack}


def mse(model, batch):
    return F.mse_loss(model(batch[0]), batch[1])


OPTIMIZERS = {
    "DDCAdam": lambda m, g: DDCAdam(m.parameters(), g, lr=1e-2, weight_decay=0.1),
    "DDCMuon": lambda m, g: DDCMuon(m.parameters(), g, lr=0.02, weight_decay=0.1, adam_lr=1e-2),
}
PEERS = {
    "AdamW": lambda m, g: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
    "Muon+AdamW": lambda m, g: MuonWithAdamW(m, g, lr=0.02, weight_decay=0.1, adam_lr=1e-2),
}


@pytest.mark.parametrize("model_key", list(MODELS))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_exactly_equivariant_under_the_composed_gauges(model_key, optimizer):
    model, gauges, batches = MODELS[model_key]()
    result = check_equivariance(OPTIMIZERS[optimizer], model, gauges, batches, mse, steps=STEPS, spread=1.0)
    assert result.displacement > 0.1, "the sampled element barely moves the model"
    assert result.error <= 1e-10, f"{optimizer} on {model_key}: {result.error:.2e} at step {result.worst_step}"


@pytest.mark.parametrize("model_key", list(MODELS))
@pytest.mark.parametrize("peer", list(PEERS))
def test_the_peers_fail_the_same_check(model_key, peer):
    model, gauges, batches = MODELS[model_key]()
    result = check_equivariance(PEERS[peer], model, gauges, batches, mse, steps=STEPS, spread=1.0)
    assert result.error >= 1e-3, f"{peer} looked equivariant on {model_key} ({result.error:.2e})"


@pytest.mark.parametrize("model_key", list(MODELS))
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_they_train_as_well_as_adamw(model_key, optimizer):
    """Full-batch regression, 300 steps: the loss falls, to within 10 % of AdamW's at the same budget."""
    model, gauges, batches = MODELS[model_key]()
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    final = {}
    for label, make in ((optimizer, OPTIMIZERS[optimizer]), ("AdamW", PEERS["AdamW"])):
        trained = copy.deepcopy(model)
        opt = make(trained, gauges.bind(trained))
        for _ in range(300):
            opt.zero_grad()
            F.mse_loss(trained(x), y).backward()
            opt.step()
        final[label] = F.mse_loss(trained(x), y).item()
    assert final[optimizer] < 0.85 * F.mse_loss(model(x), y).item()
    assert final[optimizer] <= 1.1 * final["AdamW"], final
