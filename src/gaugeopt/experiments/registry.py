"""The experiments of docs/experiments.md by name, each with ``tiny``, ``smoke`` and ``full`` presets.

An experiment module defines a frozen config dataclass (with a ``seeds`` field), a
``run(config, context)`` function that begins each unit of its work with ``context.start_unit``
(see :mod:`.runner`: what makes a run resumable) and a module-level ``EXPERIMENT``. Modules are
imported only when their experiment is asked for, so listing experiments stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .runner import RunContext

PRESETS = ("tiny", "smoke", "full")

EXPERIMENT_MODULES = {
    "overtrain-lm": "gaugeopt.experiments.overtrain_lm",
    "vit": "gaugeopt.experiments.vit",
    "grokking": "gaugeopt.experiments.grokking",
    "moe": "gaugeopt.experiments.moe",
    "bridge": "gaugeopt.experiments.bridge",
    "rrr": "gaugeopt.experiments.rrr",
    "modadd-width": "gaugeopt.experiments.modadd_width",
    "cnn": "gaugeopt.experiments.cnn",
    "readout-clock": "gaugeopt.experiments.readout_clock",
}


@dataclass(frozen=True)
class Experiment:
    """``presets`` maps ``tiny`` (tests), ``smoke`` (minutes on 2 CPU cores) and ``full`` to configs."""

    name: str
    summary: str
    presets: Mapping[str, Any]
    run: Callable[[Any, RunContext], None]

    def __post_init__(self) -> None:
        missing = [p for p in PRESETS if p not in self.presets]
        if missing:
            raise ValueError(f"experiment {self.name!r} lacks preset(s) {missing}")

    def config(self, preset: str, *, seeds: tuple[int, ...] | list[int] | None = None,
               **overrides: Any) -> Any:
        """The preset's config, with seeds and named fields replaced (each converted to the preset
        value's type by :func:`coerce_field`, then checked by the config itself); unknown names raise."""
        if preset not in self.presets:
            raise ValueError(f"unknown preset {preset!r} for {self.name}; choose from {list(self.presets)}")
        config = self.presets[preset]
        known = {f.name for f in fields(config)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"{self.name} has no config field(s) {unknown}; fields: {sorted(known)}")
        if seeds is not None:
            overrides["seeds"] = seeds
        overrides = {name: coerce_field(name, getattr(config, name), value) for name, value in overrides.items()}
        return replace(config, **overrides)


def coerce_field(name: str, default: Any, value: Any) -> Any:
    """``value`` in the type of the preset's ``default``: a scalar given for a tuple field becomes a
    1-tuple, an int for a float field a float, a whole float for an int field an int (``1e15``);
    anything else of another type is an error."""
    if value is None:  # optional fields (e.g. train_chars=None: the whole split)
        return None
    if isinstance(default, tuple):
        value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        if default and value and not all(isinstance(v, type(default[0])) or
                                         (isinstance(default[0], float) and isinstance(v, int)) for v in value):
            raise ValueError(f"field {name} holds {type(default[0]).__name__} values, got {value!r}")
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        if not (isinstance(default, bool) and isinstance(value, bool)):
            raise ValueError(f"field {name} expects {type(default).__name__}, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    if isinstance(default, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    if default is not None and not isinstance(value, type(default)):
        raise ValueError(f"field {name} expects {type(default).__name__}, got {value!r}")
    return value


def experiment_names() -> list[str]:
    return list(EXPERIMENT_MODULES)


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENT_MODULES:
        raise ValueError(f"unknown experiment {name!r}; choose from {', '.join(EXPERIMENT_MODULES)}")
    return importlib.import_module(EXPERIMENT_MODULES[name]).EXPERIMENT
