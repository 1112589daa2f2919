"""DDCMuon: equivariance under every gauge family (R2), reduction to torch.optim.Muon + AdamW (R4),
fixed orbit coordinates (R3), head-wise Newton-Schulz, state_dict resume, errors; training (slow)."""

from __future__ import annotations

import copy
import functools
import io
import warnings

import pytest
import torch
import torch.nn.functional as F

from gaugeopt import DDCMuon, SymmetryCompatible, find_gauges
from gaugeopt.gauges import GaugeSet
from gaugeopt.models import (
    ModularAdditionConfig,
    ModularAdditionTransformer,
    MoEConfig,
    MoELM,
    ReLUMLP,
    ReLUMLPConfig,
    TransformerLM,
    TransformerLMConfig,
    modular_addition_data,
)
from gaugeopt.optim.baselines import MuonWithAdamW
from gaugeopt.optim.ddc_muon import MUON_EDGE_SCALE, muon_lr_scale, muon_parameter_names
from gaugeopt.optim.layerwise import muon_update
from gaugeopt.optim.matrix_functions import MUON_NS_COEFFICIENTS, newton_schulz, polar_express_coefficients
from gaugeopt.testing import check_equivariance, check_equivariance_per_family, relative_error

KINDS = ("logit_shift", "neuron_scale", "norm_scale", "qk_rotation", "vo_rotation")
MUON_LR, ADAM_LR, DECAY = 0.05, 1e-2, 0.1
VOCAB = 17


def ddc_muon(model, gauges, **options):
    settings = dict(lr=MUON_LR, weight_decay=DECAY, adam_lr=ADAM_LR, ns_dtype=None)
    return DDCMuon(model.parameters(), gauges, **{**settings, **options})


def torch_muon_adamw(model, gauges):
    return MuonWithAdamW(model, gauges, lr=MUON_LR, weight_decay=DECAY, adam_lr=ADAM_LR)


