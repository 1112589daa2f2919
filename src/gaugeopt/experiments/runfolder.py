"""A run folder whose ``results.json`` is rewritten atomically as the run goes.

Layout of ``results.json`` (everything the report and the plots are rebuilt from; checked by
:func:`check_results` whenever a folder is read)::

    experiment, preset, status ("running" | "complete" | "interrupted" | "failed"), error,
    started, finished, config, seeds, environment {versions, machine, source},
    timings {name: seconds}, metrics {arm: {name: value}}, curves {arm: {seed: {series: [..]}}},
    figures [figure specs, see gaugeopt.experiments.plots], claims [claim rows, see report],
    resumed [{at, completed_units, source, device}: one entry per ``--resume``, when there was one]

Every write goes to a temporary file renamed over the old one, so a run stopped at any moment
leaves a complete, readable JSON of what was measured so far. Besides the report's files the folder
holds, while the run is unfinished, ``resume.json`` (the last unit checkpoint, see
:mod:`.checkpoint`) and, while a process writes it, ``run.lock`` (see :class:`RunLock`).

A run starts in a new or empty folder. A folder that holds a run already is refused unless
``overwrite`` is given; then that run's files (``results.json``, ``report.md``, ``resume.json``, the
PNG plots) are removed and any other file is kept. A non-empty folder that is not a run folder, and a
folder another process is writing, are always refused.

Nothing is written while the experiment prepares (reads its data, builds what its units share): the
folder is created, or the replaced run removed, when the first unit starts or the first measurement
is recorded, so an error found while preparing leaves the disk as it was.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CHECKPOINT_FILE
from .environment import machine_description, package_versions, source_commit
from .statistics import Verdict

try:  # POSIX; elsewhere no lock is taken and a stopped run cannot be told from a running one
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
LOCK_FILE = "run.lock"
STATUSES = ("running", "complete", "interrupted", "failed")


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def to_json(value: Any) -> Any:
    """Plain JSON data from dataclasses, tensors, numpy scalars, tuples and paths; NaN/inf -> None."""
    if is_dataclass(value) and not isinstance(value, type):
        return to_json(asdict(value))
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, torch.Tensor):
        return to_json(value.detach().cpu().tolist())
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return to_json(value.tolist())
    return repr(value)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``: a reader (or a
    process killed mid-write) sees the old file or the new one, never a part."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


# -- reading results.json ------------------------------------------------------------------------

class ResultsError(ValueError):
    """A ``results.json`` that is not JSON or does not have the layout of the module docstring."""


_PLAIN_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=\-]*")  # a file name inside the run folder, no path


def _number_or_none(value: Any) -> bool:
    return value is None or isinstance(value, (int, float))


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (int, float, str))


def check_results(results: Any, source: str = RESULTS_FILE) -> None:
    """Raise :class:`ResultsError` naming the first entry of ``results`` that breaks the layout the
    report and the plots read (``source`` names the file in the message). Entries an experiment adds
    beyond the layout are not checked."""

    def require(ok: bool, where: str, what: str, value: Any) -> None:
        if not ok:
            shown = json.dumps(value)[:60] if _scalar(value) else type(value).__name__
            raise ResultsError(f"{source}: {where} must be {what}, got {shown}")

    def mapping(value: Any, where: str) -> dict:
        require(isinstance(value, dict), where, "an object", value)
        return value

    def sequence(value: Any, where: str) -> list:
        require(isinstance(value, list), where, "a list", value)
        return value

    def strings(value: Any, where: str) -> None:
        for i, item in enumerate(sequence(value, where)):
            require(isinstance(item, str), f"{where}[{i}]", "a string", item)

    def plot_file(name: Any, where: str, suffix: str = "") -> None:
        require(isinstance(name, str) and _PLAIN_FILE.fullmatch(name) is not None and name.endswith(suffix),
                where, f"a plain file name{' ending in ' + suffix if suffix else ''} (no folder)", name)

    def hlines(value: Any, where: str) -> None:
        for i, line in enumerate(sequence(value, where)):
            line = mapping(line, f"{where}[{i}]")
            require(_number_or_none(line.get("y")), f"{where}[{i}].y", "a number or null", line.get("y"))

    mapping(results, "the file")
    missing = [key for key in ("experiment", "preset", "status", "seeds", "config", "environment", "timings",
                               "metrics", "curves", "figures", "claims") if key not in results]
    if missing:
        raise ResultsError(f"{source}: the run's record lacks {', '.join(missing)}")
    for key in ("experiment", "preset"):
        require(isinstance(results[key], str), key, "a string", results[key])
    require(results["status"] in STATUSES, "status", f"one of {list(STATUSES)}", results["status"])
    for key in ("error", "started", "finished"):
        require(results.get(key) is None or isinstance(results[key], str), key, "a string or null", results.get(key))
    for i, seed in enumerate(sequence(results["seeds"], "seeds")):
        require(isinstance(seed, int) and not isinstance(seed, bool), f"seeds[{i}]", "an integer", seed)
    mapping(results["config"], "config")
    for key, value in mapping(results["environment"], "environment").items():
        mapping(value, f"environment.{key}")
    mapping(results["timings"], "timings")
    for arm, values in mapping(results["metrics"], "metrics").items():
        mapping(values, f"metrics[{arm!r}]")
    for arm, seeds in mapping(results["curves"], "curves").items():
        for seed, series in mapping(seeds, f"curves[{arm!r}]").items():
            for name, values in mapping(series, f"curves[{arm!r}][{seed!r}]").items():
                plot_file(name, f"curves[{arm!r}][{seed!r}] series name")  # it names curve_<name>.png
                for i, value in enumerate(sequence(values, f"curves[{arm!r}][{seed!r}][{name!r}]")):
                    require(_number_or_none(value), f"curves[{arm!r}][{seed!r}][{name!r}][{i}]", "a number or null",
                            value)
    for f, figure in enumerate(sequence(results["figures"], "figures")):
        where = f"figures[{f}]"
        figure = mapping(figure, where)
        plot_file(figure.get("file"), f"{where}.file", ".png")
        require(figure.get("kind", "line") in ("line", "scatter", "bar"), f"{where}.kind", "line, scatter or bar",
                figure.get("kind"))
        for s, series in enumerate(sequence(figure.get("series", []), f"{where}.series")):
            series = mapping(series, f"{where}.series[{s}]")
            require(isinstance(series.get("label"), str), f"{where}.series[{s}].label", "a string", series.get("label"))
            for axis in ("x", "y"):
                values = sequence(series.get(axis), f"{where}.series[{s}].{axis}")
                require(all(_scalar(v) for v in values), f"{where}.series[{s}].{axis}", "numbers, names or nulls",
                        values)
        hlines(figure.get("hlines", []), f"{where}.hlines")
    for c, claim in enumerate(sequence(results["claims"], "claims")):
        claim = mapping(claim, f"claims[{c}]")
        for key in ("claim", "anchor", "ours"):
            require(isinstance(claim.get(key), str), f"claims[{c}].{key}", "a string", claim.get(key))
        require(claim.get("reproduced", "absent") in (True, False, None), f"claims[{c}].reproduced",
                "true, false or null", claim.get("reproduced"))
    for key in ("notes", "reading"):
        if key in results:
            strings(results[key], key)
    for t, table in enumerate(sequence(results.get("tables", []), "tables")):
        table = mapping(table, f"tables[{t}]")
        require(isinstance(table.get("title"), str), f"tables[{t}].title", "a string", table.get("title"))
        sequence(table.get("header"), f"tables[{t}].header")
        for r, row in enumerate(sequence(table.get("rows"), f"tables[{t}].rows")):
            sequence(row, f"tables[{t}].rows[{r}]")
    for name, lines in mapping(results.get("curve_lines", {}), "curve_lines").items():
        hlines(lines, f"curve_lines[{name!r}]")
    for i, entry in enumerate(sequence(results.get("resumed", []), "resumed")):
        mapping(entry, f"resumed[{i}]")


def read_results(run_dir: str | Path) -> dict[str, Any]:
    """The checked contents of ``run_dir/results.json``: ``FileNotFoundError`` when there is none,
    :class:`ResultsError` (a ``ValueError``) when it is not JSON or not the layout."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a gaugeopt run folder")
    try:
        results = json.loads(path.read_text())
    except UnicodeDecodeError as error:
        raise ResultsError(f"{path} is not text: {error}") from None
    except json.JSONDecodeError as error:
        raise ResultsError(f"{path} is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}"
                           ) from None
    check_results(results, str(path))
    return results


