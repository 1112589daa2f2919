"""A DDS reading: a row of observables per site, and the sites that could not be read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .capture import PerSampleLoss, capture_sites
from .observables import DEFAULT_REL_TOL, SiteObservables, observables_from_eigenvalues, site_eigenvalues


@dataclass(frozen=True)
class DDSReading:
    """Rows of :class:`SiteObservables` (one per readable site) and ``skipped`` (site -> reason).

    ``spectra`` keeps, per site, every eigenvalue (ascending, float64) of ``A`` and of ``G``, so a
    rate readout can follow the same eigenvalues along a trajectory; it stays in memory (it is not
    part of :meth:`as_dict`).
    """

    rows: tuple[SiteObservables, ...]
    skipped: dict[str, str]
    spectra: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)

    def row(self, site: str) -> SiteObservables:
        """The row of ``site`` (``"name"`` is read as ``"name:output"``)."""
        key = site if ":" in site else f"{site}:output"
        for row in self.rows:
            if row.site == key:
                return row
        reason = self.skipped.get(key, "it was not requested")
        raise KeyError(f"no reading for site {key!r}: {reason}")

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": [row.as_dict() for row in self.rows],
            "skipped": [{"site": site, "reason": reason} for site, reason in self.skipped.items()],
        }


def dead_direction_signatures(
    model: nn.Module,
    inputs: torch.Tensor | tuple[Any, ...],
    targets: Any,
    *,
    loss: PerSampleLoss,
    sites: Sequence[str],
    rel_tol: float = DEFAULT_REL_TOL,
) -> DDSReading:
    """Read the dead-direction observables of dds.md §2 at ``sites`` from one forward and backward.

    Args:
        model: any ``nn.Module``; it is called as ``model(inputs)`` (or ``model(*inputs)`` for a
            tuple). Its mode and parameter gradients are left untouched.
        inputs, targets: one probe batch; ``loss(outputs, targets)`` must return per-sample (or
            per-token) losses, e.g. ``F.mse_loss(..., reduction="none").sum(-1)``.
        sites: ``"module"`` / ``"module:output"`` (the module's output) or ``"module:input"``.
        rel_tol: eigenvalues at or below ``rel_tol * lambda_max`` are treated as zero.

    Returns:
        A :class:`DDSReading`: one row per readable site with ``width``, ``samples`` (rows after
        flattening leading dimensions), ``sigma2_min_X``, ``lambda_min_G``, ``logdet_G``,
        ``rank_G``, ``lambda_min_A``, ``logdet_A``, ``rank_A``; and the skipped sites with reasons.
    """
    captured = capture_sites(model, inputs, targets, loss, sites)
    rows: list[SiteObservables] = []
    skipped = dict(captured.skipped)
    spectra: dict[str, dict[str, torch.Tensor]] = {}
    for site, activations in captured.activations.items():
        gradients = captured.gradients[site]
        try:
            eigenvalues = site_eigenvalues(site, activations, gradients)
            rows.append(observables_from_eigenvalues(site, eigenvalues["A"], eigenvalues["G"],
                                                     samples=activations.shape[0], width=activations.shape[1],
                                                     rel_tol=rel_tol))
            spectra[site] = eigenvalues
        except ValueError as error:
            skipped[site] = str(error)
    return DDSReading(rows=tuple(rows), skipped=skipped, spectra=spectra)
