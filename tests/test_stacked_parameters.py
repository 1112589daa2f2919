"""``stack_parameters=True``: the parameters a step computes on as a stack live in one buffer per batch.

* The step is the same, bit for bit: parameters, optimizer state and the frozen-unit report equal
  those of the default optimizer over several steps, with a dead unit (zero incoming side) and a zero
  outgoing side in the model, for DDCAdam and DDCMuon; and the isolated pairs' members then lie one
  after another in one buffer.
* It is checked, not assumed: a member whose memory was replaced after the first step (``p.data =``)
  is stacked as a copy again, and the steps still equal the default optimizer's.
* A model whose parameters share buffers saves and loads as any other (``torch.save`` of its
  ``state_dict``), and trains as before under ``torch.compile``; a step through the buffer marks
  every member modified for autograd, compiled or not.
* Gradients are held where that costs nothing: after torch's ``zero_grad()`` they are ``None`` and
  the eager step reads the new ones where backward put them; gradients kept from step to step
  (``zero_grad(set_to_none=False)``) are moved into one buffer, where backward then accumulates;
  the steps are the default's, bit for bit, either way.
* Compiled (``compiled=True``), the step on held buffers equals the default eager one to 1e-12 with
  frozen units, and inductor generates as many kernels for 3 layers as for 2.
"""

from __future__ import annotations

import contextlib
import copy
import io
import tempfile
from pathlib import Path

import pytest
import torch

import gaugeopt

from gaugeopt import DDCMuon
from gaugeopt.models import TransformerLM, TransformerLMConfig
from gaugeopt.optim.storage import HeldGradients, move_into_stack, owns_its_memory, stacked_view

from gaugeopt.testing import relative_error
from optimizer_cases import same, snapshot
from test_step_edges import OPTIMIZERS as _EDGE_OPTIMIZERS
from test_step_edges import VOCAB, _lm, _train, lm_loss

#: DDCAdam, DDCMuon in float64 and DDCMuon at its bfloat16 default (its direction then reaches the
#: write in bfloat16, read as it is both from a held buffer and member by member).
OPTIMIZERS = {**_EDGE_OPTIMIZERS,
              "DDCMuon bfloat16": lambda m, g, **kw: DDCMuon(m.parameters(), g, lr=0.02, weight_decay=0.1,
                                                             adam_lr=1e-2, **kw)}


