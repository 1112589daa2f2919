"""Spectral observables of one site: the functional core of dead-direction signatures (dds.md §2).

A *site* contributes two N x h data matrices (N samples, h features):

* ``X`` -- the activations at the site, with second-moment matrix ``A = X^T X / N``;
* ``D`` -- per-sample gradients of the per-sample loss with respect to the site's pre-activation,
  with second-moment matrix ``G = D^T D / N`` (the gradient-side Kronecker factor of the Fisher).

Everything here is computed in float64 without damping. The *positive spectrum* of a symmetric
positive semi-definite matrix S is its set of eigenvalues above ``tau = rel_tol * lambda_max(S)``;
``rank+`` counts them, ``lambda+_min`` is the smallest and ``logdet+ = sum(log lambda_i)`` runs over
them (the log pseudo-determinant).

Cost stays closed form: the nonzero eigenvalues of ``Z^T Z / N`` (h x h) equal those of the Gram
matrix ``Z Z^T / N`` (N x N), so whichever is smaller is diagonalised. No per-parameter Fisher is
ever formed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

DEFAULT_REL_TOL = 1e-10

# The observables whose slopes are read, in row order. Values of the "log" kind are fitted as
# log(O) against log t; values of the "linear" kind (already logarithms) are fitted as O itself.
# sigma2_min_X is not among them: it is N * lambda_min_A, so its slope is lambda_min_A's.
SLOPE_OBSERVABLES: dict[str, str] = {
    "lambda_min_G": "log",
    "logdet_G": "linear",
    "lambda_min_A": "log",
    "logdet_A": "linear",
}


@dataclass(frozen=True)
class PositiveSpectrum:
    """Eigenvalues of a PSD second-moment matrix that lie above ``rel_tol * lambda_max``."""

    eigenvalues: torch.Tensor  # float64, ascending, all > tau
    tau: float

    @property
    def rank(self) -> int:
        return int(self.eigenvalues.numel())

    @property
    def min(self) -> float:
        return float(self.eigenvalues[0]) if self.rank else math.nan

    @property
    def logdet(self) -> float:
        return float(torch.log(self.eigenvalues).sum()) if self.rank else math.nan


def second_moment_eigenvalues(data: torch.Tensor) -> torch.Tensor:
    """All eigenvalues (ascending, float64) of ``Z^T Z / N`` for an N x h matrix ``Z``.

    Uses the N x N Gram ``Z Z^T / N`` when N < h: it has the same nonzero eigenvalues, and the
    h - N extra zeros of the h x h matrix carry no information for the positive spectrum.
    """
    if data.ndim != 2:
        raise ValueError(f"expected an (N, h) matrix, got shape {tuple(data.shape)}")
    samples, width = data.shape
    if samples == 0 or width == 0:
        raise ValueError(f"expected a non-empty (N, h) matrix, got shape {tuple(data.shape)}")
    z = data.detach().to(torch.float64)
    if not torch.isfinite(z).all():
        raise ValueError("data contains non-finite values")
    gram = z @ z.T if samples < width else z.T @ z
    return torch.linalg.eigvalsh(gram / samples)


def positive_spectrum(data: torch.Tensor, rel_tol: float = DEFAULT_REL_TOL) -> PositiveSpectrum:
    """Positive spectrum of ``Z^T Z / N``: eigenvalues above ``rel_tol * lambda_max``."""
    return positive_part(second_moment_eigenvalues(data), rel_tol)


def positive_part(eigenvalues: torch.Tensor, rel_tol: float = DEFAULT_REL_TOL) -> PositiveSpectrum:
    """The eigenvalues (ascending) above ``rel_tol * lambda_max``."""
    if not 0.0 < rel_tol < 1.0:
        raise ValueError(f"rel_tol must lie in (0, 1), got {rel_tol}")
    lambda_max = float(eigenvalues[-1])
    if lambda_max <= 0.0:
        return PositiveSpectrum(eigenvalues=eigenvalues[:0], tau=0.0)
    tau = rel_tol * lambda_max
    return PositiveSpectrum(eigenvalues=eigenvalues[eigenvalues > tau], tau=tau)


@dataclass(frozen=True)
class SiteObservables:
    """One row of a DDS reading: the observables of dds.md §2 at one site.

    ``sigma2_min_X`` is the smallest positive squared singular value of X itself (so it equals
    ``samples * lambda_min_A``); the ``_A`` and ``_G`` values refer to ``X^T X / N`` and
    ``D^T D / N``.
    """

    site: str
    width: int
    samples: int
    sigma2_min_X: float
    lambda_min_G: float
    logdet_G: float
    rank_G: int
    lambda_min_A: float
    logdet_A: float
    rank_A: int

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def site_observables(
    site: str, activations: torch.Tensor, gradients: torch.Tensor, rel_tol: float = DEFAULT_REL_TOL
) -> SiteObservables:
    """Observables of one site from its activations X (N x h) and per-sample gradients D (N x h).

    Raises ``ValueError`` when the shapes disagree or a spectrum is empty (all-zero data).
    """
    eigenvalues = site_eigenvalues(site, activations, gradients)
    return observables_from_eigenvalues(site, eigenvalues["A"], eigenvalues["G"], samples=activations.shape[0],
                                        width=activations.shape[1], rel_tol=rel_tol)


def site_eigenvalues(site: str, activations: torch.Tensor, gradients: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"A": eigenvalues of X^T X / N, "G": eigenvalues of D^T D / N}`` (ascending, float64)."""
    if activations.shape != gradients.shape:
        raise ValueError(
            f"site {site!r}: activations {tuple(activations.shape)} and gradients "
            f"{tuple(gradients.shape)} must have the same (N, h) shape"
        )
    return {"A": second_moment_eigenvalues(activations), "G": second_moment_eigenvalues(gradients)}


def observables_from_eigenvalues(site: str, eigenvalues_A: torch.Tensor, eigenvalues_G: torch.Tensor, *,
                                 samples: int, width: int, rel_tol: float = DEFAULT_REL_TOL) -> SiteObservables:
    """The row of a site from all eigenvalues (ascending) of its ``A`` and ``G``."""
    spectrum_A = positive_part(eigenvalues_A, rel_tol)
    spectrum_G = positive_part(eigenvalues_G, rel_tol)
    if spectrum_A.rank == 0:
        raise ValueError(f"site {site!r}: activations are identically zero")
    if spectrum_G.rank == 0:
        raise ValueError(f"site {site!r}: per-sample gradients are identically zero")
    return SiteObservables(
        site=site,
        width=int(width),
        samples=int(samples),
        sigma2_min_X=samples * spectrum_A.min,
        lambda_min_G=spectrum_G.min,
        logdet_G=spectrum_G.logdet,
        rank_G=spectrum_G.rank,
        lambda_min_A=spectrum_A.min,
        logdet_A=spectrum_A.logdet,
        rank_A=spectrum_A.rank,
    )
