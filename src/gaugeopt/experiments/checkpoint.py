"""Unit checkpoints: what ``gaugeopt run --resume DIR`` continues a stopped run from.

An experiment runs as a sequence of *units* (one optimizer arm and seed, one width and seed, ...),
each begun with :meth:`~gaugeopt.experiments.runner.RunContext.start_unit`. When a unit begins, every
unit before it has completed, and the runner writes ``DIR/resume.json`` (atomically)::

    format        1
    experiment, preset, config   the run it belongs to (config as in results.json)
    completed     [[name, seed], ...]  the units done, in the order they ran
    recorded      {results: everything recorded so far (the live contents of results.json),
                   state: RunContext.state, what the experiment carries from unit to unit}
    random        torch's (CPU and, when initialised, CUDA), NumPy's and Python's global generators

A resumed run replays the experiment with these results and this state: the units in ``completed``
are skipped (the experiment is asked for them in the same order, which is checked), the generators
are restored where the first unfinished unit begins, and everything from there runs as it would
have, so the finished ``results.json`` equals an uninterrupted run's up to timestamps and timings.

``recorded`` keeps the Python types exactly (integer dictionary keys, tuples, NaN and
infinities), which plain JSON would not: a tuple is stored as ``{"__tuple__": [...]}`` and a dict
whose keys are not all strings as ``{"__dict__": [[key, value], ...]}``. It also keeps their
sharing: a dict or list reachable from two places (an experiment's accumulator kept in the state and
also put into the results) is stored once, ``{"__shared__": n, "value": ...}`` then
``{"__ref__": n}``, and comes back as one object, so what the resumed run adds to it reaches both
places, as in the uninterrupted run. The file is JSON, never a pickle, so resuming a folder someone
else wrote runs no code from it.
"""

from __future__ import annotations

import base64
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_FILE = "resume.json"
FORMAT = 1
_TUPLE, _DICT, _SHARED, _REF = "__tuple__", "__dict__", "__shared__", "__ref__"
_TAGS = {_TUPLE, _DICT, _SHARED, _REF}


class CheckpointError(ValueError):
    """A checkpoint that cannot be written (a value of an unsupported type) or read (a damaged file)."""


def encode(value: Any, where: str = "value") -> Any:
    """``value`` (plain data: dicts, lists, tuples, strings, numbers, bools, None) as JSON data that
    :func:`decode` turns back into an equal value of the same types, with the same dicts and lists
    shared; ``where`` names it in errors."""
    seen: dict[int, int] = {}

    def count(item: Any) -> None:
        if isinstance(item, (dict, list)):
            seen[id(item)] = seen.get(id(item), 0) + 1
            if seen[id(item)] > 1:
                return
        if isinstance(item, dict):
            for key, child in item.items():
                count(key)
                count(child)
        elif isinstance(item, (list, tuple)):
            for child in item:
                count(child)

    count(value)
    anchors: dict[int, int] = {}

    def convert(item: Any, where: str) -> Any:
        if item is None or isinstance(item, (bool, str)):
            return item
        if isinstance(item, int):
            return int(item)
        if isinstance(item, float):  # NumPy's float64 is a float: stored as one
            return float(item)
        if isinstance(item, tuple):
            return {_TUPLE: [convert(v, f"{where}[{i}]") for i, v in enumerate(item)]}
        if isinstance(item, (dict, list)):
            if seen[id(item)] > 1:
                if id(item) in anchors:
                    return {_REF: anchors[id(item)]}
                anchors[id(item)] = len(anchors)
                return {_SHARED: anchors[id(item)], "value": container(item, where)}
            return container(item, where)
        raise CheckpointError(f"{where} holds a {type(item).__name__}, which a unit checkpoint cannot store; "
                              "keep plain numbers, strings, lists, tuples and dicts there")

    def container(item: dict | list, where: str) -> Any:
        if isinstance(item, list):
            return [convert(v, f"{where}[{i}]") for i, v in enumerate(item)]
        if all(isinstance(k, str) for k in item) and not (_TAGS & item.keys()):
            return {k: convert(v, f"{where}[{k!r}]") for k, v in item.items()}
        return {_DICT: [[convert(k, f"{where} key {k!r}"), convert(v, f"{where}[{k!r}]")] for k, v in item.items()]}

    return convert(value, where)


