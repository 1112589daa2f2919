"""DDCAdam(fused=True): the fused updates give the eager step's numbers, compiled or not.

Most checks run the fused functions eagerly (``torch.compiler.set_stance("force_eager")``), which
tests their math in float64 at no compile cost; one test compiles them for real and compares.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gaugeopt
from gaugeopt.models import ReLUMLP, ReLUMLPConfig, TransformerLM, TransformerLMConfig
from gaugeopt.optim.ddc_adam import DDCAdam, _check_fusable
from gaugeopt.optim import NonFiniteGradientError
from gaugeopt.optim.fused_updates import COLUMN_BLOCK, column_inner, unit_inner
from gaugeopt.optim.gauge_frames import AxisAction, enter_frame, unit_slices
from gaugeopt.testing import check_equivariance
from test_ddc_adam import CASES, LR, WD, _case, adamw, lm_loss, vit_loss

STEPS = 8


def _eagerly():
    return torch.compiler.set_stance("force_eager")


def _groups(model: nn.Module) -> list[dict]:
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if "norm" not in n]},
            {"params": [p for n, p in named if "norm" in n], "weight_decay": 0.0}]


def _train(model: nn.Module, gauges, batches, loss, *, fused: bool, steps: int = STEPS, before_step=None,
           **kw) -> DDCAdam:
    """``steps`` steps with two parameter groups (no decay on norms) and a schedule halving the rate
    every 3 steps; ``before_step(t)`` runs before step ``t``."""
    opt = DDCAdam(_groups(model), gauges, lr=LR, weight_decay=WD, fused=fused, **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    for t in range(steps):
        if before_step is not None:
            before_step(t)
        opt.zero_grad()
        loss(model, batches[t % len(batches)]).backward()
        opt.step()
        sched.step()
    return opt


def _assert_same_run(model_a, opt_a, model_b, opt_b, rtol: float = 1e-10) -> None:
    """Parameters and state agree to ``rtol``, with an absolute tolerance of ``10 rtol``: the key bias'
    gradient is rounding noise (softmax ignores it), and its updates, about ``lr * noise / eps``,
    differ at that level between any two summation orders."""
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=rtol, atol=10 * rtol, msg=name)
        for key, value in opt_a.state[a].items():
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                torch.testing.assert_close(opt_b.state[b][key], value, rtol=rtol, atol=10 * rtol,
                                           msg=f"{name} state {key}")


# --------------------------------------------------------------------------------------------------
# The pieces
# --------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, derandomize=True)
@given(rows=st.sampled_from([1, 3, 64, 65, 128, 192]), cols=st.integers(1, 9), axis=st.sampled_from([0, 1]))
def test_unit_inner_is_the_sum_of_products_over_the_other_axis(rows, cols, axis):
    g = torch.Generator().manual_seed(rows * 31 + cols)
    a, b = (torch.randn(rows, cols, generator=g, dtype=torch.float64) for _ in range(2))
    expected = torch.linalg.vecdot(unit_slices(a, axis), unit_slices(b, axis), dim=1)
    torch.testing.assert_close(unit_inner(a, b, axis), expected, rtol=1e-12, atol=1e-12)


def test_unit_inner_blocks_tall_matrices_and_handles_vectors():
    assert COLUMN_BLOCK < 128  # the 128-row case above takes the blocked sum
    v, w = torch.randn(7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    torch.testing.assert_close(unit_inner(v, w, 0), v * w)


@pytest.mark.parametrize("centered", [False, True])
def test_norm_scale_input_in_closed_form_equals_the_sum_in_the_frame(centered):
    g = torch.Generator().manual_seed(0)
    param, grad = (torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(2))
    gain = torch.randn(5, generator=g, dtype=torch.float64)
    gain[2] = 0.0  # a dead channel
    entry = enter_frame(param, grad, gain, role="tensor", merged=True, centered=centered, decay=0.97,
                        threshold=1e-12, dtype=torch.float64)
    expected = torch.linalg.vecdot(entry.grad, entry.value, dim=0)
    got = column_inner(param, grad, centered=centered, dtype=torch.float64) * 0.97
    torch.testing.assert_close(torch.where(gain != 0, got, 0.0), expected, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# The fused step against the eager step
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(CASES))
def test_fused_step_matches_the_eager_step(key):
    model, gauges, batches, loss = _case(key)
    fused_model = copy.deepcopy(model)
    eager = _train(model, gauges, batches, loss, fused=False)
    with _eagerly():
        fused = _train(fused_model, gauges.bind(fused_model), batches, loss, fused=True)
    _assert_same_run(model, eager, fused_model, fused)


@pytest.mark.parametrize("options", [dict(pair_frame="radius"), dict(norm_scale_step=False)])
def test_fused_step_matches_the_eager_step_with_other_options(options):
    model, gauges, batches, loss = _case("lm_variant")
    fused_model = copy.deepcopy(model)
    eager = _train(model, gauges, batches, loss, fused=False, **options)
    with _eagerly():
        fused = _train(fused_model, gauges.bind(fused_model), batches, loss, fused=True, **options)
    _assert_same_run(model, eager, fused_model, fused)


def test_fused_step_is_equivariant_and_adamw_fails_the_same_check():
    model, gauges, batches, loss = _case("lm_variant")

    def fused(m, g):
        return DDCAdam(m.parameters(), g, lr=LR, weight_decay=WD, fused=True)

    with _eagerly():
        result = check_equivariance(fused, model, gauges, batches, loss, steps=20)
    assert result.displacement > 0.01
    assert result.error < 1e-10, result
    assert check_equivariance(adamw, model, gauges, batches, loss, steps=20).error > 1e-3


def test_dead_channels_and_units_are_frozen_as_in_the_eager_step():
    runs = []
    for fused in (False, True):
        model, gauges, batches, loss = _case("lm_variant")
        params = dict(model.named_parameters())
        with torch.no_grad():
            params["blocks.0.norm2.weight"][3] = 0.0
            params["blocks.0.ffn.up.weight"][5] = 0.0
            params["blocks.0.ffn.up.bias"][5] = 0.0
            params["blocks.0.ffn.down.weight"][:, 5] = 0.0
        before = copy.deepcopy(params)
        with _eagerly() if fused else contextlib.nullcontext(), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt = _train(model, gauges, batches, loss, fused=fused, steps=3)
        assert opt.frozen == {"norm_scale:blocks.0.norm2": (3,), "neuron_scale:blocks.0.ffn.up": (5,)}
        assert torch.equal(params["blocks.0.ffn.down.weight"][:, 5], before["blocks.0.ffn.down.weight"][:, 5])
        assert torch.equal(params["blocks.0.ffn.up.weight"][:, 3], before["blocks.0.ffn.up.weight"][:, 3])
        runs.append((model, opt))
    _assert_same_run(*runs[0], *runs[1])


def test_checkpoints_move_between_the_fused_and_the_eager_step():
    model, gauges, batches, loss = _case("lm")
    reference = copy.deepcopy(model)
    _train(reference, gauges.bind(reference), batches, loss, fused=False, steps=6)
    with _eagerly():
        fused_opt = _train(model, gauges, batches, loss, fused=True, steps=3)
    eager_opt = DDCAdam(_groups(model), gauges, lr=LR, weight_decay=WD)
    eager_opt.load_state_dict(fused_opt.state_dict())
    for t in range(3, 6):  # the schedule halved the rate at step 3; the loaded groups carry it
        eager_opt.zero_grad()
        loss(model, batches[t % len(batches)]).backward()
        eager_opt.step()
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-10, atol=1e-9, msg=name)


def test_relu_classifier_with_shift_and_neuron_on_one_matrix_matches_the_eager_step():
    torch.manual_seed(4)
    model = ReLUMLP(ReLUMLPConfig(sizes=(5, 12, 4))).double()
    gauges = gaugeopt.find_gauges(model, torch.randn(2, 5, dtype=torch.float64), output="logits")
    assert set(gauges.kinds) == {"neuron_scale", "logit_shift"}  # both on the output Linear
    g = torch.Generator().manual_seed(7)
    batches = [(torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (6,), generator=g))
               for _ in range(3)]
    fused_model = copy.deepcopy(model)
    eager = _train(model, gauges, batches, vit_loss, fused=False)
    with _eagerly():
        fused = _train(fused_model, gauges.bind(fused_model), batches, vit_loss, fused=True)
    _assert_same_run(model, eager, fused_model, fused)


def test_fused_refuses_a_pair_member_under_a_rotation():
    model, gauges, _, _ = _case("lm")
    plan = DDCAdam(model.parameters(), gauges).plan
    down = next(r.name for f in plan.pairs for r in f.divided)
    plan.frame(down).axes[0] = AxisAction("share", "a rotation", groups=torch.zeros(16, dtype=torch.long))
    with pytest.raises(ValueError, match="fused=True.*neuron pair.*share"):
        _check_fusable(plan)


def test_bfloat16_parameters_keep_float32_state_in_the_fused_step():
    model, gauges, batches, loss = _case("lm")
    model = model.to(torch.bfloat16)
    with _eagerly():
        opt = _train(model, gauges.bind(model), batches,
                     lambda m, b: lm_loss(m, b).float(), fused=True, steps=3)
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in model.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in opt.state.values() if "exp_avg" in s)


@pytest.mark.parametrize("where", ["blocks.0.ffn.gate.weight", "blocks.0.ffn.down.weight", "blocks.0.ffn.up.weight",
                                   "blocks.0.norm1.weight", "embed.weight"])
def test_a_nonfinite_gradient_anywhere_is_caught_before_anything_changes(where):
    """The fused step reads consumer and pair gradients in its own passes, the rest by the guard."""
    model, gauges, batches, loss = _case("lm")
    params = dict(model.named_parameters())
    assert where in params
    opt = DDCAdam(model.parameters(), gauges, lr=LR, weight_decay=WD, fused=True)
    loss(model, batches[0]).backward()
    params[where].grad.view(-1)[1] = float("nan")
    before = copy.deepcopy(model.state_dict())
    with _eagerly(), pytest.raises(NonFiniteGradientError, match=where.replace(".", r"\.")):
        opt.step()
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items())
    assert not opt.state or all(not s for s in opt.state.values())


def test_norm_scale_input_from_the_norms_own_gradients_equals_the_consumers_column_sums():
    """Euler's identity for the scaling symmetry: sum_i G_C,ij C_ij = g dL/dg + beta dL/dbeta."""
    for key in ("lm", "lm_variant"):  # RMSNorm; LayerNorm with a bias
        model, gauges, batches, loss = _case(key)
        opt = DDCAdam(model.parameters(), gauges, lr=LR, weight_decay=WD, fused=True)
        loss(model, batches[0]).backward()
        _, stepped, _ = opt._sort_parameters()
        for family in opt.plan.norms:
            from_gain = opt._scale_input_from_gain(family, stepped)
            assert from_gain is not None, family.name
            from_columns = opt._scale_input_from_columns(stepped, list(family.consumers))
            torch.testing.assert_close(from_gain, from_columns, rtol=1e-10, atol=1e-12, msg=family.name)


