"""Nothing lost, nothing half-written: what the gaugeopt optimizers refuse, and that a refusal changes nothing.

``load_state_dict`` checks a whole checkpoint before it changes anything; a parameter given twice is
refused; ``add_param_group`` applies the constructor's checks; a step that raises has moved nothing.
Each case asserts the error (its message is the one ``docs/robustness.md`` lists) and that the
parameters, the state and the param groups are exactly as before. A ``hypothesis`` property closes
the module: any mutation of a valid state dict either loads to the state it describes (and the
next step runs) or is refused with nothing changed.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import gaugeopt
from gaugeopt.optim import DDCAdam, DDCMuon, SymmetryCompatible, symmetry_param_groups
from gaugeopt.optim.guards import SECOND_MOMENTS, compute_dtype
from optimizer_cases import VOCAB, assert_untouched, backward, same, snapshot, tiny, train


@dataclass(frozen=True)
class Case:
    """A gaugeopt optimizer: ``build(model, gauges, groups=None, **settings)``."""

    name: str
    build: Callable[..., Any]

    def __repr__(self) -> str:
        return self.name


CASES = (
    Case("DDCAdam", lambda model, gauges, groups=None, **kw: DDCAdam(groups or model.parameters(), gauges,
                                                                      **{"lr": 1e-2, "weight_decay": 0.1, **kw})),
    Case("DDCMuon", lambda model, gauges, groups=None, **kw: DDCMuon(groups or model.parameters(), gauges,
                                                                      **{"lr": 2e-2, "adam_lr": 1e-2, **kw})),
    Case("SymmetryCompatible", lambda model, gauges, groups=None, **kw: SymmetryCompatible(
        groups or symmetry_param_groups(model, verbose=False), **kw)),
)
each = pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)


def started(case: Case, steps: int = 3, **settings):
    model, gauges = tiny(0)
    opt = case.build(model, gauges, **settings)
    train(model, opt, range(steps))
    return model, gauges, opt


def assert_refused(model, opt, state_dict, pattern: str) -> None:
    """``load_state_dict(state_dict)`` raises a ``ValueError`` matching ``pattern`` and changes nothing:
    parameters, state, and the param groups (the same dict objects, with the same values)."""
    before, groups = snapshot(model, opt), [(g, dict(g)) for g in opt.param_groups]
    with pytest.raises(ValueError, match=pattern):
        opt.load_state_dict(state_dict)
    assert_untouched(before, model, opt)
    assert [(g, dict(g)) for g in opt.param_groups] == groups


def state_entries(state_dict) -> list[tuple[int, str]]:
    """(parameter id, key) of every state entry of a state dict."""
    return [(index, key) for index, entry in state_dict["state"].items() for key in entry]


# --------------------------------------------------------------------------------------------------
# Truncated or corrupted state
# --------------------------------------------------------------------------------------------------


@each
def test_a_checkpoint_missing_any_one_state_entry_is_refused(case):
    """A truncated checkpoint (one exp_avg_sq missing) used to load and make the next step 3-18x too
    large: every entry of each kind of state a parameter holds must be there (a parameter without
    any entry is one that was not stepped, as in torch)."""
    model, _, opt = started(case)
    saved = opt.state_dict()
    for index, key in state_entries(saved):
        if len(saved["state"][index]) == 1:
            continue  # no entry at all: a parameter that was not stepped yet, as in torch
        truncated = copy.deepcopy(saved)
        del truncated["state"][index][key]
        assert_refused(model, opt, truncated, rf"but lacks \['{key}'\]: a truncated or edited checkpoint")


@each
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_state_is_refused(case, bad):
    model, _, opt = started(case)
    saved = opt.state_dict()
    for index, key in state_entries(saved):
        if key == "step":
            continue
        corrupted = copy.deepcopy(saved)
        corrupted["state"][index][key].view(-1)[0] = bad
        assert_refused(model, opt, corrupted, rf"state '{key}' of .* holds NaN or Inf")


@each
def test_a_negative_second_moment_is_refused(case):
    model, _, opt = started(case)
    saved = opt.state_dict()
    entries = [(index, key) for index, key in state_entries(saved) if key in SECOND_MOMENTS]
    assert entries
    for index, key in entries:
        corrupted = copy.deepcopy(saved)
        corrupted["state"][index][key].view(-1)[0] = -1e-3
        assert_refused(model, opt, corrupted, rf"state '{key}' of .* \(a second moment\) holds negative entries")


@each
def test_state_of_the_wrong_shape_or_dtype_is_refused(case):
    model, _, opt = started(case)
    saved = opt.state_dict()
    index, key = next((i, k) for i, k in state_entries(saved) if k != "step")
    for bad, pattern in ((torch.zeros(3, dtype=torch.float64), "has shape"),
                         (saved["state"][index][key].to(torch.int64), "must be floating point"),
                         (saved["state"][index][key].tolist(), "must be a tensor")):
        corrupted = copy.deepcopy(saved)
        corrupted["state"][index][key] = bad
        assert_refused(model, opt, corrupted, rf"state '{key}' of .*{pattern}")


def test_a_checkpoint_of_the_previous_frame_with_unit_scale_state_is_refused():
    """The unit-scale step of the balanced frame (before the section frame) kept ``unit_exp_avg`` and
    ``unit_exp_avg_sq`` per unit; such a checkpoint is refused, naming them, before anything changes."""
    model, _, opt = started(CASES[0])
    saved = opt.state_dict()
    index = next(i for i, k in state_entries(saved) if k == "exp_avg" and saved["state"][i][k].dim() == 2)
    old = copy.deepcopy(saved)
    units = old["state"][index]["exp_avg"].shape[0]
    old["state"][index].update(unit_exp_avg=torch.zeros(units, dtype=torch.float64),
                               unit_exp_avg_sq=torch.zeros(units, dtype=torch.float64))
    assert_refused(model, opt, old, r"unit_exp_avg")


@each
@pytest.mark.parametrize("step", ["3", -1, 2.5, math.nan, True, None, torch.tensor([1.0, 2.0])],
                         ids=["string", "negative", "fraction", "nan", "bool", "none", "two-element"])
def test_a_step_count_that_is_not_a_whole_number_is_refused(case, step):
    """A string used to load and make the next step raise AttributeError."""
    model, _, opt = started(case)
    corrupted = copy.deepcopy(opt.state_dict())
    index = next(i for i, k in state_entries(corrupted) if k == "step")
    corrupted["state"][index]["step"] = step
    assert_refused(model, opt, corrupted, r"the step count of .* must be a whole number >= 0")


@each
@pytest.mark.parametrize("step", [3, 3.0, torch.tensor(3), torch.tensor([3.0], dtype=torch.float64)],
                         ids=["int", "float", "int64 tensor", "one-element float64"])
def test_a_step_count_given_as_any_whole_number_loads_as_a_float32_tensor(case, step):
    model, _, opt = started(case)
    saved = copy.deepcopy(opt.state_dict())
    for entry in saved["state"].values():
        if "step" in entry:
            entry["step"] = step
    opt.load_state_dict(saved)
    counts = [entry["step"] for entry in opt.state.values() if "step" in entry]
    assert counts and all(c.dtype == torch.float32 and c.shape == () and c.item() == 3 for c in counts)
    train(model, opt, range(3, 4))


@each
@pytest.mark.parametrize("skipped", ["x", -1, 1.5, True, [1]])
def test_a_malformed_skipped_steps_is_refused(case, skipped):
    """It used to raise after the state was already replaced."""
    model, _, opt = started(case)
    corrupted = copy.deepcopy(opt.state_dict())
    corrupted["gaugeopt"]["skipped_steps"] = skipped
    assert_refused(model, opt, corrupted, "skipped_steps must be a whole number >= 0")


@each
def test_state_under_an_id_that_no_group_lists_and_ids_listed_twice_are_refused(case):
    model, _, opt = started(case)
    saved = opt.state_dict()
    stray = copy.deepcopy(saved)
    stray["state"][999] = stray["state"].pop(next(iter(stray["state"])))
    assert_refused(model, opt, stray, r"holds state under \[999\], which no param group lists")
    twice = copy.deepcopy(saved)
    ids = twice["param_groups"][-1]["params"]
    if len(ids) > 1:
        ids[1] = ids[0]
        assert_refused(model, opt, twice, "lists the parameter id .* twice")


# --------------------------------------------------------------------------------------------------
# Group settings in a checkpoint
# --------------------------------------------------------------------------------------------------


@each
def test_a_misspelt_missing_or_unknown_group_key_is_refused(case):
    model, _, opt = started(case)
    saved = opt.state_dict()
    misspelt = copy.deepcopy(saved)
    misspelt["param_groups"][0]["wieght_decay"] = misspelt["param_groups"][0].pop("weight_decay")
    assert_refused(model, opt, misspelt, r"param group 0 of the state dict has unknown option\(s\) 'wieght_decay' "
                                         r"\(did you mean 'weight_decay'\?\)")
    missing = copy.deepcopy(saved)
    del missing["param_groups"][-1]["lr"]
    assert_refused(model, opt, missing, rf"param group {len(saved['param_groups']) - 1} of the state dict lacks "
                                        r"the setting\(s\) \['lr'\]")
    bad = copy.deepcopy(saved)
    bad["param_groups"][0]["lr"] = "0.1"
    assert_refused(model, opt, bad, "param group 0 of the state dict.*learning rate")


@each
def test_the_keys_schedulers_write_into_groups_load(case):
    model, _, opt = started(case)
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        group.update(initial_lr=group["lr"], max_lr=0.1, min_lr=0.0, base_momentum=0.85, max_momentum=0.95,
                     swa_lr=0.05)
    opt.load_state_dict(saved)
    assert all(g["swa_lr"] == 0.05 and g["max_momentum"] == 0.95 for g in opt.param_groups)
    train(model, opt, range(3, 4))


def test_a_symmetry_compatible_checkpoint_with_the_earlier_beta_key_loads():
    """SymmetryCompatible's momentum coefficient was called ``beta`` before it took torch's name."""
    model, _, opt = started(CASES[2])
    saved = copy.deepcopy(opt.state_dict())
    for group in saved["param_groups"]:
        group["beta"] = group.pop("momentum") * 0.5
    opt.load_state_dict(saved)
    assert all(g["momentum"] == 0.475 and "beta" not in g for g in opt.param_groups)


# --------------------------------------------------------------------------------------------------
# Parameters listed twice; add_param_group
# --------------------------------------------------------------------------------------------------


def _mlp(hidden_layers: int) -> tuple[nn.Module, Any]:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(4, 5)]
    for _ in range(hidden_layers - 1):
        layers += [nn.ReLU(), nn.Linear(5, 5)]
    model = nn.Sequential(*layers, nn.ReLU(), nn.Linear(5, 3)).double()
    return model, gaugeopt.find_gauges(model, torch.randn(2, 4, dtype=torch.float64))


@each
@pytest.mark.parametrize("hidden_layers", [1, 3])
def test_a_parameter_given_twice_is_refused(case, hidden_layers):
    """It used to crash in frames.py (one hidden layer) or step that parameter twice (three)."""
    model, gauges = _mlp(hidden_layers)
    params = list(model.parameters())
    if case.name == "SymmetryCompatible":
        groups = [{"params": [model[0].weight, model[-1].weight, model[0].weight], "rule": "muon"}]
    else:
        groups = [{"params": params + [model[0].weight]}]
    with pytest.raises(ValueError, match=r"param group \d+ lists the same parameter twice \(entries \d+ and \d+\)"):
        case.build(model, gauges, groups=groups)


def _added_group(case: Case, params: list[Tensor], **settings) -> dict:
    return {"params": params, **({"rule": "adamw"} if case.name == "SymmetryCompatible" else {}), **settings}


@each
def test_add_param_group_applies_the_constructors_checks_and_changes_nothing_on_error(case):
    model, gauges = tiny(0)
    first = [p for n, p in model.named_parameters() if n != "head.bias"]
    groups = [{"params": first}]
    if case.name == "SymmetryCompatible":
        groups = [{"params": [p for p in first if p.ndim == 2], "rule": "muon"},
                  {"params": [p for p in first if p.ndim == 1], "rule": "adamw"}]
    opt = case.build(model, gauges, groups=groups)
    train(model, opt, range(2))
    bias = model.head.bias
    refused = [
        (_added_group(case, [bias], lr=-1.0), ValueError, "learning rate"),
        (_added_group(case, [bias], wieght_decay=0.1), ValueError, r"unknown option\(s\) 'wieght_decay'"),
        (_added_group(case, [bias, bias]), ValueError, "same parameter twice"),
        (_added_group(case, [model.up.weight]), ValueError, "more than one parameter group"),
        (_added_group(case, [torch.zeros(3, dtype=torch.int64)]), (TypeError, ValueError), "floating|Tensor"),
        (_added_group(case, [torch.zeros(3, dtype=torch.complex128, requires_grad=True)]), (TypeError, ValueError),
         "real"),
    ]
    before, groups_before = snapshot(model, opt), [(g, dict(g)) for g in opt.param_groups]
    for group, error, pattern in refused:
        with pytest.raises(error, match=pattern):
            opt.add_param_group(group)
        assert [(g, dict(g)) for g in opt.param_groups] == groups_before
        assert_untouched(before, model, opt)
    opt.add_param_group(_added_group(case, [bias], **({} if case.name != "DDCMuon" else {"use_muon": False})))
    if case.name != "SymmetryCompatible":  # a parameter outside gauges.model takes its rule, named in a warning
        with pytest.warns(UserWarning, match=r"not parameters of gauges\.model"):
            opt.add_param_group(_added_group(case, [nn.Parameter(torch.zeros(3, dtype=torch.float64))]))
    train(model, opt, range(2, 3))
    assert not torch.equal(bias, before[0]["head.bias"])


# --------------------------------------------------------------------------------------------------
# A step that raises has moved nothing
# --------------------------------------------------------------------------------------------------


def _resize_a_parameter(model, opt):
    """The embedding grows a row after the optimizer has state for it."""
    with torch.no_grad():
        model.embed.weight.data = torch.randn(VOCAB + 1, model.embed.weight.shape[1], dtype=torch.float64)
    for p in model.parameters():
        p.grad = torch.randn_like(p)


def _break_the_state_in_a_load_post_hook(model, opt):
    def truncate(o):
        del next(e for e in o.state.values() if "exp_avg_sq" in e)["exp_avg_sq"]

    opt.register_load_state_dict_post_hook(truncate)
    opt.load_state_dict(opt.state_dict())
    opt.zero_grad()
    backward(model, 5)


def _raising_closure(model, opt):
    opt.zero_grad()
    backward(model, 5)

    def closure():
        raise RuntimeError("out of memory in the forward pass")

    return closure


#: How a step can raise -> (what sets it up, returning the closure to pass; the error; its message).
RAISING_STEPS = {
    "a resized parameter": (_resize_a_parameter, ValueError,
                            r"state '\w+' of embed\.weight .* has shape \(7, 6\), expected \(8, 6\)"),
    "state a load post-hook broke": (_break_the_state_in_a_load_post_hook, ValueError, r"lacks \['exp_avg_sq'\]"),
    "a closure that raises": (_raising_closure, RuntimeError, "out of memory"),
}


@each
@pytest.mark.parametrize("how", list(RAISING_STEPS))
def test_a_step_that_raises_moves_nothing(case, how):
    """The state that no longer fits its parameter is found when the step lays out its batches, before
    anything is written (bad settings and gradients: tests/test_robustness.py)."""
    setup, error, pattern = RAISING_STEPS[how]
    model, gauges, opt = started(case)
    closure = setup(model, opt)
    before = snapshot(model, opt)
    with pytest.raises(error, match=pattern):
        opt.step(closure)
    assert_untouched(before, model, opt)


# --------------------------------------------------------------------------------------------------
# The property: any mutation of a valid state dict loads to what it says, or is refused
# --------------------------------------------------------------------------------------------------

#: Examples per optimizer; GAUGEOPT_LOAD_FUZZ_EXAMPLES=5000 runs a longer search.
LOAD_FUZZ_EXAMPLES = int(os.environ.get("GAUGEOPT_LOAD_FUZZ_EXAMPLES", "200"))

JUNK = (None, "x", "0.1", -1, 0, 1, 2.5, 1e300, math.nan, math.inf, True, False, [], {}, (1, 2),
        torch.tensor(math.nan), torch.tensor(0.5), torch.zeros(3), torch.zeros(()), torch.ones(2, 2, dtype=torch.int64))
ELEMENTS = (math.nan, math.inf, -math.inf, -1.0, 0.0, 1e30, 1e-30)


def _nodes(obj: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    """Every (path, value) of a nested state dict (tensors are leaves)."""
    out = [(path, obj)]
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            out += _nodes(value, path + (key,))
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            out += _nodes(value, path + (index,))
    return out


def _replaced(obj: Any, path: tuple, fn: Callable[[Any], Any]) -> Any:
    """``obj`` with the node at ``path`` replaced by ``fn(node)`` (a removed node: ``fn`` returns
    ``_REMOVE``); tuples are rebuilt."""
    if not path:
        return fn(obj)
    head, rest = path[0], path[1:]
    if isinstance(obj, Mapping):
        out = dict(obj)
        new = _replaced(out[head], rest, fn)
        if new is _REMOVE:
            del out[head]
        else:
            out[head] = new
        return out
    items = list(obj)
    new = _replaced(items[head], rest, fn)
    if new is _REMOVE:
        del items[head]
    else:
        items[head] = new
    return type(obj)(items) if isinstance(obj, tuple) else items


_REMOVE = object()


@st.composite
def mutations(draw, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``state_dict`` with one to three random edits: a node removed, replaced by junk, a
    key renamed or added, a list's items swapped or repeated, a tensor's entry, shape or dtype
    changed."""
    out = copy.deepcopy(state_dict)
    for _ in range(draw(st.integers(1, 3))):
        nodes = [(path, value) for path, value in _nodes(out) if path]
        path, value = nodes[draw(st.integers(0, len(nodes) - 1))]
        kinds = ["remove", "junk"]
        if isinstance(value, Mapping):
            kinds += ["rename", "add"] if value else ["add"]
        if isinstance(value, (list, tuple)) and len(value) > 1:
            kinds += ["swap", "repeat"]
        if isinstance(value, Tensor):
            kinds += ["element", "truncate", "dtype"]
        kind = draw(st.sampled_from(kinds))
        if kind == "remove":
            fn = lambda node: _REMOVE  # noqa: E731
        elif kind == "junk":
            junk = draw(st.sampled_from(JUNK))
            fn = lambda node: copy.deepcopy(junk)  # noqa: E731
        elif kind == "rename":
            key = draw(st.sampled_from(sorted(value, key=str)))
            new_key = draw(st.sampled_from([f"{key}_", str(key)[:-1] or "_", 999]))
            fn = lambda node: {(new_key if k == key else k): v for k, v in node.items()}  # noqa: E731
        elif kind == "add":
            fn = lambda node: {**node, "extra": 1}  # noqa: E731
        elif kind in ("swap", "repeat"):
            i, j = draw(st.integers(0, len(value) - 1)), draw(st.integers(0, len(value) - 1))

            def fn(node, i=i, j=j, kind=kind):
                items = list(node)
                items[i], items[j] = (items[j], items[i]) if kind == "swap" else (items[j], items[j])
                return type(node)(items) if isinstance(node, tuple) else items
        elif kind == "element":
            index, element = draw(st.integers(0, max(value.numel() - 1, 0))), draw(st.sampled_from(ELEMENTS))

            def fn(node, index=index, element=element):
                node = node.clone()
                if node.numel() and node.is_floating_point():
                    node.view(-1)[index] = element
                return node
        elif kind == "truncate":
            fn = lambda node: node[:-1] if node.dim() else node.reshape(1)  # noqa: E731
        else:
            dtype = draw(st.sampled_from([torch.float16, torch.float32, torch.float64, torch.int64]))
            fn = lambda node: node.to(dtype)  # noqa: E731
        out = _replaced(out, path, fn)
    return out


