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
* **Param groups.** A parameter listed twice is refused (torch only warns; it would be stepped
  twice), and ``add_param_group`` applies every check of the constructor.
* **Checkpoints.** ``state_dict`` records the optimizer class and every parameter's name and shape
  under the key ``"gaugeopt"``; ``load_state_dict`` checks everything before it changes anything:
  the class, group count and sizes, names, shapes, every group's settings (each key of the
  defaults present, none unknown, valid values), and every parameter's state (all the entries of
  each kind of state it holds, shapes, floating point, finite, second moments ``>= 0``, step counts
  whole numbers ``>= 0``). On a ``ValueError`` nothing changed. State tensors are restored in
  :func:`compute_dtype` (torch would cast them to the parameter's dtype, losing float32 state of
  bfloat16 parameters) and step counts saved as numbers become tensors.
* **Copies.** ``copy.deepcopy`` and pickling keep every attribute the step needs (torch's
  ``__getstate__`` keeps three), so a copy steps like the original.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import math
import numbers
import os
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .shards import local_tensor

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
    "require_positive",
    "require_unit_interval",
    "require_betas",
    "require_choice",
    "require_known_keys",
    "SCHEDULER_KEYS",
    "SECOND_MOMENTS",
    "user_stacklevel",
]

#: What a step does when some gradient holds NaN or Inf.
NONFINITE_MODES = ("raise", "skip")

_LOW_PRECISION = (torch.float16, torch.bfloat16)

#: Key of the checkpoint metadata in a gaugeopt optimizer's state dict.
_META_KEY = "gaugeopt"

#: Keys torch's LR schedulers and SWALR write into param groups (allowed besides the settings).
SCHEDULER_KEYS = frozenset({"initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum", "swa_lr"})

