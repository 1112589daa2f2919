"""Run an experiment into a fresh run folder and finish it with plots and a report, whatever happens."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .checks import check_memory
from .environment import select_device
from .registry import Experiment, get_experiment
from .report import write_report
from .runfolder import RunFolder

DEFAULT_RUNS_DIR = Path("runs")


@dataclass
class RunContext:
    """What an experiment's ``run`` receives besides its config."""

    folder: RunFolder
    device: torch.device
    progress: bool = True

    def bar(self, iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "") -> tqdm:
        """A tqdm progress bar (silent when progress is off)."""
        return tqdm(iterable, total=total, desc=desc, disable=not self.progress, leave=False,
                    dynamic_ncols=True)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While active (main thread only), SIGTERM raises KeyboardInterrupt so a killed run is
    finished as ``interrupted`` with its report, like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def default_run_dir(experiment: str, preset: str, root: Path = DEFAULT_RUNS_DIR) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = root / f"{experiment}-{preset}-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = root / f"{experiment}-{preset}-{stamp}-{suffix}"
    return path


def run_experiment(name: str | Experiment, preset: str = "smoke", *, seeds: list[int] | tuple[int, ...] | None = None,
                   device: str | None = "auto", out: str | Path | None = None, progress: bool = True,
                   threads: int | None = 1, overwrite: bool = False, **overrides: Any) -> Path:
    """Run ``name`` at ``preset`` and return its folder (``results.json``, PNGs, ``report.md``).

    ``name`` is a registered experiment name or an :class:`Experiment`; ``seeds`` and
    ``overrides`` (config field names) replace the preset's values; ``device`` is ``"auto"``
    (CUDA when available) or forced; ``out`` defaults to ``runs/<name>-<preset>-<UTC time>`` and
    must be new or empty, or hold a run that ``overwrite`` replaces (:func:`.runfolder.claim_run_dir`).
    The config is checked (its ``__post_init__``, and its memory floor against the device:
    :func:`.checks.check_memory`) before anything is written.
    ``threads`` sets torch's CPU threads for the run (restored afterwards; None leaves it): the
    reference models are small, and one thread avoids the large slowdowns of oversubscribed
    OpenMP pools on shared CPUs.

    A failure, Ctrl-C or SIGTERM still writes the report of what was measured, marks the status
    (``failed`` / ``interrupted``) and re-raises.
    """
    experiment = name if isinstance(name, Experiment) else get_experiment(name)
    config = experiment.config(preset, seeds=seeds, **overrides)
    chosen = select_device(device)
    check_memory(config, chosen)
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be a positive integer or None, got {threads}")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_into_folder(experiment, preset, config, chosen, out, progress, overwrite)
    finally:
        torch.set_num_threads(previous_threads)


def _run_into_folder(experiment: Experiment, preset: str, config: Any, chosen: torch.device,
                     out: str | Path | None, progress: bool, overwrite: bool) -> Path:
    path = Path(out) if out is not None else default_run_dir(experiment.name, preset)
    folder = RunFolder(path, experiment=experiment.name, preset=preset, config=config, seeds=config.seeds,
                       device=chosen, overwrite=overwrite)
    try:
        with sigterm_as_interrupt(), folder.timed("total"):
            experiment.run(config, RunContext(folder, chosen, progress))
    except KeyboardInterrupt as stop:
        folder.finish("interrupted", str(stop) or "stopped by the user (Ctrl-C)")
        write_report(path)
        raise
    except Exception as error:
        folder.finish("failed", f"{type(error).__name__}: {error}")
        write_report(path)
        raise
    folder.finish("complete")
    write_report(path)
    return path
