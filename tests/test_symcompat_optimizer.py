"""SymmetryCompatible as a torch optimizer: step math, validation, state_dict, schedulers, closure."""

from __future__ import annotations

import copy

import pytest
import torch

from gaugeopt.optim import SymmetryCompatible
from gaugeopt.optim.layerwise import apply_map

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def param(*shape: int, seed: int = 0) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(*shape, generator=gen(seed), dtype=F64))


def test_one_step_is_ema_momentum_decay_then_phi():
    W = param(6, 4)
    W0 = W.detach().clone()
    G1, G2 = torch.randn(6, 4, generator=gen(1), dtype=F64), torch.randn(6, 4, generator=gen(2), dtype=F64)
    lr, wd, beta = 0.1, 0.3, 0.9
    opt = SymmetryCompatible([W], lr=lr, rule="hybrid", weight_decay=wd, momentum=beta, alpha=1.0)
    W.grad = G1
    opt.step()
    M1 = (1 - beta) * G1  # EMA from zero, no bias correction
    W1 = (1 - lr * wd) * W0 - lr * apply_map("hybrid", M1, alpha=1.0)
    assert torch.allclose(W.detach(), W1, atol=1e-13)
    W.grad = G2
    opt.step()
    M2 = beta * M1 + (1 - beta) * G2
    W2 = (1 - lr * wd) * W1 - lr * apply_map("hybrid", M2, alpha=1.0)
    assert torch.allclose(W.detach(), W2, atol=1e-13)
    assert torch.allclose(opt.state[W]["momentum_buffer"], M2, atol=1e-15)


def test_adamw_rule_matches_torch_adamw():
    a, b = param(5, seed=3), param(5, seed=3)
    ours = SymmetryCompatible([a], rule="adamw", lr=0.01, weight_decay=0.1, adam_betas=(0.9, 0.99), adam_eps=1e-8)
    theirs = torch.optim.AdamW([b], lr=0.01, weight_decay=0.1, betas=(0.9, 0.99), eps=1e-8)
    for step in range(5):
        g = torch.randn(5, generator=gen(10 + step), dtype=F64)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    assert torch.allclose(a, b, atol=1e-14)


def test_groups_use_their_own_rules_and_hyperparameters():
    W, v = param(8, 4, seed=4), param(4, seed=5)
    opt = SymmetryCompatible(
        [dict(params=[W], rule="muon", lr=0.02, heads=2), dict(params=[v], rule="adamw", lr=1e-3)],
        lr=0.5,
    )
    assert [g["lr"] for g in opt.param_groups] == [0.02, 1e-3]
    assert opt.param_groups[0]["momentum"] == 0.95  # defaults fill the rest
    W.grad, v.grad = torch.ones(8, 4, dtype=F64), torch.ones(4, dtype=F64)
    before = W.detach().clone()
    opt.step()
    expected = before - 0.02 * apply_map("muon", 0.05 * torch.ones(8, 4, dtype=F64), heads=2)
    assert torch.allclose(W.detach(), expected, atol=1e-13)
    assert set(opt.state[v]) == {"step", "exp_avg", "exp_avg_sq"}


def test_params_without_grad_are_skipped():
    W, U = param(3, 3, seed=6), param(3, 3, seed=7)
    opt = SymmetryCompatible([W, U], rule="row_norm", lr=0.1)
    before = U.detach().clone()
    W.grad = torch.ones(3, 3, dtype=F64)
    opt.step()
    assert torch.equal(U.detach(), before) and U not in opt.state


@pytest.mark.parametrize(
    "kwargs, group, message",
    [
        ({}, {}, "no 'rule'"),
        ({"rule": "rownorm"}, {}, "known rules"),
        ({"rule": "row_norm"}, {"orientation": "diagonal"}, "orientation"),
        ({"rule": "row_norm"}, {"heads": 2}, "only meaningful for rule 'muon'"),
        ({"rule": "muon"}, {"heads": 3}, "does not divide"),
        ({"rule": "muon"}, {"heads": 2, "orientation": "col"}, "does not divide"),
        ({"rule": "muon"}, {"lr": -1.0}, "lr"),
        ({"rule": "muon"}, {"momentum": 1.0}, "momentum"),
        ({"rule": "muon"}, {"weight_decay": -0.1}, "weight_decay"),
        ({"rule": "hybrid"}, {"alpha": -1.0}, "alpha"),
        ({"rule": "muon"}, {"adjust_lr": "sqrt"}, "adjust_lr"),
        ({"rule": "muon"}, {"ns_steps": 2.5}, "ns_steps"),
        ({"rule": "adamw"}, {"adam_betas": (0.9, 1.5)}, "adam_betas"),
        ({"rule": "muon"}, {"wieght_decay": 0.1}, "did you mean 'weight_decay'"),
    ],
)
def test_invalid_settings_raise_clear_errors(kwargs, group, message):
    W = param(4, 3, seed=8)  # 4 rows, 3 columns
    with pytest.raises(ValueError, match=message):
        SymmetryCompatible([dict(params=[W], **group)], **kwargs)