#: State entries that are second moments (sums of squares): a checkpoint with a negative one is refused.
SECOND_MOMENTS = frozenset({"exp_avg_sq", "scale_exp_avg_sq"})


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
    """``value`` as a float when it is a real number (a Python or NumPy number, or a one-element
    real tensor); ``None`` for anything else (a string such as ``"0.1"`` included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, Tensor):
        return float(value) if value.numel() == 1 and not value.is_complex() and value.dtype != torch.bool else None
    return float(value) if isinstance(value, numbers.Real) else None


def require_nonnegative(where: str, field: str, value: Any) -> None:
    """``value`` is a finite real number ``>= 0``."""
    x = _real(value)
    require(x is not None and math.isfinite(x) and x >= 0, where,
            f"{field} must be a finite number >= 0, got {value!r}")


def require_positive(where: str, field: str, value: Any) -> None:
    """``value`` is a finite real number ``> 0``."""
    x = _real(value)
    require(x is not None and math.isfinite(x) and x > 0, where, f"{field} must be a finite number > 0, got {value!r}")


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
    unknown = sorted(set(group) - known, key=str)
    if unknown:
        hints = {k: difflib.get_close_matches(str(k), sorted(known), n=1) for k in unknown}
        detail = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
        raise ValueError(f"{where} has unknown option(s) {detail}")


def user_stacklevel() -> int:
    """The ``stacklevel`` of the innermost caller outside torch and gaugeopt, for a warning raised inside
    ``step`` (whose wrappers, ``no_grad``, the step hooks and a scheduler's counter, vary in number)."""
    inside = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)))
    frame, level = inspect.currentframe().f_back, 1
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


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
    :meth:`_validate_group` and :meth:`_state_kinds`, set :attr:`_EXTRA_GROUP_KEYS` (group keys
    outside ``defaults``) and :attr:`_TRANSIENT` (caches left out of copies), and begin ``step``
    with :meth:`_check_step_inputs` after running the closure.
    """

    #: Keys a param group may set besides ``params``, ``param_names`` and those of ``defaults``.
    _EXTRA_GROUP_KEYS: frozenset[str] = frozenset()
    #: Attributes rebuilt on demand (:meth:`_reset_transient`), left out of copies and pickles.
    _TRANSIENT: frozenset[str] = frozenset()

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

    # ----- param groups ---------------------------------------------------------------------------
    def _validate_group(self, group: dict[str, Any], where: str) -> None:
        """Raise ``ValueError(f"{where}: <field> ...")`` for a bad setting of ``group``."""

    def _check_new_parameters(self, group: dict[str, Any], where: str) -> None:
        """Raise for parameters of a group being added that the optimizer cannot take (the
        constructor's checks: every group, at construction or later, goes through them)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``torch.optim.Optimizer.add_param_group`` with the constructor's checks: unknown keys, a
        parameter listed twice (torch only warns), the group's settings and parameters. On an error
        the optimizer is unchanged."""
        where = f"param group {len(self.param_groups)}"
        if isinstance(param_group, dict):
            require_known_keys(where, param_group, self._group_keys())
            params = param_group.get("params")
            if params is not None and not isinstance(params, (Tensor, set)):
                param_group["params"] = params = list(params)  # an iterator is read once
                _refuse_duplicates(where, params)
        super().add_param_group(param_group)
        try:
            self._check_new_parameters(self.param_groups[-1], where)
            self._validate_group(self.param_groups[-1], where)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise

    def _group_keys(self) -> set[str]:
        """Every key a param group may hold besides ``params`` and ``param_names``."""
        return set(self.defaults) | self._EXTRA_GROUP_KEYS | SCHEDULER_KEYS

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

    # ----- copies ---------------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """Every attribute the step needs (torch keeps only ``defaults``, ``state`` and
        ``param_groups``); caches and, as in torch, hooks are left out."""
        return {k: v for k, v in self.__dict__.items() if k not in self._TRANSIENT and k not in _HOOK_DICTS}

    def __setstate__(self, state: dict[str, Any]) -> None:
        defaults = state.get("defaults", self.__dict__.get("defaults", {}))
        differentiable = "differentiable" in defaults
        super().__setstate__(state)  # torch: empty hooks, the profiled step
        if not differentiable:  # torch adds this flag for its own pickles; it is no setting of ours
            self.defaults.pop("differentiable", None)
        self._reset_transient()

    def _reset_transient(self) -> None:
        """Rebuild what :attr:`_TRANSIENT` names (after a copy or a load)."""

    # ----- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict with the entry ``"gaugeopt"`` (class, parameter names and shapes,
        ``skipped_steps``), added before the state-dict post-hooks run, so they see it."""
        post_hooks = self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_post_hooks = OrderedDict()
        try:
            state_dict = super().state_dict()  # the pre-hooks run here
        finally:
            self._optimizer_state_dict_post_hooks = post_hooks
        # a parameter that is only a frame (a norm gain without the channel-scale step) is never
        # stepped; torch.distributed.checkpoint loads (strictly) only with an entry for every
        # parameter that requires a gradient, so it gets an empty one
        for group, packed in zip(self.param_groups, state_dict["param_groups"]):
            for p, index in zip(group["params"], packed["params"]):
                if p.requires_grad and not self._state_kinds(group, p):
                    state_dict["state"].setdefault(index, {})
        state_dict[_META_KEY] = {
            "optimizer": type(self).__name__,
            "names": self.parameter_names(),
            "shapes": [[list(p.shape) for p in group["params"]] for group in self.param_groups],
            "skipped_steps": self.skipped_steps,
        }
        for hook in post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint written by ``state_dict`` of this class for these parameters.

        As in torch, the load-state-dict pre-hooks get a shallow copy of ``state_dict`` (and may
        return another dict), the param groups take the saved settings (and ``param_names``, where
        saved) and the post-hooks run last. Unlike torch, everything is checked before anything
        changes (:meth:`_read_state_dict`): on a ``ValueError`` the state and the param groups are
        exactly as they were. State tensors are copied in the class's compute dtype and step counts
        become tensors (a count saved as a number loads).
        """
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"{type(self).__name__}.load_state_dict needs a state dict, got "
                             f"{type(state_dict).__name__}")
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        state, groups, skipped_steps = self._read_state_dict(state_dict)
        self.__setstate__({"state": state, "param_groups": groups})
        if skipped_steps is not None:
            self.skipped_steps = skipped_steps
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _upgraded_group(self, saved: Mapping[str, Any]) -> Mapping[str, Any]:
        """A saved param group in this version's keys (a subclass renames keys of older versions)."""
        return saved

    def _state_kinds(self, group: Mapping[str, Any], p: Tensor) -> tuple[Mapping[str, tuple[int, ...]], ...]:
        """The state entries ``p`` may hold as a member of ``group``, in kinds: each maps its keys to
        their shapes, and a parameter holds all of a kind's entries or none (none at all before its
        first step)."""
        raise NotImplementedError

    def _metadata_from_groups(self, saved_groups: Any) -> dict[str, Any] | None:
        """Metadata for a state dict without the ``"gaugeopt"`` entry, or ``None`` if its groups are
        not this optimizer's.

        ``torch.distributed.checkpoint`` (``get_state_dict`` / ``set_state_dict``) re-keys a state dict
        by parameter name and keeps only ``"state"`` and ``"param_groups"``. The optimizer is then
        recognised by its group settings (every key of ``defaults``, nothing unknown); parameter names
        and shapes are not recorded, so only the state shapes are checked against the parameters, and
        ``skipped_steps`` is left as it is.
        """
        known = self._group_keys() | {"params", "param_names"}
        if not isinstance(saved_groups, (list, tuple)) or not all(
                isinstance(g, Mapping) and set(self.defaults) <= set(self._upgraded_group(g)) <= known
                for g in saved_groups):
            return None
        sizes = [len(g["params"]) if isinstance(g.get("params"), (list, tuple)) else 0 for g in saved_groups]
        return {"optimizer": type(self).__name__, "skipped_steps": None,
                "names": [[None] * n for n in sizes], "shapes": [[None] * n for n in sizes]}

    def _read_state_dict(self, state_dict: Mapping[str, Any]) -> tuple[defaultdict, list[dict[str, Any]], int | None]:
        """The state, param groups and ``skipped_steps`` a state dict loads to, or ``ValueError``
        naming what does not fit (nothing of the optimizer is touched)."""
        mine = type(self).__name__
        meta = state_dict.get(_META_KEY)
        if meta is None and {"state", "param_groups"} <= set(state_dict):
            meta = self._metadata_from_groups(state_dict["param_groups"])
        if not isinstance(meta, Mapping) or "optimizer" not in meta:
            raise ValueError(f"this state dict was not written by a gaugeopt optimizer (no {_META_KEY!r} "
                             f"entry); {mine} loads only its own checkpoints")
        if not isinstance(meta["optimizer"], str) or meta["optimizer"] != mine:
            raise ValueError(f"this state dict was written by {meta['optimizer']!s}, not {mine}")
        missing = sorted({"state", "param_groups"} - set(state_dict))
        if missing:
            raise ValueError(f"this state dict lacks {missing}")
        lacking = sorted({"names", "shapes", "skipped_steps"} - set(meta))
        if lacking:
            raise ValueError(f"this state dict's {_META_KEY!r} entry lacks {lacking}")
        saved_state, saved_groups = state_dict["state"], state_dict["param_groups"]
        if not isinstance(saved_state, Mapping):
            raise ValueError(f"the state dict's 'state' must be a dict, got {type(saved_state).__name__}")
        if not isinstance(saved_groups, (list, tuple)) or not all(isinstance(g, Mapping) for g in saved_groups):
            raise ValueError("the state dict's 'param_groups' must be a list of dicts")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"the state dict has {len(saved_groups)} param groups, this {mine} has "
                             f"{len(self.param_groups)}: it was saved for another model or grouping")
        skipped_steps = meta["skipped_steps"]
        if skipped_steps is not None and not _is_count(skipped_steps):
            raise ValueError(f"this state dict's skipped_steps must be a whole number >= 0, got {skipped_steps!r}")
        names = self.parameter_names()
        seen: set[Any] = set()
        state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
        groups = []
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            where = f"param group {gi} of the state dict"
            saved = self._upgraded_group(saved)
            ids = saved.get("params")
            if not isinstance(ids, (list, tuple)):
                raise ValueError(f"{where} has no list 'params' of parameter ids")
            if len(ids) != len(group["params"]):
                raise ValueError(f"{where} has {len(ids)} parameters, this {mine} has {len(group['params'])}: "
                                 f"it was saved for another model")
            settings = {k: v for k, v in saved.items() if k not in ("params", "param_names")}
            require_known_keys(where, settings, self._group_keys())
            missing = sorted(set(self.defaults) - set(settings))
            if missing:
                raise ValueError(f"{where} lacks the setting(s) {missing}")
            self._validate_group({**settings, "params": group["params"]}, where)
            loaded = copy.deepcopy(settings)
            loaded["params"] = group["params"]
            if "param_names" in saved:
                given = saved["param_names"]
                if not isinstance(given, (list, tuple)) or len(given) != len(ids) \
                        or not all(isinstance(n, str) for n in given):
                    raise ValueError(f"{where} has param_names that are not one name per parameter: {given!r}")
                loaded["param_names"] = list(given)
            elif "param_names" in group:
                loaded["param_names"] = group["param_names"]
            saved_names, saved_shapes = _per_group(meta, "names", gi, len(ids)), _per_group(meta, "shapes", gi, len(ids))
            for pi, (saved_id, p) in enumerate(zip(ids, group["params"])):
                here = self.describe_parameter(gi, pi, names)
                if not _is_hashable(saved_id):
                    raise ValueError(f"{where} lists {saved_id!r}, which is not a parameter id")
                if saved_id in seen:
                    raise ValueError(f"{where} lists the parameter id {saved_id!r} twice")
                seen.add(saved_id)
                saved_name, saved_shape = saved_names[pi], saved_shapes[pi]
                if saved_name is not None and (not isinstance(saved_name, str)
                                               or names[gi][pi] is not None and saved_name != names[gi][pi]):
                    raise ValueError(f"the state dict was saved for parameter {saved_name!r} where this {mine} "
                                     f"has {here}: it belongs to another model")
                if saved_shape is not None and (not _is_shape(saved_shape) or list(saved_shape) != list(p.shape)):
                    raise ValueError(f"the state dict was saved for a parameter of shape {saved_shape!r} "
                                     f"where this {mine} has {here}: it belongs to another model")
                if saved_id not in saved_state:
                    continue
                entry = saved_state[saved_id]
                if not isinstance(entry, Mapping):
                    raise ValueError(f"the state of {here} must be a dict, got {type(entry).__name__}")
                self._check_state_entry(here, self._state_kinds(loaded, p), entry, loading=True)
                if entry:
                    state[p] = {key: _loaded_state_value(key, value, p) for key, value in entry.items()}
            groups.append(loaded)
        stray = [k for k in saved_state if k not in seen]
        if stray:
            raise ValueError(f"the state dict holds state under {stray[:3]!r}, which no param group lists")
        return state, groups, None if skipped_steps is None else int(skipped_steps)

    def _check_state_entry(self, here: str, kinds: tuple[Mapping[str, tuple[int, ...]], ...],
                           entry: Mapping[Any, Any], *, loading: bool) -> None:
        """``ValueError`` naming what in ``entry`` (the state of the parameter ``here``) does not fit
        its ``kinds``: unknown or missing keys, shapes; when ``loading``, also values (floating point,
        finite, second moments ``>= 0``, step counts whole numbers ``>= 0``)."""
        mine = type(self).__name__
        expected = {key: shape for kind in kinds for key, shape in kind.items()}
        unknown = [key for key in entry if key not in expected]
        if unknown:
            raise ValueError(f"the state of {here} has keys {sorted(map(str, unknown))} that {mine} does not "
                             f"keep for it")
        for kind in kinds:
            present = [key for key in kind if key in entry]
            if present and len(present) != len(kind):
                raise ValueError(f"the state of {here} holds {sorted(present)} but lacks "
                                 f"{sorted(set(kind) - set(present))}: a truncated or edited checkpoint")
        for key, value in entry.items():
            if key == "step":
                if loading and not _is_count(value):
                    raise ValueError(f"the step count of {here} must be a whole number >= 0, got {value!r}")
                continue
            if not isinstance(value, Tensor):
                raise ValueError(f"state {key!r} of {here} must be a tensor, got {type(value).__name__}")
            if tuple(value.shape) != tuple(expected[key]):
                raise ValueError(f"state {key!r} of {here} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(expected[key])}")
            if not loading:
                continue
            if not value.is_floating_point():
                raise ValueError(f"state {key!r} of {here} must be floating point, got {value.dtype}")
            local = local_tensor(value)
            if local.numel() and not bool(torch.isfinite(local).all()):
                raise ValueError(f"state {key!r} of {here} holds NaN or Inf")
            if key in SECOND_MOMENTS and local.numel() and bool((local < 0).any()):
                raise ValueError(f"state {key!r} of {here} (a second moment) holds negative entries")

    def _check_state(self) -> None:
        """``ValueError`` before a step when a parameter's state no longer fits it (its shape changed
        since the state was made, or the state was edited); run when the step's layout is built."""
        names = self.parameter_names()
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                entry = self.state.get(p)
                if entry:
                    self._check_state_entry(self.describe_parameter(gi, pi, names), self._state_kinds(group, p),
                                            entry, loading=False)