def lm_loss(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def classification_loss(model, batch):
    inputs, labels = batch
    return F.cross_entropy(model(inputs), labels)


@functools.cache
def _lm(overrides: tuple = ()):
    torch.manual_seed(0)
    config = dict(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=8)
    model = TransformerLM(TransformerLMConfig(**{**config, **dict(overrides)})).double()
    tokens = torch.randint(0, VOCAB, (3, 4, 8), generator=torch.Generator().manual_seed(1))
    return model, find_gauges(model, (tokens[0],), output="logits"), list(tokens), lm_loss


def make_lm(**overrides):
    """A tiny float64 language model, its gauges, three batches and the loss (cached: copy before training)."""
    return _lm(tuple(sorted(overrides.items())))


def make_modadd():
    torch.manual_seed(0)
    model = ModularAdditionTransformer(ModularAdditionConfig(modulus=13, d_model=16, n_layers=1, n_heads=2,
                                                             d_ff=32)).double()
    inputs, labels = modular_addition_data(13)
    batches = [(inputs[i::3], labels[i::3]) for i in range(3)]
    return model, find_gauges(model, (inputs[:4],), output="logits"), batches, classification_loss


MODELS = {"lm": make_lm, "modadd": make_modadd}


@pytest.fixture(scope="module", params=list(MODELS))
def setup(request):
    return MODELS[request.param]()


# --------------------------------------------------------------------------------------------------
# R2: equivariance (float64 Newton-Schulz), and the baselines that are not equivariant
# --------------------------------------------------------------------------------------------------


def test_equivariant_under_each_family_and_their_product(setup):
    model, gauges, batches, loss_fn = setup
    assert set(gauges.kinds) == set(KINDS)
    results = check_equivariance_per_family(ddc_muon, model, gauges, batches, loss_fn, steps=50)
    assert set(results) == {*KINDS, "product"}
    for kind, result in results.items():
        assert result.displacement > 1e-2, kind  # the element really moves the parameters
        assert result.error <= 1e-8, (kind, result.error, result.worst_parameter, result.worst_step)


def test_torch_muon_with_adamw_is_not_equivariant_under_rescalings(setup):
    model, gauges, batches, loss_fn = setup
    results = check_equivariance_per_family(torch_muon_adamw, model, gauges, batches, loss_fn, steps=50,
                                            kinds=["neuron_scale", "norm_scale"], product=False)
    for kind, result in results.items():
        assert result.error >= 1e-3, (kind, result.error)


def test_plain_muon_commutes_with_rotations_but_not_with_rescalings():
    """The structure behind the construction, measured without bfloat16 rounding: Muon alone (float64
    Newton-Schulz, no gauge frames) is equivariant under head rotations and not under rescalings."""
    model, gauges, batches, loss_fn = make_lm()
    hidden = muon_parameter_names(model, gauges)

    def plain(m, g):
        groups = [{"params": [p for n, p in m.named_parameters() if (n in hidden) == flag], "use_muon": flag}
                  for flag in (True, False)]
        return DDCMuon(groups, GaugeSet([], [], m), lr=MUON_LR, weight_decay=DECAY, adam_lr=ADAM_LR, ns_dtype=None)

    rotation = check_equivariance(plain, model, gauges, batches, loss_fn, steps=50, families="qk_rotation")
    rescaling = check_equivariance(plain, model, gauges, batches, loss_fn, steps=20, families="neuron_scale")
    assert rotation.error <= 1e-8, rotation.error
    assert rescaling.error >= 1e-3, rescaling.error


def test_head_wise_equivariant_with_grouped_query_partial_rope():
    model, gauges, batches, loss_fn = make_lm(n_heads=4, n_kv_heads=2, rope="partial")
    result = check_equivariance(lambda m, g: ddc_muon(m, g, head_wise=True), model, gauges,
                                batches, loss_fn, steps=50)
    assert result.displacement > 1e-2 and result.error <= 1e-8, (result.error, result.worst_parameter)


def test_relu_chain_with_biases_takes_muon_on_the_hidden_weight_and_adam_on_the_rest():
    """The input and output layers and every bias take the Adam rule in their frames, the hidden
    weight Muon (frame -> rule -> lift is covariant tensor by tensor)."""
    torch.manual_seed(0)
    model = ReLUMLP(ReLUMLPConfig(sizes=(6, 12, 12, 3))).double()
    gauges = find_gauges(model, (torch.randn(2, 6, dtype=torch.float64),), output="values")
    assert gauges.kinds == ("neuron_scale",)
    assert muon_parameter_names(model, gauges) == {"layers.1.weight"}
    generator = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 6, generator=generator, dtype=torch.float64),
                torch.randn(8, 3, generator=generator, dtype=torch.float64)) for _ in range(3)]
    result = check_equivariance(ddc_muon, model, gauges, batches, lambda m, b: F.mse_loss(m(b[0]), b[1]), steps=50)
    assert result.displacement > 1e-2 and result.error <= 1e-8, result.error


def test_a_model_without_hidden_matrices_is_told_that_nothing_takes_muon():
    """A Linear-ReLU-Linear classifier has an input layer and an output layer only: both take Adam,
    so lr is unused; DDCMuon says so once, and split() lists who takes what at which rate."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))
    gauges = find_gauges(model, (torch.randn(2, 6),), output="logits")
    with pytest.warns(UserWarning, match=r"no parameter takes the Muon step.*lr=0\.05.*adam_lr=0\.01"):
        optimizer = DDCMuon(model.parameters(), gauges, lr=0.05, adam_lr=0.01)
    rows = optimizer.split(print_table=False)
    assert {row.rule for row in rows} == {"adam"} and {row.lr for row in rows} == {0.01}
    deeper = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 12), torch.nn.ReLU(),
                                 torch.nn.Linear(12, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer = DDCMuon(deeper.parameters(), find_gauges(deeper, (torch.randn(2, 6),), output="logits"), lr=0.05)
    assert [(row.parameter, row.rule) for row in optimizer.split(print_table=False) if row.rule == "muon"] == \
        [("2.weight", "muon")]


def test_moe_router_takes_centered_muon_and_stays_equivariant():
    """The router is a hidden matrix with a router shift: Muon on its centered part (every family of
    a tiny MoE language model at once, experts' neuron pairs included)."""
    torch.manual_seed(0)
    model = MoELM(MoEConfig(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, d_ff=16, n_experts=3, top_k=2,
                            max_seq_len=8)).double()
    tokens = list(torch.randint(0, VOCAB, (3, 4, 8), generator=torch.Generator().manual_seed(1)))
    gauges = find_gauges(model, (tokens[0],), output="logits")
    assert {"router_shift", "neuron_scale"} <= set(gauges.kinds)
    assert "blocks.0.moe.router.weight" in muon_parameter_names(model, gauges)

    def loss_fn(m, batch):
        logits, aux = m(batch[:, :-1], return_aux=True)
        return F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1)) + 0.01 * aux

    result = check_equivariance(ddc_muon, model, gauges, tokens, loss_fn, steps=20)
    assert result.displacement > 1e-2 and result.error <= 1e-8, (result.error, result.worst_parameter)


