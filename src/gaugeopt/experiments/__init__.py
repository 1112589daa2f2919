"""Reproduction experiments: registry, run folders, plots, reports (see docs/experiments.md).

``run_experiment("overtrain-lm", "smoke")`` runs one experiment into ``runs/<name>-<preset>-<time>/``
with ``results.json`` (flushed as the run goes), PNG plots and ``report.md``;
``write_report(run_dir)`` rebuilds the plots and the report from ``results.json`` alone;
``resume_experiment(run_dir)`` continues a stopped run from its last completed unit.
"""

from .environment import select_device
from .registry import PRESETS, Experiment, experiment_names, get_experiment
from .report import render_report, write_report
from .runfolder import RunFolder, read_results
from .runner import ExperimentRun, RunContext, RunInterrupted, resume_experiment, run_experiment

__all__ = [
    "Experiment", "PRESETS", "experiment_names", "get_experiment",
    "RunFolder", "RunContext", "ExperimentRun", "RunInterrupted", "read_results", "run_experiment",
    "resume_experiment",
    "render_report", "write_report", "select_device",
]
