"""Edges of the batched step: tensors without gradients, frozen tensors, clipping, the compiled step.

* A neuron pair, a norm family or a whole layer without gradients steps without error and is left
  exactly as it was; a parameter whose ``requires_grad`` is turned off after construction does not
  move (even with a stale gradient).
* ``gaugeopt.clip_grad_norm_`` measures the canonical gradients: active on every step it keeps
  DDCAdam equivariant, where torch's ``clip_grad_norm_`` in the same loop does not.
* The compiled step (``compiled=True``) equals the eager one to 1e-12 in float64 under
  ``clip_grad_value_`` and per-tensor clipping, a OneCycleLR schedule of the learning rate and
  betas runs without recompiling, and a NaN or infinite gradient entry is refused (or the step
  skipped) with nothing changed, compiled or not.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect

import pytest
import torch
import torch.nn.functional as F

import gaugeopt
from gaugeopt import DDCAdam, DDCMuon
from gaugeopt.models import TransformerLM, TransformerLMConfig
from gaugeopt.optim import NonFiniteGradientError, gauge_invariant_grad_norm
from gaugeopt.testing import check_equivariance, relative_error

VOCAB = 11


@functools.cache
def _lm(layers: int = 2):
    """LayerNorm with bias, ReLU MLP with bias (every frame kind with every tensor kind), float64."""
    torch.manual_seed(0)
    model = TransformerLM(TransformerLMConfig(vocab_size=VOCAB, d_model=16, n_layers=layers, n_heads=2, d_ff=24,
                                              max_seq_len=8, norm="layernorm", mlp="relu", mlp_bias=True,
                                              head_bias=True, init_std=0.3)).double()
    tokens = torch.randint(0, VOCAB, (4, 3, 8), generator=torch.Generator().manual_seed(1))
    gauges = gaugeopt.find_gauges(model, tokens[0, :1], output="logits")
    return model, gauges, list(tokens)


def lm_loss(model, tokens):
    return F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())


OPTIMIZERS = {
    "DDCAdam": lambda m, g, **kw: DDCAdam(m.parameters(), g, lr=1e-2, weight_decay=0.1, **kw),
    # float64 Newton-Schulz: the compiled and the eager step agree to float64 rounding (bfloat16: docs/ddc_muon.md)
    "DDCMuon": lambda m, g, **kw: DDCMuon(m.parameters(), g, lr=0.02, weight_decay=0.1, adam_lr=1e-2, ns_dtype=None,
                                          **kw),
}


def _train(model, optimizer, batches, steps: int = 4, drop=(), hook=None) -> None:
    for t in range(steps):
        optimizer.zero_grad()
        lm_loss(model, batches[t % len(batches)]).backward()
        for name, p in model.named_parameters():
            if any(name.startswith(prefix) for prefix in drop):
                p.grad = None
        if hook is not None:
            hook(model)
        optimizer.step()


# --------------------------------------------------------------------------------------------------
# Tensors without gradients
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("dropped", [
    ("blocks.0.ffn.up.", "blocks.0.ffn.down."),  # a neuron pair (weights and bias)
    ("blocks.1.norm2.", "blocks.1.ffn.up.weight"),  # a norm family: gain, bias and its consumer
    ("blocks.0.",),  # a whole layer
], ids=["neuron pair", "norm family", "layer"])
def test_components_without_gradients_are_left_exactly_as_they_were(optimizer, dropped):
    model, gauges, batches = _lm()
    model = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, OPTIMIZERS[optimizer](model, gauges.bind(model)), batches, drop=dropped)
    for name, p in model.named_parameters():
        if any(name.startswith(prefix) for prefix in dropped):
            assert torch.equal(p, before[name]), name
    assert not torch.equal(model.head.weight, before["head.weight"])
    assert not torch.equal(model.blocks[1].attn.q_proj.weight, before["blocks.1.attn.q_proj.weight"])


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_a_tensor_frozen_after_construction_does_not_move(optimizer):
    model, gauges, batches = _lm()
    model = copy.deepcopy(model)
    opt = OPTIMIZERS[optimizer](model, gauges.bind(model))
    _train(model, opt, batches, steps=2)
    down = model.blocks[0].ffn.down.weight
    stale = torch.ones_like(down)
    down.requires_grad_(False)  # frozen, and it even keeps a stale gradient below
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def keep_stale(m):
        m.blocks[0].ffn.down.weight.grad = stale

    _train(model, opt, batches, steps=3, hook=keep_stale)
    assert torch.equal(down, before["blocks.0.ffn.down.weight"])
    assert not torch.equal(model.blocks[0].ffn.up.weight, before["blocks.0.ffn.up.weight"])


# --------------------------------------------------------------------------------------------------
# Gauge-invariant gradient clipping
# --------------------------------------------------------------------------------------------------


class _Clipped:
    """An optimizer whose ``step`` clips the model's gradients first (what a training loop does)."""

    def __init__(self, optimizer, model, clip):
        self.optimizer, self.model, self.clip = optimizer, model, clip

    def step(self):
        self.clip(self.model)
        self.optimizer.step()

    def zero_grad(self, set_to_none: bool = True):
        self.optimizer.zero_grad(set_to_none)


