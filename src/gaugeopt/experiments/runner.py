"""Run an experiment into a run folder unit by unit, and finish it with plots and a report whatever happens.

:class:`ExperimentRun` is one run. Building it checks everything that can be checked without
writing: the config's rules (its ``__post_init__``), the device, the memory floor
(:func:`.checks.check_memory`) and the folder (:func:`.runfolder.check_run_dir`);
:meth:`ExperimentRun.execute` runs it. :func:`run_experiment` and :func:`resume_experiment` do both.

**Units.** An experiment begins each unit of its work (one optimizer arm and seed, one width and
seed, ...) with :meth:`RunContext.start_unit`:

- the first unit ends the preparation: nothing is written before it, so an error while the
  experiment reads its data leaves the disk as it was;
- every later unit first checkpoints the run (:mod:`.checkpoint`), so a run stopped in any way,
  SIGKILL included, can be continued from its last completed unit (:func:`resume_experiment`);
- a resumed run skips the units it had completed and restores the random generators where the
  first unfinished one begins.

For the resumed run to equal an uninterrupted one, what a unit leaves for later units or for the
summary goes into ``context.state`` or ``context.folder.results`` (both checkpointed), what the
experiment computes outside its units (data, settings) follows from the config, and the code between
units does not draw from the global random generators (each unit seeds what it uses).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .checkpoint import CHECKPOINT_FILE, Checkpoint, Unit, random_state, restore_random_state
from .checks import check_memory
from .environment import select_device, source_commit
from .registry import Experiment, get_experiment
from .report import write_report
from .runfolder import (
    REPORT_FILE,
    RESULTS_FILE,
    RunFolder,
    check_not_in_use,
    check_run_dir,
    read_results,
    to_json,
    utc_now,
)

DEFAULT_RUNS_DIR = Path("runs")


@dataclass
class RunContext:
    """What an experiment's ``run`` receives besides its config.

    ``state`` holds what the experiment carries from one unit to the next (plain data: dicts, lists,
    tuples, numbers, strings); it is saved with every checkpoint and restored by a resume.
    ``units`` lists the units begun so far, the running one last.
    """

    folder: RunFolder
    device: torch.device
    progress: bool = True
    state: dict[str, Any] = field(default_factory=dict)
    resume_from: Checkpoint | None = None
    units: list[Unit] = field(default_factory=list)

    def bar(self, iterable: Iterable[Any] | None = None, *, total: int | None = None, desc: str = "") -> tqdm:
        """A tqdm progress bar (silent when progress is off)."""
        return tqdm(iterable, total=total, desc=desc, disable=not self.progress, leave=False,
                    dynamic_ncols=True)

    def start_unit(self, name: str, seed: int) -> bool:
        """Begin the unit (``name``, ``seed``), e.g. ``("adamw", 0)``, and say whether to run it.

        Every unit begun before this one has completed. The first unit that runs ends the
        preparation (the run folder is written); each later one checkpoints the run first. Returns
        False for a unit that a resumed run had completed: the experiment skips it. Units are
        identified by their order and key, so an experiment must begin the same units in the same
        order for the same config; beginning one twice is an error.
        """
        unit = (name, int(seed))
        if unit in self.units:
            raise ValueError(f"unit {unit} was started twice; units must have distinct (name, seed) keys")
        index = len(self.units)
        completed = self.resume_from.completed if self.resume_from is not None else []
        if index < len(completed):
            if unit != completed[index]:  # found before the folder is written: the resume changes nothing
                raise ValueError(f"cannot resume: unit {index + 1} is {unit} here but {completed[index]} in "
                                 f"{self.folder.path / CHECKPOINT_FILE} (the experiment's code changed since?)")
            self.units.append(unit)
            return False
        self.folder.open()
        if index == len(completed) and completed:
            restore_random_state(self.resume_from.random)
        if index > 0:
            results = self.folder.results
            Checkpoint(results["experiment"], results["preset"], results["config"], list(self.units), results,
                       self.state, random_state()).write(self.folder.path)
            self.folder.flush()
        self.units.append(unit)
        return True


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


@dataclass
class WrapUp:
    """What the end of a run wrote: its final ``status`` into results.json, then plots and report.md.
    ``stopped_again``: a second Ctrl-C (or SIGTERM) cut the wrap-up short."""

    status: str
    status_recorded: bool = False
    report_written: bool = False
    stopped_again: bool = False
    report_error: str | None = None

    def describe(self, path: Path) -> str:
        """What is in ``path`` now, and how to go on, as one clause list."""
        results, report = path / RESULTS_FILE, path / REPORT_FILE
        if self.status_recorded:
            parts = [f"wrote {results} (status '{self.status}')" + (f" and {report}" if self.report_written else "")]
        else:
            parts = [f"{results} holds what was measured up to its last save but still says 'running' "
                     "(stopped again before it was updated)"]
        if not self.report_written:
            why = self.report_error or "stopped again while writing it"
            parts.append(f"{REPORT_FILE} was not written ({why}; `gaugeopt report {path}` writes it)")
        if self.status != "complete":
            parts.append(f"continue with `gaugeopt run --resume {path}`")
        return "; ".join(parts)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a run. ``str()`` says why and what the run left on disk.

    ``wrap_up`` is None when nothing was written (the run was stopped while it prepared);
    ``completed_units`` counts the units its checkpoint holds."""

    def __init__(self, reason: str, path: Path, wrap_up: WrapUp | None, completed_units: int):
        super().__init__(reason)
        self.reason, self.path, self.wrap_up, self.completed_units = reason, path, wrap_up, completed_units

    def __str__(self) -> str:
        if self.wrap_up is None:
            return f"interrupted ({self.reason}) before the first unit began; nothing was written"
        return (f"interrupted ({self.reason}) with {self.completed_units} completed unit(s) checkpointed; "
                f"{self.wrap_up.describe(self.path)}")


