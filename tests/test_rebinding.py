"""Parameters are bound by name: wrapping that replaces the parameter objects after the optimizer was
built keeps every frame, and a tensor that no longer matches its name is refused.

accelerate's ``prepare`` and FSDP2's ``fully_shard`` replace a model's parameters with new tensors. An
optimizer built before holds the old ones (or, after accelerate, new ones it has never seen); it
resolves its parameters by their names in ``gauges.model`` at the first step
(``FramedOptimizer.rebind``). Single process: the model's parameters are replaced by hand, as those
tools do, and the run must equal the unwrapped one bit for bit (an optimizer that lost its frames
does not: the control). Two gloo ranks (tests/rebind_worker.py): the same under real ``fully_shard``
and accelerate's own parameter switch.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gaugeopt import DDCAdam, DDCMuon
from gaugeopt.testing import relative_error

sys.path.insert(0, str(Path(__file__).parent))
from test_param_groups import VOCAB, lm, lm_loss  # noqa: E402  (the tiny float64 LM, its gauges, three batches)

OPTIMIZERS = {
    "DDCAdam": lambda params, gauges: DDCAdam(params, gauges, lr=1e-2, weight_decay=0.1),
    "DDCMuon": lambda params, gauges: DDCMuon(params, gauges, lr=0.05, adam_lr=1e-2, weight_decay=0.1),
}


def train(model, optimizer, batches, steps):
    for t in range(steps):
        optimizer.zero_grad()
        lm_loss(model, batches[t % len(batches)]).backward()
        optimizer.step()


def replace_parameters(model: nn.Module) -> dict[nn.Parameter, nn.Parameter]:
    """Give every parameter of ``model`` a new tensor object with the same values, as wrapping does;
    returns old -> new."""
    replaced = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                replaced[p] = module._parameters[name] = nn.Parameter(p.detach().clone())
    return replaced


def switch(optimizer, replaced) -> None:
    """Put the new tensors in the optimizer's param groups, as accelerate's prepare does."""
    for group in optimizer.param_groups:
        group["params"] = [replaced[p] for p in group["params"]]


@pytest.fixture(scope="module")
def unwrapped():
    """Each optimizer's run on the plain model, 6 steps."""
    out = {}
    for label, make in OPTIMIZERS.items():
        model, gauges, batches = lm()
        train(model, make(model.parameters(), gauges), batches, 6)
        out[label] = model
    return out


@pytest.mark.parametrize("label", list(OPTIMIZERS))
def test_parameters_replaced_in_model_and_optimizer_before_the_first_step_keep_their_frames(label, unwrapped):
    """accelerate's order: the optimizer is built on the plain model; then both the model and the
    optimizer's groups get new tensors. The run equals the unwrapped one exactly; the same optimizer
    without gauges (what lost frames amount to) does not."""
    model, gauges, batches = lm()
    optimizer = OPTIMIZERS[label](model.parameters(), gauges)
    switch(optimizer, replace_parameters(model))
    assert sorted(n for names in optimizer.parameter_names() for n in names) == sorted(dict(model.named_parameters()))
    train(model, optimizer, batches, 6)
    assert relative_error(model, unwrapped[label])[0] == 0.0
    unframed, _, _ = lm()
    train(unframed, OPTIMIZERS[label](unframed.parameters(), None), batches, 6)
    assert relative_error(unframed, unwrapped[label])[0] > 1e-3


@pytest.mark.parametrize("label", list(OPTIMIZERS))
def test_parameters_replaced_in_the_model_alone_are_taken_from_it_at_the_first_step(label, unwrapped):
    """``fully_shard`` after the optimizer: the model holds new tensors, the optimizer the old ones. At
    its first step the optimizer takes the model's by name; the old ones are never touched."""
    model, gauges, batches = lm()
    optimizer = OPTIMIZERS[label](model.parameters(), gauges)
    replaced = replace_parameters(model)
    old = {p: p.detach().clone() for p in replaced}
    train(model, optimizer, batches, 6)
    assert relative_error(model, unwrapped[label])[0] == 0.0
    assert all(torch.equal(p, value) for p, value in old.items())
    held = [p for g in optimizer.param_groups for p in g["params"]]
    assert all(any(p is q for q in model.parameters()) for p in held)


@pytest.mark.parametrize("label", list(OPTIMIZERS))
def test_rebind_after_training_moves_the_state_to_the_models_new_parameters(label, unwrapped):
    """Parameters replaced mid-training (``load_state_dict(assign=True)``, a re-wrap): ``rebind()`` takes
    the model's new tensors and moves the optimizer state with them; training goes on as before."""
    model, gauges, batches = lm()
    optimizer = OPTIMIZERS[label](model.parameters(), gauges)
    train(model, optimizer, batches, 3)
    replace_parameters(model)
    optimizer.rebind()
    assert all(optimizer.state[p] for p in model.parameters() if p.ndim == 2)
    for t in range(3, 6):  # the same batches as the reference's last three steps
        train(model, optimizer, batches[t % 3:] + batches[:t % 3], 1)
    assert relative_error(model, unwrapped[label])[0] == 0.0


@pytest.mark.parametrize("label", list(OPTIMIZERS))
def test_entries_that_no_longer_match_their_names_are_refused_and_nothing_changes(label):
    """Two entries swapped (each is now the model's parameter of the other's name), a parameter the
    model lost, one whose shape changed: ``ValueError`` naming it, before anything changes."""
    model, gauges, batches = lm()
    optimizer = OPTIMIZERS[label](model.parameters(), gauges)
    train(model, optimizer, batches, 1)
    group = optimizer.param_groups[0]
    group["params"][0], group["params"][1] = group["params"][1], group["params"][0]
    before = copy.deepcopy((dict(model.named_parameters()), optimizer.state_dict()))
    with pytest.raises(ValueError, match=r"was gauges\.model's parameter '.*' and is now its '.*'; the param groups "
                                         r"were reordered"):
        train(model, optimizer, batches, 1)
    assert all(torch.equal(p, before[0][n]) for n, p in model.named_parameters())
    after = optimizer.state_dict()["state"]
    assert all(torch.equal(after[i][k], v) for i, state in before[1]["state"].items() for k, v in state.items())
    group["params"][0], group["params"][1] = group["params"][1], group["params"][0]
    model.head = nn.Linear(16, VOCAB + 1, bias=False).double()  # the head changed shape
    with pytest.raises(ValueError, match=r"'head\.weight', which now has shape \(18, 16\)"):
        optimizer.rebind()
    del model.head
    model.head = None
    with pytest.raises(ValueError, match=r"'head\.weight', which the model no longer has"):
        optimizer.rebind()


# --------------------------------------------------------------------------------------------------
# FSDP2 on two gloo ranks
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    pytest.importorskip("accelerate", reason="the accelerate path needs accelerate (the hf extra)")
    out = tmp_path_factory.mktemp("rebind")
    worker = Path(__file__).parent / "rebind_worker.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
               f"--master-port={_free_port()}", str(worker), str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stderr[-6000:]}"
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("label", ["ddc_adam", "ddc_muon"])
@pytest.mark.parametrize("way", ["accelerate", "optimizer_first"])
def test_fsdp2_after_the_optimizer_trains_as_fsdp2_before_it(launched, label, way):
    """Built before ``fully_shard`` (with accelerate's parameter switch, or without any), the optimizer
    binds every sharded parameter by name and trains exactly as one built after."""
    run = launched[label][way]
    assert run["difference"] == 0.0 and run["moved"] > 1e-2
    assert run["bound"] == run["parameters"] == launched[label]["sharded_first"]["parameters"]
    assert run["held_are_the_models"]