def _with_edges(model):
    """Unit 0 of the first block's MLP with a zero incoming side (weights and bias), unit 1 of the
    second block's with a zero outgoing side."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.blocks[0].ffn.up.weight[0].zero_()
        model.blocks[0].ffn.up.bias[0].zero_()
        model.blocks[1].ffn.down.weight[:, 1].zero_()
    return model


def _pair_sides(model):
    return [[m.ffn.up.weight for m in model.blocks], [m.ffn.down.weight for m in model.blocks]]


def _default_and_held(model, gauges, batches, steps: int, optimizer: str = "DDCAdam", compiled: bool = False,
                      warns: str | None = None):
    """``[(model, optimizer)]`` after ``steps`` training steps on copies of ``model``: by default, and
    with ``stack_parameters=True`` (and ``compiled``). ``warns``: a RuntimeWarning each run must give."""
    runs = []
    for held in (False, True):
        m = copy.deepcopy(model)
        opt = OPTIMIZERS[optimizer](m, gauges.bind(m), stack_parameters=held, compiled=held and compiled)
        with pytest.warns(RuntimeWarning, match=warns) if warns else contextlib.nullcontext():
            _train(m, opt, batches, steps=steps)
        runs.append((m, opt))
    return runs


def _assert_same(a, b, opt_a, opt_b):
    """Parameters and optimizer state dicts equal, bit for bit."""
    assert same(snapshot(a, opt_a), snapshot(b, opt_b))


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_parameters_held_in_one_buffer_step_exactly_as_copies_do(optimizer):
    model, gauges, batches = _lm(layers=3)
    (plain, plain_opt), (held, held_opt) = _default_and_held(_with_edges(model), gauges, batches, steps=5,
                                                             optimizer=optimizer, warns="froze")
    _assert_same(plain, held, plain_opt, held_opt)
    assert held_opt.frozen_report() == plain_opt.frozen_report() and held_opt.frozen_report()
    assert all(stacked_view(side) is not None for side in _pair_sides(held))
    assert all(stacked_view(side) is None for side in _pair_sides(plain))
    gains = [block.get_parameter(f"norm{i}.weight") for block in held.blocks for i in (1, 2)] + [held.norm.weight]
    for members in [[block.get_parameter(name) for block in held.blocks]  # every batch is held (new gradients are not)
                    for name in ("attn.v_proj.weight", "attn.o_proj.weight", "ffn.up.bias")] + [gains]:
        assert stacked_view(members) is not None and stacked_view([p.grad for p in members]) is None
    assert not torch.equal(plain.blocks[1].ffn.up.weight, model.blocks[1].ffn.up.weight)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_step_through_the_buffer_marks_every_member_modified_for_autograd(compiled):
    """As a copy into each parameter would: a graph that saved a parameter before the step refuses
    to run backward after it, whichever member it saved."""
    model, gauges, batches = _lm(layers=3)
    m = copy.deepcopy(model)
    opt = OPTIMIZERS["DDCAdam"](m, gauges.bind(m), stack_parameters=True, compiled=compiled)
    _train(m, opt, batches, steps=1)
    saved = m.blocks[2].ffn.up.weight.square().sum()  # saves the last member of its buffer
    _train(m, opt, batches, steps=1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_a_member_moved_out_of_its_buffer_is_stacked_as_a_copy_again(optimizer):
    model, gauges, batches = _lm(layers=3)
    runs = []
    for stacked in (False, True):
        m = copy.deepcopy(model)
        opt = OPTIMIZERS[optimizer](m, gauges.bind(m), stack_parameters=stacked)
        _train(m, opt, batches, steps=2)
        weight = m.blocks[1].ffn.up.weight
        weight.data = weight.data.clone()  # the same values in memory of its own
        _train(m, opt, batches, steps=3)
        runs.append((m, opt))
    (plain, plain_opt), (held, held_opt) = runs
    assert stacked_view(_pair_sides(held)[0]) is None and stacked_view(_pair_sides(held)[1]) is not None
    _assert_same(plain, held, plain_opt, held_opt)


def test_parameters_that_are_views_of_memory_held_elsewhere_are_not_moved():
    """A parameter whose memory is a slice of someone else's buffer (FSDP1's flat parameters, a
    user's own) keeps it: moving it would detach it from that buffer. Its batch is stacked as a copy,
    and the steps are the default optimizer's."""
    model, gauges, batches = _lm(layers=3)
    runs = []
    for stacked in (False, True):
        m = copy.deepcopy(model)
        ups = _pair_sides(m)[0]
        flat = torch.cat([p.detach().reshape(-1) for p in reversed(ups)])
        offset = 0
        for p in reversed(ups):  # the user's own flat buffer, the layers in reverse order
            p.data = flat[offset:offset + p.numel()].view(p.shape)
            offset += p.numel()
        opt = OPTIMIZERS["DDCAdam"](m, gauges.bind(m), stack_parameters=stacked)
        _train(m, opt, batches, steps=3)
        assert all(p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() for p in ups)
        runs.append((m, opt))
    (plain, plain_opt), (held, held_opt) = runs
    assert stacked_view(_pair_sides(held)[1]) is not None  # the down projections own theirs: moved
    _assert_same(plain, held, plain_opt, held_opt)


def test_a_model_with_stacked_parameters_saves_and_loads_as_any_other():
    model, gauges, batches = _lm(layers=3)
    m = copy.deepcopy(model)
    opt = OPTIMIZERS["DDCAdam"](m, gauges.bind(m), stack_parameters=True)
    _train(m, opt, batches, steps=2)
    saved = io.BytesIO()
    torch.save(m.state_dict(), saved)
    saved.seek(0)
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(torch.load(saved))
    for p, q in zip(m.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    # loading into the stacked model writes through its views: the buffer stays whole
    m.load_state_dict(model.state_dict())
    assert stacked_view(_pair_sides(m)[0]) is not None
    assert torch.equal(m.blocks[2].ffn.up.weight, model.blocks[2].ffn.up.weight)


def test_released_parameters_save_whole_with_accelerate_and_are_held_again_at_the_next_step():
    """Accelerate's ``save_model`` keeps one tensor per shared memory (it would drop all but one member
    of every buffer): after ``release_parameters()`` every parameter has memory of its own and the file
    holds them all; the next step holds them in buffers again, and the steps are the default's."""
    accelerate = pytest.importorskip("accelerate")
    from safetensors.torch import load_file

    model, gauges, batches = _lm(layers=3)
    (plain, plain_opt), (held, held_opt) = _default_and_held(model, gauges, batches, steps=2)
    held_opt.release_parameters()
    assert all(stacked_view(side) is None for side in _pair_sides(held))
    try:
        with tempfile.TemporaryDirectory() as folder:
            accelerate.Accelerator(cpu=True).save_model(held, folder)
            saved = load_file(Path(folder) / "model.safetensors")
    finally:
        accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    expected = held.state_dict()
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], v) for k, v in expected.items())
    for m, opt in ((plain, plain_opt), (held, held_opt)):
        for t in range(2, 4):
            opt.zero_grad()
            lm_loss(m, batches[t % len(batches)]).backward()
            opt.step()
    assert all(stacked_view(side) is not None for side in _pair_sides(held))
    _assert_same(plain, held, plain_opt, held_opt)


