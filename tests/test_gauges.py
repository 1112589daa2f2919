"""Gauge library: invariance, vertical directions, discovery (positives and negatives)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gaugeopt import find_gauges
from gaugeopt.models import (
    DeepLinear,
    DeepLinearConfig,
    ModularAdditionConfig,
    ModularAdditionTransformer,
    MoEConfig,
    MoELM,
    ReducedRankRegression,
    ReducedRankRegressionConfig,
    ReLUMLP,
    ReLUMLPConfig,
    TransformerLM,
    TransformerLMConfig,
    ViT,
    ViTConfig,
)

TOL = 1e-10
# the warning of models built to lack some family (tests/test_discovery.py tests it)
MISSING_FAMILIES = r"ignore:find_gauges\(\w+\). (no gauge family|fewer families):UserWarning"


def _jitter(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move every parameter off its init (nonzero biases, non-unit gains) so no symmetry is trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def lm(**kw):
    base = dict(vocab_size=11, d_model=16, n_layers=2, n_heads=4, d_ff=24, max_seq_len=8)
    return TransformerLM(TransformerLMConfig(**{**base, **kw}))


# name -> (model factory, example input factory, output kind, expected family names)
def _lm_expected(prefix="", layers=2, mlp_gauge=True, head="head"):
    names = {f"logit_shift:{prefix}{head}", f"norm_scale:{prefix}norm"}
    for i in range(layers):
        names |= {f"norm_scale:{prefix}blocks.{i}.norm1", f"norm_scale:{prefix}blocks.{i}.norm2",
                  f"qk_rotation:{prefix}blocks.{i}.attn", f"vo_rotation:{prefix}blocks.{i}.attn"}
        if mlp_gauge:
            names.add(f"neuron_scale:{prefix}blocks.{i}.ffn.up")
    return names


def _moe_expected(layers=2, experts=3):
    names = {"logit_shift:head", "norm_scale:norm"}
    for i in range(layers):
        names |= {f"norm_scale:blocks.{i}.norm1", f"norm_scale:blocks.{i}.norm2",
                  f"qk_rotation:blocks.{i}.attn", f"vo_rotation:blocks.{i}.attn",
                  f"router_shift:blocks.{i}.moe.router"}
        names |= {f"neuron_scale:blocks.{i}.moe.experts.{e}.up" for e in range(experts)}
    return names


def _tokens(vocab, batch=2, seq=6):
    return lambda: torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


REFERENCE = {
    "lm-rope-rms-swiglu-gqa": (lambda: lm(n_kv_heads=2, rope="full"), _tokens(11), "logits", _lm_expected()),
    "lm-partial-rope": (lambda: lm(rope="partial", rope_fraction=0.5), _tokens(11), "logits", _lm_expected()),
    "lm-layernorm-relu-norope-bias": (
        lambda: lm(rope="none", norm="layernorm", mlp="relu", head_bias=True, mlp_bias=True, attn_bias=True),
        _tokens(11), "logits", _lm_expected()),
    "vit": (lambda: ViT(ViTConfig(d_model=16, d_ff=24, n_heads=2, n_layers=2, num_classes=5)),
            lambda: torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)), "logits", _lm_expected()),
    "modadd": (lambda: ModularAdditionTransformer(ModularAdditionConfig(modulus=7, d_model=16, d_ff=24, n_layers=2)),
               lambda: torch.randint(0, 7, (3, 2), generator=torch.Generator().manual_seed(1)), "logits",
               _lm_expected(prefix="decoder.")),
    "moe": (lambda: MoELM(MoEConfig(vocab_size=11, d_model=16, d_ff=8, n_experts=3, top_k=2, router_bias=True,
                                    max_seq_len=8)), _tokens(11), "logits", _moe_expected()),
    "relu-mlp": (lambda: ReLUMLP(ReLUMLPConfig(sizes=(5, 7, 6, 3))),
                 lambda: torch.randn(4, 5, generator=torch.Generator().manual_seed(1)), "values",
                 {"neuron_scale:layers.0", "neuron_scale:layers.1"}),
    "deep-linear": (lambda: DeepLinear(DeepLinearConfig(width=4, depth=3)),
                    lambda: torch.randn(4, 4, generator=torch.Generator().manual_seed(1)), "values",
                    {"neuron_scale:layers.0", "neuron_scale:layers.1"}),
    "rrr": (lambda: ReducedRankRegression(ReducedRankRegressionConfig(inputs=6, outputs=4, width=3)),
            lambda: torch.randn(4, 6, generator=torch.Generator().manual_seed(1)), "values", {"neuron_scale:A"}),
}


def _build(key):
    make_model, make_input, output, expected = REFERENCE[key]
    torch.manual_seed(0)
    model = _jitter(make_model().double())
    x = make_input()
    if x.is_floating_point():
        x = x.double()
    return model, x, output, expected


def _observable(model, x, output):
    y = model(x)
    return y.log_softmax(-1) if output == "logits" else y


@pytest.fixture(scope="module", params=list(REFERENCE))
def reference(request):
    model, x, output, expected = _build(request.param)
    return request.param, model, x, output, expected, find_gauges(model, x, output=output)


def test_discovery_finds_exactly_the_expected_families(reference):
    key, _, _, _, expected, gauges = reference
    assert {f.name for f in gauges} == expected, f"{key}: {gauges.summary(print_table=False)}"


def test_outputs_invariant_under_each_family_and_their_product(reference):
    key, model, x, output, _, gauges = reference
    before = _observable(model, x, output)
    gen = torch.Generator().manual_seed(3)
    for families in [*gauges.kinds, None]:
        moved = copy.deepcopy(model)
        element = gauges.sample(gen, families=families, spread=1.0)
        gauges.apply(moved, element)
        assert _rel(_observable(moved, x, output), before) <= TOL, (key, families)
        # the element really moved the parameters (the test could fail)
        change = max((a - b).abs().max().item() for a, b in zip(moved.parameters(), model.parameters()))
        assert change > 1e-3, (key, families)


def test_apply_inverse_restores_parameters(reference):
    _, model, _, _, _, gauges = reference
    moved = copy.deepcopy(model)
    element = gauges.sample(torch.Generator().manual_seed(4), spread=1.0)
    gauges.apply(moved, element)
    gauges.apply_inverse(moved, element)
    for a, b in zip(moved.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_loss_gradient_is_orthogonal_to_every_vertical_direction(reference):
    key, model, x, output, _, gauges = reference
    y = model(x)
    target = torch.randn_like(y) if output == "values" else torch.randint(0, y.shape[-1], y.shape[:-1])
    loss = F.mse_loss(y, target) if output == "values" else F.cross_entropy(y.flatten(0, -2), target.flatten())
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    params = gauges.params()
    grad_norm = math.sqrt(sum(g.pow(2).sum().item() for g in grads.values()))
    pairings = gauges.pairings(grads)
    for family in gauges:
        tangents = list(family.tangents(params))
        assert len(tangents) == family.dim
        norms = torch.tensor([math.sqrt(sum(v.pow(2).sum().item() for v in t.values())) for t in tangents],
                             dtype=torch.float64)
        # the efficient pairing agrees with the explicit tangents
        explicit = torch.tensor([sum((grads[n] * v).sum().item() for n, v in t.items()) for t in tangents],
                                dtype=torch.float64)
        torch.testing.assert_close(pairings[family.name], explicit, rtol=1e-9, atol=1e-14)
        relative = explicit.abs() / (norms * grad_norm).clamp_min(1e-300)
        assert relative.max().item() <= TOL, (key, family.name, relative.max().item())


def test_vertical_directions_are_tangent_to_the_orbit(reference):
    """A small step along each generator's tangent changes the outputs only at second order."""
    key, model, x, output, _, gauges = reference
    before = _observable(model, x, output)
    params = gauges.params()
    for family in gauges:
        tangent = next(iter(family.tangents(params)))
        moved = copy.deepcopy(model)
        moved_params = dict(moved.named_parameters())
        with torch.no_grad():
            for n, v in tangent.items():
                moved_params[n].add_(1e-4 * v)
        assert _rel(_observable(moved, x, output), before) < 1e-6, (key, family.name)