def test_dead_unit_is_frozen_and_reported_without_nan():
    model, gauges, batches, loss_fn = make_lm()
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.blocks[0].ffn.up.weight[3].zero_()
        model.blocks[0].ffn.down.weight[:, 3].zero_()
    optimizer = ddc_muon(model, gauges.bind(model))
    with pytest.warns(RuntimeWarning, match="froze"):
        for t in range(3):
            optimizer.zero_grad()
            loss_fn(model, batches[t]).backward()
            optimizer.step()
    assert optimizer.frozen == {"neuron_scale:blocks.0.ffn.up": (3,)}
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert model.blocks[0].ffn.up.weight[3].abs().max() == 0 and model.blocks[0].ffn.down.weight[:, 3].abs().max() == 0


# --------------------------------------------------------------------------------------------------
# R3: the orbit coordinates do not move
# --------------------------------------------------------------------------------------------------


def test_orbit_coordinates_held_fixed_while_torch_muon_moves_them():
    model, gauges, batches, loss_fn = make_lm()
    moved = {}
    for label, make in (("ddc", ddc_muon), ("torch", torch_muon_adamw)):
        trained = copy.deepcopy(model)
        bound = gauges.bind(trained)
        edge = MUON_EDGE_SCALE  # the section DDCMuon's frame holds (any other moves with the units' sizes)
        before = bound.orbit_coordinates(edge_scale=edge)
        optimizer = make(trained, bound)
        for t in range(20):
            optimizer.zero_grad()
            loss_fn(trained, batches[t % len(batches)]).backward()
            optimizer.step()
        after = bound.orbit_coordinates(edge_scale=edge)
        moved[label] = {f: ((after[f] - before[f]).norm() / before[f].norm().clamp_min(1e-12)).item()
                        for f in before if before[f].numel()}
    assert max(moved["ddc"].values()) <= 1e-10, moved["ddc"]
    assert min(moved["torch"].values()) >= 1e-3, moved["torch"]


# --------------------------------------------------------------------------------------------------
# R4: reduction to torch.optim.Muon (hidden matrices) + torch.optim.AdamW (the rest)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("nesterov,adjust_lr", [(True, "original"), (False, "match_rms_adamw")])
def test_no_gauges_reduces_to_torch_muon_and_adamw(nesterov, adjust_lr):
    model, _, batches, loss_fn = make_lm()
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    settings = dict(lr=MUON_LR, weight_decay=DECAY, nesterov=nesterov, adjust_lr=adjust_lr, adam_lr=ADAM_LR)
    optimizers = (DDCMuon(ours.parameters(), GaugeSet([], [], ours), **settings),  # bfloat16 by default, as torch
                  MuonWithAdamW(theirs, None, **settings))
    assert {g["ns_dtype"] for g in optimizers[0].param_groups} == {torch.bfloat16}
    # the embedding and the LM head (found from the structure without gauges) take AdamW on both sides
    assert set(optimizers[1].muon_names) == {n for n, p in model.named_parameters()
                                            if p.ndim == 2 and n not in ("embed.weight", "head.weight")}
    for t in range(10):
        for m, optimizer in zip((ours, theirs), optimizers):
            optimizer.zero_grad()
            loss_fn(m, batches[t % len(batches)]).backward()
            optimizer.step()
    error, where = relative_error(ours, theirs)
    assert error <= 1e-10, (error, where)
    assert relative_error(ours, model)[0] > 1e-2  # both moved


@pytest.mark.parametrize("shape", [(8, 8), (5, 12), (12, 5)])
def test_newton_schulz_is_torch_bit_for_bit_in_bfloat16(shape):
    from torch.optim._muon import _zeropower_via_newtonschulz  # torch's own (private) iteration

    update = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = newton_schulz(update, dtype=torch.bfloat16)
    theirs = _zeropower_via_newtonschulz(update, (3.4445, -4.7750, 2.0315), 5, 1e-7)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, theirs)