# --------------------------------------------------------------------------------------------------
# Compiled for real
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
def test_compiled_fused_step_matches_the_eager_step_without_recompiling_for_a_new_rate(device):
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    config = TransformerLMConfig(vocab_size=16, d_model=128, n_layers=1, n_heads=4, d_ff=256, max_seq_len=8)
    model = TransformerLM(config).double()  # d_model > COLUMN_BLOCK: the blocked column sums run
    tokens = torch.randint(0, 16, (2, 7), generator=torch.Generator().manual_seed(1))
    gauges = gaugeopt.find_gauges(model, tokens[:1], output="logits")
    model.to(device)
    batches = [tokens.roll(t, dims=1).to(device) for t in range(4)]
    compiled_model = copy.deepcopy(model)
    eager = _train(model, gauges, batches, lm_loss, fused=False, steps=4)
    graphs = {}

    def count_graphs(t):
        graphs[t] = counters["stats"]["unique_graphs"]

    fused = _train(compiled_model, gauges.bind(compiled_model), batches, lm_loss, fused=True, steps=4,
                   before_step=count_graphs)
    assert graphs[1] > graphs[0]  # the first step compiled
    # Later steps change the step count, and step 3 halves the rate: graph inputs, nothing recompiles.
    assert counters["stats"]["unique_graphs"] == graphs[1]
    _assert_same_run(model, eager, compiled_model, fused)