# -- who is writing a folder ----------------------------------------------------------------------

def _describe_holder(info: dict[str, Any]) -> str:
    if not info.get("pid"):
        return "another process"
    return f"process {info['pid']} on {info.get('host', 'an unknown host')} (since {info.get('since', '?')})"


class RunLock:
    """An exclusive ``flock`` on ``DIR/run.lock``, held by the process that writes the run folder.

    The kernel releases the lock when its process ends however it ends (SIGKILL included), so a
    folder whose ``results.json`` says ``running`` while no process holds the lock was left by a
    process that is gone: :func:`lock_holder` tells the two apart. The file records the holder's
    pid, host and start time for messages; it is removed when the lock is released normally.
    """

    def __init__(self, folder: Path):
        self.path = folder / LOCK_FILE
        self._fd: int | None = None
        if fcntl is None:  # pragma: no cover
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                check_not_in_use(folder)  # raises when a writer holds it
                continue  # only lock_holder's probe held it, for an instant: try again
            try:  # the previous holder may have removed the file between our open and our lock
                current = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": utc_now()}).encode())
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file, then drop the lock (a process waiting on the old file sees it gone)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


def lock_holder(folder: str | Path) -> dict[str, Any] | None:
    """What the live process writing ``folder`` recorded (``pid``, ``host``, ``since``; empty when it
    could not be read), or None when no process holds the folder's lock. The probe takes a shared
    lock for an instant (a :class:`RunLock` taken at that instant tries again)."""
    if fcntl is None:  # pragma: no cover
        return None
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                info = json.loads(os.read(fd, 4096) or b"{}")
            except ValueError:
                info = {}
            return info if isinstance(info, dict) else {}
        return None
    finally:
        os.close(fd)


