"""Reproduction experiments: registry, run folders, plots, reports (see docs/experiments.md).

``run_experiment("overtrain-lm", "smoke")`` runs one experiment into ``runs/<name>-<preset>-<time>/``
with ``results.json`` (flushed as the run goes), PNG plots and ``report.md``;
``write_report(run_dir)`` rebuilds the plots and the report from ``results.json`` alone.
"""

from .environment import select_device
from .registry import PRESETS, Experiment, experiment_names, get_experiment
from .report import render_report, write_report
from .runfolder import RunFolder, read_results
from .runner import RunContext, run_experiment

__all__ = [
    "Experiment", "PRESETS", "experiment_names", "get_experiment",
    "RunFolder", "RunContext", "read_results", "run_experiment",
    "render_report", "write_report", "select_device",
]