MAX_NORM = 0.05  # below every gradient norm of the check: clipping acts on every step


def _ours(model, gauges):
    def clip(m):
        norm = gaugeopt.clip_grad_norm_(m.parameters(), MAX_NORM, gauges)
        assert norm > MAX_NORM
    return _Clipped(DDCAdam(model.parameters(), gauges, lr=1e-2, weight_decay=0.1), model, clip)


def _torchs(model, gauges):
    def clip(m):
        assert torch.nn.utils.clip_grad_norm_(m.parameters(), MAX_NORM) > MAX_NORM
    return _Clipped(DDCAdam(model.parameters(), gauges, lr=1e-2, weight_decay=0.1), model, clip)


def test_gauge_invariant_clipping_keeps_ddc_adam_equivariant_and_torchs_does_not():
    model, gauges, batches = _lm()
    ours = check_equivariance(_ours, model, gauges, batches, lm_loss, steps=20, spread=1.0)
    theirs = check_equivariance(_torchs, model, gauges, batches, lm_loss, steps=20, spread=1.0)
    assert ours.displacement > 0.1
    assert ours.error <= 1e-10, ours.error
    assert theirs.error >= 1e-3, theirs.error


def test_the_clipping_norm_is_invariant_and_torchs_is_not():
    model, gauges, batches = _lm()
    moved = copy.deepcopy(model)
    bound = gauges.bind(moved)
    bound.apply(moved, bound.sample(torch.Generator().manual_seed(3), spread=1.0))
    norms = {}
    for label, m, g in (("start", model, gauges), ("moved", moved, bound)):
        m = copy.deepcopy(m) if label == "start" else m
        m.zero_grad()
        lm_loss(m, batches[0]).backward()
        norms[label] = (gauge_invariant_grad_norm(m.parameters(), g.bind(m) if label == "start" else g).item(),
                        torch.nn.utils.get_total_norm([p.grad for p in m.parameters()]).item())
    assert norms["start"][0] == pytest.approx(norms["moved"][0], rel=1e-12)
    assert abs(norms["start"][1] / norms["moved"][1] - 1) > 1e-2


def test_without_gauges_it_is_torchs_clipping():
    model, _, batches = _lm()
    twins = [copy.deepcopy(model) for _ in range(2)]
    for m in twins:
        lm_loss(m, batches[0]).backward()
    ours = gaugeopt.clip_grad_norm_(twins[0].parameters(), 0.1, None)
    theirs = torch.nn.utils.clip_grad_norm_(twins[1].parameters(), 0.1)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)
    for a, b in zip(twins[0].parameters(), twins[1].parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-12, atol=0)


