"""The benchmark suite (``python -m benchmarks``): the exponent fit is a known answer, the state count
is the optimizer's tensors, and a quick run writes a report whose numbers are its measurements."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.__main__ import main
from benchmarks.dispatch import DispatchCounter, dispatched_ops, iteration_traffic, step_traffic
from benchmarks.optimizer_steps import (adamw, ddc_adam, ddc_adam_stacked, ddc_muon, model_with_gradients,
                                       muon_with_adamw_torch, next_token_loss, reference_tokens, state_bytes)
from benchmarks.report import fitted_exponent
from gaugeopt.optim.storage import HeldGradients, move_into_stack


def test_fitted_exponent_recovers_a_power_law():
    parameters = [1e5, 3e5, 1e6, 3e6]
    assert fitted_exponent(parameters, [2e-9 * n**1.25 for n in parameters]) == pytest.approx(1.25, abs=1e-12)


def test_state_bytes_counts_adamw_moments_and_ddc_adam_stays_within_two_percent():
    model, gauges = model_with_gradients(32)
    reference = adamw(model, gauges)
    reference.step()
    params = sum(p.numel() for p in model.parameters())
    assert state_bytes(reference) == 2 * 4 * params + 4 * len(list(model.parameters()))  # m, v, step
    ours = ddc_adam(model, gauges.bind(model))
    ours.step()
    assert state_bytes(reference) <= state_bytes(ours) <= 1.02 * state_bytes(reference)


def test_dispatch_counter_counts_each_operation_once_by_name():
    a, b = torch.ones(3), torch.ones(3)
    with DispatchCounter() as counter:
        c = a + b
        c.mul_(2.0)
        torch.linalg.vector_norm(c)
    assert counter.total == 3
    assert counter.counts["aten.add.Tensor"] == 1 and counter.counts["aten.mul_.Tensor"] == 1


def test_views_allocations_and_host_reads_launch_no_kernel():
    a = torch.ones(4, 3)
    with DispatchCounter() as counter:
        a.t().unsqueeze(0)
        b = a.view(12)[2:]  # views
        torch.empty(3)  # an allocation without values
        c = b * 2  # a kernel
        c.sum().item()  # a kernel (the sum) and a host read
    assert counter.total > counter.total_launches
    assert counter.launches == {"aten.mul.Tensor": 1, "aten.sum.default": 1}


def test_a_multi_tensor_operation_whose_lists_do_not_match_launches_a_kernel_per_member():
    """CUDA's multi-tensor kernels take lists whose corresponding tensors match in size, strides and
    dtype: a factor broadcast to each member or a 0-d tensor per member takes the per-tensor path."""
    members = [torch.ones(3, 4) for _ in range(5)]
    with DispatchCounter() as counter:
        torch._foreach_mul_(members, 2.0)  # one kernel
        torch._foreach_mul_(members, torch.tensor(2.0))  # one 0-d tensor for all: one kernel
        torch._foreach_add_(members, [torch.ones(3, 4) for _ in range(5)])  # matching lists: one kernel
        torch._foreach_mul_(members, [torch.ones(4)] * 5)  # broadcast rows: five
        torch._foreach_mul_(members, [torch.tensor(2.0)] * 5)  # a 0-d tensor per member: five
        torch._foreach_add_(members, [torch.ones(4, 3).t() for _ in range(5)])  # other strides: five
    assert counter.launches["aten._foreach_mul_.Scalar"] == counter.launches["aten._foreach_mul_.Tensor"] == 1
    assert counter.launches["aten._foreach_mul_.List"] == 10
    assert counter.launches["aten._foreach_add_.List"] == 1 + 5


def test_traffic_counts_what_each_operation_reads_and_writes():
    a, b, out = torch.ones(4), torch.ones(4), torch.empty(4)
    with DispatchCounter() as counter:
        c = a * b  # reads a, b; writes c
        c.add_(a)  # reads c, a; writes c
        torch.mul(a, a, out=out)  # reads a once; writes out without reading it
        out.copy_(c)  # reads c; writes out
        c.view(2, 2)  # a view moves nothing
    assert counter.total_bytes == 16 * (3 + 3 + 2 + 2)
    assert counter.host_reads == 0
    with DispatchCounter() as counter:
        c.sum().item()
        c.tolist()
        bool(c.all())
    assert counter.reads == {"aten._local_scalar_dense.default": 2, "Tensor.tolist": 1} and counter.host_reads == 3


def test_a_blocking_upload_counts_as_a_host_read_and_the_steps_scalars_are_not_one():
    """A copy from the CPU to a device that is not ``non_blocking`` waits for the device's queue (the
    meta device stands in for an accelerator); the step's table of numbers is uploaded without it."""
    from gaugeopt.optim.step import BatchScalars
    from gaugeopt.optim.storage import ScalarTables

    with DispatchCounter() as counter:
        torch.ones(3).to("meta")
        torch.ones(3).to("meta", non_blocking=True)
        torch.empty(3, device="meta").copy_(torch.ones(3))
        torch.tensor([1.0, 2.0], device="meta")
    assert counter.reads == {"aten._to_copy.default from cpu, blocking": 1, "aten.copy_.default from cpu, blocking": 1,
                             "torch.tensor to meta, blocking": 1}
    with DispatchCounter() as counter:
        scalars = ScalarTables().upload(BatchScalars(0.1, 0.99, (0.05, [1.0, 2.0]), 0.2), torch.float32,
                                        torch.device("meta"))
    assert counter.host_reads == 0 and scalars.lr.device.type == "meta" and scalars.rule[1].shape == (2,)


