"""Robustness of every gaugeopt optimizer: bad input, numerical edge cases, checkpoints.

In the style of torch's optimizer test registry (``torch.testing._internal.common_optimizers``):
each optimizer is an :class:`OptimizerInfo` record with a factory that builds it on a tiny model,
the invalid settings it must refuse, and the cases that do not apply to it (with the reason). Every
test below runs its case for every record and asserts either the error message or that nothing
(parameters, optimizer state) changed. A ``hypothesis`` fuzz test closes the module: random tiny
models, dtypes and gradient scales from 1e-30 to 1e30 never give a NaN or Inf parameter.
"""

from __future__ import annotations

import copy
import io
import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from gaugeopt.optim import DDCAdam, DDCMuon, NonFiniteGradientError, SymmetryCompatible, symmetry_param_groups
from gaugeopt.optim.guards import all_finite
from gaugeopt.optim.layerwise import MAPS, apply_map
from gaugeopt.optim.baselines import MuonWithAdamW
from optimizer_cases import HIDDEN, WIDTH, assert_untouched, backward, same, snapshot, tiny, train

# --------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimizerInfo:
    """One optimizer under test.

    ``build(model, gauges, groups=None, **settings)`` makes it on ``model`` (``groups`` replaces
    the default param groups where the optimizer takes groups); ``bad_settings`` are constructor
    keywords it must refuse with a ``ValueError`` naming the field; ``group_field`` is a group key
    checked when set in a group dict or written later; ``quiet`` are settings without weight decay
    (for the all-zero-gradient case); ``skips`` maps a case to why it does not apply.
    """

    name: str
    build: Callable[..., Any]
    default_groups: Callable[[nn.Module], list[dict]] | None
    bad_settings: tuple[tuple[dict, str], ...]
    group_field: str = "lr"
    quiet: Mapping[str, Any] = field(default_factory=dict)
    skips: Mapping[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:
        return self.name


def _all_params(model: nn.Module) -> list[dict]:
    return [{"params": list(model.parameters())}]


def _symmetry_groups(model: nn.Module) -> list[dict]:
    return symmetry_param_groups(model, verbose=False)


COMMON_BAD = (({"lr": -1.0}, "learning rate"), ({"lr": math.nan}, "learning rate"), ({"lr": math.inf}, "learning rate"),
              ({"weight_decay": -0.1}, "weight_decay"), ({"nonfinite": "ignore"}, "nonfinite"))
GROUP_CASES = "group setting, setting written later, empty param group, parameters given as groups"

OPTIMIZERS = (
    OptimizerInfo(
        "DDCAdam",
        lambda model, gauges, groups=None, **kw: DDCAdam(groups or _all_params(model), gauges,
                                                         **{"lr": 1e-2, "weight_decay": 0.1, **kw}),
        _all_params,
        COMMON_BAD + (({"betas": (0.9, 1.0)}, "betas"), ({"betas": 0.9}, "betas"), ({"eps": -1.0}, "eps"),
                      ({"eps": 0.0}, "eps"), ({"edge_scale": 0.0}, "edge_scale")),
        quiet={"weight_decay": 0.0},
    ),
    OptimizerInfo(
        "DDCMuon",
        lambda model, gauges, groups=None, **kw: DDCMuon(groups or _all_params(model), gauges,
                                                         **{"lr": 2e-2, "adam_lr": 1e-2, "weight_decay": 0.1, **kw}),
        _all_params,
        COMMON_BAD + (({"momentum": 1.0}, "momentum"), ({"adjust_lr": "spectral"}, "adjust_lr"),
                      ({"ns_steps": 2.5}, "ns_steps"), ({"ns_coefficients": (1.0, 2.0)}, "ns_coefficients"),
                      ({"ns_eps": -1.0}, "ns_eps"), ({"ns_dtype": torch.int32}, "ns_dtype"),
                      ({"adam_lr": -1.0}, "learning rate"), ({"adam_betas": (1.0, 0.9)}, "betas"),
                      ({"adam_eps": -1.0}, "eps"), ({"adam_eps": 0.0}, "eps"), ({"edge_scale": -1.0}, "edge_scale")),
        quiet={"weight_decay": 0.0},
    ),
    OptimizerInfo(
        "SymmetryCompatible",
        lambda model, gauges, groups=None, **kw: SymmetryCompatible(groups or _symmetry_groups(model), **kw),
        _symmetry_groups,
        COMMON_BAD[3:] + (({"momentum": 1.0}, "momentum"), ({"eps": -1.0}, "eps"), ({"alpha": math.nan}, "alpha"),
                          ({"adjust_lr": "spectral"}, "adjust_lr"), ({"orientation": "diagonal"}, "orientation"),
                          ({"adam_betas": (0.9, 1.5)}, "adam_betas"), ({"adam_eps": -1.0}, "adam_eps"),
                          ({"adam_eps": 0.0}, "adam_eps")),
        skips={"gauges": "takes no GaugeSet (it is configured by symmetry_param_groups)",
               "uncovered": "takes no GaugeSet (it is configured by symmetry_param_groups)",
               "coupled": "has no coupled updates: every tensor is stepped on its own"},
    ),
    OptimizerInfo(
        "MuonWithAdamW",
        lambda model, gauges, groups=None, **kw: MuonWithAdamW(model, gauges, **{"lr": 2e-2, "adam_lr": 1e-2, **kw}),
        None,
        COMMON_BAD + (({"momentum": 1.0}, "momentum"), ({"adjust_lr": "spectral"}, "adjust_lr"),
                      ({"adam_betas": (0.9, 1.0)}, "adam_betas"), ({"adam_eps": -1.0}, "adam_eps")),
        quiet={"weight_decay": 0.0},
        skips={"groups": "a baseline built from the model: it takes no param groups and torch's optimizers do not "
                         "re-check settings written later",
               "uncovered": "takes the model itself, so it cannot be given parameters the GaugeSet does not cover",
               "coupled": "has no coupled updates: every tensor is stepped on its own",
               "state_dtype": "torch.optim.Muon and AdamW keep state in the parameter's dtype",
               "float16": "torch.optim.AdamW keeps float16 state: eps=1e-8 and small squared gradients round to 0 "
                          "in float16 and its steps divide by zero (why the gaugeopt optimizers keep float32 state)",
               "state_keys": "its state is torch's, loaded by torch's optimizers",
               "sync": "not a GuardedOptimizer; its step calls the same all_finite before torch's steps"},
    ),
)


def each(case: str):
    """Parametrize over the optimizers ``case`` applies to (skipped ones say why)."""
    return pytest.mark.parametrize("info", [
        pytest.param(info, id=info.name,
                     marks=[pytest.mark.skip(reason=info.skips[case])] if case in info.skips else [])
        for info in OPTIMIZERS])


# --------------------------------------------------------------------------------------------------
# Helpers: snapshots and "nothing changed"
# --------------------------------------------------------------------------------------------------


def state_tensors(opt) -> list[tuple[str, torch.Tensor]]:
    optimizers = opt.optimizers if isinstance(opt, MuonWithAdamW) else (opt,)
    return [(key, value) for o in optimizers for state in o.state.values() for key, value in state.items()
            if isinstance(value, torch.Tensor)]


def started(info: OptimizerInfo, seed: int = 0, **kw):
    """A model, its gauges and an optimizer that has taken one step (so state is not empty)."""
    model, gauges = tiny(seed)
    opt = info.build(model, gauges, **kw)
    train(model, opt, range(1))
    return model, gauges, opt


# --------------------------------------------------------------------------------------------------
# Invalid settings
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("info, settings_, field_", [
    pytest.param(info, kw, f, id=f"{info.name}-{next(iter(kw))}={next(iter(kw.values()))!r}")
    for info in OPTIMIZERS for kw, f in info.bad_settings])
def test_invalid_setting_is_refused_at_construction_naming_the_field(info, settings_, field_):
    model, gauges = tiny()
    with pytest.raises(ValueError, match=field_):
        info.build(model, gauges, **settings_)


@each("groups")
def test_invalid_setting_in_a_param_group_names_the_group_and_field(info):
    model, gauges = tiny()
    groups = info.default_groups(model)
    groups[0][info.group_field] = -1.0
    with pytest.raises(ValueError, match=rf"param group 0.*{info.group_field}"):
        info.build(model, gauges, groups=groups)


@each("groups")
def test_setting_written_into_a_group_later_is_refused_at_the_next_step(info):
    model, gauges, opt = started(info)
    opt.param_groups[-1][info.group_field] = -1.0
    opt.zero_grad()
    backward(model, 1)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=rf"param group {len(opt.param_groups) - 1}.*{info.group_field}"):
        opt.step()
    assert_untouched(before, model, opt)


