"""Optimizers: frames, base rules and the batched step as pure functions on tensors; thin shells.

The step of every optimizer here is frame -> base rule -> lift, batched across layers:

* ``symmetry``: the vocabulary below the rest (sides of a scaling, blocks of an axis, the residual
  symmetry a frame leaves for a rule);
* ``frames``: gauge frames, canonical coordinates in which the rules cannot see the gauges
  (norm and neuron scalings, chains of them, translations, rotations as a residual symmetry);
* ``rules``: the base rules, written once (Adam, Muon, MomentumMap: a layerwise map on the momentum),
  with ``matrix_functions`` (Newton-Schulz, polar, inverse square roots) and ``layerwise`` (the
  symmetry-compatible matrix maps ``Phi``, which MomentumMap applies);
* ``program``: what is stepped with what (batches of same-shape tensors across layers, typed
  records built once per layout); ``storage``: the rule state as persistent stacked buffers whose
  slices are the parameters' state; ``step``: read -> canonicalize -> rule -> lift -> write on a
  program, on whole tensors or on row shards (``shards``: which rows a rank holds, and the two
  collective operations a sharded step makes); ``compile``: the phases run eagerly or compiled,
  decided once;
* ``roles``: the one structural classifier of a model's parameters (embedding, LM head, attention,
  SwiGLU, MoE, convolution kernels, input and output layers, ...), read by DDCMuon's Muon/Adam split
  and by SymmetryCompatible's param groups;
* the shells: ``base.FramedOptimizer`` and ``ddc_adam`` (DDCAdam), ``ddc_muon`` (DDCMuon),
  ``symcompat`` (SymmetryCompatible and its roles' rules), ``baselines`` (Muon + AdamW);
* around them: ``guards`` (settings, gradients, low precision, checkpoints), ``clipping``
  (gauge-invariant ``clip_grad_norm_``), ``distributed`` (DDP and FSDP2: the process-group
  collectives).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DDCAdam": "gaugeopt.optim.ddc_adam",
    "DDCMuon": "gaugeopt.optim.ddc_muon",
    "SymmetryCompatible": "gaugeopt.optim.symcompat",
    "symmetry_param_groups": "gaugeopt.optim.symcompat",
    "NonFiniteGradientError": "gaugeopt.optim.guards",
    "clip_grad_norm_": "gaugeopt.optim.clipping",
    "gauge_invariant_grad_norm": "gaugeopt.optim.clipping",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gaugeopt.optim' has no attribute {name!r}")