def test_torchs_adamw_moves_its_known_bytes_per_parameter():
    """The fused kernel reads p, g, m, v and writes p, m, v (28 bytes per float32 entry); the foreach
    kernels make eight passes (80); the foreach step reads each parameter's step count on the host."""
    traffic = step_traffic({"fused": lambda m, g: torch.optim.AdamW(m.parameters(), fused=True),
                            "foreach": lambda m, g: torch.optim.AdamW(m.parameters(), foreach=True)},
                           width=32, layers=1)
    fused, foreach = traffic["optimizers"]["fused"], traffic["optimizers"]["foreach"]
    steps = 4 * len(list(model_with_gradients(32, n_layers=1)[0].parameters())) / traffic["parameters"]
    assert fused["bytes_per_parameter"] == pytest.approx(28 + 3 * steps)  # and the counts: added to, then read
    assert foreach["bytes_per_parameter"] == pytest.approx(80, abs=0.5)
    assert fused["host_reads"] == 0 and foreach["host_reads"] > 0


def test_plain_sgd_dispatches_one_update_per_parameter():
    # torch.optim.SGD without momentum or foreach is one ``param.add_(grad, alpha=-lr)`` per parameter.
    model, gauges = model_with_gradients(32, n_layers=3)
    counter = dispatched_ops(lambda m, g: torch.optim.SGD(m.parameters(), lr=0.1, foreach=False), model, gauges)
    assert counter.total == counter.counts["aten.add_.Tensor"] == len(list(model.parameters()))


@pytest.mark.parametrize("name", ["DDCAdam", "DDCMuon"])
def test_an_eager_step_dispatches_the_same_operations_at_every_depth(name):
    """Same-shaped components of all layers are stepped as one stack: 2 and 8 layers dispatch the
    same operations, as many of each, and read one value back."""
    make = ddc_adam if name == "DDCAdam" else ddc_muon()
    shallow, deep = (dispatched_ops(make, *model_with_gradients(32, n_layers=n)) for n in (2, 8))
    assert shallow.counts == deep.counts
    assert shallow.host_reads == deep.host_reads == 1


@pytest.mark.parametrize("name", ["DDCAdam", "DDCMuon"])
def test_with_stack_parameters_and_kept_gradients_an_eager_step_launches_as_many_kernels_at_any_depth(name):
    """Counted as on a CUDA device (a multi-tensor operation whose lists do not match runs a kernel per
    member): with parameters held in one buffer per batch and gradients kept from step to step
    (``zero_grad(set_to_none=False)``: the step moves them into a buffer too), 2 and 8 layers launch
    the same kernels. (With new gradients at every step, as by default, the frames' factors are
    broadcast to each member of a list of gradients, so the count grows with depth.)"""
    make = ddc_adam_stacked if name == "DDCAdam" else ddc_muon(stack_parameters=True)
    shallow, deep = (dispatched_ops(make, *model_with_gradients(32, n_layers=n), gradients="kept") for n in (2, 8))
    assert shallow.launches == deep.launches
    assert dispatched_ops(make, *model_with_gradients(32, n_layers=8)).total_launches > deep.total_launches


@pytest.mark.parametrize("name", ["DDCAdam", "DDCMuon"])
def test_stack_parameters_costs_backward_nothing_with_torchs_zero_grad(name):
    """A training iteration phase by phase (``benchmarks.dispatch.iteration_traffic``): with torch's
    ``zero_grad()`` the gradients of an optimizer with ``stack_parameters=True`` are ``None`` after it,
    and ``zero_grad`` and backward move exactly the bytes they move for the default optimizer (backward
    hands over new gradients instead of adding them into held ones), while the step moves fewer."""
    default, held = (ddc_adam, ddc_adam_stacked) if name == "DDCAdam" else (ddc_muon(), ddc_muon(stack_parameters=True))
    model, gauges = model_with_gradients(32, n_layers=2)
    tokens = reference_tokens()
    plain, stacked = (iteration_traffic(make, model, gauges, lambda m: next_token_loss(m, tokens))
                      for make in (default, held))
    assert stacked["zero_grad"] == plain["zero_grad"] == 0
    assert stacked["forward_backward"] == plain["forward_backward"]
    assert stacked["step"] < plain["step"]


