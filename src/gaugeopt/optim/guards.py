"""Guards shared by every gaugeopt optimizer: bad input, non-finite gradients, low precision, checkpoints.

:class:`GuardedOptimizer` is the ``torch.optim.Optimizer`` base of ``DDCAdam``, ``DDCMuon`` and
``SymmetryCompatible``. It adds, without touching the update math:

* **Hyperparameter checks.** Each subclass states its group rules in :meth:`_validate_group`; they
  run when a group is added (construction and ``add_param_group``, which also refuses unknown
  keys), at the start of every step (values a scheduler or the user wrote into a group later) and
  on every group a checkpoint loads. A bad value raises ``ValueError`` naming the group and the field.
* **Gradient checks** (:meth:`_check_step_inputs`, the first thing a step does): a sparse gradient
  raises ``ValueError`` naming the parameter. Finiteness is decided by one flag the step reads
  before it writes anything (one device synchronisation per step however many parameters; the
  batched step reduces every gradient stack to it). ``nonfinite="raise"`` raises
  :class:`NonFiniteGradientError` naming the parameters; ``nonfinite="skip"`` skips the whole step
  and counts it in ``skipped_steps`` (:meth:`NonfinitePolicy.apply_nonfinite_policy`). Either way
  nothing (parameters or state) has changed.
* **Low precision.** :func:`compute_dtype` is float32 for float16/bfloat16 parameters (and the
  parameter's own dtype otherwise): optimizer state is kept in it, the update is computed in it,
  and only the result is cast back to the parameter.
* **Checkpoints.** ``state_dict`` records the optimizer class and every parameter's name and shape
  under the key ``"gaugeopt"``; ``load_state_dict`` checks the class, group count and sizes,
  names, shapes, state keys and state shapes, and the loaded hyperparameters, and raises
  ``ValueError`` before changing anything. State tensors are restored in :func:`compute_dtype`
  (torch would cast them to the parameter's dtype, losing float32 state of bfloat16 parameters).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "GuardedOptimizer",
    "NonfinitePolicy",
    "NonFiniteGradientError",
    "NONFINITE_MODES",
    "all_finite",
    "check_gauges_cover",
    "compute_dtype",
    "state_zeros",
    "require",
    "require_rate",
    "require_nonnegative",
    "require_unit_interval",
    "require_betas",
    "require_choice",
    "require_known_keys",
]

#: What a step does when some gradient holds NaN or Inf.
NONFINITE_MODES = ("raise", "skip")

_LOW_PRECISION = (torch.float16, torch.bfloat16)

#: Key of the checkpoint metadata in a gaugeopt optimizer's state dict.
_META_KEY = "gaugeopt"


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds NaN or Inf (raised before any parameter or state changes)."""


# --------------------------------------------------------------------------------------------------
# Dtypes
# --------------------------------------------------------------------------------------------------


def compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype the update of ``t`` is computed and its state kept in: float32 for float16 and
    bfloat16 tensors, ``t.dtype`` otherwise."""
    return torch.float32 if t.dtype in _LOW_PRECISION else t.dtype


def state_zeros(p: Tensor) -> Tensor:
    """A zero state tensor shaped like ``p``, in :func:`compute_dtype` of ``p``."""
    return torch.zeros_like(p, dtype=compute_dtype(p), memory_format=torch.preserve_format)


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every entry of every tensor is finite, with one device synchronisation per device.

    Each tensor's minimum and maximum (``torch.aminmax``, one pass; NaN propagates into both, an
    infinity is one of them, and unlike a norm it cannot overflow for finite input) are tested on
    the device and the flags reduced to one per device. On a CPU this costs about a tenth of an
    AdamW step; the infinity norm (``torch._foreach_norm(ts, inf)``) cost as much as the step itself.
    """
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        if t.numel():
            by_device.setdefault(t.device, []).append(t)
    flags = [torch.stack([torch.stack(torch.aminmax(t)).isfinite().all() for t in ts]).all()
             for ts in by_device.values()]
    return all(bool(flag) for flag in flags)


# --------------------------------------------------------------------------------------------------
# Hyperparameter checks: each raises ValueError("<where>: <field> ...")
# --------------------------------------------------------------------------------------------------


