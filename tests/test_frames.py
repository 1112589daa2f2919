"""Gauge frames (gaugeopt.optim.frames) and the read phase that applies them.

The property everything rests on: the canonical gradients and the frames' dead masks computed from
``g . theta`` equal those computed from ``theta`` (for the gradients of an invariant loss, which
transform contragrediently), for every gauge family and their product, including chains of neuron
scalings of any depth and width (hypothesis). Plus the plan's structure on known models, what it
refuses, and known answers of the pure maps.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import gaugeopt
from gaugeopt.gauges import AxisRef, GaugeSet, HeadRotation, NeuronScaling
from gaugeopt.models import ReLUMLP, ReLUMLPConfig, SwiGLUMLP, SwiGLUMLPConfig, TransformerLM, TransformerLMConfig
from gaugeopt.optim.program import build_program
from gaugeopt.optim.step import read_frames, step_inputs
from gaugeopt.optim.frames import (FrameConflictError, build_frame_plan, finite_nonnegative, frozen_gains,
                                   neuron_frames, unit_square_sums)
from gaugeopt.optim.symmetry import SharedAxis, block_layout, center_rows, group_mean


def _canonical_gradients(model, gauges, loss_fn, batch) -> dict[str, torch.Tensor]:
    """Per parameter, the canonical gradient the step would feed its rule (read phase, unstacked)."""
    model.zero_grad()
    loss_fn(model, batch).backward()
    params = [p for p in model.parameters()]
    names = {id(p): n for n, p in model.named_parameters()}
    plan = build_frame_plan(gauges)
    with torch.no_grad():
        return _read(model, params, names, plan)


def _read(model, params, names, plan) -> dict[str, torch.Tensor]:
    layout = build_program([{"params": params}], names, dict(model.named_parameters()), plan, [None],
                           channel_step=True, edge_scale=1.0)
    frames = read_frames(layout.program, step_inputs(layout, dict(model.named_parameters())))
    out = {}
    for members, gradients in zip(layout.tensors, frames.canonical):
        for p, g in zip(members.params, gradients):
            out[names[id(p)]] = g
    for members, h in zip(layout.norms, frames.scale_inputs):
        for family, row in zip(members.families, h.unbind(0)):
            out[family.gain] = row
    assert frames.flags.tolist() == [True, False, False]
    return out


def _assert_invariant(model, gauges, loss_fn, batch, seed: int = 0) -> None:
    """Canonical gradients at ``g . theta`` equal those at ``theta``, rotated by ``g``'s rotations
    (the residual symmetry a rotation leaves; every other family's part of ``g`` drops out)."""
    before = _canonical_gradients(model, gauges, loss_fn, batch)
    moved = copy.deepcopy(model)
    bound = gauges.bind(moved)
    element = bound.sample(torch.Generator().manual_seed(seed))
    bound.apply(moved, element)
    after = _canonical_gradients(moved, bound, loss_fn, batch)
    assert before.keys() == after.keys()
    before = {n: g.detach().clone() for n, g in before.items()}
    for family in gauges:
        if isinstance(family, HeadRotation):
            family.apply(before, element[family.name])
    largest = max(g.abs().max() for g in before.values())  # a gradient of rounding noise (a key bias) is exempt
    for name in before:
        assert (before[name] - after[name]).abs().max() <= 1e-9 * before[name].abs().max() + 1e-14 * largest, name


def _lm_loss(model, tokens):
    return F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())


def _mse(model, batch):
    return F.mse_loss(model(batch[0]), batch[1])


@pytest.mark.parametrize("overrides", [
    {},
    dict(rope="none", norm="layernorm", mlp="relu", mlp_bias=True, attn_bias=True, head_bias=True),
])
def test_canonical_gradients_of_a_language_model_are_invariant(overrides):
    torch.manual_seed(0)
    model = TransformerLM(TransformerLMConfig(vocab_size=11, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=24,
                                              max_seq_len=8, init_std=0.3, **overrides)).double()
    tokens = torch.randint(0, 11, (3, 8), generator=torch.Generator().manual_seed(1))
    gauges = gaugeopt.find_gauges(model, tokens[:1], output="logits")
    _assert_invariant(model, gauges, _lm_loss, tokens)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(sizes=st.lists(st.integers(1, 6), min_size=3, max_size=6), bias=st.booleans(), seed=st.integers(0, 100))
