"""The pure maps of gaugeopt.optim.gauge_frames: invariance of the chart inputs, covariance of the
lift, exact orbit coordinates after the retraction, block sharing, and the frame plan's rules."""

from __future__ import annotations

import math

import pytest
import torch

import gaugeopt
from gaugeopt.models import TransformerLM, TransformerLMConfig
from gaugeopt.optim.gauge_frames import (
    block_layout,
    build_frame_plan,
    center_rows,
    group_mean,
    pair_chart,
    pair_retract,
)

UNITS, N1, N2 = 6, 5, 4


def _pairs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    P1, G1 = (torch.randn(UNITS, N1, generator=g, dtype=torch.float64) for _ in range(2))
    P2, G2 = (torch.randn(UNITS, N2, generator=g, dtype=torch.float64) for _ in range(2))
    a = torch.exp(torch.randn(UNITS, 1, generator=g, dtype=torch.float64))
    return P1, G1, P2, G2, a


@pytest.mark.parametrize("frame", ["radius", "balanced"])
def test_chart_inputs_are_invariant_and_the_lift_is_covariant(frame):
    P1, G1, P2, G2, a = _pairs()
    chart = pair_chart(P1, G1, P2, G2, frame=frame)
    moved = pair_chart(a * P1, G1 / a, P2 / a, a * G2, frame=frame)  # gradients transform dually
    for field in ("radial", "vertical", "tangent1", "tangent2", "direction1", "direction2"):
        assert torch.allclose(getattr(chart, field), getattr(moved, field), rtol=1e-12, atol=1e-13), field
    g = torch.Generator().manual_seed(1)
    radial = torch.randn(UNITS, generator=g, dtype=torch.float64)
    u1 = torch.randn(UNITS, N1, generator=g, dtype=torch.float64)
    u2 = torch.randn(UNITS, N2, generator=g, dtype=torch.float64)
    new1, new2 = pair_retract(chart, radial, u1, u2, lr=0.05)
    moved1, moved2 = pair_retract(moved, radial, u1, u2, lr=0.05)
    assert torch.allclose(a * new1, moved1, rtol=1e-12) and torch.allclose(new2 / a, moved2, rtol=1e-12)
    # the orbit coordinate log(|P1| / |P2|) is held exactly, and the step is not trivial
    before = torch.log(P1.norm(dim=1) / P2.norm(dim=1))
    after = torch.log(new1.norm(dim=1) / new2.norm(dim=1))
    assert (after - before).abs().max() <= 1e-14
    assert (new1 - P1).norm() > 1e-3


def test_gauge_mode_vanishes_for_a_gradient_of_an_invariant_function():
    """f(P1, P2) = sum_i <w_i, P1_i> <P2_i, z_i> is invariant under (a P1, P2 / a): its gradient has
    h1 = h2 per unit, so the chart's vertical (gauge) mode is zero."""
    P1, _, P2, _, _ = _pairs(2)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(UNITS, N1, generator=g, dtype=torch.float64)
    z = torch.randn(UNITS, N2, generator=g, dtype=torch.float64)
    P1, P2 = P1.requires_grad_(), P2.requires_grad_()
    ((P1 * w).sum(1) * (P2 * z).sum(1)).sum().backward()
    chart = pair_chart(P1.detach(), P1.grad, P2.detach(), P2.grad)
    assert chart.vertical.abs().max() <= 1e-12 * chart.radial.abs().max()


def test_dead_units_come_back_as_zero_rows_without_nan():
    P1, G1, P2, G2, _ = _pairs(4)
    P1[2] = 0.0
    chart = pair_chart(P1, G1, P2, G2, threshold=1e-12, frame="balanced")
    assert chart.dead.tolist() == [i == 2 for i in range(UNITS)]
    new1, new2 = pair_retract(chart, chart.radial, chart.tangent1, chart.tangent2, lr=0.1)
    assert torch.isfinite(new1).all() and torch.isfinite(new2).all()
    assert new1[2].abs().max() == 0 and new2[2].abs().max() == 0


def test_group_mean_and_centering():
    x = torch.arange(12, dtype=torch.float64).reshape(4, 3)
    groups = torch.tensor([0, 1, 0, 2])
    shared = group_mean(x, groups, axis=0)
    assert torch.equal(shared[0], (x[0] + x[2]) / 2) and torch.equal(shared[2], shared[0])
    assert torch.equal(shared[1], x[1]) and torch.equal(shared[3], x[3])
    assert torch.equal(group_mean(x.T, groups, axis=1), shared.T)
    assert center_rows(x).sum(0).abs().max() == 0


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
    for axis, values in ((0, x), (1, x.T.contiguous())):
        scattered = group_mean(values, groups, axis)
        assert torch.allclose(group_mean(values, groups, axis, layout), scattered, rtol=1e-15, atol=0)


def test_frame_plan_of_a_language_model():
    torch.manual_seed(0)
    model = TransformerLM(TransformerLMConfig(vocab_size=7, d_model=8, n_layers=1, n_heads=2, d_ff=8,
                                              max_seq_len=4, rope="none", norm="layernorm")).double()
    gauges = gaugeopt.find_gauges(model, torch.randint(0, 7, (1, 3)), output="logits")
    plan = build_frame_plan(gauges)
    t = plan.tensors
    assert t["blocks.0.norm1.weight"].role == "gain" and t["blocks.0.norm1.bias"].role == "norm_bias"
    head = t["head.weight"]
    assert head.centered and head.merge.gain == "norm.weight"
    q = t["blocks.0.attn.q_proj.weight"]
    assert q.merge.gain == "blocks.0.norm1.weight" and q.axes[0].kind == "share"
    assert q.axes[0].groups.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]  # two heads of 4 dims, no RoPE: whole heads
    assert t["blocks.0.attn.o_proj.weight"].axes[1].kind == "share"
    assert t["blocks.0.ffn.up.weight"].pair[0] == 0 and t["blocks.0.ffn.down.weight"].pair[0] == 1
    assert "embed.weight" not in t
    assert [f.name for f in plan.pairs] == ["neuron_scale:blocks.0.ffn.up"]
    assert math.isclose(len(plan.norms), 3)
