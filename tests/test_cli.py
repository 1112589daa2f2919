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
    (["report", "/nonexistent/run"], "not a gaugeopt run folder"),
])
def test_bad_input_gives_a_one_line_error_and_status_2(argv, message, capsys, tmp_path):
    if argv[0] == "run":
        argv = [*argv, "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith(f"gaugeopt {argv[0]}: error:")


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
    reading = table[table.index("\nReading:\n"):]  # the reading ends the output
    assert " ".join(reading.split()[1:]) == " ".join(" ".join(results["reading"]).split())