@each("groups")
def test_misspelt_group_option_is_refused(info):
    model, gauges = tiny()
    groups = info.default_groups(model)
    groups[0]["wieght_decay"] = 0.1
    with pytest.raises(ValueError, match="unknown option.*wieght_decay"):
        info.build(model, gauges, groups=groups)


# --------------------------------------------------------------------------------------------------
# Non-finite and sparse gradients
# --------------------------------------------------------------------------------------------------


def test_fused_finiteness_check_known_answers():
    big = torch.full((5,), 3e38)  # finite, but its 2-norm overflows float32: the check uses the max norm
    assert all_finite([big, torch.zeros(0), torch.ones(2, dtype=torch.bfloat16), torch.tensor(1e-45)])
    assert all_finite([torch.tensor([1e300, -1e308], dtype=torch.float64), big])  # beyond float32's range
    assert all_finite([])
    for bad in (math.nan, math.inf, -math.inf):
        assert not all_finite([torch.ones(3, dtype=torch.float64), torch.tensor([0.0, bad], dtype=torch.float16)])


@each("sync")
def test_a_step_reads_one_flag_not_one_per_parameter(info, monkeypatch):
    """Host reads of tensor values (``bool``, ``item``, ``tolist``) are device synchronisations on an
    accelerator; a whole step makes exactly one (finite gradients, no dead unit) for the ten
    gradients, and none per parameter."""
    model, gauges = tiny()
    opt = info.build(model, gauges)
    train(model, opt, range(1))  # the first step also lays out the batches
    opt.zero_grad()
    backward(model, 1)
    reads = []
    for method in ("__bool__", "item", "tolist"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method,
                            lambda self, *a, _original=original, _name=method: (reads.append(_name),
                                                                                _original(self, *a))[1])
    opt.step()
    monkeypatch.undo()
    assert reads == ["tolist"]