def test_with_accelerate_loaded_the_first_move_says_what_to_call_before_its_save_model(monkeypatch):
    """Once per optimizer, when it first moves parameters into buffers and Accelerate is loaded (whose
    ``save_model`` would drop them): a RuntimeWarning naming ``release_parameters``; none without it."""
    import sys
    import types
    import warnings

    model, gauges, batches = _lm(layers=3)
    monkeypatch.delitem(sys.modules, "accelerate", raising=False)
    quiet = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(quiet, OPTIMIZERS["DDCAdam"](quiet, gauges.bind(quiet), stack_parameters=True), batches, steps=2)
    monkeypatch.setitem(sys.modules, "accelerate", types.ModuleType("accelerate"))
    loud = copy.deepcopy(model)
    opt = OPTIMIZERS["DDCAdam"](loud, gauges.bind(loud), stack_parameters=True)
    with pytest.warns(RuntimeWarning, match="release_parameters") as caught:
        _train(loud, opt, batches, steps=1)
    said = [w for w in caught if "release_parameters" in str(w.message)]
    assert len(said) == 1 and said[0].filename.endswith("test_step_edges.py")  # where _train calls step()
    opt.release_parameters()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(loud, opt, batches, steps=2)  # held again, without a second warning


def test_stacked_view_is_a_view_only_of_members_laid_out_in_order():
    params = [torch.nn.Parameter(torch.randn(3, 4)) for _ in range(3)]
    assert stacked_view(params) is None
    buffer = move_into_stack(params)
    view = stacked_view(params)
    assert view is not None and view.shape == (3, 3, 4) and torch.equal(view, buffer)
    with torch.no_grad():
        view[1].mul_(2)  # writes the member
    assert torch.equal(params[1], buffer[1]) and params[1].data_ptr() == buffer[1].data_ptr()
    assert stacked_view(params[::-1]) is None and stacked_view([params[0], params[2]]) is None
    assert all(p.grad is None and p.requires_grad and isinstance(p, torch.nn.Parameter) for p in params)


def test_a_compiled_model_trains_on_parameters_held_in_one_buffer():
    """``torch.compile(model)`` over parameters that share a buffer (views of one base, inputs of the
    compiled graph): the same training, bit for bit, as the default optimizer's on the same compiled
    model."""
    model, gauges, batches = _lm(layers=3)
    runs = []
    for stacked in (False, True):
        m = copy.deepcopy(model)
        opt = OPTIMIZERS["DDCAdam"](m, gauges.bind(m), stack_parameters=stacked)
        _train(torch.compile(m), opt, batches, steps=3)
        runs.append((m, opt))
    (plain, plain_opt), (held, held_opt) = runs
    assert stacked_view(_pair_sides(held)[0]) is not None
    _assert_same(plain, held, plain_opt, held_opt)


@pytest.mark.parametrize("optimizer", ["DDCAdam", "DDCMuon bfloat16"])
def test_resuming_with_stacked_parameters_is_exact(optimizer):
    """Interrupted after 2 steps (the model's and the optimizer's state dicts through ``torch.save``),
    loaded into a fresh model and optimizer (which hold the parameters in buffers again at their first
    step) and continued for 3: bit for bit the uninterrupted 5 steps."""
    model, gauges, batches = _lm(layers=3)
    straight = copy.deepcopy(model)
    straight_opt = OPTIMIZERS[optimizer](straight, gauges.bind(straight), stack_parameters=True)
    _train(straight, straight_opt, batches, steps=5)

    first = copy.deepcopy(model)
    first_opt = OPTIMIZERS[optimizer](first, gauges.bind(first), stack_parameters=True)
    _train(first, first_opt, batches, steps=2)
    saved = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_opt.state_dict()}, saved)
    saved.seek(0)
    checkpoint = torch.load(saved)
    resumed = copy.deepcopy(model)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = OPTIMIZERS[optimizer](resumed, gauges.bind(resumed), stack_parameters=True)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    for t in range(2, 5):  # the same batches as steps 2-4 of the straight run
        resumed_opt.zero_grad()
        lm_loss(resumed, batches[t % len(batches)]).backward()
        resumed_opt.step()
    _assert_same(straight, resumed, straight_opt, resumed_opt)


