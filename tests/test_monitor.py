"""DeadDirectionMonitor: the documented usage on the reference LM (the issue's acceptance check), what a
reading measures (known answers), that it leaves no trace in training, its cadence and its errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import gaugeopt
from benchmarks.optimizer_steps import reference_config
from gaugeopt.dds import dead_direction_signatures
from gaugeopt.experiments.common import per_token_cross_entropy as per_token_loss
from gaugeopt.models import TransformerLM, TransformerLMConfig
from gaugeopt.monitor import DEFAULT_OBSERVABLES, DeadDirectionMonitor, gauge_carrying_sites

VOCAB, SEQ = 256, 64


def train_step(model, optimizer, batch: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).backward()
    optimizer.step()


def event_scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series TensorBoard finds in ``log_dir``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


# ----- the acceptance check of the issue --------------------------------------------------------------------
@pytest.mark.parametrize("optimizer_name", ["AdamW", "DDCAdam"])
def test_documented_usage_on_the_reference_lm_logs_dds_and_gauge_drift(tmp_path, optimizer_name):
    pytest.importorskip("tensorboard")
    torch.manual_seed(0)
    model = TransformerLM(reference_config(64))
    tokens = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(1))
    gauges = gaugeopt.find_gauges(model, tokens, output="logits")
    optimizer = (torch.optim.AdamW(model.parameters(), lr=3e-3) if optimizer_name == "AdamW"
                 else gaugeopt.DDCAdam(model.parameters(), gauges, lr=3e-3))
    data = torch.Generator().manual_seed(2)
    probe = torch.randint(0, VOCAB, (2, SEQ + 1), generator=data)
    inputs, targets = probe[:, :-1], probe[:, 1:]
    loader = [torch.randint(0, VOCAB, (4, SEQ + 1), generator=data) for _ in range(50)]

    every, log_dir = 10, tmp_path / "runs" / optimizer_name
    monitor = DeadDirectionMonitor(model, gauges, probe=(inputs, targets),
                                   loss=per_token_loss, every=every, log_dir=log_dir)
    for batch in loader:
        train_step(model, optimizer, batch)
        monitor.step()
    monitor.close()

    scalars = event_scalars(log_dir)
    readings = [10, 20, 30, 40, 50]
    dds = [tag for tag in scalars if tag.startswith("dds/")]
    drift = {tag: series for tag, series in scalars.items() if tag.startswith("gauge_drift/")}
    assert len(dds) >= 4
    assert all([step for step, _ in scalars[tag]] == readings for tag in dds)  # one point per `every` steps
    assert len(dds) == len(gauge_carrying_sites(model, gauges)) * len(DEFAULT_OBSERVABLES) == 15 * 6
    assert drift and all([step for step, _ in series] == readings for series in drift.values())
    norm_gains = {tag: series for tag, series in drift.items() if tag.startswith("gauge_drift/norm_scale:")}
    assert len(norm_gains) == 5  # the four block norms and the final norm
    for tag, series in norm_gains.items():
        first, last = series[0][1], series[-1][1]
        if optimizer_name == "AdamW":
            assert last > 1e-3 and last > first, tag  # AdamW drifts along the orbits, and keeps drifting
        else:
            assert last < 1e-4, tag  # DDCAdam holds the norm gains: rounding at most
    assert [row["step"] for row in monitor.table()] == readings


def test_a_reading_is_the_dds_reading_of_the_probe_and_the_logger_gets_what_tensorboard_gets(tmp_path):
    pytest.importorskip("tensorboard")
    model, gauges, probe = small_lm()
    optimizer = gaugeopt.DDCAdam(model.parameters(), gauges, lr=1e-2)
    logged = []
    monitor = DeadDirectionMonitor(model, gauges, probe=probe, loss=per_token_loss, every=2, log_dir=tmp_path,
                                   logger=lambda scalars, step: logged.append((step, scalars)), optimizer=optimizer)
    for batch in batches(4):
        train_step(model, optimizer, batch)
        monitor.step()
    monitor.close()
    assert [step for step, _ in logged] == [2, 4]
    step, scalars = logged[-1]
    expected = dead_direction_signatures(model, *probe, loss=per_token_loss, sites=monitor.sites)
    for row in expected.rows:
        site = row.site.removesuffix(":output")
        for name in DEFAULT_OBSERVABLES:
            assert scalars[f"dds/{site}/{name}"] == getattr(row, name)
    assert scalars["frozen_units/total"] == 0.0
    assert monitor.table()[-1] == {"step": 4, **scalars, "reading_s": monitor.table()[-1]["reading_s"]}
    events = event_scalars(tmp_path)
    assert set(events) == set(scalars)
    for tag, value in scalars.items():  # TensorBoard stores float32
        assert events[tag][-1] == (4, pytest.approx(value, rel=1e-6, abs=1e-30))


# ----- known answers ----------------------------------------------------------------------------------------
def small_lm(seed: int = 0):
    """A float64 decoder (RMSNorm, SwiGLU, RoPE), its gauges and a probe of 2 x 8 tokens."""
    torch.manual_seed(seed)
    model = TransformerLM(TransformerLMConfig(vocab_size=17, d_model=16, n_layers=1, n_heads=2, d_ff=24,
                                              max_seq_len=16, init_std=0.3)).double()
    tokens = torch.randint(0, 17, (2, 9), generator=torch.Generator().manual_seed(seed + 1))
    gauges = gaugeopt.find_gauges(model, tokens[:1, :6], output="logits")
    return model, gauges, (tokens[:, :-1], tokens[:, 1:])


def batches(n: int, seed: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 17, (4, 9), generator=generator) for _ in range(n)]


@pytest.mark.parametrize("kind", ["norm_scale", "neuron_scale"])
def test_drift_of_a_pure_gauge_move_is_the_rms_of_its_log_scales(kind):
    # log|g| moves by log a under a norm's gain scaling; log(|in_i| / |w~_in|) by log a_i under a neuron's
    # (|w~_in| the section point of the unit's invariant size).
    model, gauges, probe = small_lm()
    monitor = DeadDirectionMonitor(model, gauges, probe=probe, loss=per_token_loss, every=1)
    element = gauges.sample(torch.Generator().manual_seed(4), families=kind)
    gauges.apply(model, element)
    scalars = monitor.step()
    assert element
    for family in gauges:
        drift = scalars.get(f"gauge_drift/{family.name}")
        if family.name in element:
            log_scale = element[family.name]["scale"].log()
            assert drift == pytest.approx(float(log_scale.pow(2).mean().sqrt()), rel=1e-12)
            assert drift > 0.05
        elif family.kind in ("qk_rotation", "vo_rotation"):
            assert drift is None  # no orbit coordinate, nothing logged
        else:
            assert drift < 1e-14  # the other families' coordinates are read off the norm-merged weights


def test_the_gradient_norm_is_gauge_invariant_where_torchs_is_not():
    model, gauges, probe = small_lm()
    moved = copy.deepcopy(model)
    moved_gauges = gauges.bind(moved)
    moved_gauges.apply(moved, moved_gauges.sample(torch.Generator().manual_seed(5)))
    norms = []
    for m, g in ((model, gauges), (moved, moved_gauges)):
        logits = m(probe[0])
        per_token_loss(logits, probe[1]).mean().backward()
        monitor = DeadDirectionMonitor(m, g, probe=probe, loss=per_token_loss, every=1)
        norms.append((monitor.step()["grad_norm/gauge_invariant"],
                      float(torch.nn.utils.get_total_norm([p.grad for p in m.parameters()]))))
    (ours, torchs), (ours_moved, torchs_moved) = norms
    assert ours_moved == pytest.approx(ours, rel=1e-10)
    assert abs(torchs_moved / torchs - 1) > 1e-2


def test_without_gauges_every_linear_layer_is_a_site_and_the_norm_is_torchs():
    model, _, probe = small_lm()
    train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), batches(1)[0])
    scalars = DeadDirectionMonitor(model, None, probe=probe, loss=per_token_loss, every=1).step()
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert {tag.split("/")[1] for tag in scalars if tag.startswith("dds/")} == set(linear)
    assert not any(tag.startswith("gauge_drift/") for tag in scalars)
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert scalars["grad_norm/gauge_invariant"] == pytest.approx(float(expected), rel=1e-12)


def test_frozen_units_of_ddc_adam_are_logged_per_family():
    model, gauges, probe = small_lm()
    with torch.no_grad():  # unit 3 of the MLP dead on both sides of its neuron pair
        model.blocks[0].ffn.up.weight[3] = 0.0
        model.blocks[0].ffn.down.weight[:, 3] = 0.0
    optimizer = gaugeopt.DDCAdam(model.parameters(), gauges, lr=1e-2)
    monitor = DeadDirectionMonitor(model, gauges, probe=probe, loss=per_token_loss, every=1, optimizer=optimizer)
    with pytest.warns(RuntimeWarning, match="froze"):
        train_step(model, optimizer, batches(1)[0])
    scalars = monitor.step()
    family = next(f.name for f in gauges if f.kind == "neuron_scale")
    assert optimizer.frozen == {family: (3,)}
    assert scalars["frozen_units/total"] == 1.0 and scalars[f"frozen_units/{family}"] == 1.0


# ----- a reading leaves no trace ------------------------------------------------------------------------------
def test_training_with_a_reading_every_step_equals_training_without():
    model, gauges, probe = small_lm()
    watched = copy.deepcopy(model)
    optimizers = [gaugeopt.DDCAdam(m.parameters(), gauges.bind(m), lr=1e-2) for m in (model, watched)]
    monitor = DeadDirectionMonitor(watched, gauges.bind(watched), probe=probe, loss=per_token_loss, every=1,
                                   optimizer=optimizers[1])
    for batch in batches(5):
        train_step(model, optimizers[0], batch)
        train_step(watched, optimizers[1], batch)
        grads = [p.grad.clone() for p in watched.parameters()]
        monitor.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(watched.parameters(), grads))
        assert watched.training and all(m.training for m in watched.modules())
    assert len(monitor.table()) == 5
    for (name, p), q in zip(model.named_parameters(), watched.parameters()):
        assert torch.equal(p, q), name


# ----- cadence ----------------------------------------------------------------------------------------------
def test_step_counts_calls_or_takes_the_callers_step_and_reads_each_multiple_once():
    model, gauges, probe = small_lm()
    monitor = DeadDirectionMonitor(model, gauges, probe=probe, loss=per_token_loss, every=3)
    assert monitor.step(0) is None  # step 0 is no multiple to read at (read(0) takes a baseline)
    read = [step for step in range(1, 10) if monitor.step() is not None]
    assert read == [3, 6, 9]
    assert monitor.step(9) is None  # the same step again (gradient accumulation): read once
    assert monitor.step(12) is not None and monitor.step(13) is None
    assert monitor.steps == [3, 6, 9, 12] and len(monitor.readings) == 4
    assert monitor.read(14) is not None and monitor.steps[-1] == 14


def test_plot_draws_four_panels_and_saves_them(tmp_path):
    model, gauges, probe = small_lm()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    monitor = DeadDirectionMonitor(model, gauges, probe=probe, loss=per_token_loss, every=1)
    for batch in batches(3):
        train_step(model, optimizer, batch)
        monitor.step()
    figure = monitor.plot(tmp_path / "monitor.png", title="AdamW")
    assert (tmp_path / "monitor.png").stat().st_size > 10_000
    assert len(figure.axes) == 4
    assert len(figure.axes[0].lines) == len(monitor.sites)
    drift_lines = {line.get_label() for line in figure.axes[2].lines}
    assert drift_lines == {f.name for f in gauges if f.kind not in ("qk_rotation", "vo_rotation")}
    with pytest.raises(ValueError, match="axes"):
        monitor.plot(axes=figure.axes[:3])


# ----- bad input --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, error, field", [
    (dict(every=0), ValueError, "every"),
    (dict(every=2.5), ValueError, "every"),
    (dict(probe=(1, 2, 3)), ValueError, "probe"),
    (dict(loss="mean"), TypeError, "loss"),
    (dict(logger=42), TypeError, "logger"),
    (dict(sites=["blocks.0.nowhere"]), ValueError, "nowhere"),
    (dict(sites=["head", "head:output"]), ValueError, "twice"),
    (dict(observables=["logdet_X"]), ValueError, "observables"),
    (dict(gauges="all"), TypeError, "gauges"),
])
def test_bad_arguments_are_refused_naming_the_field(change, error, field):
    model, gauges, probe = small_lm()
    arguments = dict(gauges=gauges, probe=probe, loss=per_token_loss, every=1) | change
    with pytest.raises(error, match=field) as raised:
        DeadDirectionMonitor(model, arguments.pop("gauges"), **arguments)
    assert "\n" not in str(raised.value)


def test_a_scalar_loss_is_refused_at_the_first_reading_and_a_closed_monitor_does_not_read():
    model, gauges, probe = small_lm()
    monitor = DeadDirectionMonitor(model, gauges, probe=probe, every=1,
                                   loss=lambda logits, y: per_token_loss(logits, y).mean())
    with pytest.raises(ValueError, match="per-sample"):
        monitor.step()
    assert all(m.training for m in model.modules())  # the modes are restored after a failed reading
    monitor.close()
    with pytest.raises(RuntimeError, match="closed"):
        monitor.read(5)