def test_canonical_gradients_of_any_relu_chain_are_invariant(sizes, bias, seed):
    """Deep ReLU MLPs: every hidden layer is a neuron scaling chained to the next (two-sided frame)."""
    torch.manual_seed(seed)
    model = ReLUMLP(ReLUMLPConfig(sizes=tuple(sizes), bias=bias)).double()
    x = torch.randn(5, sizes[0], dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    gauges = gaugeopt.find_gauges(model, x[:2], output="values")
    assert len(gauges) == len(sizes) - 2
    _assert_invariant(model, gauges, _mse, (x, torch.randn(5, sizes[-1], dtype=torch.float64)), seed)


def test_canonical_gradients_of_a_swiglu_stack_are_invariant():
    torch.manual_seed(0)
    model = SwiGLUMLP(SwiGLUMLPConfig(d_in=5, width=6, d_ff=8, depth=3, d_out=4)).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    gauges = gaugeopt.find_gauges(model, x[:2], output="values")
    plan = build_frame_plan(gauges)
    assert plan.neurons and not any(f.isolated for f in plan.neurons)  # one chain through every block
    _assert_invariant(model, gauges, _mse, (x, torch.randn(7, 4, dtype=torch.float64)))


def test_frame_plan_of_a_language_model():
    torch.manual_seed(0)
    model = TransformerLM(TransformerLMConfig(vocab_size=7, d_model=8, n_layers=1, n_heads=2, d_ff=8,
                                              max_seq_len=4, rope="none", norm="layernorm")).double()
    gauges = gaugeopt.find_gauges(model, torch.randint(0, 7, (1, 3)), output="logits")
    plan = build_frame_plan(gauges)
    t = plan.tensors
    assert t["blocks.0.norm1.weight"].gain
    assert t["blocks.0.norm1.bias"].scaled == ((0, t["blocks.0.norm1.bias"].scale_on(0)),)
    assert t["blocks.0.norm1.bias"].scale_on(0).side == 1
    head = t["head.weight"]
    assert head.centered and head.scale_on(1).family == "norm_scale:norm" and head.scale_on(1).side == -1
    q = t["blocks.0.attn.q_proj.weight"]
    assert q.scale_on(1).kind == "norm" and q.shared[0][0] == 0
    assert q.shared[0][1].groups == (0, 0, 0, 0, 1, 1, 1, 1)  # two heads of 4 dims, no RoPE: whole heads
    assert t["blocks.0.attn.o_proj.weight"].shared[0][0] == 1
    up, down = t["blocks.0.ffn.up.weight"], t["blocks.0.ffn.down.weight"]
    assert up.scale_on(0).kind == "neuron" and up.scale_on(0).side == 1 and up.scale_on(1).kind == "norm"
    assert down.scale_on(1).kind == "neuron" and down.scale_on(1).side == -1
    assert "embed.weight" not in t
    assert [f.name for f in plan.neurons] == ["neuron_scale:blocks.0.ffn.up"] and plan.neurons[0].isolated
    assert len(plan.norms) == 3


def test_frame_plan_of_a_deep_relu_mlp_is_one_chain_in_dependency_order():
    torch.manual_seed(0)
    model = ReLUMLP(ReLUMLPConfig(sizes=(4, 6, 6, 6, 3))).double()
    gauges = gaugeopt.find_gauges(model, torch.randn(2, 4, dtype=torch.float64), output="logits")
    plan = build_frame_plan(gauges)
    neurons = plan.neurons
    assert [f.name for f in neurons] == [f"neuron_scale:layers.{i}" for i in range(3)]
    assert neurons[0].upstream == () and neurons[0].downstream == ("neuron_scale:layers.1",)
    assert neurons[1].upstream == ("neuron_scale:layers.0",) and neurons[2].downstream == ()
    middle = plan.tensors["layers.1.weight"]
    assert middle.scale_on(0).side == 1 and middle.scale_on(1).side == -1
    assert plan.tensors["layers.3.weight"].centered  # the logit shift on the last layer's rows


def test_cycles_and_double_sided_tensors_are_refused_naming_the_parameter():
    torch.manual_seed(0)
    model = ReLUMLP(ReLUMLPConfig(sizes=(4, 4, 3))).double()
    gauges = gaugeopt.find_gauges(model, torch.randn(2, 4, dtype=torch.float64), output="values")
    loop = NeuronScaling("neuron_scale:loop", 4, (AxisRef("layers.1.weight", 1),), (AxisRef("layers.0.weight", 1),),
                         producer="x")
    with pytest.raises(FrameConflictError, match="layers.1.weight|two families"):
        build_frame_plan(GaugeSet([*gauges, loop], (), model))
    twice = NeuronScaling("neuron_scale:twice", 4, (AxisRef("layers.0.weight", 1),), (), producer="x")
    with pytest.raises(FrameConflictError, match=r"layers\.0\.weight.*multiplied side of two"):
        build_frame_plan(GaugeSet([*gauges, twice], (), model))


# --------------------------------------------------------------------------------------------------
# Pure maps
# --------------------------------------------------------------------------------------------------


def _shared(groups: torch.Tensor) -> SharedAxis:
    return SharedAxis("f", tuple(groups.tolist()), block_layout(groups))


def test_group_mean_and_centering():
    x = torch.arange(12, dtype=torch.float64).reshape(4, 3)
    shared = group_mean(x, _shared(torch.tensor([0, 1, 0, 2])), axis=0)
    assert torch.equal(shared[0], (x[0] + x[2]) / 2) and torch.equal(shared[2], shared[0])
    assert torch.equal(shared[1], x[1]) and torch.equal(shared[3], x[3])
    assert torch.equal(group_mean(x.T, _shared(torch.tensor([0, 1, 0, 2])), axis=1), shared.T)
    assert center_rows(x, axis=0).sum(0).abs().max() == 0


@pytest.mark.parametrize("groups, layout", [
    (torch.arange(3).repeat_interleave(4), (3, 4, 1)),  # contiguous head blocks
    (torch.arange(2 * 3).reshape(2, 1, 3).expand(2, 2, 3).flatten(), (2, 2, 3)),  # RoPE planes (i, i + 3) per head
    (torch.arange(5), (5, 1, 1)),  # no sharing
    (torch.tensor([0, 1, 0, 2]), None),  # blocks of different sizes
    (torch.tensor([0, 1, 1, 0]), None),  # equal sizes, but no reshape gives them
])
def test_block_layout_and_the_reshaped_mean_agree_with_the_scatter(groups, layout):
    assert block_layout(groups) == layout
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(groups), 3, generator=g, dtype=torch.float64)
    irregular = SharedAxis("f", tuple(groups.tolist()), None)
    for axis, values in ((0, x), (1, x.T.contiguous())):
        scattered = group_mean(values, irregular, axis)
        assert torch.allclose(group_mean(values, _shared(groups), axis), scattered, rtol=1e-15, atol=0)


