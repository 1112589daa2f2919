"""Hook capture: per-sample gradients from one backward equal one-sample-at-a-time autograd."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gaugeopt.experiments.common import half_squared_error

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


def test_positions_keep_only_the_answer_position_of_a_sequence_model():
    from gaugeopt.dds import dead_direction_signatures
    from gaugeopt.models import ModularAdditionConfig, ModularAdditionTransformer

    torch.manual_seed(0)
    model = ModularAdditionTransformer(ModularAdditionConfig(modulus=7, d_model=8, n_layers=1, n_heads=2,
                                                             d_ff=16)).double()
    x = torch.randint(0, 7, (12, 2))
    y = (x[:, 0] + x[:, 1]) % 7

    def loss(logits, targets):
        return torch.nn.functional.cross_entropy(logits, targets, reduction="none")

    sites = ["decoder.head", "decoder.blocks.0.ffn.down"]
    every = capture_sites(model, x, y, loss, sites)
    last = capture_sites(model, x, y, loss, sites, positions=[-1])
    for site in ("decoder.head:output", "decoder.blocks.0.ffn.down:output"):
        assert every.activations[site].shape[0] == 36 and last.activations[site].shape[0] == 12
        # the two positions before '=' carry no loss: their gradient rows are exactly zero
        assert every.gradients[site].view(12, 3, -1)[:, :2].abs().max() == 0
        torch.testing.assert_close(last.gradients[site], every.gradients[site].view(12, 3, -1)[:, 2])
    reading = dead_direction_signatures(model, x, y, loss=loss, sites=sites, positions=[2])
    assert reading.row("decoder.head").samples == 12
    with pytest.raises(ValueError, match="distinct"):
        capture_sites(model, x, y, loss, sites, positions=[0, 0])
    flat = torch.nn.Sequential(torch.nn.Linear(3, 2))
    skipped = capture_sites(flat, torch.randn(4, 3), torch.zeros(4, 2),
                            lambda o, t: (o - t).pow(2).sum(-1), ["0"], positions=[-1]).skipped
    assert "no sequence dimension" in skipped["0:output"]


def test_project_out_reads_the_spectra_of_the_orthogonal_complement():
    from gaugeopt.dds import dead_direction_signatures, second_moment_eigenvalues

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5)).double()
    x, y = torch.randn(40, 4, dtype=torch.float64), torch.randn(40, 5, dtype=torch.float64)
    loss = half_squared_error
    captured = capture_sites(model, x, y, loss, ["0"])
    out = dead_direction_signatures(model, x, y, loss=loss, sites=["0"],
                                    project_out={"0": torch.eye(5)[:2] * 3.0})  # span of e_1, e_2
    row = out.row("0")
    # projecting out two coordinate axes leaves the spectra of the remaining 3 x 3 blocks
    for side, data in (("A", captured.activations["0:output"]), ("G", captured.gradients["0:output"])):
        expected = second_moment_eigenvalues(data[:, 2:])
        assert getattr(row, f"rank_{side}") == 3
        assert getattr(row, f"lambda_min_{side}") == pytest.approx(float(expected[0]), rel=1e-12)
        assert getattr(row, f"logdet_{side}") == pytest.approx(float(expected.log().sum()), rel=1e-12)
    with pytest.raises(ValueError, match="not among the sites"):
        dead_direction_signatures(model, x, y, loss=loss, sites=["0"], project_out={"1": torch.ones(1, 5)})
    with pytest.raises(ValueError, match="linearly dependent"):
        dead_direction_signatures(model, x, y, loss=loss, sites=["0"], project_out={"0": torch.ones(2, 5)})


def test_the_logit_shift_that_float32_round_off_leaks_into_G_is_gone_in_float64_with_the_quotient():
    from gaugeopt.dds import dead_direction_signatures

    torch.manual_seed(0)
    classes = 7
    directions = torch.nn.functional.normalize(torch.randn(classes, 5), dim=1)
    model = torch.nn.Sequential(torch.nn.Linear(5, classes, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(directions)
    y = torch.arange(64) % classes
    x = 50 * directions[y] + 0.1 * torch.randn(64, 5)  # memorised: per-sample losses <= 1e-3

    def loss(logits, targets):
        return torch.nn.functional.cross_entropy(logits, targets, reduction="none")

    # softmax - onehot sums to zero in every row, so the all-ones direction is not one of G's; in
    # float32 its round-off (~1e-7 of the largest probability) sits far above the real eigenvalues
    leaky = dead_direction_signatures(model, x, y, loss=loss, sites=["0"]).row("0")
    exact = dead_direction_signatures(model.double(), x.double(), y, loss=loss, sites=["0"],
                                      project_out={"0": torch.ones(1, classes)}).row("0")
    plain64 = dead_direction_signatures(model.double(), x.double(), y, loss=loss, sites=["0"]).row("0")
    assert leaky.rank_G > exact.rank_G == plain64.rank_G and exact.rank_G <= classes - 1