def _resolved(state_dict: Mapping[str, Any]) -> list[tuple[dict, list[dict]]]:
    """Per group, its settings and each position's state (an empty entry is no entry)."""
    out = []
    for group in state_dict["param_groups"]:
        settings = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        out.append((settings, [dict(state_dict["state"].get(i, {})) for i in group["params"]]))
    return out


def assert_loaded_as_described(opt, mutated: Mapping[str, Any], params: list[Tensor]) -> None:
    """The optimizer's state is what ``mutated`` says, as the optimizer keeps it: state tensors in
    the compute dtype, step counts as float32 tensors."""
    loaded = _resolved(opt.state_dict())
    for (our_settings, states), (their_settings, their_states) in zip(loaded, _resolved(mutated)):
        assert same(our_settings, their_settings)
        for mine, theirs in zip(states, their_states):
            assert mine.keys() == theirs.keys()
            for key, value in theirs.items():
                if key == "step":
                    count = float(value.item()) if isinstance(value, Tensor) else float(value)
                    assert mine[key].dtype == torch.float32
                    assert mine[key].item() == torch.tensor(count, dtype=torch.float32).item()
                else:
                    assert torch.equal(mine[key], value.to(mine[key].dtype))
    for group, theirs in zip(opt.param_groups, mutated["param_groups"]):
        if "param_names" in theirs:
            assert group["param_names"] == list(theirs["param_names"])
    meta = mutated.get("gaugeopt")
    if meta is not None and meta["skipped_steps"] is not None:
        assert opt.skipped_steps == meta["skipped_steps"]
    for p in params:
        for key, value in opt.state.get(p, {}).items():
            assert key == "step" or value.dtype == compute_dtype(p)