def default_run_dir(experiment: str, preset: str, root: Path = DEFAULT_RUNS_DIR) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = root / f"{experiment}-{preset}-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = root / f"{experiment}-{preset}-{stamp}-{suffix}"
    return path


def _check_threads(threads: int | None) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")


class ExperimentRun:
    """One run of an experiment into one folder: checked when built (nothing written), executed once.

    Build it with :meth:`new` or :meth:`resume`. After :meth:`execute` has raised, :attr:`written`
    says whether the folder was written (an error raised before was found while the experiment
    prepared: bad input, nothing changed on disk) and :attr:`wrap_up` what the end of the run wrote.
    """

    def __init__(self, experiment: Experiment, preset: str, config: Any, device: torch.device, path: Path, *,
                 overwrite: bool = False, threads: int | None = 1, progress: bool = True,
                 resume_from: Checkpoint | None = None, resumed: dict[str, Any] | None = None):
        _check_threads(threads)
        check_memory(config, device)
        self.experiment, self.preset, self.config, self.device, self.path = experiment, preset, config, device, path
        self.overwrite, self.threads, self.progress = overwrite, threads, progress
        self.resume_from, self.resumed = resume_from, resumed
        self.folder: RunFolder | None = None
        self.wrap_up: WrapUp | None = None
        self._executed = False

    @classmethod
    def new(cls, name: str | Experiment, preset: str = "smoke", *, seeds: list[int] | tuple[int, ...] | None = None,
            device: str | None = "auto", out: str | Path | None = None, progress: bool = True,
            threads: int | None = 1, overwrite: bool = False, **overrides: Any) -> ExperimentRun:
        """A new run of ``name`` at ``preset``; see :func:`run_experiment`."""
        experiment = name if isinstance(name, Experiment) else get_experiment(name)
        config = experiment.config(preset, seeds=seeds, **overrides)
        chosen = select_device(device)
        path = Path(out) if out is not None else default_run_dir(experiment.name, preset)
        check_run_dir(path, overwrite)
        return cls(experiment, preset, config, chosen, path, overwrite=overwrite, threads=threads, progress=progress)

    @classmethod
    def resume(cls, run_dir: str | Path, *, device: str | None = "auto", progress: bool = True,
               threads: int | None = 1, experiment: Experiment | None = None) -> ExperimentRun:
        """Continue the stopped run in ``run_dir``; see :func:`resume_experiment`."""
        path = Path(run_dir)
        check_not_in_use(path)
        experiment, preset, config, checkpoint = _resume_point(path, experiment)
        chosen = select_device(device)
        completed = len(checkpoint.completed) if checkpoint else 0
        resumed = {"at": utc_now(), "completed_units": completed, "source": source_commit(), "device": str(chosen)}
        return cls(experiment, preset, config, chosen, path, threads=threads, progress=progress,
                   resume_from=checkpoint, resumed=resumed)

    @property
    def written(self) -> bool:
        return self.folder is not None and self.folder.opened

    def execute(self) -> Path:
        """Run the experiment; return its folder (``results.json``, PNGs, ``report.md``).

        A failure still writes the report of what was measured, marks the status ``failed`` and
        re-raises; Ctrl-C or SIGTERM does the same with ``interrupted`` and raises
        :class:`RunInterrupted`. Before the first unit began nothing is written: the error is
        raised as it is (the folders the run created are removed again).
        """
        if self._executed:
            raise RuntimeError("an ExperimentRun runs once; build another")
        self._executed = True
        previous_threads = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            with sigterm_as_interrupt():
                return self._execute()
        finally:
            torch.set_num_threads(previous_threads)

    def _claim(self) -> RunFolder:
        if self.resumed is None:
            return RunFolder(self.path, experiment=self.experiment.name, preset=self.preset, config=self.config,
                             seeds=self.config.seeds, device=self.device, overwrite=self.overwrite)
        results = (self.resume_from.results if self.resume_from is not None else
                   RunFolder.new_results(self.experiment.name, self.preset, self.config, self.config.seeds,
                                         self.device))
        folder = RunFolder.reopen(self.path, results, self.resumed)
        try:  # the folder may have moved on between the checks and the lock
            now = _resume_point(self.path, self.experiment)[3]
            if (now.completed if now else None) != (self.resume_from.completed if self.resume_from else None):
                raise FileExistsError(f"{self.path} changed while the resume was being prepared; try again")
        except BaseException:
            folder.close()
            raise
        return folder

    def _execute(self) -> Path:
        self.folder = folder = self._claim()
        state = dict(self.resume_from.state) if self.resume_from is not None else {}
        context = RunContext(folder, self.device, self.progress, state=state, resume_from=self.resume_from)
        try:
            try:
                with folder.timed("total"):
                    self.experiment.run(self.config, context)
            except KeyboardInterrupt as stop:
                reason = str(stop) or "stopped by the user (Ctrl-C)"
                completed = max(0, len(context.units) - 1)
                if folder.opened:
                    self.wrap_up = _wrap_up(folder, "interrupted", reason)
                raise RunInterrupted(reason, folder.path, self.wrap_up, completed) from None
            except Exception as error:
                if not folder.opened:
                    raise
                self.wrap_up = _wrap_up(folder, "failed", f"{type(error).__name__}: {error}")
                if self.wrap_up.stopped_again:
                    raise RunInterrupted(f"stopped while recording the failure {type(error).__name__}: {error}",
                                         folder.path, self.wrap_up, max(0, len(context.units) - 1)) from error
                raise
            self.wrap_up = _wrap_up(folder, "complete")
            if self.wrap_up.stopped_again:
                raise RunInterrupted("stopped while writing the report", folder.path, self.wrap_up,
                                     len(context.units))
            return folder.path
        finally:
            folder.close()