def test_orbit_coordinates_move_under_their_own_family_only():
    model, x, output, _ = _build("lm-rope-rms-swiglu-gqa")
    gauges = find_gauges(model, x, output=output)
    base = gauges.orbit_coordinates()
    for kind in ("neuron_scale", "norm_scale", "logit_shift"):
        moved = copy.deepcopy(model)
        gauges.apply(moved, gauges.sample(torch.Generator().manual_seed(5), families=kind))
        coords = gauges.orbit_coordinates(moved)
        for family in gauges:
            if base[family.name].numel() == 0:
                continue
            delta = (coords[family.name] - base[family.name]).abs().max().item()
            if family.kind == kind:
                assert delta > 1e-3, (kind, family.name)
            else:
                assert delta < 1e-12, (kind, family.name, delta)


# --------------------------------------------------------------------------------------------------
# Rotation groups: exactly the commutant of the positional map
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rope", "expected_generators", "block_sizes"), [
    ("full", 4, {2}),  # head_dim 8: four RoPE planes, one generator each
    ("partial", 2 + 6, {2, 4}),  # rotary 4 dims: two planes; four free dims: so(4) has 6
    ("none", 28, {8}),  # so(8)
])
def test_query_key_rotation_algebra_matches_rope(rope, expected_generators, block_sizes):
    model = _jitter(lm(d_model=16, n_heads=2, n_layers=1, rope=rope, rope_fraction=0.5).double())
    x = torch.randint(0, 11, (1, 6))
    gauges = find_gauges(model, x, output="logits")
    qk = gauges["qk_rotation:blocks.0.attn"]
    assert qk.algebra.shape[0] == expected_generators
    assert {len(b) for b in qk.blocks} == block_sizes
    vo = gauges["vo_rotation:blocks.0.attn"]
    assert vo.algebra.shape[0] == 28  # values carry no positional map: all of so(8)