#: torch's six hook tables; like torch, copies and pickles of an optimizer start without hooks.
_HOOK_DICTS = frozenset({
    "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
})


def _refuse_duplicates(where: str, params: list[Any]) -> None:
    """``ValueError`` when a parameter (or ``(name, parameter)`` entry) is listed twice in a group:
    it would be stepped twice, or break the frame of its family."""
    seen: dict[int, int] = {}
    for index, entry in enumerate(params):
        tensor = entry[1] if isinstance(entry, tuple) and len(entry) == 2 else entry
        if id(tensor) in seen:
            raise ValueError(f"{where} lists the same parameter twice (entries {seen[id(tensor)]} and {index}"
                             f"{', ' + repr(entry[0]) if isinstance(entry, tuple) else ''}): give each parameter once")
        seen[id(tensor)] = index


#: Step counts are float32 tensors (as torch's): a larger count would become infinite.
_LARGEST_COUNT = torch.finfo(torch.float32).max


def _is_count(value: Any) -> bool:
    """Whether ``value`` is a whole number ``>= 0`` (and finite in float32): a Python number or a
    one-element real tensor."""
    if isinstance(value, Tensor) and value.is_floating_point() and value.numel() == 1:
        value = local_tensor(value).item()
    elif isinstance(value, Tensor) and not value.is_complex() and value.dtype != torch.bool and value.numel() == 1:
        value = int(local_tensor(value).item())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and 0 <= value <= _LARGEST_COUNT and float(value).is_integer()