def _wrap_up(folder: RunFolder, status: str, error: str | None = None) -> WrapUp:
    """Record ``status`` and write the report. A second interrupt stops it (and is recorded); a report
    that cannot be rendered fails a complete run, and is recorded for a stopped or failed one."""
    done = WrapUp(status)
    try:
        folder.finish(status, error)
        done.status_recorded = True
        try:
            write_report(folder.path)
            done.report_written = True
        except Exception as report_error:
            if status == "complete":
                raise
            done.report_error = f"{type(report_error).__name__}: {report_error}"
    except KeyboardInterrupt:
        done.stopped_again = True
    return done


def _resume_point(path: Path, experiment: Experiment | None = None) -> tuple[Experiment, str, Any, Checkpoint | None]:
    """The experiment, preset, config and checkpoint of the stopped run in ``path``; raises when it cannot be
    resumed (not a run folder, complete, a config this code cannot rebuild, a damaged checkpoint)."""
    results = read_results(path)
    if experiment is None:
        experiment = get_experiment(results["experiment"])
    elif experiment.name != results["experiment"]:
        raise ValueError(f"{path} holds a run of {results['experiment']!r}, not of {experiment.name!r}")
    if results["status"] == "complete":
        raise ValueError(f"{path} holds a complete run: there is nothing to resume")
    try:
        config = experiment.config(results["preset"], **results["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"cannot resume {path}: its recorded config does not build here ({error})") from None
    if to_json(config) != results["config"]:
        changed = sorted(k for k, v in to_json(config).items() if results["config"].get(k, object()) != v)
        raise ValueError(f"cannot resume {path}: the config this code builds differs from the recorded one "
                         f"in {changed}")
    checkpoint = Checkpoint.read(path)
    if checkpoint is not None and (checkpoint.experiment, checkpoint.preset, checkpoint.config) != (
            results["experiment"], results["preset"], results["config"]):
        raise ValueError(f"cannot resume {path}: its {CHECKPOINT_FILE} belongs to another run than its {RESULTS_FILE}")
    return experiment, results["preset"], config, checkpoint


def run_experiment(name: str | Experiment, preset: str = "smoke", *, seeds: list[int] | tuple[int, ...] | None = None,
                   device: str | None = "auto", out: str | Path | None = None, progress: bool = True,
                   threads: int | None = 1, overwrite: bool = False, **overrides: Any) -> Path:
    """Run ``name`` at ``preset`` and return its folder (``results.json``, PNGs, ``report.md``).

    ``name`` is a registered experiment name or an :class:`Experiment`; ``seeds`` and
    ``overrides`` (config field names) replace the preset's values; ``device`` is ``"auto"``
    (CUDA when available) or forced; ``out`` defaults to ``runs/<name>-<preset>-<UTC time>`` and
    must be new or empty, or hold a run that ``overwrite`` replaces (:func:`.runfolder.check_run_dir`).
    The config, the device, the memory the config needs and the folder are checked before anything
    is written, and an error while the experiment prepares (before its first unit) writes nothing.
    ``threads`` sets torch's CPU threads for the run (restored afterwards; None leaves it): the
    reference models are small, and one thread avoids the large slowdowns of oversubscribed
    OpenMP pools on shared CPUs.

    A failure, Ctrl-C or SIGTERM during the run still writes the report of what was measured, marks
    the status (``failed`` / ``interrupted``) and re-raises (an interrupt as :class:`RunInterrupted`,
    a ``KeyboardInterrupt``); the folder keeps its last unit checkpoint for :func:`resume_experiment`.
    """
    return ExperimentRun.new(name, preset, seeds=seeds, device=device, out=out, progress=progress, threads=threads,
                             overwrite=overwrite, **overrides).execute()


def resume_experiment(run_dir: str | Path, *, device: str | None = "auto", progress: bool = True,
                      threads: int | None = 1, experiment: Experiment | None = None) -> Path:
    """Continue the stopped run in ``run_dir`` (interrupted, failed, or killed and still marked
    ``running``) from its last completed unit, with the experiment, preset and config it recorded.

    The units its checkpoint holds are skipped and the rest run as they would have, so the finished
    ``results.json`` equals that of an uninterrupted run except for timestamps, timings and the entry
    this resume adds to its ``resumed`` list (time, completed units, source commit, device). With no
    checkpoint (the run stopped during its first unit) the run starts again from its beginning. A
    complete run, a folder another process is writing and a config this code no longer builds are
    refused before anything is written. ``experiment`` is needed only for an experiment that is not
    registered (an :class:`Experiment` passed to :func:`run_experiment`).
    """
    return ExperimentRun.resume(run_dir, device=device, progress=progress, threads=threads,
                                experiment=experiment).execute()