def test_grouped_query_heads_share_their_key_value_rotation():
    model = _jitter(lm(d_model=16, n_heads=4, n_kv_heads=2, n_layers=1).double())
    gauges = find_gauges(model, torch.randint(0, 11, (1, 6)), output="logits")
    assert gauges["qk_rotation:blocks.0.attn"].query_group == (0, 0, 1, 1)
    assert gauges["vo_rotation:blocks.0.attn"].query_group == (0, 0, 1, 1)


# --------------------------------------------------------------------------------------------------
# Negatives: what is not a gauge is not reported
# --------------------------------------------------------------------------------------------------


def test_post_norm_blocks_carry_no_norm_scale():
    model = _jitter(lm(post_norm=True).double())
    gauges = find_gauges(model, torch.randint(0, 11, (1, 6)), output="logits")
    norm_families = {f.name for f in gauges if f.kind == "norm_scale"}
    assert norm_families == {"norm_scale:norm"}  # only the final norm, which feeds the head alone
    reasons = {s.site: s.reason for s in gauges.skipped if s.family == "norm_scale"}
    assert "blocks.0.norm1" in reasons and "residual" in reasons["blocks.0.norm1"]


@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_non_gated_smooth_activation_has_no_neuron_gauge(activation):
    model = _jitter(lm(mlp=activation).double())
    gauges = find_gauges(model, torch.randint(0, 11, (1, 6)), output="logits")
    assert "neuron_scale" not in gauges.kinds
    reasons = {s.site: s.reason for s in gauges.skipped if s.family == "neuron_scale"}
    assert activation in reasons["blocks.0.ffn.up"]


def test_logit_shift_needs_declared_softmax_outputs():
    model = _jitter(lm().double())
    gauges = find_gauges(model, torch.randint(0, 11, (1, 6)))  # output="values" by default
    assert "logit_shift" not in gauges.kinds
    assert any(s.site == "head" and s.family == "logit_shift" for s in gauges.skipped)


@pytest.mark.filterwarnings(MISSING_FAMILIES)
def test_tied_embedding_and_head_carry_no_logit_shift():
    model = _jitter(lm().double())
    model.head.weight = model.embed.weight  # tie
    gauges = find_gauges(model, torch.randint(0, 11, (1, 6)), output="logits")
    assert "logit_shift" not in gauges.kinds
    assert any("tied" in s.reason for s in gauges.skipped)


def test_without_example_inputs_one_warning_names_what_needs_them(capsys):
    model = _jitter(lm().double())
    with pytest.warns(UserWarning) as record:
        gauges = find_gauges(model, output="logits")
    assert len(record) == 1
    message = str(record[0].message)
    assert "example_inputs" in message and "blocks.0.attn" in message and "blocks.0.norm1" in message
    assert "qk_rotation" not in gauges.kinds and "norm_scale" not in gauges.kinds
    assert len(gauges.notes) == 1 and gauges.notes[0] in message
    gauges.summary()
    assert f"note: {gauges.notes[0]}" in capsys.readouterr().out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with_example = find_gauges(model, torch.randint(0, 11, (1, 6)), output="logits")
    assert {"qk_rotation", "norm_scale"} <= set(with_example.kinds) and with_example.notes == ()