def test_after_torchs_zero_grad_the_eager_step_reads_gradients_where_backward_put_them():
    model, gauges, batches = _lm(layers=3)
    (plain, plain_opt), (held, held_opt) = _default_and_held(model, gauges, batches, steps=2)
    ups = _pair_sides(held)[0]
    held_opt.zero_grad()
    assert all(p.grad is None for p in held.parameters())
    lm_loss(held, batches[0]).backward()
    new = [p.grad for p in ups]
    held_opt.step()
    assert all(p.grad is g for p, g in zip(ups, new)) and stacked_view(new) is None
    plain_opt.zero_grad()
    lm_loss(plain, batches[0]).backward()
    plain_opt.step()
    _assert_same(plain, held, plain_opt, held_opt)


@pytest.mark.parametrize("optimizer", ["DDCAdam", "DDCMuon"])
def test_gradients_kept_from_step_to_step_are_moved_into_one_buffer_and_accumulated_there(optimizer):
    """With ``zero_grad(set_to_none=False)`` the second step finds the gradients it saw at the first
    and moves them into one buffer per batch; backward then adds into it (two backward passes per
    step here, so the buffer holds their sum), and the steps equal the default optimizer's."""
    model, gauges, batches = _lm(layers=3)
    runs = []
    for stacked in (False, True):
        m = copy.deepcopy(model)
        opt = OPTIMIZERS[optimizer](m, gauges.bind(m), stack_parameters=stacked)
        buffers = []
        for t in range(4):
            opt.zero_grad(set_to_none=False)
            for batch in (batches[t % len(batches)], batches[(t + 1) % len(batches)]):
                lm_loss(m, batch).backward()
            opt.step()
            buffers.append(stacked_view([p.grad for p in _pair_sides(m)[0]]))
        runs.append((m, opt))
    assert buffers[0] is None and all(b is not None for b in buffers[1:])  # (the held run's)
    assert len({b.data_ptr() for b in buffers[1:]}) == 1
    (plain, plain_opt), (held, held_opt) = runs
    _assert_same(plain, held, plain_opt, held_opt)


@pytest.mark.parametrize("optimizer", ["DDCAdam", "DDCMuon"])
def test_gradients_that_come_new_are_copied_in_for_the_compiled_step(optimizer):
    """Compiled, every batch is one input of the step's graphs: new gradients (torch's ``zero_grad()``,
    then backward) are copied into one buffer at each step, and the steps equal the eager default's."""
    model, gauges, batches = _lm(layers=3)
    (eager, eager_opt), (compiled, compiled_opt) = _default_and_held(model, gauges, batches, steps=3,
                                                                     optimizer=optimizer, compiled=True)
    assert stacked_view([p.grad for p in _pair_sides(compiled)[0]]) is not None
    error, where = relative_error(compiled, eager)
    assert error <= 1e-12, (error, where)


def test_held_gradients_are_copied_only_when_asked_and_kept_at_one_address_when_asked():
    """:class:`HeldGradients` on three parameters held in one buffer: new gradients stay where they
    are unless ``copy``; ``keep`` copies each step's new gradients into the same buffer; gradients
    that persist are moved once, then left in place."""
    params = [torch.nn.Parameter(torch.randn(2, 3)) for _ in range(3)]
    move_into_stack(params)

    def new_gradients():
        for p in params:
            p.grad = torch.randn(2, 3)
        return [p.grad.clone() for p in params]

    held = HeldGradients([params])
    new_gradients()
    held.hold(copy=False)
    assert stacked_view([p.grad for p in params]) is None
    addresses = []
    for _ in range(3):
        values = new_gradients()
        held.hold(copy=True, keep=True)
        view = stacked_view([p.grad for p in params])
        assert view is not None and all(torch.equal(p.grad, v) for p, v in zip(params, values))
        addresses.append(view.data_ptr())
    assert len(set(addresses)) == 1
    persisting = HeldGradients([params])
    new_gradients()
    persisting.hold(copy=False)
    assert stacked_view([p.grad for p in params]) is None
    for p in params:  # zero_grad(set_to_none=False), then backward adds into the same tensors
        p.grad.zero_().add_(1.0)
    persisting.hold(copy=False)
    view = stacked_view([p.grad for p in params])
    assert view is not None and torch.equal(view, torch.ones(3, 2, 3))
    persisting.hold(copy=False)
    assert stacked_view([p.grad for p in params]).data_ptr() == view.data_ptr()
    params[1].grad = None  # a member without a gradient: nothing is held, nothing fails
    persisting.hold(copy=True, keep=True)
    assert params[1].grad is None