def test_holding_new_gradients_copies_each_entry_once_and_kept_ones_cost_nothing():
    """The byte count of ``HeldGradients.hold`` on three float32 parameters held in one buffer: new
    gradients are copied into a buffer at 8 bytes per entry (read and written once), into the same
    buffer at the next step when asked to keep it; gradients that lie in it already move nothing."""
    params = [torch.nn.Parameter(torch.randn(4, 5)) for _ in range(3)]
    move_into_stack(params)
    held = HeldGradients([params])
    for step in range(2):
        for p in params:
            p.grad = torch.randn(4, 5)
        with DispatchCounter() as counter:
            held.hold(copy=True, keep=True)
        assert counter.total_bytes == 8 * 60, (step, dict(counter.bytes))
    with DispatchCounter() as counter:
        held.hold(copy=True, keep=True)
    assert counter.total_bytes == 0


def test_an_eager_ddc_adam_step_moves_at_most_1_2_times_adamws_bytes():
    """Bytes read and written per parameter by one eager step (the dispatch count of
    ``benchmarks.dispatch``), DDCAdam at most 1.2x AdamW(foreach)'s, on the reference LM at d_model 64
    x 2 layers. Both are sums of passes over stacks the size of the parameters plus per-unit and
    per-channel vectors, so the ratio hardly depends on the size: it was 1.22x at d_model 64 x 2 and
    256 x 4 alike before the lift multiplied a gain's factor and its channel factor together, about
    1.15x after that, and 1.11-1.14x since the pairs' decay rides on their rebalance and the
    translated head takes torch's fused kernel."""
    traffic = step_traffic({"AdamW (foreach)": adamw, "DDCAdam": ddc_adam}, width=64, layers=2)["optimizers"]
    ours, reference = (traffic[name]["bytes_per_parameter"] for name in ("DDCAdam", "AdamW (foreach)"))
    assert ours <= 1.2 * reference


def test_an_eager_ddc_muon_step_reads_its_muon_gradients_once_before_newton_schulz():
    """DDCMuon's Muon batches take their canonical gradients per member into the momentum and stack
    the nesterov input straight into bfloat16, so no float32 stack of gradients is written and read
    again, and every write reads the bfloat16 direction as it is: at d_model 64 x 2 one step moves
    at most 1.22x the bytes of torch's Muon + AdamW (1.197x; 1.31x while a write member by member
    converted the direction to float32, 1.40x before the momentum change; 1.14x with
    ``stack_parameters=True``. At d_model 256 x 4 it is 1.26x, 1.196x with the option, against issue
    31's 1.2x: the pairs' frames and rebalance are most of the rest, docs/ddc_muon.md)."""
    traffic = step_traffic({"torch": muon_with_adamw_torch, "DDCMuon": ddc_muon(),
                            "held": ddc_muon(stack_parameters=True)}, width=64, layers=2)["optimizers"]
    counts = dispatched_ops(ddc_muon(), *model_with_gradients(64, n_layers=2)).counts
    torch_bytes = traffic["torch"]["bytes_per_parameter"]
    assert traffic["DDCMuon"]["bytes_per_parameter"] <= 1.22 * torch_bytes
    assert traffic["held"]["bytes_per_parameter"] <= 1.16 * torch_bytes
    assert counts["aten.stack.out"] >= 1 and counts["aten._foreach_lerp_.Scalar"] >= 1
    held_counts = dispatched_ops(ddc_muon(stack_parameters=True), *model_with_gradients(64, n_layers=2)).counts
    assert counts["aten._to_copy.default"] == held_counts["aten._to_copy.default"]


