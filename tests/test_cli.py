"""The ``gaugeopt`` command line: list, run, report, results, errors (demo and gauges: see marks)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gaugeopt.cli import main
from gaugeopt.experiments import experiment_names, read_results


def test_list_names_every_experiment(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in experiment_names())


def test_run_report_and_results_round_trip(tmp_path, capsys):
    run_dir = tmp_path / "vit"
    assert main(["run", "vit", "--preset", "tiny", "--seeds", "3", "--device", "cpu", "--out", str(run_dir),
                 "--set", "arms=('adamw',)", "--set", "steps=4", "--no-progress"]) == 0
    assert f"report: {run_dir / 'report.md'}" in capsys.readouterr().out
    results = read_results(run_dir)
    assert results["seeds"] == [3] and results["config"]["steps"] == 4 and results["config"]["arms"] == ["adamw"]
    (run_dir / "report.md").unlink()
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.md").read_text().startswith("# vit (tiny preset)")
    table = tmp_path / "results.md"
    assert main(["results", str(run_dir), "--output", str(table)]) == 0
    assert "| vit | tiny |" in table.read_text()


@pytest.mark.parametrize("argv, message", [
    (["run", "vit", "--preset", "tiny", "--set", "learning_rate=1"], "no config field"),
    (["run", "vit", "--preset", "tiny", "--device", "abacus"], "unknown device"),
    (["run", "vit", "--preset", "huge"], "unknown preset 'huge' for vit"),
    (["report", "/nonexistent/run"], "not a gaugeopt run folder"),
])
def test_bad_input_gives_a_one_line_error_and_status_2(argv, message, capsys, tmp_path):
    if argv[0] == "run":
        argv = [*argv, "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith(f"gaugeopt {argv[0]}: error:")


@pytest.mark.parametrize("flags, field", [
    (["--seeds", "-1"], "seeds"),
    (["--seeds", "0", "0"], "seeds"),
    (["--set", "steps=-5"], "steps"),
    (["--set", "val_fraction=1.5"], "val_fraction"),
    (["--set", "arms=sgd"], "arms"),
])
@pytest.mark.parametrize("with_out", [False, True])
def test_bad_config_values_give_one_line_and_write_nothing(flags, field, with_out, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default run folder would go under ./runs
    out = ["--out", str(tmp_path / "run")] if with_out else []
    assert main(["run", "vit", "--preset", "smoke", *flags, *out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gaugeopt run: error: ViTExperimentConfig.") and f".{field} must be" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_the_installed_command_refuses_negative_seeds_without_a_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "gaugeopt.cli", "run", "vit", "--preset", "smoke", "--seeds", "-1"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "seeds must be" in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_out_on_an_existing_run_needs_overwrite(tmp_path, capsys):
    run_dir = tmp_path / "vit"
    argv = ["run", "vit", "--preset", "tiny", "--device", "cpu", "--out", str(run_dir), "--set", "arms=adamw",
            "--set", "steps=2", "--no-progress"]
    assert main(argv) == 0
    first = read_results(run_dir)["started"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("gaugeopt run: error:") and "--overwrite" in err and err.count("\n") == 1
    assert read_results(run_dir)["started"] == first
    assert main([*argv, "--overwrite"]) == 0
    assert read_results(run_dir)["status"] == "complete"


def test_unknown_experiment_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "no-such-experiment"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_module_entry_point_runs_in_a_fresh_process():
    done = subprocess.run([sys.executable, "-m", "gaugeopt.cli", "list"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "overtrain-lm" in done.stdout


def test_gauges_prints_the_summary_of_a_reference_model(capsys):
    assert main(["gauges", "mlp"]) == 0
    assert "neuron_scale" in capsys.readouterr().out  # the ReLU units rescale


@pytest.mark.slow
def test_demo_ends_with_its_verdict_table(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"report: {tmp_path / 'demo' / 'report.md'}" in out
    results = read_results(tmp_path / "demo")
    assert results["status"] == "complete" and set(results["metrics"]) == {"adamw wd=0", "ddc-adam wd=0"}
    table = out[out.index("Verdicts: overtrain-lm"):]
    assert all(claim["claim"] in table for claim in results["claims"])
    reading = table[table.index("\nReading:\n"):table.index("\nHow to read this:\n")]  # then what the words mean
    assert " ".join(reading.split()[1:]) == " ".join(" ".join(results["reading"]).split())
    assert "a cell is one (site, observable) pair" in " ".join(table.split())
