"""Rules for experiment config values, stated in each config's ``__post_init__``.

A config is checked where it is defined, so a preset, ``Experiment.config(preset, seeds=...,
**overrides)`` and the ``gaugeopt run --seeds/--set`` flags all meet the same rules, before any run
folder is written. A broken rule raises :class:`ConfigError`, a ``ValueError`` whose one-line message
names the config and the field::

    ViTExperimentConfig.steps must be positive, got -5

Every config has ``seeds``: a non-empty tuple of distinct integers in [0, 2^31) (they seed torch,
NumPy, whose seeds stop at 2^32, and generators at offsets such as ``10_000 + seed``); a config with
``arms`` names distinct optimizer arms of :func:`.training.build_optimizer`.

Before a run writes anything, :func:`check_memory` also refuses a config whose :func:`memory_floor`
(a lower bound of what one run must hold at once) exceeds the device's memory::

    OvertrainLMConfig needs at least 3.64 PiB for the activations one training step keeps
    (batch_size 1000000000000000 x seq_len 16 x 1 layer(s) x width 32 x 4 bytes); cpu has 125.7 GiB
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .training import OPTIMIZER_ARMS

SEED_LIMIT = 2**31


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
AT_LEAST_TWO = Interval(2.0, math.inf, high_closed=False)  # a count that needs two of its kind (a slope's points)


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
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < SEED_LIMIT for s in seeds)):
        raise field_error(config, "seeds", "a non-empty tuple of distinct integers in [0, 2^31)", seeds)
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


FLOAT_BYTES = 4  # the experiments train in float32


def _largest(config: Any, *names: str) -> int:
    """The largest integer among the named fields of ``config`` (a tuple field: its largest entry); 1
    when it has none of them."""
    values = [v for name in names for v in _entries_or_none(config, name)]
    return max([v for v in values if isinstance(v, int) and not isinstance(v, bool) and v > 0], default=1)


def _entries_or_none(config: Any, name: str) -> list[Any]:
    value = getattr(config, name, None)
    return list(value) if isinstance(value, tuple) else [value]


def memory_floor(config: Any) -> tuple[int, str]:
    """A lower bound, in bytes, of the memory one run of ``config`` holds at once, and the tensor
    that sets it (with the field values it is the product of).

    It is read from the field names the experiment configs share (a field a config lacks counts as
    1, a tuple field as its largest entry) and takes the largest of tensors every such run
    allocates, in float32 unless said otherwise:

    - the activations one training step keeps for the backward pass, at least one per layer:
      ``batch_size x seq_len x n_layers (or depth) x width``, width the largest of ``d_model``,
      ``d_ff``, ``hidden``, ``width`` and ``widths``;
    - the feed-forward weights: ``n_layers x n_experts x d_model x d_ff``;
    - the modular-addition pairs, all ``modulus^2`` of them as two int64 tokens;
    - a generated data set's ``num_samples`` int64 labels.

    Each term is a tensor the run cannot avoid, so the floor stays below its real peak: it refuses
    sizes that cannot fit (``--set batch_size=1000000000000000``), not runs that are merely large.
    Fields that only cap a slice of data already in memory (``eval_windows``, ``dds_samples``,
    ``probe_samples``) are not counted.
    """
    batch, tokens = _largest(config, "batch_size"), _largest(config, "seq_len")
    layers, experts = _largest(config, "n_layers", "depth"), _largest(config, "n_experts")
    width = _largest(config, "d_model", "d_ff", "hidden", "width", "widths")
    d_model, d_ff = _largest(config, "d_model"), _largest(config, "d_ff")
    modulus, samples = _largest(config, "modulus"), _largest(config, "num_samples")
    terms = [
        (batch * tokens * layers * width * FLOAT_BYTES,
         f"the activations one training step keeps (batch_size {batch} x seq_len {tokens} x {layers} layer(s) "
         f"x width {width} x {FLOAT_BYTES} bytes)"),
        (layers * experts * d_model * d_ff * FLOAT_BYTES,
         f"the feed-forward weights ({layers} layer(s) x {experts} expert(s) x d_model {d_model} x d_ff {d_ff} "
         f"x {FLOAT_BYTES} bytes)"),
        (modulus * modulus * 2 * 8, f"the modular-addition pairs (modulus {modulus}^2 x 2 int64 tokens)"),
        (samples * 8, f"the generated data set's labels (num_samples {samples} x 8 bytes)"),
    ]
    return max(terms, key=lambda term: term[0])


def device_memory(device: torch.device) -> int | None:
    """The memory of ``device`` in bytes: a CUDA device's own, else the machine's physical memory
    (None when the platform does not say)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        return None


def format_bytes(count: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB"):
        if count < 1024 or unit == "YiB":
            return f"{count:.3g} {unit}" if unit != "bytes" else f"{int(count)} bytes"
        count /= 1024
    raise AssertionError  # pragma: no cover


def check_memory(config: Any, device: torch.device, available: int | None = None) -> None:
    """Raise :class:`ConfigError` when :func:`memory_floor` of ``config`` exceeds ``available``
    bytes (default: :func:`device_memory` of ``device``)."""
    available = device_memory(device) if available is None else available
    need, what = memory_floor(config)
    if available is not None and need > available:
        raise ConfigError(f"{type(config).__name__} needs at least {format_bytes(need)} for {what}; "
                          f"{device} has {format_bytes(available)}")


__all__ = ["ConfigError", "Interval", "POSITIVE", "NON_NEGATIVE", "UNIT", "OPEN_UNIT", "START_FRACTION", "AT_LEAST_TWO",
           "SEED_LIMIT", "check_config", "check_memory", "device_memory", "field_error", "memory_floor"]