def test_without_example_inputs_a_model_that_needs_no_shapes_does_not_warn():
    model = ReLUMLP(ReLUMLPConfig(sizes=(5, 7, 6, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gauges = find_gauges(model)
    assert [f.name for f in gauges] == [f.name for f in find_gauges(model, torch.randn(2, 5))]


def test_a_compiled_model_gives_the_gauges_of_the_plain_one(capsys):
    model, x, output, _ = _build("lm-rope-rms-swiglu-gqa")
    compiled_model = torch.compile(model)  # compiles on its first call, which discovery never makes
    plain, compiled = find_gauges(model, x, output=output), find_gauges(compiled_model, x, output=output)
    assert compiled.model is model and plain.notes == ()
    assert [(f.name, f.parameters, f.dim) for f in compiled] == [(f.name, f.parameters, f.dim) for f in plain]
    assert compiled.skipped == plain.skipped
    compiled.summary()
    assert "note: read through torch.compile" in capsys.readouterr().out
    # the same element moves the plain model and a compiled copy alike, through either GaugeSet
    element = plain.sample(torch.Generator().manual_seed(0), spread=1.0)
    moved_plain, moved_compiled = copy.deepcopy(model), torch.compile(copy.deepcopy(model))
    plain.apply(moved_plain, element)
    compiled.apply(moved_compiled, element)
    for a, b in zip(moved_plain.parameters(), moved_compiled.parameters()):
        assert torch.equal(a, b)
    assert _rel(moved_plain(x).log_softmax(-1), model(x).log_softmax(-1)) <= TOL


class ScaledLogits(nn.Module):
    """A ReLU layer and a head whose logits ``z`` are returned as ``combine(self, z, x)``."""

    def __init__(self, combine):
        super().__init__()
        self.hidden, self.head = nn.Linear(5, 6), nn.Linear(6, 7)
        self.register_buffer("temperature", torch.tensor(2.5))
        self.register_buffer("vocab_bias", torch.linspace(-1.0, 1.0, 7))
        self.combine = combine

    def forward(self, x):
        return self.combine(self, self.head(torch.relu(self.hidden(x))), x)


SHIFT_KEPT = {
    "times a constant": lambda m, z, x: z * 0.5,
    "a constant times": lambda m, z, x: -3.0 * z,  # the sign does not matter: a shift stays a shift
    "divided by a constant": lambda m, z, x: z / 4.0,
    "divided by a buffer": lambda m, z, x: z / m.temperature,
    "divided by a per-sample scale": lambda m, z, x: z / (1.0 + x.pow(2).sum(-1, keepdim=True)),
    "plus a vocabulary bias": lambda m, z, x: (z + m.vocab_bias).mul(2.0),
}
SHIFT_SEEN = {
    "times a vocabulary factor": (lambda m, z, x: z * m.vocab_bias, "entry by entry"),
    "divided by its own norm": (lambda m, z, x: z / z.norm(dim=-1, keepdim=True), "norm (norm) sees the shift"),
    "times a function of the head": (lambda m, z, x: z * m.head.weight.sum(), "depends on head"),
    "squared": (lambda m, z, x: z * z, "sees the shift"),
    "floor-divided": (lambda m, z, x: torch.div(z, 0.5, rounding_mode="floor"), "sees the shift"),
}


def _shift_the_head(model: nn.Module) -> nn.Module:
    """A copy with one vector added to every row of the head (every logit of a sample moves alike)."""
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.head.weight += torch.randn(6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return moved


@pytest.mark.parametrize("key", list(SHIFT_KEPT))
def test_the_logit_shift_survives_scaling_by_constants_and_added_biases(key):
    model = _jitter(ScaledLogits(SHIFT_KEPT[key]).double())
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gauges = find_gauges(model, x[:1], output="logits")
    assert {f.name for f in gauges} == {"logit_shift:head", "neuron_scale:hidden"}
    before = model(x).log_softmax(-1)
    assert _rel(_shift_the_head(model)(x).log_softmax(-1), before) <= TOL
    moved = copy.deepcopy(model)
    gauges.apply(moved, gauges.sample(torch.Generator().manual_seed(2), spread=1.0))
    assert _rel(moved(x).log_softmax(-1), before) <= TOL


@pytest.mark.filterwarnings(MISSING_FAMILIES)
@pytest.mark.parametrize("key", list(SHIFT_SEEN))
def test_a_logit_shift_the_output_sees_is_left_out_with_its_reason(key):
    combine, reason = SHIFT_SEEN[key]
    model = _jitter(ScaledLogits(combine).double())
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert _rel(_shift_the_head(model)(x).log_softmax(-1), model(x).log_softmax(-1)) > 1e-3  # not a symmetry
    gauges = find_gauges(model, x[:1], output="logits")
    assert "logit_shift" not in gauges.kinds
    reasons = {(s.family, s.site): s.reason for s in gauges.skipped}
    assert reason in reasons[("logit_shift", "head")]


@pytest.mark.filterwarnings(MISSING_FAMILIES)
def test_a_branch_on_a_buffer_is_read_and_a_branch_on_a_parameter_is_data_dependent():
    """Buffers are constants of the model: tracing reads them (and records ops that mix them with
    traced sizes, as BERT's ``token_type_ids[:, :seq].expand(batch, seq)``); parameters are not."""

    class Switch(nn.Module):
        def __init__(self, on_buffer: bool):
            super().__init__()
            self.layer, self.out = nn.Linear(4, 4), nn.Linear(4, 3)
            self.register_buffer("flag", torch.ones(1, 16))
            self.gate = nn.Parameter(torch.ones(()))
            self.on_buffer = on_buffer

        def forward(self, x):
            batch, width = x.shape
            h = torch.relu(self.layer(x)) * self.flag[:, :width].expand(batch, width)
            switch = self.flag.sum() if self.on_buffer else self.gate
            return self.out(h) if switch > 0 else -self.out(h)

    x = torch.randn(2, 4)
    on_buffer = find_gauges(Switch(on_buffer=True), x)
    assert [f.name for f in on_buffer] == ["neuron_scale:layer"] and on_buffer.skipped[0].family != "all"
    on_parameter = find_gauges(Switch(on_buffer=False), x)
    assert len(on_parameter) == 0 and on_parameter.skipped[0].family == "all"


def test_bad_arguments_are_rejected():
    model = lm()
    with pytest.raises(ValueError, match="output"):
        find_gauges(model, torch.randint(0, 11, (1, 6)), output="probabilities")
    gauges = find_gauges(model, torch.randint(0, 11, (1, 6)), output="logits")
    with pytest.raises(ValueError, match="unknown gauge families"):
        gauges.sample(families="shear")
    with pytest.raises(ValueError, match="different parameters"):
        gauges.bind(lm(d_model=32))


# --------------------------------------------------------------------------------------------------
# A transformer written in the test from plain torch.nn modules
# --------------------------------------------------------------------------------------------------


class PlainAttention(nn.Module):
    """Attention as fused ``scaled_dot_product_attention`` or as explicit matmuls (nanoGPT style)."""

    def __init__(self, width, heads, explicit=False):
        super().__init__()
        self.heads, self.explicit = heads, explicit
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)

    def forward(self, x):
        b, t, c = x.shape
        split = lambda y: y.reshape(b, t, self.heads, c // self.heads).permute(0, 2, 1, 3)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        if self.explicit:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))
            att = att.masked_fill(torch.ones_like(att).tril() == 0, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.permute(0, 2, 1, 3).reshape(b, t, c))


class PlainBlock(nn.Module):
    def __init__(self, width, heads, activation, explicit=False):
        super().__init__()
        self.ln_a, self.ln_b = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mix = PlainAttention(width, heads, explicit)
        self.mlp = nn.Sequential(nn.Linear(width, 3 * width), activation, nn.Dropout(0.0), nn.Linear(3 * width, width))

    def forward(self, x):
        x = x + self.mix(self.ln_a(x))
        return x + self.mlp(self.ln_b(x))


class PlainTransformer(nn.Module):
    def __init__(self, vocab=13, width=12, heads=3, depth=2, activation=None, explicit=False):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(16, width))
        self.body = nn.Sequential(*(PlainBlock(width, heads, activation or nn.ReLU(), explicit) for _ in range(depth)))
        self.ln_f = nn.LayerNorm(width)
        self.unembed = nn.Linear(width, vocab)

    def forward(self, idx):
        return self.unembed(self.ln_f(self.body(self.tok(idx) + self.pos[: idx.shape[1]])))


@pytest.mark.parametrize("explicit", [False, True], ids=["sdpa", "explicit-matmul-attention"])
def test_plain_torch_transformer_is_understood(explicit):
    model = _jitter(PlainTransformer(explicit=explicit).double())
    x = torch.randint(0, 13, (2, 5))
    gauges = find_gauges(model, x, output="logits")
    expected = {"logit_shift:unembed", "norm_scale:ln_f"}
    for i in range(2):
        expected |= {f"norm_scale:body.{i}.ln_a", f"norm_scale:body.{i}.ln_b", f"qk_rotation:body.{i}.mix",
                     f"vo_rotation:body.{i}.mix", f"neuron_scale:body.{i}.mlp.0"}
    assert {f.name for f in gauges} == expected
    before = model(x).log_softmax(-1)
    moved = copy.deepcopy(model)
    gauges.apply(moved, gauges.sample(torch.Generator().manual_seed(0), spread=1.0))
    assert _rel(moved(x).log_softmax(-1), before) <= TOL


def test_plain_torch_transformer_with_gelu_has_no_neuron_gauge():
    model = PlainTransformer(activation=nn.GELU()).double()
    gauges = find_gauges(model, torch.randint(0, 13, (2, 5)), output="logits")
    assert "neuron_scale" not in gauges.kinds
    assert {"norm_scale", "qk_rotation", "vo_rotation", "logit_shift"} <= set(gauges.kinds)


def test_summary_is_a_printed_table(capsys):
    model, x, output, _ = _build("lm-rope-rms-swiglu-gqa")
    rows = find_gauges(model, x, output=output).summary()
    printed = capsys.readouterr().out
    assert len(rows) == 2 * 5 + 2
    assert "qk_rotation" in printed and "group dim" in printed
    head = next(r for r in rows if r.family == "logit_shift")
    assert head.parameters == ("head.weight",) and head.dimension == 16


# --------------------------------------------------------------------------------------------------
# Property test over architectures
# --------------------------------------------------------------------------------------------------


@st.composite
def lm_configs(draw):
    n_kv = draw(st.sampled_from([1, 2]))
    n_heads = n_kv * draw(st.sampled_from([1, 2]))
    head_dim = draw(st.sampled_from([2, 4, 6]))
    return dict(
        vocab_size=draw(st.integers(3, 9)), d_model=n_heads * head_dim, n_heads=n_heads, n_kv_heads=n_kv,
        n_layers=draw(st.integers(1, 2)), d_ff=draw(st.integers(2, 9)), max_seq_len=8,
        rope=draw(st.sampled_from(["full", "partial", "none"])), rope_fraction=0.5,
        norm=draw(st.sampled_from(["rmsnorm", "layernorm"])), norm_bias=draw(st.booleans()),
        mlp=draw(st.sampled_from(["swiglu", "relu"])), mlp_bias=draw(st.booleans()),
        attn_bias=draw(st.booleans()), head_bias=draw(st.booleans()),
    )


@settings(max_examples=12, deadline=None)
@given(config=lm_configs(), seq=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_property_invariance_over_architectures(config, seq, seed):
    torch.manual_seed(seed)
    model = _jitter(TransformerLM(TransformerLMConfig(**config)).double(), seed)
    x = torch.randint(0, config["vocab_size"], (2, seq))
    gauges = find_gauges(model, x[:1], output="logits")
    assert {f.name for f in gauges} == _lm_expected(layers=config["n_layers"])
    before = model(x).log_softmax(-1)
    gen = torch.Generator().manual_seed(seed)
    for families in [*gauges.kinds, None]:
        moved = copy.deepcopy(model)
        gauges.apply(moved, gauges.sample(gen, families=families, spread=1.0))
        assert _rel(moved(x).log_softmax(-1), before) <= TOL, families


@pytest.mark.parametrize("rope", ["full", "partial"])
def test_float32_models_give_the_same_families(rope):
    torch.manual_seed(0)
    model32 = _jitter(lm(n_kv_heads=2, rope=rope))
    model64 = copy.deepcopy(model32).double()
    x = torch.randint(0, 11, (2, 6))
    g32, g64 = find_gauges(model32, x, output="logits"), find_gauges(model64, x, output="logits")
    assert [(f.name, f.dim) for f in g32] == [(f.name, f.dim) for f in g64]
    before = model32(x).log_softmax(-1)
    gauges_sample = g32.sample(torch.Generator().manual_seed(0))
    g32.apply(model32, gauges_sample)
    assert _rel(model32(x).log_softmax(-1), before) <= 1e-5