def test_gradients_that_something_else_puts_back_at_every_step_are_moved_once():
    """As DDP's ``gradient_as_bucket_view`` does, the same tensors of someone else's buffer are put
    back as the gradients before every step: they persist, so the eager step moves them into a buffer
    once, and then leaves them where they are put (not a copy every other step)."""
    params = [torch.nn.Parameter(torch.randn(2, 3)) for _ in range(3)]
    move_into_stack(params)
    rows = list(torch.randn(3, 2, 3).unbind(0))[::-1]  # in another order: not a stack of these members
    held = HeldGradients([params])
    moved = []
    for _ in range(5):
        for p, row in zip(params, rows):
            p.grad = row
        held.hold(copy=False)
        moved.append(not all(p.grad is row for p, row in zip(params, rows)))
    assert moved == [False, True, False, False, False]


@pytest.mark.parametrize("optimizer", ["DDCAdam", "DDCMuon"])
def test_the_compiled_step_on_held_buffers_equals_the_eager_default(optimizer):
    model, gauges, batches = _lm(layers=3)
    model = _with_edges(model)
    (eager, eager_opt), (compiled, compiled_opt) = _default_and_held(model, gauges, batches, steps=5,
                                                                     optimizer=optimizer, compiled=True, warns="froze")
    error, where = relative_error(compiled, eager)
    assert error <= 1e-12, (error, where)
    assert compiled_opt.frozen_report() == eager_opt.frozen_report()
    assert torch.equal(compiled.blocks[0].ffn.up.weight[0], model.blocks[0].ffn.up.weight[0])  # frozen unit


def test_the_compiled_step_on_held_buffers_generates_as_many_kernels_for_any_depth():
    """Every batch one stacked tensor per graph input: inductor's generated kernels (CPU loop nests,
    a GPU's launches) do not grow with the layers (the default compiled step's do: a loop per tensor)."""
    from torch._inductor import config, metrics

    kernels = {}
    with config.patch(fx_graph_cache=False):
        for layers in (2, 3):  # a width no other test compiles (equal programs share their graphs)
            torch.manual_seed(0)
            model = TransformerLM(TransformerLMConfig(vocab_size=VOCAB, d_model=20, n_layers=layers, n_heads=2,
                                                      d_ff=28, max_seq_len=8)).double()
            batches = list(torch.randint(0, VOCAB, (2, 3, 8), generator=torch.Generator().manual_seed(1)))
            gauges = gaugeopt.find_gauges(model, batches[0][:1], output="logits")
            opt = OPTIMIZERS["DDCAdam"](model, gauges, stack_parameters=True, compiled=True)
            metrics.reset()
            _train(model, opt, batches, steps=1)
            kernels[layers] = metrics.generated_kernel_count
    assert kernels[2] == kernels[3] > 0, kernels


def test_low_precision_parameters_stay_where_they_are():
    """bfloat16 parameters are stepped on float32 stacks (copies) anyway: none is moved into a buffer,
    and the steps are the default's, bit for bit."""
    model, gauges, batches = _lm(layers=3)
    (plain, plain_opt), (held, held_opt) = _default_and_held(copy.deepcopy(model).to(torch.bfloat16), gauges,
                                                             batches, steps=3)
    assert all(owns_its_memory(p) for p in held.parameters())
    _assert_same(plain, held, plain_opt, held_opt)


@pytest.mark.parametrize("optimizer", ["DDCAdam", "DDCMuon"])
def test_a_layer_that_comes_and_goes_without_gradients_steps_as_the_default(optimizer):
    """The middle block gets no gradients on every other step (its batch members change, so the
    step is laid out again and the others are held in a new buffer): the same steps as the default
    optimizer's, bit for bit, and the block does not move on the steps it has no gradient."""
    model, gauges, batches = _lm(layers=3)
    runs = []
    for stacked in (False, True):
        m = copy.deepcopy(model)
        opt = OPTIMIZERS[optimizer](m, gauges.bind(m), stack_parameters=stacked)
        for t in range(6):
            opt.zero_grad(set_to_none=True)
            lm_loss(m, batches[t % len(batches)]).backward()
            if t % 2:
                for p in m.blocks[1].parameters():
                    p.grad = None
                before = [p.detach().clone() for p in m.blocks[1].parameters()]
            opt.step()
            if t % 2:
                assert all(torch.equal(a, p) for a, p in zip(before, m.blocks[1].parameters()))
        runs.append((m, opt))
    (plain, plain_opt), (held, held_opt) = runs
    _assert_same(plain, held, plain_opt, held_opt)