def check_not_in_use(folder: str | Path) -> None:
    """Raise ``FileExistsError`` when a live process is writing ``folder``."""
    holder = lock_holder(folder)
    if holder is not None:
        raise FileExistsError(f"{folder} is being written by {_describe_holder(holder)}; wait for it or choose "
                              "another folder")


def _recorded_status(folder: Path) -> str:
    """The status a folder's results.json records, read leniently ("unknown" when unreadable)."""
    try:
        status = json.loads((folder / RESULTS_FILE).read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return "unknown"
    return status if isinstance(status, str) else "unknown"


def stopped_run_note(folder: str | Path) -> str | None:
    """A sentence saying that the run in ``folder`` stopped without finishing when its results.json
    still says ``running`` but no process holds the folder (it was killed); None otherwise."""
    folder = Path(folder)
    if _recorded_status(folder) != "running" or lock_holder(folder) is not None:
        return None
    return (f"the run in {folder} stopped without finishing: results.json says 'running' but no process is "
            f"writing it (killed?); continue it with `gaugeopt run --resume {folder}`")


# -- claiming a folder -----------------------------------------------------------------------------

RUN_FILE_PATTERNS = (RESULTS_FILE, REPORT_FILE, CHECKPOINT_FILE, "*.tmp", "*.png")


def _run_files(folder: Path, patterns: tuple[str, ...] = RUN_FILE_PATTERNS) -> list[Path]:
    return [file for pattern in patterns for file in folder.glob(pattern) if file.is_file()]


def check_run_dir(path: str | Path, overwrite: bool = False, *, locked: bool = False) -> bool:
    """Check, without writing anything, that a new run may go into ``path``; returns whether a run
    found there will be replaced (``overwrite``).

    Raises ``FileExistsError`` for a folder another process is writing (unless ``locked``: this
    process holds its lock), one that holds a run (unless ``overwrite``; the message says whether
    that run completed, stopped or is resumable) and a non-empty folder that is not a run folder;
    ``NotADirectoryError`` when ``path`` or a folder above it is a file; ``PermissionError`` when
    it cannot be written.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a folder")
    if not path.exists():
        ancestor = path.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise NotADirectoryError(f"cannot create the run folder {path}: {ancestor} is a file, not a folder")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot create the run folder {path}: {ancestor} is not writable")
        return False
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write the run folder {path}: permission denied")
    if not locked:
        check_not_in_use(path)
    contents = [p for p in path.iterdir() if p.name != LOCK_FILE]
    if not contents:
        return False
    if not (path / RESULTS_FILE).is_file():
        raise FileExistsError(f"{path} is not empty and is not a gaugeopt run folder; choose a new or empty folder")
    if overwrite:
        return True
    status = _recorded_status(path)
    if status == "complete":
        raise FileExistsError(f"{path} holds a run already; choose another folder or overwrite it "
                              "(gaugeopt run --overwrite, run_experiment(..., overwrite=True))")
    stopped = {"running": "a run that stopped without finishing (results.json says 'running' but its process "
                          "is gone)", "interrupted": "an interrupted run", "failed": "a failed run"}
    raise FileExistsError(f"{path} holds {stopped.get(status, 'a run of unknown status')}; continue it with "
                          f"`gaugeopt run --resume {path}` or replace it with --overwrite")


def _make_dirs(path: Path) -> list[Path]:
    """``mkdir -p path``; returns the folders it created, outermost first."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        folder.mkdir()
    return list(reversed(missing))


def _remove_empty_dirs(created: list[Path]) -> None:
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:  # not empty (someone else wrote there) or already gone: leave it
            return


class RunFolder:
    """Owns one run folder while a process writes it; experiments record into it and it flushes
    ``results.json``.

    Constructing it claims the folder: checks it (:func:`check_run_dir`; ``overwrite`` replaces a
    run found there), creates it and takes its :class:`RunLock`, and writes nothing else until
    :meth:`open` (the first unit or measurement). :meth:`close` drops the lock, and removes the
    folders it created when nothing was written. ``flush_every`` seconds bounds how stale the file
    may be while curves stream in; metrics, timings, figures and claims are flushed at once.
    """

    def __init__(self, path: str | Path, *, experiment: str, preset: str, config: Any,
                 seeds: tuple[int, ...] | list[int], device: torch.device, flush_every: float = 5.0,
                 overwrite: bool = False):
        self._setup(Path(path), flush_every)
        self.results = self.new_results(experiment, preset, config, seeds, device)
        self._replace = check_run_dir(self.path, overwrite)
        self._created = _make_dirs(self.path)
        try:
            self._lock: RunLock | None = RunLock(self.path)
            self._replace = check_run_dir(self.path, overwrite, locked=True)
        except BaseException:
            self.close()
            raise

    @classmethod
    def reopen(cls, path: str | Path, results: dict[str, Any], resumed: dict[str, Any],
               flush_every: float = 5.0) -> RunFolder:
        """Continue the stopped run in ``path`` with ``results`` (restored from its checkpoint, or
        new when none was written) and record ``resumed`` in its ``resumed`` list when it opens. The
        old report and plots are removed then; they are written again when the run ends."""
        self = cls.__new__(cls)
        self._setup(Path(path), flush_every)
        self._lock = RunLock(self.path)
        if _recorded_status(self.path) == "complete":  # finished by another process since it was checked
            self.close()
            raise FileExistsError(f"{self.path} holds a complete run: there is nothing to resume")
        self.results = results
        self._replace = True
        self._resumed = resumed
        return self

    def _setup(self, path: Path, flush_every: float) -> None:
        self.path = path
        self.flush_every = flush_every
        self._last_flush = 0.0
        self._lock = None
        self._created: list[Path] = []
        self._replace = False
        self._resumed: dict[str, Any] | None = None
        self.opened = False

    @staticmethod
    def new_results(experiment: str, preset: str, config: Any, seeds: tuple[int, ...] | list[int],
                    device: torch.device) -> dict[str, Any]:
        return {
            "experiment": experiment,
            "preset": preset,
            "status": "running",
            "error": None,
            "started": utc_now(),
            "finished": None,
            "config": to_json(config),
            "seeds": list(seeds),
            "environment": {
                "versions": package_versions(),
                "machine": machine_description(device),
                "source": source_commit(),
            },
            "timings": {},
            "metrics": {},
            "curves": {},
            "figures": [],
            "claims": [],
        }

    # -- recording -------------------------------------------------------------------------------
    def log_point(self, arm: str, seed: int, **values: Any) -> None:
        """Append one value to each named series of (arm, seed), e.g. ``step=10, val_loss=2.3``."""
        self.open()
        series = self.results["curves"].setdefault(arm, {}).setdefault(str(seed), {})
        for name, value in values.items():
            series.setdefault(name, []).append(to_json(value))
        if time.monotonic() - self._last_flush >= self.flush_every:
            self.flush()

    def set_metric(self, arm: str, name: str, value: Any) -> None:
        self.open()
        self.results["metrics"].setdefault(arm, {})[name] = to_json(value)
        self.flush()

    def set_timing(self, name: str, seconds: float) -> None:
        self.results["timings"][name] = round(float(seconds), 3)
        self.flush()

    def add_figure(self, figure: dict[str, Any]) -> None:
        """Add (or replace, by file name) a figure spec; see :mod:`gaugeopt.experiments.plots`."""
        self.open()
        figures = [f for f in self.results["figures"] if f["file"] != figure["file"]]
        self.results["figures"] = [*figures, to_json(figure)]
        self.flush()

    def add_claim(self, claim: str, anchor: str, ours: str, reproduced: bool | None | Verdict, note: str = "",
                  evidence: dict[str, Any] | None = None) -> None:
        """One row of the report's verdict table.

        ``reproduced`` is a :class:`~gaugeopt.experiments.statistics.Verdict` (its label, e.g. "not
        decided" or "not measurable", and its reason are kept) or a plain bool / None (None: "not
        decided here"). ``evidence`` holds the numbers behind the verdict (per-seed values, interval).
        """
        self.open()
        row: dict[str, Any] = {"claim": claim, "anchor": anchor, "ours": ours, "note": note}
        if isinstance(reproduced, Verdict):
            row.update(reproduced=reproduced.reproduced, verdict=reproduced.label)
            row["note"] = "; ".join(part for part in (note, reproduced.reason) if part)
        else:
            row["reproduced"] = reproduced
        if evidence is not None:
            row["evidence"] = to_json(evidence)
        self.results["claims"].append(row)
        self.flush()

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.set_timing(name, time.perf_counter() - start)

    # -- lifecycle -------------------------------------------------------------------------------
    def open(self) -> None:
        """End the preparation: remove the run this one replaces (its results, report, checkpoint and
        plots; other files stay), record a resume, and write ``results.json``. Idempotent."""
        if self.opened:
            return
        if self._replace:
            keep = () if self._resumed is None else (CHECKPOINT_FILE,)  # a resumed run's checkpoint stays valid
            for file in _run_files(self.path):
                if file.name not in keep:
                    file.unlink()
        if self._resumed is not None:
            self.results.update(status="running", error=None, finished=None)
            self.results.setdefault("resumed", []).append(self._resumed)
        self.opened = True
        self.flush()

    def finish(self, status: str = "complete", error: str | None = None) -> None:
        """Record the final ``status`` (a complete run's checkpoint is removed: nothing is left to resume)."""
        self.open()
        self.results["status"] = status
        self.results["error"] = error
        self.results["finished"] = utc_now()
        self.flush()
        if status == "complete":
            (self.path / CHECKPOINT_FILE).unlink(missing_ok=True)

    def flush(self) -> None:
        """Rewrite ``results.json`` (atomically); nothing before :meth:`open`."""
        if not self.opened:
            return
        write_atomically(self.path / RESULTS_FILE, json.dumps(self.results, indent=1))
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Release the folder: drop its lock, and when nothing was written remove the folders
        this run created. Idempotent."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if not self.opened:
            _remove_empty_dirs(self._created)
            self._created = []