def test_matrix_rule_on_a_vector_names_the_parameter():
    weight, bias = param(4, 3), param(4)
    with pytest.raises(ValueError, match=r"layer\.bias.*adamw"):
        SymmetryCompatible([dict(params=[weight, bias], param_names=["layer.weight", "layer.bias"], rule="row_norm")])
    with pytest.raises(ValueError, match="matrix"):
        SymmetryCompatible([param(2, 2, 2, 2)], rule="centered_row_norm")


def test_add_param_group_is_validated():
    opt = SymmetryCompatible([param(3, 3)], rule="muon")
    with pytest.raises(ValueError, match="known rules"):
        opt.add_param_group({"params": [param(3, 3, seed=1)], "rule": "polar"})
    opt.add_param_group({"params": [param(3, seed=2)], "rule": "adamw", "lr": 1e-3})
    assert opt.param_groups[-1]["rule"] == "adamw"


def make_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    x = torch.randn(32, 5, generator=gen(seed), dtype=F64)
    y = torch.randn(32, 3, generator=gen(seed + 1), dtype=F64)
    groups = [
        dict(params=[model[0].weight], rule="muon", lr=0.05),
        dict(params=[model[2].weight], rule="centered_hybrid", lr=0.01),
        dict(params=[model[0].bias, model[2].bias], rule="adamw", lr=0.01),
    ]
    return model, x, y, groups


def train(model, opt, x, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def test_state_dict_round_trip_resumes_exactly():
    model, x, y, groups = make_problem()
    opt = SymmetryCompatible(groups, nesterov=True)
    train(model, opt, x, y, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, x, y, 3)
    reference = [p.detach().clone() for p in model.parameters()]

    resumed, _, _, resumed_groups = make_problem(seed=5)  # different init, overwritten below
    resumed.load_state_dict(saved_model)
    resumed_opt = SymmetryCompatible(resumed_groups, nesterov=True)
    resumed_opt.load_state_dict(saved_opt)
    assert resumed_opt.param_groups[1]["rule"] == "centered_hybrid"
    train(resumed, resumed_opt, x, y, 3)
    for a, b in zip(resumed.parameters(), reference):
        assert torch.equal(a.detach(), b)


def test_works_with_lr_schedulers_and_closures():
    model, x, y, groups = make_problem()
    opt = SymmetryCompatible(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    initial = [g["lr"] for g in opt.param_groups]
    losses = []
    for _ in range(3):
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        losses.append(opt.step(closure).item())
        scheduler.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([lr * 0.125 for lr in initial])
    assert losses[-1] < losses[0]


def test_training_reduces_loss_and_zero_lr_freezes():
    model, x, y, groups = make_problem()
    opt = SymmetryCompatible(groups)
    loss0 = torch.nn.functional.mse_loss(model(x), y).item()
    train(model, opt, x, y, 40)
    assert torch.nn.functional.mse_loss(model(x), y).item() < 0.7 * loss0
    frozen, _, _, frozen_groups = make_problem()
    for g in frozen_groups:
        g["lr"] = 0.0
    before = [p.detach().clone() for p in frozen.parameters()]
    train(frozen, SymmetryCompatible(frozen_groups, weight_decay=0.1), x, y, 3)
    assert all(torch.equal(a.detach(), b) for a, b in zip(frozen.parameters(), before))


def test_bfloat16_parameters_are_updated_through_float32():
    W = torch.nn.Parameter(torch.randn(6, 4).to(torch.bfloat16))
    opt = SymmetryCompatible([W], rule="centered_left_spectral", lr=0.01)
    W.grad = torch.randn(6, 4).to(torch.bfloat16)
    before = W.detach().clone()
    opt.step()
    assert W.dtype == torch.bfloat16 and torch.isfinite(W).all() and not torch.equal(W.detach(), before)
