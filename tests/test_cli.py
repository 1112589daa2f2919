"""The ``gaugeopt`` command line: list, run, report, results, errors (demo and gauges: see marks)."""

from __future__ import annotations

import json
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
    reading = table[table.index("\nReading:\n"):]  # the reading ends the output
    assert " ".join(reading.split()[1:]) == " ".join(" ".join(results["reading"]).split())


# -- report and results on a malformed results.json: one line, status 2, nothing written ------------

def tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def valid_results(tmp_path_factory):
    """The results.json of a real (tiny) run."""
    run_dir = tmp_path_factory.mktemp("valid") / "run"
    assert main(["run", "cnn", "--preset", "tiny", "--out", str(run_dir), "--set", "arms=adamw", "--set", "steps=2",
                 "--set", "eval_every=1", "--no-progress"]) == 0
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.parametrize("change, message", [
    (lambda r: "{", "is not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
    (lambda r: [1], "results.json: the file must be an object, got list"),
    (lambda r: {k: v for k, v in r.items() if k != "claims"}, "results.json: the run's record lacks claims"),
    (lambda r: {**r, "status": "done"}, "results.json: status must be one of ['running', 'complete', "),
    (lambda r: {**r, "figures": [{"file": "../../outside.png", "series": []}]},
     "figures[0].file must be a plain file name ending in .png (no folder), got \"../../outside.png\""),
    (lambda r: {**r, "figures": [{"file": "results.json", "series": []}]}, "figures[0].file must be a plain file"),
    (lambda r: {**r, "curves": {"adamw": {"0": {"../x": [1.0]}}}}, "series name must be a plain file name"),
    (lambda r: {**r, "claims": [{"claim": "c", "anchor": "a"}]}, "claims[0].ours must be a string, got null"),
    (lambda r: {**r, "figures": [{"file": "a.png", "series": [{"label": "s", "x": [1], "y": [{"v": 1}]}]}]},
     "figures[0].series[0].y must be numbers, names or nulls, got list"),
    (lambda r: {**r, "metrics": {"adamw": 3}}, "metrics['adamw'] must be an object, got 3"),
])
def test_report_on_a_malformed_results_json_is_one_line_and_writes_nothing(change, message, valid_results, tmp_path,
                                                                           capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    changed = change(valid_results)
    (run_dir / "results.json").write_text(changed if isinstance(changed, str) else json.dumps(changed))
    capsys.readouterr()
    before = tree(tmp_path)
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gaugeopt report: error: {run_dir / 'results.json'}") and message in err, err
    assert err.count("\n") == 1
    assert tree(tmp_path) == before
    assert main(["results", str(run_dir)]) == 2 and message in capsys.readouterr().err


def test_every_results_json_in_docs_runs_passes_the_check():
    from pathlib import Path

    runs = sorted((Path(__file__).parents[1] / "docs" / "runs").glob("*/results.json"))
    assert runs
    for path in runs:
        read_results(path.parent)