@each("nonfinite")
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_gradient_raises_naming_the_parameter_and_changes_nothing(info, bad):
    model, gauges, opt = started(info)
    opt.zero_grad()
    backward(model, 1)
    model.down.weight.grad[1, 2] = bad
    before = snapshot(model, opt)
    with pytest.raises(NonFiniteGradientError, match=r"down\.weight"):
        opt.step()
    assert_untouched(before, model, opt)


@each("nonfinite")
def test_nonfinite_gradient_with_skip_skips_the_whole_step_and_counts_it(info):
    model, gauges, opt = started(info, nonfinite="skip")
    opt.zero_grad()
    backward(model, 1)
    model.head.bias.grad[0] = math.nan
    before = snapshot(model, opt)
    opt.step()
    assert opt.skipped_steps == 1 and opt.last_step_skipped
    # the counter is checkpoint state; apart from it nothing changed
    assert_untouched((before[0], {**before[1], "gaugeopt": opt.state_dict()["gaugeopt"]}), model, opt)
    train(model, opt, range(2, 3))
    assert not opt.last_step_skipped and opt.skipped_steps == 1
    assert not torch.equal(model.up.weight.detach(), before[0]["up.weight"])


@each("sparse")
def test_sparse_gradient_is_refused_naming_the_parameter(info):
    model, gauges, opt = started(info)
    opt.zero_grad()
    backward(model, 1)
    model.embed.weight.grad = model.embed.weight.grad.to_sparse()
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"sparse.*embed\.weight"):
        opt.step()
    assert_untouched(before, model, opt)


# --------------------------------------------------------------------------------------------------
# GaugeSets that do not describe the parameters
# --------------------------------------------------------------------------------------------------