@pytest.mark.parametrize("foreach", [None, True, False])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_clipping_has_torchs_signature_and_without_gauges_its_results(norm_type, foreach):
    """``clip_grad_norm_(parameters, max_norm, gauges=None, norm_type, error_if_nonfinite, foreach)``:
    torch's parameters and defaults with ``gauges`` third; without gauges, torch's norm and scaling."""
    ours_signature = inspect.signature(gaugeopt.clip_grad_norm_).parameters
    torchs = inspect.signature(torch.nn.utils.clip_grad_norm_).parameters
    assert list(ours_signature) == ["parameters", "max_norm", "gauges", *list(torchs)[2:]]
    assert ours_signature["gauges"].default is None
    assert all(ours_signature[k].default == v.default for k, v in torchs.items())
    model, _, batches = _lm()
    twins = [copy.deepcopy(model) for _ in range(2)]
    for m in twins:
        lm_loss(m, batches[0]).backward()
    ours = gaugeopt.clip_grad_norm_(twins[0].parameters(), 0.1, norm_type=norm_type, foreach=foreach)
    theirs = torch.nn.utils.clip_grad_norm_(twins[1].parameters(), 0.1, norm_type=norm_type, foreach=foreach)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12) and theirs.item() > 0.1
    for a, b in zip(twins[0].parameters(), twins[1].parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-12, atol=0)


def test_clipping_refuses_bad_input():
    model, gauges, batches = _lm()
    model = copy.deepcopy(model)
    lm_loss(model, batches[0]).backward()
    with pytest.raises(ValueError, match="max_norm"):
        gaugeopt.clip_grad_norm_(model.parameters(), -1.0, gauges.bind(model))
    with pytest.raises(TypeError, match="GaugeSet"):
        gaugeopt.clip_grad_norm_(model.parameters(), 1.0, ["not", "gauges"])
    with pytest.raises(TypeError, match=r"norm_type is the fourth argument"):  # torch's positional norm_type
        gaugeopt.clip_grad_norm_(model.parameters(), 1.0, 2.0)
    model.head.weight.grad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        gaugeopt.clip_grad_norm_(model.parameters(), 1.0, gauges.bind(model), error_if_nonfinite=True)


# --------------------------------------------------------------------------------------------------
# The compiled step
# --------------------------------------------------------------------------------------------------


def _per_tensor_norm_clip(model):
    for p in model.parameters():
        torch.nn.utils.clip_grad_norm_([p], 0.05)


def _value_clip(model):
    torch.nn.utils.clip_grad_value_(model.parameters(), 0.02)


@pytest.mark.parametrize("held", [False, True], ids=["", "stack_parameters"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_compiled_and_eager_steps_agree_under_clipping_and_a_schedule_compiles_once(optimizer, held):
    """Ten steps with both clippings alternating and a OneCycleLR schedule of lr and betas (momentum
    for Muon): the compiled run (parameters and gradients held in stacked buffers or not) equals the
    default eager one to 1e-12, and no graph is compiled after the first step."""
    model, gauges, batches = _lm(layers=2)  # two layers: the compiled step stacks Muon's batches
    runs = {}
    for compiled in (False, True):
        m = copy.deepcopy(model)
        opt = OPTIMIZERS[optimizer](m, gauges.bind(m), compiled=compiled, stack_parameters=held and compiled)
        schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[2 * g["lr"] for g in opt.param_groups],
                                                       total_steps=10, cycle_momentum=True, base_momentum=0.85,
                                                       max_momentum=0.95)
        with contextlib.ExitStack() as later_steps:
            for t in range(10):
                if compiled and t == 1:  # the first step compiled; none after it may
                    later_steps.enter_context(torch._dynamo.config.patch(error_on_recompile=True))
                opt.zero_grad()
                lm_loss(m, batches[t % len(batches)]).backward()
                (_value_clip if t % 2 else _per_tensor_norm_clip)(m)
                opt.step()
                schedule.step()
        runs[compiled] = m
    error, where = relative_error(runs[True], runs[False])
    assert error <= 1e-12, (error, where)
    assert relative_error(runs[False], model)[0] > 1e-2


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_compiled_and_eager_steps_agree_on_gains_that_are_not_one(optimizer):
    """Norm gains away from 1 (a trained or loaded model's; DDCMuon never steps them, so at their
    initial 1 a factor applied twice would not show): four steps compiled equal the eager ones to
    1e-12. (Before 0776061 the compiled read phase formed a Muon stack's canonical gradient in place
    and the write phase multiplied it by the gains again: 6e-3 apart here.)"""
    model, gauges, batches = _lm(layers=2)
    model = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=torch.Generator().manual_seed(len(name)), dtype=p.dtype) + 0.5)
    runs = {}
    for compiled in (False, True):
        m = copy.deepcopy(model)
        _train(m, OPTIMIZERS[optimizer](m, gauges.bind(m), compiled=compiled), batches, steps=4)
        runs[compiled] = m
    error, where = relative_error(runs[True], runs[False])
    assert error <= 1e-12, (error, where)