def test_muon_lr_scale_matches_torch():
    from torch.optim._muon import _adjust_lr

    for shape in [(4, 16), (16, 4), (7, 7)]:
        for adjust in ("original", "match_rms_adamw"):
            assert muon_lr_scale(shape, adjust) * 0.3 == pytest.approx(_adjust_lr(0.3, adjust, torch.Size(shape)))


@pytest.mark.parametrize("shape,adjust_lr", [((12, 5), "original"), ((5, 12), "match_rms_adamw"),
                                              ((12, 5), "match_rms_adamw"), ((18, 2, 1, 3), "original")])
def test_a_muon_step_is_its_formula_with_the_shape_factor_in_the_rate(shape, adjust_lr):
    """Known answer, two steps on one tensor (float64 Newton-Schulz): ``B <- mu B + (1 - mu) G``,
    ``U = (1 - mu) G + mu B``, ``p <- (1 - lr wd) p - lr s NS(U)`` with ``s`` the shape factor of the
    tensor's matrix (a conv kernel's ``(out, in * kh * kw)``), which the step applies with the rate
    (``Rule.rate_factor``) while the rule returns ``NS(U)``; shapes whose ``s`` is not a power of two."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(shape, dtype=torch.float64, generator=generator)
    grads = [torch.randn(shape, dtype=torch.float64, generator=generator) for _ in range(2)]
    lr, wd, mu = 0.02, 0.1, 0.9
    p = torch.nn.Parameter(start.clone())
    optimizer = DDCMuon([{"params": [p], "use_muon": True}], None, lr=lr, momentum=mu, weight_decay=wd,
                        adjust_lr=adjust_lr, ns_dtype=None)
    expected, buffer = start.clone(), torch.zeros_like(start)
    matrix = (shape[0], start[0].numel())
    scale = muon_lr_scale(matrix, adjust_lr)
    assert scale not in (0.5, 1.0, 2.0)
    for grad in grads:
        p.grad = grad.clone()
        optimizer.step()
        buffer = mu * buffer + (1 - mu) * grad
        update = newton_schulz(((1 - mu) * grad + mu * buffer).reshape(matrix)).reshape(shape)
        expected = (1 - lr * wd) * expected - lr * scale * update
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("nesterov", [True, False])
def test_the_layerwise_muon_rule_and_ddc_muon_take_the_same_step(nesterov):
    """One Muon rule serves both: on a matrix no gauge touches, SymmetryCompatible's ``muon`` rule and
    DDCMuon give bit-identical trajectories."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(6, 10, dtype=torch.float64, generator=generator)
    grads = [torch.randn(6, 10, dtype=torch.float64, generator=generator) for _ in range(4)]
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    settings = dict(lr=0.02, nesterov=nesterov, weight_decay=0.1)
    layerwise = SymmetryCompatible([ours], rule="muon", momentum=0.9, **settings)
    ddc = DDCMuon([theirs], None, momentum=0.9, ns_dtype=None, **settings)  # SymmetryCompatible's NS dtype
    for grad in grads:
        for p, opt in ((ours, layerwise), (theirs, ddc)):
            p.grad = grad.clone()
            opt.step()
    assert not torch.equal(ours, start)
    assert torch.equal(ours, theirs)


# --------------------------------------------------------------------------------------------------
# Polar Express coefficients
# --------------------------------------------------------------------------------------------------


def test_polar_express_is_the_schedule_it_names_and_stays_exactly_equivariant():
    """``ns_coefficients="polar_express"`` steps as the explicit per-step schedule (bit for bit), moves
    the parameters differently from Muon's coefficients, is exactly equivariant under the product of
    every family in float64, and survives a checkpoint as its name."""
    model, gauges, batches, loss_fn = make_lm()
    runs = {}
    for label, coefficients in (("name", "polar_express"), ("schedule", list(polar_express_coefficients(5))),
                                ("muon", MUON_NS_COEFFICIENTS)):
        m = copy.deepcopy(model)
        optimizer = ddc_muon(m, gauges.bind(m), ns_coefficients=coefficients)
        for t in range(3):
            optimizer.zero_grad()
            loss_fn(m, batches[t]).backward()
            optimizer.step()
        runs[label] = m
    assert relative_error(runs["name"], runs["schedule"])[0] == 0.0
    assert relative_error(runs["name"], runs["muon"])[0] > 1e-3
    fresh = ddc_muon(model, gauges)
    fresh.load_state_dict(ddc_muon(model, gauges, ns_coefficients="polar_express").state_dict())
    assert {g["ns_coefficients"] for g in fresh.param_groups} == {"polar_express"}
    result = check_equivariance(lambda m, g: ddc_muon(m, g, ns_coefficients="polar_express"), model, gauges,
                                batches, loss_fn, steps=20)
    assert result.displacement > 1e-2 and result.error <= 1e-8, (result.error, result.worst_parameter)