@each("gauges")
def test_gauges_of_another_model_are_refused(info):
    model, gauges = tiny()
    other, _ = tiny(1)
    with pytest.raises(ValueError, match="bind"):
        info.build(other, gauges)


@each("uncovered")
def test_parameters_the_gauges_do_not_cover_are_named_and_a_gauge_set_of_another_model_is_refused(info):
    """A parameter outside gauges.model is stepped without a frame and named in one warning
    (tests/test_param_groups.py checks its steps); a GaugeSet that covers none of the parameters is
    another model's and is refused."""
    model, gauges = tiny()
    extra = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.warns(UserWarning, match=r"1 parameter\(s\) are not parameters of gauges\.model.*shape \(3,\)"):
        info.build(model, gauges, groups=[{"params": [*model.parameters(), extra]}])
    with pytest.raises(ValueError, match=r"none of the parameters belongs to gauges\.model"):
        info.build(copy.deepcopy(model), gauges)


@each("uncovered")
def test_model_changed_after_gauge_discovery_is_refused(info):
    model, gauges = tiny()
    model.up, model.down = nn.Linear(WIDTH, HIDDEN + 2).double(), nn.Linear(HIDDEN + 2, WIDTH).double()
    with pytest.raises(ValueError, match=r"changed after find_gauges"):
        info.build(model, gauges)


@each("coupled")
def test_neuron_pair_partly_frozen_steps_the_rest_and_leaves_the_frozen_part_alone(info):
    """The frame of a pair reads every member; only members with gradients are written."""
    model, gauges = tiny()
    opt = info.build(model, gauges)
    model.up.bias.requires_grad_(False)
    before = snapshot(model, opt)[0]
    train(model, opt, range(3))
    assert torch.equal(model.up.bias.detach(), before["up.bias"])
    assert not torch.equal(model.up.weight.detach(), before["up.weight"])
    assert_finite(model, opt)


# --------------------------------------------------------------------------------------------------
# Checkpoints from another optimizer or model
# --------------------------------------------------------------------------------------------------


def _other_state_dicts(info: OptimizerInfo, model: nn.Module, gauges) -> dict[str, dict]:
    """State dicts this optimizer must refuse: torch's AdamW and every other registry optimizer on the
    same model, and the same optimizer on a model of another width."""
    out = {}
    adamw = torch.optim.AdamW(model.parameters())
    out["torch AdamW"] = adamw.state_dict()
    for other in OPTIMIZERS:
        if other is not info:
            out[other.name] = other.build(model, gauges).state_dict()
    wider, wider_gauges = tiny(hidden=HIDDEN + 1)
    wide = info.build(wider, wider_gauges)
    train(wider, wide, range(1))
    out["wider model"] = wide.state_dict()
    return out


@each("load")
def test_state_dict_of_another_optimizer_or_model_is_refused_before_anything_changes(info):
    model, gauges, opt = started(info)
    sources = _other_state_dicts(info, *tiny(5))
    before = snapshot(model, opt)
    for source, state_dict in sources.items():
        expected = "another model" if source == "wider model" else "written by"
        with pytest.raises(ValueError, match=expected):
            opt.load_state_dict(state_dict)
        assert_untouched(before, model, opt)


@each("load")
def test_state_dict_without_its_gaugeopt_entry_is_recognised_by_its_groups(info):
    """torch.distributed.checkpoint's get/set_state_dict keep only "state" and "param_groups": the
    optimizer's own such dict loads, every other one (another optimizer, another width) is refused."""
    model, gauges, opt = started(info)
    if not isinstance(opt, torch.optim.Optimizer):
        pytest.skip("not a torch.optim.Optimizer: torch.distributed.checkpoint does not handle its state dict")
    before = snapshot(model, opt)

    def stripped(state_dict: dict) -> dict:
        return {k: v for k, v in state_dict.items() if k != "gaugeopt"}

    for source, state_dict in _other_state_dicts(info, *tiny(5)).items():
        with pytest.raises(ValueError, match="written by|state .* has shape|has keys"):
            opt.load_state_dict(stripped(state_dict))
        assert_untouched(before, model, opt)
    opt.load_state_dict(stripped(before[1]))
    assert_untouched(before, model, opt)  # loading its own state changes nothing


