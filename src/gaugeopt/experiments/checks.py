"""Rules for experiment config values, stated in each config's ``__post_init__``.

A config is checked where it is defined, so a preset, ``Experiment.config(preset, seeds=...,
**overrides)`` and the ``gaugeopt run --seeds/--set`` flags all meet the same rules, before any run
folder is written. A broken rule raises :class:`ConfigError`, a ``ValueError`` whose one-line message
names the config and the field::

    ViTExperimentConfig.steps must be positive, got -5

Every config has ``seeds``: a non-empty tuple of distinct non-negative integers (torch seeds); a
config with ``arms`` names distinct optimizer arms of :func:`.training.build_optimizer`.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .training import OPTIMIZER_ARMS


class ConfigError(ValueError):
    """A config field holds a value the experiment cannot run with."""


@dataclass(frozen=True)
class Interval:
    """An interval of real numbers, open or closed at each end."""

    low: float
    high: float
    low_closed: bool = True
    high_closed: bool = True

    def __contains__(self, value: float) -> bool:
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below

    def __str__(self) -> str:
        return f"{'[' if self.low_closed else '('}{self.low:g}, {self.high:g}{']' if self.high_closed else ')'}"


POSITIVE = Interval(0.0, math.inf, low_closed=False, high_closed=False)
NON_NEGATIVE = Interval(0.0, math.inf, high_closed=False)
UNIT = Interval(0.0, 1.0)  # [0, 1]: a ratio or a threshold
OPEN_UNIT = Interval(0.0, 1.0, low_closed=False, high_closed=False)  # (0, 1): a split fraction
START_FRACTION = Interval(0.0, 1.0, high_closed=False)  # [0, 1): where in a run something starts


def field_error(config: Any, name: str, rule: str, value: Any) -> ConfigError:
    """The error for field ``name`` of ``config`` that breaks ``rule``."""
    return ConfigError(f"{type(config).__name__}.{name} must be {rule}, got {value!r}")


def _entries(config: Any, name: str) -> list[Any]:
    """The field's value as a list: its entries for a tuple (which must not be empty), else itself."""
    value = getattr(config, name)
    if isinstance(value, tuple):
        if not value:
            raise field_error(config, name, "a non-empty tuple", value)
        return list(value)
    return [value]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def check_config(config: Any, *, positive: Sequence[str] = (), non_negative: Sequence[str] = (),
                 within: Mapping[str, Interval] | None = None, choices: Mapping[str, Collection[Any]] | None = None,
                 divisible: Sequence[tuple[str, str]] = ()) -> None:
    """Check ``config``'s seeds, its arms if it has them, and the named fields; raise
    :class:`ConfigError` at the first breach.

    Args:
        positive: numbers > 0; integer counts and sizes, learning rates.
        non_negative: numbers >= 0 (a warm-up length, a weight decay).
        within: field -> the :class:`Interval` it must lie in (fractions, ratios).
        choices: field -> its allowed values.
        divisible: (field, divisor field) pairs, e.g. ``("d_model", "n_heads")``; the divisor
            field must be among ``positive``.

    A tuple-valued field must be non-empty and every entry must satisfy the rule (a ``choices``
    tuple also has no repeats). A field holding ``None`` (an optional setting left unset) is not
    checked.
    """
    seeds = getattr(config, "seeds")
    if (not isinstance(seeds, tuple) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise field_error(config, "seeds", "a non-empty tuple of distinct non-negative integers", seeds)
    if hasattr(config, "arms"):
        choices = {"arms": OPTIMIZER_ARMS, **(choices or {})}
    intervals = {**{name: POSITIVE for name in positive}, **{name: NON_NEGATIVE for name in non_negative},
                 **(within or {})}
    for name, interval in intervals.items():
        if getattr(config, name) is None:
            continue
        if not all(_is_number(value) and value in interval for value in _entries(config, name)):
            rule = {POSITIVE: "positive", NON_NEGATIVE: "non-negative"}.get(interval, f"in {interval}")
            raise field_error(config, name, rule, getattr(config, name))
    for name, allowed in (choices or {}).items():
        entries = _entries(config, name)
        if any(entry not in allowed for entry in entries) or len(set(entries)) != len(entries):
            raise field_error(config, name, f"distinct values among {sorted(allowed)}"
                              if isinstance(getattr(config, name), tuple) else f"one of {sorted(allowed)}",
                              getattr(config, name))
    for name, divisor_name in divisible:
        divisor = getattr(config, divisor_name)
        if any(value % divisor for value in _entries(config, name)):
            raise field_error(config, name, f"divisible by {divisor_name}={divisor}", getattr(config, name))


__all__ = ["ConfigError", "Interval", "POSITIVE", "NON_NEGATIVE", "UNIT", "OPEN_UNIT", "START_FRACTION",
           "check_config", "field_error"]
