"""DDP and FSDP2 (CPU, gloo, 2 ranks, float64) against single-process training, for every optimizer.

One ``torchrun`` launch (tests/distributed_worker.py) trains under DDP and FSDP2, saves a distributed
checkpoint mid-run and runs the equivariance check under FSDP2; this module trains the same model
on whole batches in one process and compares. It also loads the 2-rank checkpoint here, in one
process without a process group, and resumes training from it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from gaugeopt.testing import relative_error

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402
from torchrun import torchrun  # noqa: E402

WORLD = 2
LAUNCH_TIMEOUT_S = 300  # a hung collective fails the test instead of blocking the run


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> tuple[Path, dict]:
    """Run the worker once under torchrun; return its output folder and results."""
    out = tmp_path_factory.mktemp("distributed")
    torchrun(worker.__file__, out, world=WORLD, timeout_s=LAUNCH_TIMEOUT_S)
    return out, json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def gauges():
    return worker.find_gauges(worker.make_model())


def _single_process(label: str, gauges, batches) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = worker.make_model()
    optimizer = worker.OPTIMIZERS[label](model, gauges.bind(model))
    worker.train(model, optimizer, batches)
    return model, optimizer


@pytest.fixture(scope="module")
def odd_reference() -> dict[str, dict[str, torch.Tensor]]:
    """Single-process parameters of the model with uneven shards (:func:`worker.make_odd_model`)."""
    gauges = worker.find_gauges(worker.make_odd_model())
    out = {}
    for label, make in worker.OPTIMIZERS.items():
        model = worker.make_odd_model()
        worker.train(model, make(model, gauges.bind(model)), worker.batches())
        out[label] = dict(model.named_parameters())
    return out


@pytest.fixture(scope="module")
def reference(gauges) -> dict[str, dict[str, torch.Tensor]]:
    """Single-process parameters after all steps, per optimizer."""
    return {label: dict(_single_process(label, gauges, worker.batches())[0].named_parameters())
            for label in worker.OPTIMIZERS}


def _error(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    assert found.keys() == expected.keys()
    return relative_error(found, expected)[0]


@pytest.mark.parametrize("label", list(worker.OPTIMIZERS))
def test_ddp_equals_single_process(launched, reference, label):
    out, _ = launched
    moved = relative_error(reference[label], dict(worker.make_model().named_parameters()))[0]
    assert moved > 1e-2  # the runs went somewhere: a parity that cannot fail proves nothing
    assert _error(torch.load(out / f"ddp_{label}.pt"), reference[label]) < 1e-10


@pytest.mark.parametrize("bucket_view", [False, True], ids=["", "gradient_as_bucket_view"])
def test_ddp_with_parameters_held_in_buffers_equals_single_process(launched, odd_reference, bucket_view):
    """DDCAdam(stack_parameters=True) under DDP on a two-layer model, whose reducer reads and writes
    the gradients (with ``gradient_as_bucket_view`` it puts views of its own buckets in their place at
    every step): the steps of one process; after the last one the parameters lie in the optimizer's
    buffers and the gradients where DDP (and backward, after torch's ``zero_grad()``) put them."""
    out, results = launched
    found = torch.load(out / f"ddp_ddc_adam_held{'_bucket_view' * bucket_view}.pt")
    assert _error(found, odd_reference["ddc_adam"]) < 1e-10
    assert results["ddp_held"][str(bucket_view)] == [True, False]


@pytest.mark.parametrize("label", list(worker.OPTIMIZERS))
def test_fsdp2_equals_single_process(launched, reference, label):
    out, results = launched
    assert results["uneven"] == ["embed.weight", "head.weight"]  # dim 0 = 11 rows over 2 ranks
    found = torch.load(out / f"fsdp_{label}.pt")
    assert _error(found, reference[label]) < 1e-10
    for name in results["uneven"]:
        assert relative_error({name: found[name]}, {name: reference[label][name]})[0] < 1e-10


def test_a_compiled_optimizer_takes_its_fsdp2_steps_eagerly_and_says_so(launched, reference):
    out, results = launched
    assert len(results["compiled_warnings"]) == 1 and "eagerly" in results["compiled_warnings"][0]
    assert _error(torch.load(out / "fsdp_compiled_ddc_adam.pt"), reference["ddc_adam"]) < 1e-10


@pytest.mark.parametrize("label", list(worker.OPTIMIZERS))
def test_fsdp2_equals_single_process_with_uneven_shards_and_straddling_heads(launched, odd_reference, label):
    out, results = launched
    assert {"embed.weight", "head.weight", "blocks.0.ffn.up.weight", "blocks.1.ffn.gate.weight"} <= set(
        results["odd_uneven"])
    moved = relative_error(odd_reference[label], dict(worker.make_odd_model().named_parameters()))[0]
    assert moved > 1e-2
    found = torch.load(out / f"fsdp_odd_{label}.pt")
    assert _error(found, odd_reference[label]) < 1e-10
    for name in results["odd_uneven"]:
        assert relative_error({name: found[name]}, {name: odd_reference[label][name]})[0] < 1e-10


def test_step_traffic_does_not_grow_with_depth_and_gathers_nothing_for_ddc_adam(launched):
    """Counted on every rank (exact counts, no timing), 2 ranks: the calls per step are the same at 2
    and 4 layers; DDCAdam only all-reduces its frame reductions (no parameter, gradient or state
    crosses: <= 5 % of the model's bytes); DDCMuon and SymmetryCompatible also send each matrix's map
    input to one rank and get their rows of the result back (<= 1.2x the model's bytes per rank)."""
    traffic = launched[1]["traffic"]
    bound = {"ddc_adam": 0.05, "ddc_muon": 1.2, "symmetry_compatible": 1.2}
    shallow, deep = worker.TRAFFIC_LAYERS
    for label in worker.OPTIMIZERS:
        calls = {n: [c for c, _, _ in traffic[f"{label}/{n}"]["counts"]] for n in worker.TRAFFIC_LAYERS}
        assert calls[shallow] == calls[deep], (label, calls)
        for n in worker.TRAFFIC_LAYERS:
            row = traffic[f"{label}/{n}"]
            assert max(b for _, b, _ in row["counts"]) <= bound[label] * row["model_bytes"], (label, n, row)
    for _, _, ops in traffic[f"ddc_adam/{deep}"]["counts"]:
        assert set(ops) == {"allreduce_"}, ops


def test_the_gauge_invariant_gradient_norm_of_fsdp2_shards_is_the_single_process_one(launched):
    """``gaugeopt.clip_grad_norm_`` on FSDP2 (the model whose heads and pairs the shard boundary cuts):
    each rank measures its rows, and the 2-, 1- and inf-norms equal one process's on the whole
    gradients; the clip scales every rank's gradient shard by the same factor."""
    from gaugeopt.optim import gauge_invariant_grad_norm

    results = launched[1]
    model = worker.make_odd_model()
    gauges = worker.find_gauges(model)
    worker.lm_loss(model, worker.batches()[0]).backward()
    for norm_type, found in results["clip_norms"].items():
        expected = float(gauge_invariant_grad_norm(model.parameters(), gauges, float(norm_type)))
        assert abs(found / expected - 1) < 1e-12, (norm_type, found, expected)
    clipped = results["clipped_head_grad"]
    assert clipped["total"] == pytest.approx(results["clip_norms"]["2.0"], rel=1e-12)
    assert clipped["ratio"] == pytest.approx(0.5 / (clipped["total"] + 1e-6), rel=1e-9)


def test_a_two_dimensional_mesh_is_refused_on_every_rank(launched):
    refusals = launched[1]["hsdp"]
    assert len(refusals) == WORLD and all("1-D device mesh" in r for r in refusals), refusals


@pytest.mark.parametrize("label", list(worker.OPTIMIZERS))
def test_fsdp2_state_is_sharded_like_its_parameter(launched, label):
    placements = launched[1]["placements"][label]
    matrices = [n for n, p in worker.make_model().named_parameters() if p.ndim == 2]
    assert all(placements[n] for n in matrices)  # every matrix has parameter-shaped state (moments, momentum)
    entries = [entry for per_param in placements.values() for entry in per_param]
    assert all(is_dtensor and same for _key, is_dtensor, same in entries), placements


@pytest.mark.filterwarnings("ignore:DDCAdam froze:RuntimeWarning")
def test_every_rank_reports_the_frozen_units(launched, gauges):
    """DDCAdam's ``frozen`` lists what the single-process step freezes, on every rank, although each
    rank holds only some rows of the neuron pair (its frames are reduced over the ranks)."""
    model = worker.make_model()
    with torch.no_grad():
        worker.kill_unit(model)
    optimizer = worker.OPTIMIZERS["ddc_adam"](model, gauges.bind(model))
    worker.train(model, optimizer, worker.batches()[:2])
    expected = {k: list(v) for k, v in optimizer.frozen.items()}
    assert expected  # the dead unit is found
    assert launched[1]["frozen"] == [expected] * WORLD


def test_a_nonfinite_gradient_shard_gets_the_same_policy_on_every_rank(launched):
    """The NaN sits in rank 0's shard of one gradient: with ``skip`` every rank skips and nothing
    changes; with ``raise`` every rank raises naming that parameter (none waits in a collective)."""
    skip, raise_ = launched[1]["nonfinite"]["skip"], launched[1]["nonfinite"]["raise"]
    for rank in skip:
        assert rank["outcome"] == "stepped" and rank["skipped_steps"] == 1 and rank["unchanged"]
        assert rank["state"] == 0  # no moment was created either
    for rank in raise_:
        assert rank["outcome"].startswith("raised: non-finite gradient") and rank["target"] in rank["outcome"]
        assert rank["unchanged"] and rank["skipped_steps"] == 0


def test_ddc_adam_is_equivariant_under_fsdp2_and_adamw_is_not(launched):
    results = launched[1]
    assert results["equivariance_ddc_adam"]["displacement"] > 0.1
    assert results["equivariance_ddc_adam"]["error"] < 1e-10
    assert results["equivariance_adamw"]["error"] > 1e-3


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize("label", list(worker.OPTIMIZERS))
def test_checkpoint_from_two_ranks_resumes_in_one_process(launched, reference, gauges, label):
    """Load the 2-rank FSDP2 checkpoint (taken after CHECKPOINT_STEP steps) into a plain model and
    optimizer in this process, train the remaining steps, and land on the uninterrupted run."""
    out, _ = launched
    model = worker.make_model()
    optimizer = worker.OPTIMIZERS[label](model, gauges.bind(model))
    worker.load_checkpoint(model, optimizer, out / f"checkpoint_{label}")
    worker.train(model, optimizer, worker.batches()[worker.CHECKPOINT_STEP:])
    assert _error(dict(model.named_parameters()), reference[label]) < 1e-10


@pytest.mark.parametrize("label", list(worker.OPTIMIZERS))
def test_checkpoint_from_two_ranks_resumes_on_two_ranks(launched, reference, label):
    out, _ = launched
    assert _error(torch.load(out / f"fsdp_resumed_{label}.pt"), reference[label]) < 1e-10