@each("state_keys")
def test_state_dict_with_foreign_state_or_bad_settings_is_refused(info):
    model, gauges, opt = started(info)
    before = snapshot(model, opt)
    tampered = copy.deepcopy(before[1])
    entry = next(iter(tampered["state"].values()))
    entry["max_exp_avg_sq"] = torch.zeros(1)
    with pytest.raises(ValueError, match="max_exp_avg_sq"):
        opt.load_state_dict(tampered)
    tampered = copy.deepcopy(before[1])
    tampered["param_groups"][0][info.group_field] = -1.0
    with pytest.raises(ValueError, match=info.group_field):
        opt.load_state_dict(tampered)
    assert_untouched(before, model, opt)


# --------------------------------------------------------------------------------------------------
# Numerical edge cases
# --------------------------------------------------------------------------------------------------


def _train_quietly(model, opt, steps) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # DDC optimizers report frozen channels / units
        train(model, opt, steps)


def assert_finite(model: nn.Module, opt) -> None:
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    for key, value in state_tensors(opt):
        assert torch.isfinite(value).all(), key


@each("zero_gains")
def test_zero_norm_gains_give_finite_steps(info):
    model, gauges = tiny()
    with torch.no_grad():
        model.norm1.weight.zero_()
        model.norm2.weight[2] = 0.0
    opt = info.build(model, gauges)
    _train_quietly(model, opt, range(4))
    assert_finite(model, opt)
    if isinstance(opt, DDCAdam):
        assert set(opt.frozen["norm_scale:norm1"]) == set(range(WIDTH)) and opt.frozen["norm_scale:norm2"] == (2,)


@each("dead_units")
def test_dead_units_give_finite_steps(info):
    model, gauges = tiny()
    with torch.no_grad():
        for unit in (0, 3):
            model.up.weight[unit] = 0.0
            model.up.bias[unit] = 0.0
            model.down.weight[:, unit] = 0.0
    opt = info.build(model, gauges)
    _train_quietly(model, opt, range(4))
    assert_finite(model, opt)
    if isinstance(opt, DDCAdam):
        assert opt.frozen["neuron_scale:up"] == (0, 3)
        assert not model.down.weight[:, [0, 3]].any()


@each("zero_grads")
def test_all_zero_gradients_leave_parameters_in_place(info):
    model, gauges = tiny()
    opt = info.build(model, gauges, **info.quiet)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    assert_finite(model, opt)
    for name, p in model.named_parameters():
        assert (p - before[name]).abs().max() <= 1e-12 * before[name].abs().max(), name


@each("frozen")
def test_frozen_parameters_and_parameters_without_gradient_are_left_alone(info):
    model, gauges = tiny()
    model.embed.weight.requires_grad_(False)  # frozen: no gradient ever
    opt = info.build(model, gauges)
    before = snapshot(model, opt)[0]
    for t in range(3):
        opt.zero_grad()
        backward(model, t)
        model.head.bias.grad = None  # this step's loss did not reach it
        opt.step()
    for name in ("embed.weight", "head.bias"):
        assert torch.equal(dict(model.named_parameters())[name], before[name]), name
    assert not torch.equal(model.up.weight, before["up.weight"])
    optimizers = opt.optimizers if isinstance(opt, MuonWithAdamW) else (opt,)
    assert not any(o.state.get(p) for o in optimizers for p in (model.embed.weight, model.head.bias))


@each("low_precision")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_parameters_train_with_float32_state(info, dtype):
    if dtype == torch.float16 and "float16" in info.skips:
        pytest.skip(info.skips["float16"])
    model, gauges = tiny(dtype=dtype)
    opt = info.build(model, gauges)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train_quietly(model, opt, range(3))
    assert all(p.dtype == dtype for p in model.parameters())
    assert_finite(model, opt)
    assert not torch.equal(model.up.weight, before["up.weight"])
    if "state_dtype" not in info.skips:
        floating = [(k, v.dtype) for k, v in state_tensors(opt) if v.is_floating_point() and k != "step"]
        assert floating and all(d == torch.float32 for _, d in floating), floating
        restored = info.build(model, gauges)
        restored.load_state_dict(opt.state_dict())  # torch alone would cast the state to the parameters' dtype
        assert same(restored.state_dict()["state"], opt.state_dict()["state"])


