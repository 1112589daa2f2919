"""A run folder whose ``results.json`` is rewritten atomically as the run goes.

Layout of ``results.json`` (everything the report and the plots are rebuilt from; checked by
:func:`check_results` whenever a folder is read)::

    experiment, preset, status ("running" | "complete" | "interrupted" | "failed"), error,
    started, finished, config, seeds, environment {versions, machine, source},
    timings {name: seconds}, metrics {arm: {name: value}}, curves {arm: {seed: {series: [..]}}},
    figures [figure specs, see gaugeopt.experiments.plots], claims [claim rows, see report]

Every write goes to a temporary file renamed over the old one, so a run stopped at any moment
leaves a complete, readable JSON of what was measured so far.

A run starts in a new or empty folder. A folder that holds a run already is refused unless
``overwrite`` is given; then that run's files (``results.json``, ``report.md``, the PNG plots) are
removed first and any other file is kept. A non-empty folder that is not a run folder is refused.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .environment import machine_description, package_versions, source_commit
from .statistics import Verdict

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
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


def claim_run_dir(path: Path, overwrite: bool = False) -> None:
    """Make ``path`` an empty place for a new run (see the module docstring); raise
    ``FileExistsError`` where that would lose or mix in what is there."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder")
    if not path.exists() or not any(path.iterdir()):
        path.mkdir(parents=True, exist_ok=True)
        return
    if not (path / RESULTS_FILE).is_file():
        raise FileExistsError(f"{path} is not empty and is not a gaugeopt run folder; choose a new or empty folder")
    if not overwrite:
        raise FileExistsError(f"{path} holds a run already; choose another folder or overwrite it "
                              "(gaugeopt run --overwrite, run_experiment(..., overwrite=True))")
    for file in (path / RESULTS_FILE, path / REPORT_FILE, path / f"{RESULTS_FILE}.tmp", *path.glob("*.png")):
        file.unlink(missing_ok=True)


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


class RunFolder:
    """Owns one run folder; experiments record into it and it flushes ``results.json``.

    The folder is claimed with :func:`claim_run_dir` (``overwrite`` replaces a run found there).
    ``flush_every`` seconds bounds how stale the file may be while curves stream in; metrics,
    timings, figures and claims are flushed at once.
    """

    def __init__(self, path: str | Path, *, experiment: str, preset: str, config: Any,
                 seeds: tuple[int, ...] | list[int], device: torch.device, flush_every: float = 5.0,
                 overwrite: bool = False):
        self.path = Path(path)
        claim_run_dir(self.path, overwrite)
        self.flush_every = flush_every
        self._last_flush = 0.0
        self.results: dict[str, Any] = {
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
        self.flush()

    # -- recording -------------------------------------------------------------------------------
    def log_point(self, arm: str, seed: int, **values: Any) -> None:
        """Append one value to each named series of (arm, seed), e.g. ``step=10, val_loss=2.3``."""
        series = self.results["curves"].setdefault(arm, {}).setdefault(str(seed), {})
        for name, value in values.items():
            series.setdefault(name, []).append(to_json(value))
        if time.monotonic() - self._last_flush >= self.flush_every:
            self.flush()

    def set_metric(self, arm: str, name: str, value: Any) -> None:
        self.results["metrics"].setdefault(arm, {})[name] = to_json(value)
        self.flush()

    def set_timing(self, name: str, seconds: float) -> None:
        self.results["timings"][name] = round(float(seconds), 3)
        self.flush()

    def add_figure(self, figure: dict[str, Any]) -> None:
        """Add (or replace, by file name) a figure spec; see :mod:`gaugeopt.experiments.plots`."""
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
    def finish(self, status: str = "complete", error: str | None = None) -> None:
        self.results["status"] = status
        self.results["error"] = error
        self.results["finished"] = utc_now()
        self.flush()

    def flush(self) -> None:
        target = self.path / RESULTS_FILE
        temporary = target.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.results, indent=1))
        os.replace(temporary, target)
        self._last_flush = time.monotonic()