def test_bad_newton_schulz_settings_are_refused_naming_the_field():
    model, gauges, _, _ = make_lm()
    with pytest.raises(ValueError, match="ns_coefficients.*'polar_express'"):
        ddc_muon(model, gauges, ns_coefficients="polar")
    with pytest.raises(ValueError, match="ns_coefficients gives 4 per-step quintics for 5"):
        ddc_muon(model, gauges, ns_coefficients=[MUON_NS_COEFFICIENTS] * 4)
    optimizer = ddc_muon(model, gauges, ns_coefficients=[MUON_NS_COEFFICIENTS] * 5)
    optimizer.param_groups[0]["ns_steps"] = 6  # the schedule no longer fits: refused at the next step
    with pytest.raises(ValueError, match="param group 0.*ns_coefficients gives 5 per-step quintics for 6"):
        optimizer.step()


# --------------------------------------------------------------------------------------------------
# Head-wise Newton-Schulz
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 16, 8), (3, 8, 16), (3, 8, 8)])
def test_muon_update_is_the_iterations_result_converted_then_scaled_bit_for_bit(shape, ns_dtype):
    """``s NS(U)`` in the update's dtype, whatever dtype the iterations ran in and whether ``s`` is 1
    (square and wide matrices) or not (tall ones): exactly ``NS(U).to(dtype) * s``, the scale
    applied in float32 to the exactly converted entries (never rounded in bfloat16)."""
    update = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    expected = newton_schulz(update, dtype=ns_dtype).to(torch.float32) * muon_lr_scale(shape[1:], "original")
    got = muon_update(update, dtype=ns_dtype)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert torch.equal(muon_update(update, dtype=ns_dtype, heads=2, block_scale=True),
                       torch.cat([muon_update(part, dtype=ns_dtype) for part in update.chunk(2, dim=1)], dim=1))


@pytest.mark.parametrize("axis", ["row", "col"])
def test_head_blocks_commute_with_per_head_rotations(axis):
    heads, head_dim, other = 3, 4, 10
    generator = torch.Generator().manual_seed(0)
    index = torch.randperm(heads * head_dim, generator=generator).reshape(heads, head_dim)  # any partition
    blocks = tuple(tuple(row) for row in index.tolist())
    shape = (heads * head_dim, other) if axis == "row" else (other, heads * head_dim)
    update = torch.randn(shape, generator=generator, dtype=torch.float64)
    rotation = torch.eye(heads * head_dim, dtype=torch.float64)
    for h in range(heads):
        q, _ = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64))
        rotation[index[h].unsqueeze(1), index[h]] = q

    def rotate(x):
        return rotation @ x if axis == "row" else x @ rotation.T

    def head_wise(x):
        return muon_update(x, head_axis=axis, head_index=blocks, block_scale=False)

    assert torch.allclose(head_wise(rotate(update)), rotate(head_wise(update)), atol=1e-12)
    whole = muon_update(update)
    assert (head_wise(update) - whole).norm() > 0.1 * whole.norm()
    with pytest.raises(ValueError, match="partition"):
        muon_update(update, head_axis=axis, head_index=tuple(b[:2] for b in blocks))


def test_head_wise_option_changes_the_attention_update_only():
    model, gauges, batches, loss_fn = make_lm()
    runs = {}
    for head_wise in (False, True):
        m = copy.deepcopy(model)
        optimizer = ddc_muon(m, gauges.bind(m), head_wise=head_wise)
        loss_fn(m, batches[0]).backward()
        optimizer.step()
        runs[head_wise] = dict(m.named_parameters())
    for name, p in runs[False].items():
        same = torch.equal(p, runs[True][name])
        assert same == (".attn." not in name), name


# --------------------------------------------------------------------------------------------------
# state_dict round trip
# --------------------------------------------------------------------------------------------------


