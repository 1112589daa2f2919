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


# -- bad input: one line, status 2, nothing written ------------------------------------------------

def tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("argv, message", [
    (["run", "cnn", "--out", "a_file/run"], "cannot create the run folder a_file/run: a_file is a file"),
    (["run", "cnn", "--out", "a_file"], "a_file exists and is not a folder"),
    (["run", "overtrain-lm", "--set", "batch_size=1000000000000000"],
     "OvertrainLMConfig needs at least 78.2 EiB for the activations one training step keeps (batch_size "
     "1000000000000000 x seq_len 64 x 2 layer(s) x width 176 x 4 bytes); cpu has "),
    (["run", "overtrain-lm", "--set", "batch_size=1e15"], "needs at least 78.2 EiB for the activations one "
                                                          "training step keeps (batch_size 1000000000000000 x"),
    (["run", "overtrain-lm", "--set", "n_layers=100000000000"], "x 100000000000 layer(s) x"),
    (["run", "grokking", "--set", "modulus=100000000"], "GrokkingConfig needs at least 142 PiB for the "
                                                        "modular-addition pairs (modulus 100000000^2"),
    (["run", "vit", "--set", "seeds=100000000000000000000"],
     "ViTExperimentConfig.seeds must be a non-empty tuple of distinct integers in [0, 2^31), got (100000000000000000000,)"),
    (["run", "vit", "--set", "seeds=(1, 2)", "--seeds", "3"], "seeds given twice: use --seeds or --set seeds=..."),
    (["run", "vit", "--set", "seeds=1.5"], "field seeds holds int values, got (1.5,)"),
    (["run", "vit", "--set", "seeds=()"], "seeds must be a non-empty tuple"),
    (["run", "overtrain-lm", "--set", "works=nosuch"], "unknown work(s) ['nosuch']; available: "),
    (["run", "overtrain-lm", "--set", "works=()"], "load_text needs at least one work name"),
    (["run", "overtrain-lm", "--set", "seq_len=100000"], "a stream of 16384 tokens holds no window of seq_len 100000"),
    (["run", "moe", "--set", "train_chars=1"], "train_chars must be at least 2, got 1"),
    (["run", "grokking", "--set", "modulus=1"], "modulus must be at least 2, got 1"),
    (["run", "bridge", "--set", "width=2"], "BridgeConfig.dead_counts must be below width=2, got (1, 2, 3, 4)"),
    (["run", "bridge", "--set", "checkpoints=1"], "BridgeConfig.checkpoints must be in [2, inf), got 1"),
    (["run", "rrr", "--set", "N=2"], "RRRConfig.widths must be at most min(M, N) = 2, got (2, 3)"),
    (["run"], "name an experiment to run (gaugeopt list), or continue a run with --resume DIR"),
    (["run", "--resume", "no_such_run"], "no_such_run/results.json does not exist: not a gaugeopt run folder"),
    (["run", "vit", "--resume", "no_such_run", "--set", "steps=2"],
     "--resume continues a run as it was configured; it takes no EXPERIMENT, --set"),
    (["report", "a_file"], "a_file/results.json does not exist"),
])
def test_bad_input_is_one_line_status_2_and_writes_nothing(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a run without --out would go under ./runs
    (tmp_path / "a_file").write_text("not a folder")
    before = tree(tmp_path)
    assert main([*argv, "--no-progress"] if argv[0] == "run" else argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gaugeopt {argv[0]}: error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert tree(tmp_path) == before


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


# -- what an interruption or a failure says it wrote ----------------------------------------------

CNN_FAST = ["run", "cnn", "--preset", "tiny", "--set", "steps=2", "--set", "eval_every=1", "--no-progress"]


def stop_at_unit(monkeypatch, number, error=KeyboardInterrupt):
    """Raise ``error`` as unit ``number`` (1-based) begins, after its checkpoint is written."""
    from gaugeopt.experiments.runner import RunContext

    original = RunContext.start_unit

    def start_unit(context, name, seed):
        go = original(context, name, seed) if number > 1 else None
        if len(context.units) == number - 1 + (number > 1):
            raise error("boom") if error is not KeyboardInterrupt else error()
        return go

    monkeypatch.setattr(RunContext, "start_unit", start_unit)


def test_ctrl_c_says_what_was_written_and_resume_finishes_the_run(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        stop_at_unit(patch, 2)
        assert main([*CNN_FAST, "--out", str(run_dir)]) == 130
    err = capsys.readouterr().err
    assert err == (f"gaugeopt run: interrupted (stopped by the user (Ctrl-C)) with 1 completed unit(s) checkpointed; "
                   f"wrote {run_dir / 'results.json'} (status 'interrupted') and {run_dir / 'report.md'}; "
                   f"continue with `gaugeopt run --resume {run_dir}`\n")
    assert read_results(run_dir)["status"] == "interrupted" and (run_dir / "report.md").is_file()
    assert main(["run", "--resume", str(run_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"resuming {run_dir}: 1 completed unit(s) kept, continuing after ('adamw', 0)\n")
    results = read_results(run_dir)
    assert results["status"] == "complete" and set(results["metrics"]) == {"adamw", "ddc-adam"}
    assert [entry["completed_units"] for entry in results["resumed"]] == [1]
    assert sorted(p.name for p in run_dir.iterdir() if p.suffix != ".png") == ["report.md", "results.json"]


def test_a_second_ctrl_c_while_the_report_is_written_is_said_not_hidden(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"

    def stopped_again(path):
        raise KeyboardInterrupt

    stop_at_unit(monkeypatch, 2)
    monkeypatch.setattr("gaugeopt.experiments.runner.write_report", stopped_again)
    assert main([*CNN_FAST, "--out", str(run_dir)]) == 130
    err = capsys.readouterr().err
    assert f"wrote {run_dir / 'results.json'} (status 'interrupted'); report.md was not written (stopped again " \
           f"while writing it; `gaugeopt report {run_dir}` writes it); continue with" in err
    assert "report.md written" not in err and f"and {run_dir / 'report.md'}" not in err
    assert read_results(run_dir)["status"] == "interrupted" and not (run_dir / "report.md").exists()


def test_ctrl_c_while_the_experiment_prepares_writes_nothing(tmp_path, monkeypatch, capsys):
    stop_at_unit(monkeypatch, 1)
    assert main([*CNN_FAST, "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert err == ("gaugeopt run: interrupted (stopped by the user (Ctrl-C)) before the first unit began; "
                   "nothing was written\n")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_run_shows_its_traceback_then_what_it_wrote(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    stop_at_unit(monkeypatch, 2, RuntimeError)
    assert main([*CNN_FAST, "--out", str(run_dir)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith(
        f"gaugeopt run: failed: RuntimeError: boom; wrote {run_dir / 'results.json'} (status 'failed') and "
        f"{run_dir / 'report.md'}; continue with `gaugeopt run --resume {run_dir}`\n")
    assert read_results(run_dir)["error"] == "RuntimeError: boom"


# -- a run folder in use, and one whose process was killed ----------------------------------------

HOLD_LOCK = """
import fcntl, json, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": "here", "since": "now"}).encode())
print("locked", flush=True)
time.sleep(600)
"""


def test_a_folder_in_use_is_refused_and_a_killed_writer_is_detected(tmp_path, capsys):
    """A process holding the run's lock is a live writer; once it is SIGKILLed the kernel drops its
    lock, and the 'running' it left is reported as a stopped run that --resume continues."""
    import signal

    run_dir = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        stop_at_unit(patch, 2)
        assert main([*CNN_FAST, "--out", str(run_dir)]) == 130
    results = json.loads((run_dir / "results.json").read_text())
    (run_dir / "results.json").write_text(json.dumps({**results, "status": "running"}))  # as a SIGKILL leaves it
    writer = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_dir / "run.lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert writer.stdout.readline() == "locked\n"
        capsys.readouterr()
        in_use = f"{run_dir} is being written by process {writer.pid} on here (since now)"
        for argv in ([*CNN_FAST, "--out", str(run_dir)], [*CNN_FAST, "--out", str(run_dir), "--overwrite"],
                     ["run", "--resume", str(run_dir)]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert in_use in err and err.count("\n") == 1, err
        assert main(["report", str(run_dir)]) == 0
        assert "stopped without finishing" not in capsys.readouterr().err  # it is running
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert main([*CNN_FAST, "--out", str(run_dir)]) == 2
    assert (f"{run_dir} holds a run that stopped without finishing (results.json says 'running' but its process is "
            f"gone); continue it with `gaugeopt run --resume {run_dir}` or replace it with --overwrite"
            in capsys.readouterr().err)
    assert main(["report", str(run_dir)]) == 0
    assert (f"gaugeopt report: note: the run in {run_dir} stopped without finishing: results.json says 'running' "
            f"but no process is writing it (killed?); continue it with `gaugeopt run --resume {run_dir}`"
            in capsys.readouterr().err)
    assert main(["run", "--resume", str(run_dir), "--no-progress"]) == 0
    assert read_results(run_dir)["status"] == "complete" and not (run_dir / "run.lock").exists()