def _is_hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _is_shape(value: Any) -> bool:
    """Whether ``value`` is a list or tuple of whole numbers (a shape as the metadata records it)."""
    return isinstance(value, (list, tuple)) and all(isinstance(d, int) and not isinstance(d, bool) for d in value)


def _loaded_state_value(key: str, value: Any, p: Tensor) -> Tensor:
    """A checked state value as the optimizer keeps it: a 0-d float32 step count on the parameter's
    device, else a copy in :func:`compute_dtype` of ``p`` on its device."""
    if key == "step":
        count = float(local_tensor(value).item()) if isinstance(value, Tensor) else float(value)
        return torch.tensor(count, dtype=torch.float32, device=local_tensor(p).device)
    return value.to(device=p.device, dtype=compute_dtype(p), copy=True)


def _per_group(meta: Mapping[str, Any], field: str, group_index: int, size: int) -> list[Any]:
    """``meta[field][group_index]`` (names or shapes of one group's parameters), checked to have
    ``size`` entries."""
    table = meta[field]
    row = table[group_index] if isinstance(table, (list, tuple)) and group_index < len(table) else None
    if not isinstance(row, (list, tuple)) or len(row) != size:
        raise ValueError(f"this state dict's {_META_KEY!r} entry has {field} that do not match its param groups")
    return list(row)


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