@pytest.mark.parametrize("held", [False, True], ids=["", "stack_parameters"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_the_step_compiled_for_cuda_graphs_writes_only_static_inputs_and_equals_the_eager_one(optimizer, held,
                                                                                              monkeypatch):
    """``compiled="reduce-overhead"``: a CUDA graph is replayed at the addresses it was recorded with,
    and inductor refuses to capture a graph that writes an input it does not know to be static (its
    "mutated inputs" check, the condition read here from each graph inductor builds: on a CPU the
    graphs are compiled as for CUDA but not captured). Every input each phase writes (parameters,
    held buffers, state, step counts) is static, with parameters held in one buffer or not; and four
    steps equal the eager ones to 1e-12."""
    from torch._inductor import output_code

    graphs = []
    build = output_code.CompiledFxGraph.__init__
    signature = inspect.signature(build)

    def recorded(self, *args, **kwargs):
        build(self, *args, **kwargs)
        static = signature.bind(self, *args, **kwargs).arguments["static_input_idxs"]
        graphs.append((set(self.mutated_input_idxs), set(static)))

    monkeypatch.setattr(output_code.CompiledFxGraph, "__init__", recorded)
    model, gauges, batches = _lm(layers=2)
    runs = {}
    with torch._inductor.config.patch(fx_graph_cache=False):
        for compiled in (False, "reduce-overhead"):
            m = copy.deepcopy(model)
            _train(m, OPTIMIZERS[optimizer](m, gauges.bind(m), compiled=compiled, stack_parameters=held), batches,
                   steps=4)
            runs[compiled] = m
    assert len(graphs) >= 2 and all(mutated for mutated, _ in graphs[1:])  # the write phases write inputs
    for mutated, static in graphs:
        assert mutated <= static, sorted(mutated - static)
    error, where = relative_error(runs["reduce-overhead"], runs[False])
    assert error <= 1e-12, (error, where)


def test_the_step_compiled_for_cuda_graphs_follows_gradients_that_come_and_go():
    """``compiled="reduce-overhead"`` with ``stack_parameters=True``: a block whose gradients are
    dropped for two steps (a new layout, new held buffers), and new gradients at every step (torch's
    ``zero_grad()``, the model's at step 4), copied into the held buffers: six steps equal the eager
    ones to 1e-12."""
    model, gauges, batches = _lm(layers=2)
    runs = {}
    for compiled in (False, "reduce-overhead"):
        m = copy.deepcopy(model)
        opt = OPTIMIZERS["DDCAdam"](m, gauges.bind(m), compiled=compiled, stack_parameters=True)
        for t in range(6):
            (m if t == 4 else opt).zero_grad()
            lm_loss(m, batches[t % len(batches)]).backward()
            for name, p in m.named_parameters():
                if t in (2, 3) and name.startswith("blocks.0.ffn."):
                    p.grad = None
            opt.step()
        runs[compiled] = m
    error, where = relative_error(runs["reduce-overhead"], runs[False])
    assert error <= 1e-12, (error, where)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_the_step_compiled_with_reduce_overhead_replays_cuda_graphs_on_a_gpu(optimizer):
    """On a GPU, ``compiled="reduce-overhead"`` with ``stack_parameters=True`` captures every phase of
    the step in a CUDA graph (inductor skips none) and six steps equal the eager ones to 1e-10. (The
    gradients backward makes anew at every step are copied into the held buffers, one address each,
    before the graphs; the single-member batches' are copied in by the graph before a replay.)"""
    from torch._dynamo.utils import counters

    model, gauges, batches = _lm(layers=2)
    batches = [b.cuda() for b in batches]
    runs = {}
    for compiled in (False, "reduce-overhead"):
        m = copy.deepcopy(model).cuda()
        counters.clear()
        _train(m, OPTIMIZERS[optimizer](m, gauges.bind(m), compiled=compiled, stack_parameters=True), batches,
               steps=6)
        runs[compiled] = m
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    error, where = relative_error(runs["reduce-overhead"], runs[False])
    assert error <= 1e-10, (error, where)


def test_compiled_takes_a_bool_or_one_of_torchs_modes():
    model, gauges, _ = _lm()
    with pytest.raises(ValueError, match="reduce-overhead"):
        DDCAdam(model.parameters(), gauges, compiled="reduce_overhead")
    with pytest.raises(ValueError, match="compiled must be"):
        DDCMuon(model.parameters(), gauges, compiled=1)
    assert DDCAdam(model.parameters(), gauges, compiled="max-autotune-no-cudagraphs").compiled


def test_a_compiled_program_stacks_matrix_product_rules_across_layers_and_no_other():
    """Compiled (``build_program(stack=False)``), every tensor is a batch of its own, which inductor
    fuses per tensor, except the batches of a rule made of matrix products (Muon): those are stacked
    across layers as in the eager step, so Newton-Schulz runs once per shape, not once per layer. (The
    MLP's neuron pairs, whose frames are one batch per family when compiled, stay per layer.)"""
    from gaugeopt.optim.frames import build_frame_plan
    from gaugeopt.optim.program import build_program
    from gaugeopt.optim.rules import Adam, Muon

    model, gauges, batches = _lm(layers=2)
    model = copy.deepcopy(model)
    lm_loss(model, batches[0]).backward()
    named = dict(model.named_parameters())
    hidden = {n for n, p in named.items() if p.ndim == 2 and "embed" not in n and "head" not in n}
    groups = [{"params": [named[n] for n in sorted(hidden)]}, {"params": [p for n, p in named.items() if n not in hidden]}]
    names = {id(p): n for n, p in named.items()}
    members = {}
    for stack in (True, False):
        layout = build_program(groups, names, named, build_frame_plan(gauges.bind(model)), [Muon(), Adam()],
                               channel_step=True, edge_scale=1.0, stack=stack)
        members[stack] = {g: sorted(len(m.params) for b, m in zip(layout.program.tensors, layout.tensors)
                                    if m.group == g and b.rebalance is None) for g in (0, 1)}
    assert members[False][0] == members[True][0] == [2, 2, 4]  # Muon: q and k, v, o across layers either way
    assert set(members[False][1]) == {1} and max(members[True][1]) > 1  # Adam: per tensor when compiled


def test_every_step_program_has_a_graph_cache_of_its_own():
    """Two models (two step programs) compiled in one process with torch's recompile limit at 1: each
    program's phases are compiled from a code object of their own, so neither counts against the
    other's limit (a shared one would fail here instead of running the second model eagerly)."""
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for layers in (1, 2):
            model, gauges, batches = _lm(layers=layers)
            opt = DDCAdam(model.parameters(), gauges, lr=1e-2, compiled=True)
            _train(model, opt, batches, steps=2)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_a_nonfinite_gradient_is_refused_and_changes_nothing_compiled_or_not(bad, compiled):
    """The compiled read phase checks finiteness its own way (``isfinite(G).all()``, the eager one by
    the extremes): one bad entry in a gradient no frame reads otherwise (the token embedding) raises,
    or skips the step, and nothing changes either way."""
    model, gauges, batches = _lm()
    for policy in ("raise", "skip"):
        opt = DDCAdam(model.parameters(), gauges, lr=1e-2, compiled=compiled, nonfinite=policy)
        _train(model, opt, batches, steps=1)
        opt.zero_grad()
        lm_loss(model, batches[1]).backward()
        model.embed.weight.grad[3, 1] = bad
        before = copy.deepcopy((dict(model.named_parameters()), opt.state_dict()["state"]))
        with pytest.raises(NonFiniteGradientError, match="embed") if policy == "raise" \
                else contextlib.nullcontext():
            opt.step()
        assert opt.skipped_steps == (policy == "skip")
        after = (dict(model.named_parameters()), opt.state_dict()["state"])
        assert all(torch.equal(before[0][n], after[0][n]) for n in before[0])
        assert all(torch.equal(v, after[1][i][k]) for i, s in before[1].items() for k, v in s.items())