@pytest.fixture(scope="module")
def references():
    """Per optimizer: a pristine model and optimizer three steps in, their state dict and snapshot,
    and a working copy of both (a refused load leaves it as it is; a load replaces it by a new copy)."""
    out = {}
    for case in CASES:
        model, gauges, opt = started(case, nonfinite="skip")
        out[case.name] = {"pristine": (model, opt), "saved": copy.deepcopy(opt.state_dict()),
                          "before": snapshot(model, opt), "working": copy.deepcopy((model, opt))}
    return out


@each
@settings(max_examples=LOAD_FUZZ_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_any_mutation_of_a_state_dict_loads_as_described_or_is_refused_with_nothing_changed(case, references, data):
    reference = references[case.name]
    model, opt = reference["working"]
    mutated = data.draw(mutations(reference["saved"]))
    groups = [(g, dict(g)) for g in opt.param_groups]
    try:
        opt.load_state_dict(mutated)
    except ValueError as error:
        event(f"refused: {str(error).split(':')[0][:60]}")
        assert_untouched(reference["before"], model, opt)
        assert [(g, dict(g)) for g in opt.param_groups] == groups
        return
    event("loaded")
    reference["working"] = copy.deepcopy(reference["pristine"])
    assert_loaded_as_described(opt, mutated, list(model.parameters()))
    opt.zero_grad()
    backward(model, 7)
    opt.step()