def decode(data: Any) -> Any:
    """The inverse of :func:`encode`."""
    shared: dict[int, Any] = {}

    def restore(item: Any) -> Any:
        if isinstance(item, list):
            return [restore(v) for v in item]
        if not isinstance(item, dict):
            return item
        if item.keys() == {_TUPLE}:
            return tuple(restore(v) for v in item[_TUPLE])
        if item.keys() == {_DICT}:
            return {_hashable(restore(k)): restore(v) for k, v in item[_DICT]}
        if item.keys() == {_SHARED, "value"}:
            shared[item[_SHARED]] = value = restore(item["value"])
            return value
        if item.keys() == {_REF}:
            if item[_REF] not in shared:
                raise CheckpointError(f"a reference to shared value {item[_REF]} comes before the value")
            return shared[item[_REF]]
        return {k: restore(v) for k, v in item.items()}

    return restore(data)


def _hashable(key: Any) -> Any:
    if isinstance(key, (list, dict)):
        raise CheckpointError(f"a dictionary key cannot be a {type(key).__name__}")
    return key


def _bytes(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.numpy().tobytes()).decode("ascii")


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def random_state() -> dict[str, Any]:
    """The global generators' states: torch (CPU, and CUDA when it has been initialised), NumPy, Python."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": _bytes(torch.get_rng_state()),
        "numpy": {"kind": kind, "keys": keys.tolist(), "position": position, "has_gauss": has_gauss,
                  "cached_gaussian": cached},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_bytes(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_random_state(state: dict[str, Any]) -> None:
    """Set the global generators to ``state`` from :func:`random_state`. CUDA's are restored when this
    process has as many CUDA devices as the one that saved them (a run resumed on another device
    continues with that device's generators as they are)."""
    torch.set_rng_state(_tensor(state["torch"]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], np.array(numpy_state["keys"], dtype=np.uint32),
                         numpy_state["position"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all([_tensor(s) for s in cuda])


Unit = tuple[str, int]


@dataclass
class Checkpoint:
    """The run as it stood when the unit after ``completed`` began (see the module docstring)."""

    experiment: str
    preset: str
    config: dict[str, Any]
    completed: list[Unit]
    results: dict[str, Any]
    state: dict[str, Any]
    random: dict[str, Any]

    def write(self, folder: Path) -> None:
        from .runfolder import write_atomically

        recorded = encode({"results": self.results, "state": self.state}, "checkpoint")  # one pass: sharing kept
        data = {"format": FORMAT, "experiment": self.experiment, "preset": self.preset, "config": self.config,
                "completed": [list(unit) for unit in self.completed], "recorded": recorded,
                "random": encode(self.random, "random")}
        write_atomically(folder / CHECKPOINT_FILE, json.dumps(data))

    @classmethod
    def read(cls, folder: Path) -> Checkpoint | None:
        """The checkpoint in ``folder``, None when there is none; :class:`CheckpointError` when the
        file is damaged or of another format."""
        path = folder / CHECKPOINT_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path} cannot be read: {error}") from None
        expected = {"format", "experiment", "preset", "config", "completed", "recorded", "random"}
        if not isinstance(data, dict) or data.keys() != expected or data["format"] != FORMAT:
            raise CheckpointError(f"{path} is not a gaugeopt unit checkpoint of format {FORMAT}")
        try:
            completed = [(str(name), int(seed)) for name, seed in data["completed"]]
            recorded, generators = decode(data["recorded"]), decode(data["random"])
            results, state = recorded["results"], recorded["state"]
        except (TypeError, ValueError, KeyError) as error:
            raise CheckpointError(f"{path} is damaged: {error}") from None
        if not (isinstance(results, dict) and isinstance(state, dict) and isinstance(generators, dict)
                and {"torch", "numpy", "python"} <= generators.keys()):
            raise CheckpointError(f"{path} is damaged: results, state or random states missing")
        return cls(data["experiment"], data["preset"], data["config"], completed, results, state, generators)


__all__ = ["CHECKPOINT_FILE", "Checkpoint", "CheckpointError", "decode", "encode", "random_state",
           "restore_random_state"]
