"""A DDS reading: a row of observables per site, and the sites that could not be read."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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
    positions: Sequence[int] | None = None,
    project_out: Mapping[str, torch.Tensor] | None = None,
) -> DDSReading:
    """Read the dead-direction observables of dds.md §2 at ``sites`` from one forward and backward.

    Args:
        model: any ``nn.Module``; it is called as ``model(inputs)`` (or ``model(*inputs)`` for a
            tuple). Its mode and parameter gradients are left untouched.
        inputs, targets: one probe batch; ``loss(outputs, targets)`` must return per-sample (or
            per-token) losses, e.g. ``F.mse_loss(..., reduction="none").sum(-1)``.
        sites: ``"module"`` / ``"module:output"`` (the module's output) or ``"module:input"``.
        rel_tol: eigenvalues at or below ``rel_tol * lambda_max`` are treated as zero.
        positions: sequence positions that count as samples (see
            :func:`~gaugeopt.dds.capture.capture_sites`); None keeps every position.
        project_out: ``{site: directions}`` with ``directions`` a ``(k, width)`` tensor: the site's
            activation and gradient rows are projected onto the orthogonal complement of their span,
            ``Z <- Z (I - Q Q^T)`` with ``Q`` an orthonormal basis (e.g. the all-ones logit-shift
            direction of a softmax head, which the loss cannot see). The directions then add exact
            zeros to both spectra, which the positive spectrum drops.

    Returns:
        A :class:`DDSReading`: one row per readable site with ``width``, ``samples`` (rows after
        flattening leading dimensions), ``sigma2_min_X``, ``lambda_min_G``, ``logdet_G``,
        ``rank_G``, ``lambda_min_A``, ``logdet_A``, ``rank_A``; and the skipped sites with reasons.
    """
    captured = capture_sites(model, inputs, targets, loss, sites, positions=positions)
    quotients = {}
    for site, directions in (project_out or {}).items():
        key = site if ":" in site else f"{site}:output"
        if key not in {str(s) if ":" in s else f"{s}:output" for s in sites}:
            raise ValueError(f"project_out names {site!r}, which is not among the sites")
        quotients[key] = orthonormal_rows(directions)
    rows: list[SiteObservables] = []
    skipped = dict(captured.skipped)
    spectra: dict[str, dict[str, torch.Tensor]] = {}
    for site, activations in captured.activations.items():
        gradients = captured.gradients[site]
        if site in quotients:
            activations, gradients = (project_rows_out(z, quotients[site]) for z in (activations, gradients))
        try:
            eigenvalues = site_eigenvalues(site, activations, gradients)
            rows.append(observables_from_eigenvalues(site, eigenvalues["A"], eigenvalues["G"],
                                                     samples=activations.shape[0], width=activations.shape[1],
                                                     rel_tol=rel_tol))
            spectra[site] = eigenvalues
        except ValueError as error:
            skipped[site] = str(error)
    return DDSReading(rows=tuple(rows), skipped=skipped, spectra=spectra)


def orthonormal_rows(directions: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (rows, float64) of the span of the rows of ``directions`` (k x width)."""
    directions = torch.as_tensor(directions, dtype=torch.float64)
    if directions.ndim == 1:
        directions = directions[None]
    if directions.ndim != 2 or directions.shape[0] == 0 or not torch.isfinite(directions).all():
        raise ValueError(f"directions must be a finite (k, width) tensor, got shape {tuple(directions.shape)}")
    q, r = torch.linalg.qr(directions.T)
    if (r.diagonal().abs() <= 1e-12 * r.diagonal().abs().max()).any():
        raise ValueError("the directions to project out are linearly dependent or zero")
    return q.T


def project_rows_out(data: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``data (I - Q^T Q)`` in float64 for orthonormal rows ``Q`` (k x width) of the same width."""
    data = data.to(torch.float64)
    if basis.shape[1] != data.shape[1]:
        raise ValueError(f"directions of width {basis.shape[1]} for a site of width {data.shape[1]}")
    basis = basis.to(data.device)
    return data - (data @ basis.T) @ basis
