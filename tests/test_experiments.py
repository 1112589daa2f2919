"""The experiment framework: run folders, reports rebuilt from JSON, interrupts, registry, training."""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import FrozenInstanceError, dataclass, fields, replace

import pytest
import torch

from gaugeopt.experiments import (
    PRESETS,
    Experiment,
    RunFolder,
    experiment_names,
    get_experiment,
    read_results,
    run_experiment,
    select_device,
    write_report,
)
from gaugeopt.experiments.checks import ConfigError, check_memory, format_bytes, memory_floor
from gaugeopt.experiments.results_table import results_markdown
from gaugeopt.experiments.runfolder import to_json
from gaugeopt.experiments.training import OptimizerSettings, build_optimizer, warmup_cosine
from gaugeopt.models import TransformerLM, TransformerLMConfig


@dataclass(frozen=True)
class CountingConfig:
    steps: int = 5
    stop_at: int | None = None  # raise KeyboardInterrupt at this step
    fail_at: int | None = None  # raise RuntimeError at this step
    seeds: tuple[int, ...] = (0,)


def counting_run(config: CountingConfig, context) -> None:
    """A real, tiny experiment: fits a scalar by gradient descent and logs as it goes."""
    folder = context.folder
    for seed in config.seeds:
        torch.manual_seed(seed)
        w = torch.zeros((), requires_grad=True)
        for step in range(config.steps):
            if step == config.stop_at:
                raise KeyboardInterrupt
            if step == config.fail_at:
                raise RuntimeError("boom")
            loss = (w - 3.0) ** 2
            loss.backward()
            with torch.no_grad():
                w -= 0.25 * w.grad
                w.grad = None
            folder.log_point("gd", seed, step=step, loss=loss.item())
            folder.flush()
        folder.set_metric("gd", "w", w.item())
    folder.add_figure({"file": "w.png", "kind": "bar", "title": "w",
                       "series": [{"label": "w", "x": ["gd"], "y": [w.item()]}]})
    folder.add_claim("w reaches 3", "3", f"{w.item():.3f}", abs(w.item() - 3) < 0.1)


COUNTING = Experiment("counting", "gradient descent on a scalar",
                      {p: CountingConfig() for p in PRESETS}, counting_run)


def test_run_folder_holds_results_plots_and_report(tmp_path):
    path = run_experiment(COUNTING, "smoke", out=tmp_path / "run", progress=False, steps=20)
    results = read_results(path)
    assert results["status"] == "complete" and results["experiment"] == "counting"
    assert results["config"]["steps"] == 20 and results["seeds"] == [0]
    assert results["environment"]["versions"]["torch"] == torch.__version__
    assert results["environment"]["machine"]["device"] == "cpu"
    assert "total" in results["timings"] and results["finished"] is not None
    assert len(results["curves"]["gd"]["0"]["loss"]) == 20
    assert abs(results["metrics"]["gd"]["w"] - 3) < 0.1
    assert {p.name for p in path.glob("*.png")} == {"curve_loss.png", "w.png"}
    report = (path / "report.md").read_text()
    assert "# counting (smoke preset)" in report and "| w reaches 3 | 3 |" in report and "reproduced" in report
    assert not list(path.glob("*.tmp"))


def test_report_is_rebuilt_from_results_json_alone(tmp_path):
    path = run_experiment(COUNTING, "smoke", out=tmp_path / "run", progress=False)
    before = (path / "report.md").read_text()
    for file in [*path.glob("*.png"), path / "report.md"]:
        file.unlink()
    write_report(path)
    assert (path / "report.md").read_text() == before
    assert (path / "curve_loss.png").stat().st_size > 1000