def require(ok: bool, where: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{where}: {message}")


def _real(value: Any) -> float | None:
    """``value`` as a float when it is a real number (a Python number or a one-element tensor)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, Tensor):
        return float(value) if value.numel() == 1 and not value.is_complex() else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def require_nonnegative(where: str, field: str, value: Any) -> None:
    """``value`` is a finite real number ``>= 0``."""
    x = _real(value)
    require(x is not None and math.isfinite(x) and x >= 0, where,
            f"{field} must be a finite number >= 0, got {value!r}")


def require_rate(where: str, value: Any) -> None:
    """The learning rate ``lr`` is a finite real number ``>= 0``."""
    x = _real(value)
    require(x is not None and math.isfinite(x) and x >= 0, where,
            f"invalid learning rate lr={value!r}: must be a finite number >= 0")


def require_unit_interval(where: str, field: str, value: Any) -> None:
    """``value`` is a real number in ``[0, 1)``."""
    x = _real(value)
    require(x is not None and 0.0 <= x < 1.0, where, f"{field} must be in [0, 1), got {value!r}")


def require_betas(where: str, field: str, value: Any) -> None:
    """``value`` is a pair of real numbers in ``[0, 1)``."""
    ok = isinstance(value, (tuple, list)) and len(value) == 2
    ok = ok and all((x := _real(b)) is not None and 0.0 <= x < 1.0 for b in value)
    require(ok, where, f"{field} must be two numbers in [0, 1), got {value!r}")


def require_choice(where: str, field: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    require(value in choices, where, f"{field} must be one of {choices}, got {value!r}")


def require_known_keys(where: str, group: Mapping[str, Any], known: Iterable[str]) -> None:
    """Refuse keys outside ``known`` (a misspelt option would otherwise be ignored silently)."""
    known = set(known) | {"params", "param_names"}
    unknown = sorted(set(group) - known)
    if unknown:
        hints = {k: difflib.get_close_matches(k, sorted(known), n=1) for k in unknown}
        detail = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
        raise ValueError(f"{where} has unknown option(s) {detail}")


# --------------------------------------------------------------------------------------------------
# The base class
# --------------------------------------------------------------------------------------------------


class NonfinitePolicy:
    """The ``nonfinite`` setting and its bookkeeping, shared by :class:`GuardedOptimizer` and the
    optimizer bundles (``MuonWithAdamW``)."""

    def _init_guards(self, nonfinite: str) -> None:
        require_choice(type(self).__name__, "nonfinite", nonfinite, NONFINITE_MODES)
        self.nonfinite = nonfinite
        #: Steps skipped because a gradient was not finite (``nonfinite="skip"``); kept in checkpoints.
        self.skipped_steps = 0
        #: Whether the last call of ``step`` was skipped.
        self.last_step_skipped = False

    def apply_nonfinite_policy(self, bad: list[str]) -> bool:
        """Apply the ``nonfinite`` policy to a step whose gradients of ``bad`` are not finite: count a
        skip and return ``False``, or raise :class:`NonFiniteGradientError` naming them."""
        if self.nonfinite == "skip":
            self.skipped_steps += 1
            self.last_step_skipped = True
            return False
        raise NonFiniteGradientError(
            f"non-finite gradient (NaN or Inf) for {'; '.join(bad)}; nothing was changed. Pass "
            f"nonfinite='skip' to skip such steps (counted in optimizer.skipped_steps)")


class GuardedOptimizer(NonfinitePolicy, torch.optim.Optimizer):
    """``torch.optim.Optimizer`` with the checks of the module docstring.

    Subclasses call :meth:`_init_guards` before ``super().__init__``, implement
    :meth:`_validate_group`, set :attr:`_EXTRA_GROUP_KEYS` (group keys outside ``defaults``),
    :attr:`_STATE_KEYS` (state keys their step writes) and :attr:`_PARAM_SHAPED_STATE` (those shaped
    like the parameter), and begin ``step`` with :meth:`_check_step_inputs` after running the closure.
    """

    _STATE_KEYS: frozenset[str] = frozenset()
    _PARAM_SHAPED_STATE: frozenset[str] = frozenset()
    #: Keys a param group may set besides ``params``, ``param_names`` and those of ``defaults``.
    _EXTRA_GROUP_KEYS: frozenset[str] = frozenset()

    # ----- names --------------------------------------------------------------------------------
    def _known_names(self) -> Mapping[int, str]:
        """``id(parameter) -> name`` known to the subclass (e.g. from the model of a GaugeSet)."""
        return {}

    def parameter_names(self) -> list[list[str | None]]:
        """Per group, each parameter's name: the subclass's, else the group's ``param_names``."""
        known = self._known_names()
        out = []
        for group in self.param_groups:
            given = group.get("param_names") or [None] * len(group["params"])
            out.append([known.get(id(p), given_name) for p, given_name in zip(group["params"], given)])
        return out

    def describe_parameter(self, group_index: int, param_index: int,
                           names: list[list[str | None]] | None = None) -> str:
        """``"name (param group g entry i, shape s)"`` for error messages."""
        names = names or self.parameter_names()
        p = self.param_groups[group_index]["params"][param_index]
        name = names[group_index][param_index]
        where = f"param group {group_index} entry {param_index}, shape {tuple(p.shape)}"
        return f"{name} ({where})" if name else where

    # ----- hyperparameters ----------------------------------------------------------------------
    def _validate_group(self, group: dict[str, Any], where: str) -> None:
        """Raise ``ValueError(f"{where}: <field> ...")`` for a bad setting of ``group``."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, Mapping):
            require_known_keys(f"param group {len(self.param_groups)}", param_group,
                               set(self.defaults) | self._EXTRA_GROUP_KEYS)
        super().add_param_group(param_group)
        try:
            self._validate_group(self.param_groups[-1], f"param group {len(self.param_groups) - 1}")
        except ValueError:
            self.param_groups.pop()
            raise

    def _validate_groups(self) -> None:
        for index, group in enumerate(self.param_groups):
            self._validate_group(group, f"param group {index}")

    # ----- gradients ------------------------------------------------------------------------------
    def _check_step_inputs(self) -> None:
        """Check the group settings (values a scheduler or the user wrote since) and refuse sparse
        gradients, naming the parameter; nothing has changed when either raises."""
        self._validate_groups()
        self.last_step_skipped = False
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is not None and p.grad.is_sparse:
                    raise ValueError(f"{type(self).__name__} does not support sparse gradients, got one for "
                                     f"{self.describe_parameter(gi, pi)}")

    def nonfinite_parameters(self) -> list[str]:
        """The descriptions of the parameters whose gradients hold NaN or Inf (a host read per
        parameter: called only once a step's check has failed)."""
        names = self.parameter_names()
        return [self.describe_parameter(gi, pi, names) for gi, group in enumerate(self.param_groups)
                for pi, p in enumerate(group["params"]) if p.grad is not None and not torch.isfinite(p.grad).all()]

    # ----- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        names = self.parameter_names()
        state[_META_KEY] = {
            "optimizer": type(self).__name__,
            "names": names,
            "shapes": [[list(p.shape) for p in group["params"]] for group in self.param_groups],
            "skipped_steps": self.skipped_steps,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint written by ``state_dict`` of this optimizer class for these parameters;
        ``ValueError`` (before anything changes) when it was written by another optimizer or for
        another model."""
        self._check_state_dict(state_dict)
        super().load_state_dict(state_dict)
        # torch cast floating state to the parameter's dtype; restore it in the compute dtype
        saved = state_dict["state"]
        ids = (i for group in state_dict["param_groups"] for i in group["params"])
        params = (p for group in self.param_groups for p in group["params"])
        for saved_id, p in zip(ids, params):
            for key, value in saved.get(saved_id, {}).items():
                if isinstance(value, Tensor) and value.is_floating_point() and key != "step":
                    self.state[p][key] = value.to(device=p.device, dtype=compute_dtype(p), copy=True)
        if _META_KEY in state_dict:
            self.skipped_steps = int(state_dict[_META_KEY]["skipped_steps"])

    def _metadata_from_groups(self, saved_groups: Any) -> dict[str, Any] | None:
        """Metadata for a state dict without the ``"gaugeopt"`` entry, or ``None`` if its groups are
        not this optimizer's.

        ``torch.distributed.checkpoint`` (``get_state_dict`` / ``set_state_dict``) re-keys a state dict
        by parameter name and keeps only ``"state"`` and ``"param_groups"``. The optimizer is then
        recognised by its group settings (every key of ``defaults``, nothing unknown); parameter names
        and shapes are not recorded, so only the state shapes are checked against the parameters, and
        ``skipped_steps`` is left as it is.
        """
        known = set(self.defaults) | self._EXTRA_GROUP_KEYS | {"params", "param_names", "initial_lr"}
        if not isinstance(saved_groups, list) or not all(
                isinstance(g, Mapping) and set(self.defaults) <= set(g) <= known for g in saved_groups):
            return None
        return {"optimizer": type(self).__name__, "skipped_steps": None,
                "names": [[None] * len(g["params"]) for g in saved_groups],
                "shapes": [[None] * len(g["params"]) for g in saved_groups]}

    def _check_state_dict(self, state_dict: Any) -> None:
        mine = type(self).__name__
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"{mine}.load_state_dict needs a state dict, got {type(state_dict).__name__}")
        meta = state_dict.get(_META_KEY)
        if meta is None and {"state", "param_groups"} <= set(state_dict):
            meta = self._metadata_from_groups(state_dict["param_groups"])
        if not isinstance(meta, Mapping) or "optimizer" not in meta:
            raise ValueError(f"this state dict was not written by a gaugeopt optimizer (no {_META_KEY!r} "
                             f"entry); {mine} loads only its own checkpoints")
        if meta["optimizer"] != mine or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError(f"this state dict was written by {meta['optimizer']}, not {mine}")
        lacking = sorted({"names", "shapes", "skipped_steps"} - set(meta))
        if lacking:
            raise ValueError(f"this state dict's {_META_KEY!r} entry lacks {lacking}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"the state dict has {len(saved_groups)} param groups, this {mine} has "
                             f"{len(self.param_groups)}: it was saved for another model or grouping")
        names = self.parameter_names()
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {gi} of the state dict has {len(saved['params'])} parameters, "
                                 f"this {mine} has {len(group['params'])}: it was saved for another model")
            for pi, p in enumerate(group["params"]):
                saved_name, saved_shape = meta["names"][gi][pi], meta["shapes"][gi][pi]
                here = self.describe_parameter(gi, pi, names)
                if saved_name is not None and names[gi][pi] is not None and saved_name != names[gi][pi]:
                    raise ValueError(f"the state dict was saved for parameter {saved_name!r} where this {mine} "
                                     f"has {here}: it belongs to another model")
                if saved_shape is not None and list(saved_shape) != list(p.shape):
                    raise ValueError(f"the state dict was saved for a parameter of shape {tuple(saved_shape)} "
                                     f"where this {mine} has {here}: it belongs to another model")
                state = state_dict["state"].get(saved["params"][pi], {})
                unknown = sorted(set(state) - self._STATE_KEYS)
                if unknown:
                    raise ValueError(f"the state of {here} has keys {unknown} that {mine} does not write")
                for key in sorted(set(state) & self._PARAM_SHAPED_STATE):
                    if tuple(state[key].shape) != tuple(p.shape):
                        raise ValueError(f"state {key!r} of {here} has shape {tuple(state[key].shape)}")
            settings = {k: v for k, v in saved.items() if k not in ("params", "param_names")}
            self._validate_group({**settings, "params": group["params"]}, f"param group {gi} of the state dict")


# --------------------------------------------------------------------------------------------------
# GaugeSet coverage
# --------------------------------------------------------------------------------------------------


def check_gauges_cover(gauges, names: Sequence[Sequence[str | None]]) -> None:
    """Check that ``gauges`` describes the model being optimized.

    ``names`` holds, per param group, each parameter's name in ``gauges.model`` (``None`` for a
    parameter outside it, which is stepped without a frame). ``ValueError`` when the model's shapes no
    longer match the families (the model was changed after ``find_gauges``), or when ``gauges`` has
    families and not one parameter is ``gauges.model``'s (a GaugeSet found on another model or on a
    copy: ``gauges.bind(model)`` re-targets it).
    """
    if gauges is None:
        return
    from ..gauges.families import NeuronScaling, NormScaling

    model_params = gauges.params()
    for family in gauges:
        if isinstance(family, (NeuronScaling, NormScaling)):
            for ref in (*family.multiplied, *family.divided):
                shape = tuple(model_params[ref.name].shape)
                if ref.axis >= len(shape) or shape[ref.axis] != family.units * ref.inner:
                    raise ValueError(
                        f"gauge family {family.name} acts on {family.units} slices along axis {ref.axis} of "
                        f"{ref.name}, which now has shape {shape}: the model changed after find_gauges; "
                        f"find the gauges again")
    given = [name for group in names for name in group]
    if given and len(gauges) and all(name is None for name in given):
        raise ValueError("none of the parameters belongs to gauges.model: pass the GaugeSet of the model "
                         "being optimized (gauges.bind(model) re-targets one to a copy)")
