"""Host reads per optimizer step: an eager step of every gaugeopt optimizer reads one value back from
the device (its finiteness and frozen-unit flags), whatever its rules, so it can be queued whole on
an accelerator. Counted with ``benchmarks.dispatch.HostReads``."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from benchmarks.dispatch import HostReads
from gaugeopt import DDCAdam, DDCMuon, SymmetryCompatible, find_gauges, symmetry_param_groups
from gaugeopt.models import MoEConfig, MoELM, TransformerLM, TransformerLMConfig

VOCAB = 17


def test_host_reads_counts_every_kind_of_read_and_nothing_else():
    x = torch.arange(4.0)
    with HostReads() as reads:
        y = (x * 2).sum()
        torch.linalg.matrix_norm(torch.eye(3)).sqrt()
    assert reads.total == 0
    with HostReads() as reads:
        y.item()
        bool(x[1] > 0)
        float(y)
        x.tolist()
        x.numpy()
        torch.equal(x, x)
    assert reads.counts == {"aten._local_scalar_dense.default": 3, "Tensor.tolist": 1, "Tensor.numpy": 1,
                            "aten.equal.default": 1}


@functools.cache
def _model(kind: str):
    torch.manual_seed(0)
    if kind == "lm":
        model = TransformerLM(TransformerLMConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                                                  max_seq_len=8))
    else:  # SymmetryCompatible's router takes the centred left-spectral map, an inverse square root
        model = MoELM(MoEConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, d_ff=16, n_experts=3, top_k=2,
                                max_seq_len=8))
    tokens = torch.randint(0, VOCAB, (4, 9), generator=torch.Generator().manual_seed(1))
    return model, find_gauges(model, (tokens[:1, :8],), output="logits"), tokens


OPTIMIZERS = {
    "DDCAdam": lambda model, gauges: DDCAdam(model.parameters(), gauges, lr=1e-2),
    "DDCMuon": lambda model, gauges: DDCMuon(model.parameters(), gauges, lr=2e-2),
    "DDCMuon polar_express": lambda model, gauges: DDCMuon(model.parameters(), gauges, lr=2e-2,
                                                           ns_coefficients="polar_express"),
    "SymmetryCompatible": lambda model, gauges: SymmetryCompatible(symmetry_param_groups(model, verbose=False)),
}


@pytest.mark.parametrize("kind", ["lm", "moe"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_an_eager_step_reads_at_most_one_value_from_the_device(name, kind):
    template, gauges, tokens = _model(kind)
    model = copy.deepcopy(template)
    optimizer = OPTIMIZERS[name](model, gauges.bind(model))
    if name == "SymmetryCompatible":  # the maps that used to iterate to convergence on the host are there
        rules = {group["rule"] for group in optimizer.param_groups}
        assert {"hybrid", "centered_hybrid"} <= rules and (kind == "lm" or "centered_left_spectral" in rules)
    for step in range(3):  # the first step lays out the batches and allocates the state
        optimizer.zero_grad()
        logits = model(tokens[:, :-1])
        logits = logits[0] if isinstance(logits, tuple) else logits
        F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).backward()
        with HostReads() as reads:
            optimizer.step()
    assert reads.total <= 1, reads.counts
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_cuda_step_waits_for_the_device_at_most_once(name):
    """What the count above stands for, on a GPU: with torch's sync debug mode on, a step (after the
    first) makes at most one synchronising call, the read of its flags (no blocking upload of its
    numbers either)."""
    import warnings

    template, gauges, tokens = _model("lm")
    model = copy.deepcopy(template).cuda()
    tokens = tokens.cuda()
    optimizer = OPTIMIZERS[name](model, gauges.bind(model))
    for step in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(tokens[:, :-1]).reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).backward()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                optimizer.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]


@pytest.mark.parametrize("name", ["DDCAdam", "DDCMuon"])
def test_a_steps_numbers_are_written_in_place_where_the_last_step_read_them(name, monkeypatch):
    """The learning rates, decays and rule numbers of a step are slices of persistent tables written
    at every step (static addresses, as a CUDA graph's inputs must be), and they are this step's: a
    scheduler's new rate is what the step reads."""
    import gaugeopt.optim.base as base

    template, gauges, tokens = _model("lm")
    model = copy.deepcopy(template)
    optimizer = OPTIMIZERS[name](model, gauges.bind(model))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0 / (1 + t))
    seen, with_state = [], base.with_state

    def recorded(*args, **kwargs):
        inputs = with_state(*args, **kwargs)
        seen.append([(t.scalars.lr.data_ptr(), float(t.scalars.lr), float(t.group["lr"])) for t in inputs.tensors])
        return inputs

    monkeypatch.setattr(base, "with_state", recorded)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(tokens[:, :-1]).reshape(-1, VOCAB), tokens[:, 1:].reshape(-1)).backward()
        optimizer.step()
        scheduler.step()
    assert len(seen) == 3 and all(len(step) == len(seen[0]) > 0 for step in seen)
    assert all([ptr for ptr, _, _ in step] == [ptr for ptr, _, _ in seen[0]] for step in seen)
    rates = [[lr for _, lr, _ in step] for step in seen]
    assert all(lr == pytest.approx(group_lr, rel=1e-6) for step in seen for _, lr, group_lr in step)
    assert rates[0] != rates[1] != rates[2]