def test_interrupted_run_leaves_a_readable_partial_folder(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run_experiment(COUNTING, "smoke", out=tmp_path / "run", progress=False, steps=10, stop_at=4)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "interrupted"
    assert results["curves"]["gd"]["0"]["step"] == [0, 1, 2, 3]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Status: interrupted" in report and "stopped before its end" in report


def test_failed_run_records_the_error_and_reraises(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        run_experiment(COUNTING, "smoke", out=tmp_path / "run", progress=False, fail_at=2)
    results = read_results(tmp_path / "run")
    assert results["status"] == "failed" and results["error"] == "RuntimeError: boom"


def test_results_table_lists_each_claim_with_its_verdict(tmp_path):
    a = run_experiment(COUNTING, "smoke", out=tmp_path / "a", progress=False, steps=20)
    b = run_experiment(COUNTING, "full", out=tmp_path / "b", progress=False, steps=1)
    table = results_markdown([a, b])
    rows = [line for line in table.splitlines() if line.startswith("| counting")]
    assert len(rows) == 2
    assert "| reproduced |" in rows[0] and "| not reproduced |" in rows[1]
    seeds = [len(read_results(run)["seeds"]) for run in (a, b)]
    assert [row.split(" | ")[2] for row in rows] == [str(n) for n in seeds]
    commit = read_results(a)["environment"]["source"]["commit"]
    if commit:
        assert commit[:10] in rows[0]


def test_read_results_rejects_a_folder_without_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a gaugeopt run folder"):
        read_results(tmp_path)


def test_to_json_converts_tensors_dataclasses_and_non_finite_values():
    data = to_json({"t": torch.tensor([1.0, float("nan")]), "c": CountingConfig(), "x": (1, math.inf),
                    "s": torch.tensor(2.5)})
    assert data == {"t": [1.0, None], "c": {"steps": 5, "stop_at": None, "fail_at": None, "seeds": [0]},
                    "x": [1, None], "s": 2.5}
    json.dumps(data, allow_nan=False)


def test_log_points_are_flushed_when_the_run_finishes(tmp_path):
    folder = RunFolder(tmp_path, experiment="x", preset="tiny", config={}, seeds=[0],
                       device=torch.device("cpu"), flush_every=3600)
    folder.log_point("arm", 0, step=0, loss=1.0)
    folder.log_point("arm", 0, step=1, loss=0.5)
    folder.finish()
    assert read_results(tmp_path)["curves"]["arm"]["0"] == {"step": [0, 1], "loss": [1.0, 0.5]}


def test_device_selection():
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert select_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            select_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        select_device("abacus")


def test_registry_has_every_experiment_with_frozen_presets():
    assert experiment_names() == ["overtrain-lm", "vit", "grokking", "moe", "bridge", "rrr", "modadd-width",
                                  "cnn", "readout-clock"]
    for name in experiment_names():
        experiment = get_experiment(name)
        assert experiment.name == name and set(PRESETS) <= set(experiment.presets)
        config = experiment.presets["smoke"]
        with pytest.raises(FrozenInstanceError):
            config.seeds = (1,)
        assert experiment.config("full", seeds=[3, 4]).seeds == (3, 4)


def test_registry_rejects_unknown_names_presets_and_fields():
    with pytest.raises(ValueError, match="unknown experiment"):
        get_experiment("nope")
    experiment = get_experiment("vit")
    with pytest.raises(ValueError, match="unknown preset"):
        experiment.config("huge")
    with pytest.raises(ValueError, match="no config field"):
        experiment.config("smoke", learning_rate=1.0)
    with pytest.raises(ValueError, match="seeds must be a non-empty tuple"):
        experiment.config("smoke", seeds=[])
    with pytest.raises(ValueError, match="field seeds holds int values"):
        experiment.config("smoke", seeds=[1.5])  # not truncated to 1
    with pytest.raises(ValueError, match="expects int"):
        experiment.config("smoke", steps=1.5)
    assert experiment.config("smoke", steps=2e2).steps == 200  # a whole float is taken as the int it is
    with pytest.raises(ValueError, match="holds str values"):
        experiment.config("smoke", arms=(1, 2))


def _numeric_fields(config) -> list[str]:
    """Fields holding numbers or tuples of numbers (or None, for an optional count), seeds aside."""
    def numeric(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    return [f.name for f in fields(config) if f.name != "seeds" and (
        getattr(config, f.name) is None or numeric(getattr(config, f.name))
        or (isinstance(getattr(config, f.name), tuple) and all(map(numeric, getattr(config, f.name)))))]


@pytest.mark.parametrize("name", experiment_names())
def test_every_numeric_config_field_is_checked_where_the_config_is_defined(name):
    """No count, size, rate or fraction of any experiment accepts -1; fractions refuse 1.5; seeds
    must be distinct and non-negative; arms must be known. Each error is one line naming the field."""
    experiment = get_experiment(name)
    smoke = experiment.presets["smoke"]
    numeric = _numeric_fields(smoke)
    assert len(numeric) >= 8
    bad = [(field, -1) for field in numeric]
    bad += [(field, 1.5) for field in numeric
            if field.endswith(("_fraction", "_ratio", "_accuracy")) and isinstance(getattr(smoke, field), float)]
    bad += [("seeds", (-1,)), ("seeds", (0, 0))]
    if hasattr(smoke, "arms"):
        bad += [("arms", ("adamw", "adamw")), ("arms", ("sgd",))]
    for field, value in bad:
        with pytest.raises(ConfigError) as error:
            if field == "seeds":
                experiment.config("smoke", seeds=list(value))
            else:
                experiment.config("smoke", **{field: value})
        message = str(error.value)
        assert f".{field} must be" in message and "\n" not in message, (field, value, message)
    for preset in PRESETS:  # the presets themselves pass (they are checked when the module loads)
        assert experiment.config(preset) == experiment.presets[preset]


def test_config_checks_name_the_rule():
    vit = get_experiment("vit")
    with pytest.raises(ConfigError, match=r"ViTExperimentConfig.steps must be positive, got -5"):
        vit.config("smoke", steps=-5)
    with pytest.raises(ConfigError, match=r"val_fraction must be in \(0, 1\), got 1.0"):
        vit.config("smoke", val_fraction=1.0)
    with pytest.raises(ConfigError, match=r"d_model must be divisible by n_heads=5"):
        vit.config("smoke", n_heads=5)
    assert vit.config("smoke", warmup_steps=0, weight_decay=0).warmup_steps == 0  # zero is allowed there
    with pytest.raises(ConfigError, match=r"top_k must be at most n_experts=8"):
        get_experiment("moe").config("smoke", top_k=9)
    with pytest.raises(ConfigError, match=r"dataset must be one of"):
        vit.config("smoke", dataset="cifar")


def test_an_existing_run_folder_is_refused_unless_overwritten(tmp_path):
    path = run_experiment(COUNTING, "smoke", out=tmp_path / "run", progress=False, steps=4)
    (path / "notes.txt").write_text("mine")
    (path / "curve_old.png").write_bytes(b"a plot of an earlier run")
    before = (path / "results.json").read_text()
    with pytest.raises(FileExistsError, match="holds a run already"):
        run_experiment(COUNTING, "smoke", out=path, progress=False, steps=6)
    assert (path / "results.json").read_text() == before  # untouched
    run_experiment(COUNTING, "smoke", out=path, progress=False, steps=6, overwrite=True)
    results = read_results(path)
    assert results["status"] == "complete" and results["config"]["steps"] == 6
    assert len(results["curves"]["gd"]["0"]["loss"]) == 6
    assert (path / "notes.txt").read_text() == "mine"  # not the run's: kept
    assert not (path / "curve_old.png").exists()  # the earlier run's plot: gone


def test_a_folder_that_is_not_a_run_folder_is_never_written_into(tmp_path):
    (tmp_path / "papers").mkdir()
    (tmp_path / "papers" / "draft.tex").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="not a gaugeopt run folder"):
            run_experiment(COUNTING, "smoke", out=tmp_path / "papers", progress=False, overwrite=overwrite)
    assert [p.name for p in (tmp_path / "papers").iterdir()] == ["draft.tex"]
    (tmp_path / "empty").mkdir()
    assert read_results(run_experiment(COUNTING, "smoke", out=tmp_path / "empty", progress=False))["status"] == "complete"


def test_cross_field_rules_of_bridge_and_rrr():
    bridge, rrr = get_experiment("bridge"), get_experiment("rrr")
    with pytest.raises(ConfigError, match=r"BridgeConfig.dead_counts must be below width=4, got \(1, 4\)"):
        bridge.config("tiny", dead_counts=(1, 4))
    with pytest.raises(ConfigError, match=r"BridgeConfig.checkpoints must be in \[2, inf\), got 1"):
        bridge.config("tiny", checkpoints=1)
    with pytest.raises(ConfigError, match=r"RRRConfig.widths must be at most min\(M, N\) = 3, got \(1, 4\)"):
        rrr.config("tiny", widths=(1, 4))
    with pytest.raises(ConfigError, match=r"RRRConfig.calibration_cell must be \(H, r\) with r <= H <= min"):
        rrr.config("tiny", calibration_cell=(1, 2))


def test_seeds_are_converted_like_any_field_and_bounded():
    vit = get_experiment("vit")
    assert vit.config("smoke", seeds=7).seeds == (7,) and vit.config("smoke", seeds=[2**31 - 1]).seeds == (2**31 - 1,)
    for seeds in ([2**31], [True]):
        with pytest.raises(ConfigError, match=r"seeds must be a non-empty tuple of distinct integers in \[0, 2\^31\)"):
            vit.config("smoke", seeds=seeds)


@pytest.mark.parametrize("name", experiment_names())
def test_the_memory_floor_refuses_impossible_sizes_and_never_a_preset(name):
    """Every preset fits (the floor is a lower bound, far below any machine); scaling the size fields
    that are the product's factors by 10**12 is refused with a one-line message naming them."""
    experiment = get_experiment(name)
    for preset in PRESETS:
        need, _ = memory_floor(experiment.presets[preset])
        assert need < 2**30, (preset, need)  # under 1 GiB
        check_memory(experiment.presets[preset], torch.device("cpu"))
    config = experiment.presets["tiny"]
    grown = {f: getattr(config, f) * 10**12 for f in ("batch_size", "n_layers", "depth", "d_ff", "modulus", "width")
             if isinstance(getattr(config, f, None), int)}
    if not grown:  # rrr: no size it must hold at once is a field
        assert memory_floor(config)[0] < 2**20
        return
    field, value = next(iter(grown.items()))
    with pytest.raises(ConfigError) as error:
        check_memory(experiment.config("tiny", **{field: value}), torch.device("cpu"), available=2**40)
    message = str(error.value)
    assert message.startswith(f"{type(config).__name__} needs at least ") and "\n" not in message
    assert str(value) in message and message.endswith("; cpu has 1 TiB")


def test_the_memory_floor_is_the_largest_tensor_it_names():
    lm = get_experiment("overtrain-lm").config("tiny", batch_size=10, seq_len=20, n_layers=3, d_model=16, d_ff=40)
    assert memory_floor(lm) == (10 * 20 * 3 * 40 * 4, "the activations one training step keeps (batch_size 10 x "
                                "seq_len 20 x 3 layer(s) x width 40 x 4 bytes)")
    moe = get_experiment("moe").config("tiny", batch_size=1, seq_len=1, n_layers=2, n_experts=50, d_model=64, d_ff=64)
    assert memory_floor(moe) == (2 * 50 * 64 * 64 * 4, "the feed-forward weights (2 layer(s) x 50 expert(s) x "
                                 "d_model 64 x d_ff 64 x 4 bytes)")
    grokking = get_experiment("grokking").config("tiny", modulus=1000)
    assert memory_floor(grokking) == (1000**2 * 16, "the modular-addition pairs (modulus 1000^2 x 2 int64 tokens)")
    assert format_bytes(1536) == "1.5 KiB" and format_bytes(3 * 2**60) == "3 EiB" and format_bytes(7) == "7 bytes"


def test_config_overrides_take_the_preset_types():
    experiment = get_experiment("vit")
    config = experiment.config("smoke", arms="adamw", lr=1, steps=7)
    assert config.arms == ("adamw",) and config.lr == 1.0 and isinstance(config.lr, float) and config.steps == 7


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(100, 100, 10, 0.1) == pytest.approx(0.1)


def test_muon_arm_leaves_embedding_head_and_vectors_to_adamw():
    torch.manual_seed(0)
    model = TransformerLM(TransformerLMConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2, d_ff=16))
    bundle = build_optimizer("muon", model, OptimizerSettings(), total_steps=10,
                             example_inputs=torch.randint(0, 11, (2, 3)))
    muon, adamw = bundle.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for g in adamw.param_groups for p in g["params"]) == [
        "blocks.0.norm1.weight", "blocks.0.norm2.weight", "embed.weight", "head.weight", "norm.weight"]
    hidden = [p for g in muon.param_groups for p in g["params"]]
    assert all(p.ndim == 2 for p in hidden) and len(hidden) == 7  # q, k, v, o, gate, up, down