def test_unit_square_sums_known_answer():
    t = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [0.0, 1.0]]], dtype=torch.float64)  # one member, 3 x 2
    assert torch.allclose(unit_square_sums(t, 1), torch.tensor([[5.0, 25.0, 1.0]], dtype=torch.float64))  # rows
    assert torch.allclose(unit_square_sums(t, 2), torch.tensor([[10.0, 21.0]], dtype=torch.float64))  # columns
    weights = torch.tensor([[2.0, 0.5]], dtype=torch.float64)
    assert torch.allclose(unit_square_sums(t, 1, {2: weights}), torch.tensor([[5.0, 40.0, 0.25]], dtype=torch.float64))


_EDGES = [0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=20))
@settings(max_examples=50, deadline=None)
def test_the_frames_masks_are_isfinite_and_the_normal_range(dtype, values):
    """frozen_gains: zero, subnormal or not finite; finite_nonnegative: isfinite on values >= 0 or
    nan (what it is given); neuron_frames' frozen units: u^2 below the smallest normal, or either
    side not finite. Each as torch.isfinite states it, at the edges of every floating dtype."""
    info = torch.finfo(dtype)
    edges = _EDGES + [info.tiny, info.tiny / 2, -info.tiny, info.max, -info.max, info.smallest_normal / 4]
    x = torch.tensor(values + edges, dtype=torch.float64).to(dtype)
    assert torch.equal(frozen_gains(x), (x.abs() < info.tiny) | ~torch.isfinite(x))
    squares = x.abs()
    assert torch.equal(finite_nonnegative(squares), torch.isfinite(squares))
    u2, v2 = squares, squares.flip(0)
    expected = (u2 < info.tiny) | ~torch.isfinite(u2) | ~torch.isfinite(v2)
    assert torch.equal(neuron_frames(u2.reshape(1, -1), v2.reshape(1, -1), edge_scale=0.5).frozen[0], expected)


def test_neuron_frames_are_the_section_point_and_only_a_zero_incoming_side_is_frozen():
    u2 = torch.tensor([[4.0, 1e-320, 9.0, 4.0, 1e6]], dtype=torch.float64)
    v2 = torch.tensor([[1.0, 1.0, 1e-30, 0.0, 1e6]], dtype=torch.float64)
    c = 0.5
    frames = neuron_frames(u2, v2, edge_scale=c)
    assert frames.frozen.tolist() == [[False, True, False, False, False]]  # only the underflowing incoming side
    assert torch.isfinite(frames.scale).all() and frames.scale[0, 1] == 0
    live = ~frames.frozen
    u, v = u2.sqrt(), v2.sqrt()
    # canonical sides u / s and v s are the section point of l = sqrt(u v): |in|^2 - |out|^2 = c^2, |in| |out| = l^2
    incoming, outgoing = (u / frames.scale).square(), (v * frames.scale).square()
    torch.testing.assert_close(incoming[live], frames.incoming[live], rtol=1e-14, atol=0)
    torch.testing.assert_close(outgoing[live], frames.outgoing[live], rtol=1e-14, atol=0)
    torch.testing.assert_close((frames.incoming - frames.outgoing)[live], torch.full((4,), c**2, dtype=torch.float64))
    torch.testing.assert_close((frames.incoming * frames.outgoing).sqrt()[live], (u * v)[live])
    assert frames.scale[0, 3] == pytest.approx(2.0 / c)  # zero outgoing side: |w~_in| = c
    assert frames.scale[0, 4] == pytest.approx(1.0, rel=1e-6)  # l >> c: near the balanced point sqrt(u / v)