"""gaugeopt.testing.check_equivariance on optimizers whose answer is known independently of DDCAdam:
plain SGD is equivariant under orthogonal gauges (head rotations) and not under rescalings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaugeopt
from gaugeopt.models import TransformerLM, TransformerLMConfig
from gaugeopt.testing import EquivarianceResult, check_equivariance, check_equivariance_per_family, relative_error


def _lm() -> tuple[nn.Module, gaugeopt.GaugeSet]:
    torch.manual_seed(0)
    model = TransformerLM(TransformerLMConfig(vocab_size=9, d_model=8, n_layers=1, n_heads=2, d_ff=8, max_seq_len=6,
                                              rope="none", init_std=0.3)).double()
    return model, gaugeopt.find_gauges(model, torch.randint(0, 9, (1, 5)), output="logits")


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 9, (2, 6), generator=g) for _ in range(3)]


def _loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())


def sgd(model: nn.Module, gauges) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)


def test_sgd_is_equivariant_under_rotations_and_not_under_rescalings():
    model, gauges = _lm()
    results = check_equivariance_per_family(sgd, model, gauges, _batches(), _loss, steps=20,
                                            kinds=["qk_rotation", "vo_rotation", "norm_scale", "neuron_scale"],
                                            product=False)
    for kind in ("qk_rotation", "vo_rotation"):
        assert results[kind].error <= 1e-10, (kind, results[kind].error)
        assert results[kind].displacement > 0.05
    for kind in ("norm_scale", "neuron_scale"):
        assert results[kind].error >= 1e-3, (kind, results[kind].error)


def test_result_object_and_model_left_unchanged():
    model, gauges = _lm()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = check_equivariance(sgd, model, gauges, _batches(), _loss, steps=5, families="qk_rotation")
    assert isinstance(result, EquivarianceResult)
    assert float(result) == result.error and len(result.per_step) == 5
    assert result.error == max(result.per_step) == result.per_step[result.worst_step - 1]
    assert set(result.element) == {f.name for f in gauges if f.kind == "qk_rotation"}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_identity_element_gives_zero_error_even_for_adamw():
    model, gauges = _lm()
    result = check_equivariance(lambda m, g: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
                                model, gauges, _batches(), _loss, steps=5, element=gauges.identity())
    assert result.error == 0.0 and result.displacement == 0.0


def test_dropout_randomness_is_shared_between_the_runs():
    """With dropout active, both runs draw the same masks, so an equivariant optimizer still passes."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 3)).double().train()
    gauges = gaugeopt.find_gauges(model, torch.randn(2, 4, dtype=torch.float64), output="values")
    assert gauges.kinds == ("neuron_scale",)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(6, 4, generator=g, dtype=torch.float64),
                torch.randn(6, 3, generator=g, dtype=torch.float64)) for _ in range(3)]
    result = check_equivariance(lambda m, gs: gaugeopt.DDCAdam(m.parameters(), gs, lr=1e-2, weight_decay=0.1),
                                model, gauges, batches, lambda m, b: F.mse_loss(m(b[0]), b[1]), steps=20)
    assert result.error <= 1e-10 and result.displacement > 0.05


def test_bad_input_is_refused():
    model, gauges = _lm()
    with pytest.raises(ValueError, match="ran out"):
        check_equivariance(sgd, model, gauges, iter(_batches()), _loss, steps=5)
    with pytest.raises(ValueError, match="does not have"):
        check_equivariance(sgd, model, gauges, _batches(), _loss, steps=2, element={"nope": {}})
    with pytest.raises(ValueError, match="either element or families"):
        check_equivariance(sgd, model, gauges, _batches(), _loss, steps=2, element=gauges.identity(),
                           families="norm_scale")
    with pytest.raises(ValueError, match="steps"):
        check_equivariance(sgd, model, gauges, _batches(), _loss, steps=0)
    with pytest.raises(TypeError, match="scalar"):
        check_equivariance(sgd, model, gauges, _batches(), lambda m, b: m(b), steps=1)


def test_relative_error_is_over_all_parameters():
    a = {"x": torch.tensor([3.0, 0.0]), "y": torch.tensor([0.0])}
    b = {"x": torch.tensor([3.0, 0.0]), "y": torch.tensor([4.0])}
    err, where = relative_error(a, b)
    assert err == pytest.approx(4.0 / 5.0) and where == "y"
    assert relative_error({"x": torch.zeros(2)}, {"x": torch.zeros(2)}) == (0.0, "x")