def test_sigterm_finishes_the_run_as_interrupted(tmp_path):
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(tmp_path)!r})
from dataclasses import replace
from gaugeopt.experiments import Experiment, PRESETS, run_experiment
import tests_counting
def run(config, context):
    context.folder.log_point("gd", 0, step=0, loss=1.0)
    os.kill(os.getpid(), signal.SIGTERM)
    raise AssertionError("SIGTERM did not stop the run")
exp = Experiment("counting", "x", {{p: tests_counting.CountingConfig() for p in PRESETS}}, run)
try:
    run_experiment(exp, "smoke", out={str(tmp_path / 'run')!r}, progress=False)
except KeyboardInterrupt:
    sys.exit(130)
"""
    (tmp_path / "tests_counting.py").write_text(
        "from dataclasses import dataclass\n@dataclass(frozen=True)\nclass CountingConfig:\n"
        "    seeds: tuple = (0,)\n")
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr
    results = read_results(tmp_path / "run")
    assert results["status"] == "interrupted" and "signal" in results["error"]
    assert (tmp_path / "run" / "report.md").read_text().count("Status: interrupted") == 1


def test_run_sets_torch_threads_and_restores_them(tmp_path):
    before = torch.get_num_threads()
    path = run_experiment(COUNTING, "smoke", out=tmp_path / "run", progress=False, threads=1)
    assert read_results(path)["environment"]["machine"]["torch_threads"] == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"):
        run_experiment(COUNTING, "smoke", out=tmp_path / "bad", progress=False, threads=0)


def test_terminal_summary_explains_the_verdicts_and_terms_it_uses():
    from gaugeopt.experiments.report import VERDICT_MEANINGS, terminal_summary

    results = {"experiment": "overtrain-lm", "preset": "smoke", "seeds": [0, 1, 2], "status": "complete",
               "claims": [{"claim": "final val-train gap: DDCAdam below AdamW", "anchor": "0.67 vs 5.88",
                           "ours": "gap 4.3 (DDCAdam) vs 4.7 (AdamW)", "reproduced": False,
                           "verdict": "direction only"},
                          {"claim": "more readable dead-direction cells with DDCAdam", "anchor": "32/65 vs 7/65",
                           "ours": "not counted", "reproduced": None, "verdict": "not measurable (instrument)"}]}
    text = terminal_summary(results, width=200)
    assert "How to read this:" in text
    assert f"DIRECTION ONLY: {VERDICT_MEANINGS['direction only']}" in text
    assert f"NOT MEASURABLE (INSTRUMENT): {VERDICT_MEANINGS['not measurable (instrument)']}" in text
    assert "a cell is one (site, observable) pair" in text and "REPRODUCED:" not in text


def test_results_rows_say_which_optimizer_core_a_run_used():
    from gaugeopt.experiments.results_table import OPTIMIZER_CORES, is_ancestor, optimizer_core

    current = OPTIMIZER_CORES[-1][0]
    if is_ancestor(current, "HEAD") is None:
        pytest.skip("no git history in this checkout")
    before = subprocess.run(["git", "rev-parse", f"{current}~1"], capture_output=True, text=True).stdout.strip()

    def results(arms, commit):
        return {"config": {"arms": arms}, "environment": {"source": {"commit": commit}}}

    assert optimizer_core(results(["adamw"], before)) == "not used"  # bridge, rrr, AdamW-only runs
    assert optimizer_core(results(["adamw", "ddc-adam"], current)).startswith("current")
    assert optimizer_core(results(["muon", "ddc-muon"], before)).startswith(f"superseded: before `{current[:7]}`")
    assert optimizer_core(results(["ddc-adam"], "0" * 40)).startswith("unknown")


def test_lr_scale_multiplies_every_rate_of_an_arm_and_lr_scales_are_checked():
    from gaugeopt.experiments.training import OptimizerSettings, arm_lr_scale, build_optimizer
    from gaugeopt.experiments.vit import PRESETS as VIT
    from gaugeopt.models import MoEConfig, MoELM

    torch.manual_seed(0)
    model = MoELM(MoEConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, n_experts=2, top_k=1, d_ff=16,
                            max_seq_len=8))
    plain = build_optimizer("symcompat", model, OptimizerSettings(), 10)
    scaled = build_optimizer("symcompat", model, OptimizerSettings(lr_scale=0.5), 10)
    rates = [[g["lr"] for g in opt.param_groups] for opt in plain.optimizers]
    halved = [[g["lr"] for g in opt.param_groups] for opt in scaled.optimizers]
    assert len(set(rates[0])) > 1 and halved == [[r / 2 for r in row] for row in rates]  # each group's own rate
    config = VIT["tiny"]
    assert arm_lr_scale(config, "adamw") == 1.0
    assert arm_lr_scale(replace(config, lr_scales=(("ddc-adam", 2.0),)), "ddc-adam") == 2.0
    for bad in ((("sgd", 2.0),), (("adamw", 0.0),), (("adamw", 1.0), ("adamw", 2.0)), ("adamw",)):
        with pytest.raises(ConfigError, match="lr_scales"):
            replace(config, lr_scales=bad)


def test_a_sweep_runs_each_factor_once_and_takes_the_best(tmp_path):
    from gaugeopt.experiments.sweep import sweep_arm

    summary = sweep_arm("vit", "tiny", "adamw", out=tmp_path, scales=(0.5, 1.0, 2.0), progress=False)
    assert sorted(summary["readings"]) == ["0.5", "1", "2"] and summary["seed"] == 100
    best = min(summary["readings"], key=summary["readings"].get)
    assert summary["chosen_scale"] == float(best) and summary["at_edge"] == (best in ("0.5", "2"))
    for factor in ("0.5", "1", "2"):
        results = read_results(tmp_path / f"adamw-x{factor}")
        assert results["config"]["arms"] == ["adamw"] and results["config"]["lr_scales"] == [["adamw", float(factor)]]
        assert results["metrics"]["adamw"]["val_loss"] == pytest.approx(summary["readings"][factor])
    assert json.loads((tmp_path / "sweep-adamw.json").read_text())["chosen_scale"] == summary["chosen_scale"]
    with pytest.raises(ValueError, match="no sweep protocol"):
        sweep_arm("bridge", "tiny", "adamw", out=tmp_path)
    with pytest.raises(ValueError, match="not an arm"):
        sweep_arm("vit", "tiny", "muon", out=tmp_path)