def test_state_dict_round_trip_resumes_identically():
    model, gauges, batches, loss_fn = make_lm()

    def train(m, optimizer, steps):
        for t in steps:
            optimizer.zero_grad()
            loss_fn(m, batches[t % len(batches)]).backward()
            optimizer.step()

    first = copy.deepcopy(model)
    optimizer = ddc_muon(first, gauges.bind(first), head_wise=True)
    train(first, optimizer, range(5))
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)

    resumed = copy.deepcopy(first)
    restored = ddc_muon(resumed, gauges.bind(resumed), head_wise=True)
    restored.load_state_dict(torch.load(buffer))  # weights_only: plain tensors, numbers and dtypes
    up = dict(resumed.named_parameters())["blocks.0.ffn.up.weight"]
    assert set(restored.state[up]) == {"momentum_buffer"}
    train(first, optimizer, range(5, 10))
    train(resumed, restored, range(5, 10))
    for (name, a), b in zip(first.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------------------------------
# Parameter split and errors
# --------------------------------------------------------------------------------------------------


def test_default_split_gives_embedding_head_and_gains_to_adam():
    model, gauges, _, _ = make_lm()
    optimizer = ddc_muon(model, gauges)
    names = {id(p): n for n, p in model.named_parameters()}
    by_rule = {flag: {names[id(p)] for g in optimizer.param_groups if g["use_muon"] == flag for p in g["params"]}
               for flag in (True, False)}
    assert by_rule[False] == {"embed.weight", "head.weight", "blocks.0.norm1.weight", "blocks.0.norm2.weight",
                              "norm.weight"}
    assert all(len(dict(model.named_parameters())[n].shape) == 2 for n in by_rule[True])
    assert {g["lr"] for g in optimizer.param_groups if not g["use_muon"]} == {ADAM_LR}


def test_errors_name_the_problem():
    model, gauges, _, _ = make_lm()
    with pytest.raises(ValueError, match="adjust_lr"):
        ddc_muon(model, gauges, adjust_lr="spectral")
    with pytest.raises(ValueError, match="unknown option"):
        DDCMuon([{"params": model.parameters(), "adam_beta": (0.9, 0.9)}], gauges)
    with pytest.raises(ValueError, match="Muon needs matrices"):
        DDCMuon([{"params": [model.norm.weight], "use_muon": True}], None)
    optimizer = ddc_muon(model, gauges)
    saved = optimizer.state_dict()
    adam_group = next(i for i, g in enumerate(optimizer.param_groups) if not g["use_muon"])
    saved["param_groups"][adam_group]["use_muon"] = True  # a checkpoint giving Muon the gains
    with pytest.raises(ValueError, match=f"param group {adam_group} of the state dict: Muon needs matrices"):
        optimizer.load_state_dict(saved)
    assert not optimizer.param_groups[adam_group]["use_muon"]
    with pytest.raises(ValueError, match=r"\(\.\.\., m, n\)"):
        newton_schulz(torch.ones(3))


# --------------------------------------------------------------------------------------------------
# Training (slow): both optimizers fit the grokking task's training split
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_muon_and_ddc_muon_reach_full_train_accuracy_on_modular_addition():
    from gaugeopt.data.modular import modular_addition_split

    data = modular_addition_split(23, 0.5, seed=0)
    first_perfect = {}
    for label in ("torch-muon", "ddc-muon"):
        torch.manual_seed(0)
        model = ModularAdditionTransformer(ModularAdditionConfig(modulus=23, d_model=32, n_layers=2, n_heads=4,
                                                                 d_ff=64))
        gauges = find_gauges(model, (data.train_inputs[:2],), output="logits")
        settings = dict(lr=0.02, weight_decay=0.1, adam_lr=3e-3)
        optimizer = (MuonWithAdamW(model, gauges, **settings) if label == "torch-muon"
                     else DDCMuon(model.parameters(), gauges, **settings))
        for step in range(300):
            optimizer.zero_grad()
            logits = model(data.train_inputs)
            F.cross_entropy(logits, data.train_labels).backward()
            optimizer.step()
            if (logits.argmax(-1) == data.train_labels).all():
                first_perfect[label] = step
                break
    print("first step at 100% train accuracy:", first_perfect)
    assert set(first_perfect) == {"torch-muon", "ddc-muon"}, first_perfect