def test_a_translated_lm_head_costs_no_more_than_adamws_step():
    """The LM head that a logit shift translates takes Adam in torch's fused kernel on its stacked
    canonical gradient, and its decay toward the mean row is one pass: on a model whose embedding
    and head are most of it (d_model 64 x 2, 4,096 tokens) an eager step moves fewer bytes per
    parameter than AdamW(foreach) (DDCAdam 64.9 against 80) and than torch's Muon + AdamW (DDCMuon
    77.1 against 90.3). The head's earlier path (Adam as stacked operations, the decay in two passes
    and a copy back) made these 1.1x and 1.19x at d_model 256 with 8,192 tokens."""
    traffic = step_traffic({"AdamW": adamw, "DDCAdam": ddc_adam, "torch": muon_with_adamw_torch, "DDCMuon": ddc_muon()},
                           width=64, layers=2, vocab=4096)["optimizers"]
    bytes_of = {name: row["bytes_per_parameter"] for name, row in traffic.items()}
    assert bytes_of["DDCAdam"] < bytes_of["AdamW"] and bytes_of["DDCMuon"] < bytes_of["torch"]


def test_step_timings_record_each_steps_page_faults_with_malloc_keeping_freed_memory():
    """The timing harness fixes glibc's malloc thresholds (where the C library is glibc) and records
    the minor page faults of every timed step, per optimizer."""
    import importlib.util
    import platform

    from benchmarks.optimizer_steps import adamw, compare, ddc_adam, keep_freed_memory

    setting = keep_freed_memory()
    if platform.libc_ver()[0] == "glibc":
        assert setting is not None and "M_TRIM_THRESHOLD" in setting and "M_MMAP_THRESHOLD" in setting
    row = compare(32, {"AdamW (foreach)": adamw, "DDCAdam": ddc_adam}, warmup=1, rounds=3)
    unix = importlib.util.find_spec("resource") is not None
    for timing in row["optimizers"].values():
        assert len(timing["step_s"]) == 3
        if unix:
            assert len(timing["page_faults"]) == 3 and all(f >= 0 for f in timing["page_faults"])
        else:
            assert timing["page_faults"] is None


@pytest.mark.slow
def test_quick_run_writes_a_report_from_its_measurements(tmp_path):
    torch.set_num_threads(1)
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "benchmarks.json").read_text())
    report = (tmp_path / "benchmarks.md").read_text()
    assert (tmp_path / "benchmarks_step_time.png").stat().st_size > 0
    assert "Quick development run" in report
    assert f"{results['summary']['ddc_adam_ratio']:.2f}x" in report
    assert f"{results['summary']['ddc_adam_exponent']:.2f}" in report
    assert "## Dispatched operations per step" in report
    assert results["dispatch"]["rows"][0]["ops"]["DDCAdam"] > 0
    assert "| optimizer | zero_grad | forward and backward | step | iteration |" in report
    assert results["iteration"]["optimizers"]["DDCAdam"]["forward_backward"] > 0


def test_monitor_overhead_reports_what_it_measured():
    from benchmarks.monitor_overhead import PROBES, end_to_end, measure, render

    row = measure(32, rounds=1, every=5, idle_calls=10)
    assert [probe["probe_tokens"] for probe in row["probes"]] == [n * 64 for n in PROBES]
    for probe in row["probes"]:  # (reading + 4 idle calls) / (5 steps)
        assert probe["overhead"] == (probe["reading_s"] + 4 * row["idle_call_s"]) / (5 * row["step_s"]) > 0
    check = end_to_end(32, 1, every=2, blocks=1)
    report = render({"every": 5, "rows": [row], "end_to_end": check, "environment": {
        "date_utc": "now", "commit": "abc", "command": "test", "torch_threads": 1, "load_start": (0.0,) * 3,
        "load_end": (0.0,) * 3}})
    assert f"{row['probes'][-1]['overhead']:.2%}" in report and f"{check['overhead']:+.2%}" in report


@pytest.mark.slow
def test_compiled_benchmark_reads_inductors_kernels_and_bytes_from_a_cold_cache():
    """Each measurement is a fresh process with an empty inductor cache, so the kernels are generated
    (a warm cache would report none); compiled AdamW's are per tensor on a CPU, so two layers make more
    kernels than one, at the same estimated bytes per parameter."""
    from benchmarks.compiled import measure, render

    one, two = (measure("AdamW compiled", 16, layers) for layers in (1, 2))
    assert 0 < one["kernels"] < two["kernels"]
    assert one["bytes_per_parameter"] == pytest.approx(two["bytes_per_parameter"], rel=0.05)
    assert 28 <= one["bytes_per_parameter"] <= 60  # reads p, g, m, v and writes p, m, v, at least
    assert one["first_step_s"] > 0
    text = render({"environment": {"date_utc": "now", "commit": "abc", "command": "c", "torch": "t",
                                   "load_start": [0.0], "load_end": [0.0]},
                   "width": 16, "cold_width": 16, "cold_depth": 1, "optimizers": ["AdamW compiled"],
                   "rows": [one, two]})
    assert f"| AdamW compiled | {one['kernels']} / {two['kernels']} |" in text