@each("groups")
def test_empty_param_group_is_harmless(info):
    model, gauges = tiny()
    empty = {"params": [], "rule": "adamw", "param_names": []} if info.name == "SymmetryCompatible" else {"params": []}
    groups = info.default_groups(model) + [empty]
    opt = info.build(model, gauges, groups=groups)
    train(model, opt, range(2))
    twin = info.build(model, gauges, groups=groups)
    twin.load_state_dict(opt.state_dict())
    assert same(twin.state_dict(), opt.state_dict())


# --------------------------------------------------------------------------------------------------
# Resume determinism
# --------------------------------------------------------------------------------------------------


@each("resume")
def test_resume_from_a_saved_checkpoint_is_bit_identical(info):
    k, total = 3, 7
    model, gauges = tiny()
    opt = info.build(model, gauges)
    train(model, opt, range(k))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    train(model, opt, range(k, total))  # the uninterrupted run

    buffer.seek(0)
    checkpoint = torch.load(buffer)  # weights_only: the state dicts hold tensors, numbers and strings
    fresh, fresh_gauges = tiny(seed=99)
    fresh.load_state_dict(checkpoint["model"])
    resumed = info.build(fresh, fresh_gauges)
    resumed.load_state_dict(checkpoint["optimizer"])
    train(fresh, resumed, range(k, total))
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name
    assert same(opt.state_dict(), resumed.state_dict())


# --------------------------------------------------------------------------------------------------
# Fuzz: finite inputs never give NaN or Inf parameters
# --------------------------------------------------------------------------------------------------


#: Examples per run; GAUGEOPT_FUZZ_EXAMPLES=2000 runs a longer search.
FUZZ_EXAMPLES = int(os.environ.get("GAUGEOPT_FUZZ_EXAMPLES", "40"))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    info=st.sampled_from(OPTIMIZERS),
    width=st.integers(2, 6),
    hidden=st.integers(1, 6),
    norm=st.sampled_from(["layernorm", "rmsnorm", "none"]),
    bias=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
    log_scale=st.floats(-30, 30),
    seed=st.integers(0, 2**16),
)
def test_fuzz_finite_gradients_never_give_nonfinite_parameters(info, width, hidden, norm, bias, dtype, log_scale,
                                                               seed):
    assume(not (dtype == torch.float16 and "float16" in info.skips))
    model, gauges = tiny(seed, width=width, hidden=hidden, norm=norm, bias=bias, dtype=dtype)
    opt = info.build(model, gauges)
    g = torch.Generator().manual_seed(seed)
    largest = torch.finfo(dtype).max / 4  # gradients stay finite in the parameters' dtype
    for _ in range(3):
        for p in model.parameters():
            grad = torch.randn(p.shape, generator=g, dtype=torch.float64) * 10.0**log_scale
            p.grad = grad.clamp(-largest, largest).to(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step()
        for name, p in model.named_parameters():
            assert torch.isfinite(p).all(), f"{name} not finite ({info.name}, {dtype}, scale 1e{log_scale:.0f})"


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True)
@given(
    map_name=st.sampled_from(list(MAPS)),
    rows=st.integers(1, 9),
    cols=st.integers(1, 9),
    rank=st.integers(0, 3),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    log_scale=st.floats(-30, 30),
    eps=st.sampled_from([0.0, 1e-8]),
    seed=st.integers(0, 2**16),
)
def test_fuzz_update_maps_are_finite_on_rank_deficient_and_extreme_momenta(map_name, rows, cols, rank, dtype,
                                                                           log_scale, eps, seed):
    """The layerwise maps on momenta of any rank (0 included) and scale: a rank-deficient Gram matrix
    must not look indefinite after rounding, nor overflow (``damped_polar``'s scaling and floor)."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(rows, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, cols, generator=g,
                                                                                 dtype=torch.float64)
    M = (M * 10.0**log_scale).to(dtype)
    update = apply_map(map_name, M, eps=eps) if map_name != "muon" else apply_map(map_name, M)
    assert torch.isfinite(update).all()
