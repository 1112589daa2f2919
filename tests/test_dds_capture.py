"""Hook capture: per-sample gradients from one backward equal one-sample-at-a-time autograd."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gaugeopt.dds import capture_sites, dead_direction_signatures
from gaugeopt.models import ReLUMLP, ReLUMLPConfig


def per_sample_mse(outputs, targets):
    return 0.5 * (outputs - targets).pow(2).sum(-1)


@pytest.fixture
def mlp_batch():
    torch.manual_seed(0)
    model = ReLUMLP(ReLUMLPConfig(sizes=(5, 7, 6, 3))).double()
    x = torch.randn(9, 5, dtype=torch.float64)
    y = torch.randn(9, 3, dtype=torch.float64)
    return model, x, y


def test_per_sample_gradients_match_one_sample_at_a_time(mlp_batch):
    model, x, y = mlp_batch
    sites = ["layers.0", "layers.1:output", "layers.2:input", "layers.0:input"]
    captured = capture_sites(model, x, y, per_sample_mse, sites)
    assert not captured.skipped
    for n in range(x.shape[0]):
        xn = x[n : n + 1].clone().requires_grad_(True)
        z0 = model.layers[0](xn)
        z1 = model.layers[1](F.relu(z0))
        h1 = F.relu(z1)
        out = model.layers[2](h1)
        loss = per_sample_mse(out, y[n : n + 1]).sum()
        g_x, g_z0, g_z1, g_h1 = torch.autograd.grad(loss, [xn, z0, z1, h1])
        torch.testing.assert_close(captured.gradients["layers.0:output"][n], g_z0[0])
        torch.testing.assert_close(captured.gradients["layers.1:output"][n], g_z1[0])
        torch.testing.assert_close(captured.gradients["layers.2:input"][n], g_h1[0])
        torch.testing.assert_close(captured.gradients["layers.0:input"][n], g_x[0])
        torch.testing.assert_close(captured.activations["layers.2:input"][n], h1[0].detach())


def test_capture_leaves_parameter_grads_and_mode_alone(mlp_batch):
    model, x, y = mlp_batch
    model.eval()
    dead_direction_signatures(model, x, y, loss=per_sample_mse, sites=["layers.0"])
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_sequence_tokens_count_as_samples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x = torch.randn(3, 5, 4, dtype=torch.float64)  # batch 3, 5 tokens
    y = torch.randn(3, 5, 2, dtype=torch.float64)
    reading = dead_direction_signatures(model, x, y, loss=per_sample_mse, sites=["0", "2"])
    assert [row.samples for row in reading.rows] == [15, 15]
    assert [row.width for row in reading.rows] == [6, 2]


def test_frozen_model_is_still_readable(mlp_batch):
    model, x, y = mlp_batch
    for p in model.parameters():
        p.requires_grad_(False)
    reading = dead_direction_signatures(model, x, y, loss=per_sample_mse,
                                        sites=["layers.0", "layers.2"])
    assert not reading.skipped and len(reading.rows) == 2


class _Odd(nn.Module):
    """A model with sites that cannot be read, for the skip reasons."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(3, 3)
        self.unused = nn.Linear(3, 3)
        self.side = nn.Linear(3, 3)
        self.zero = nn.Linear(3, 3)
        nn.init.zeros_(self.zero.weight)
        nn.init.zeros_(self.zero.bias)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = self.shared(self.shared(x))
        self.side(x)  # computed, never used by the loss
        return self.head(h + self.zero(x))


def test_skipped_sites_are_reported_with_reasons():
    model = _Odd().double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    reading = dead_direction_signatures(
        model, x, y, loss=per_sample_mse, sites=["shared", "unused", "side", "zero", "head"]
    )
    assert [row.site for row in reading.rows] == ["head:output"]
    assert "called 2 times" in reading.skipped["shared:output"]
    assert "not called" in reading.skipped["unused:output"]
    assert "does not influence the loss" in reading.skipped["side:output"]
    assert "identically zero" in reading.skipped["zero:output"]
    with pytest.raises(KeyError, match="not called"):
        reading.row("unused")
    assert reading.as_dict()["skipped"][0]["reason"]


def test_bad_input_errors(mlp_batch):
    model, x, y = mlp_batch
    with pytest.raises(ValueError, match="no module 'nope'"):
        dead_direction_signatures(model, x, y, loss=per_sample_mse, sites=["nope"])
    with pytest.raises(ValueError, match="side must be"):
        dead_direction_signatures(model, x, y, loss=per_sample_mse, sites=["layers.0:weights"])
    with pytest.raises(ValueError, match="non-empty sequence"):
        dead_direction_signatures(model, x, y, loss=per_sample_mse, sites=[])
    with pytest.raises(ValueError, match="listed twice"):
        dead_direction_signatures(model, x, y, loss=per_sample_mse, sites=["layers.0", "layers.0:output"])
    with pytest.raises(ValueError, match="per-sample losses"):
        dead_direction_signatures(model, x, y, loss=lambda o, t: per_sample_mse(o, t).mean(),
                                  sites=["layers.0"])
