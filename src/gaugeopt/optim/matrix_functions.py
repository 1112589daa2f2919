"""Matrix functions behind the orthogonalising optimizers, as pure functions on (batched) tensors.

Every function accepts a single matrix ``(m, n)`` or a batch ``(..., m, n)`` and treats the last two
axes as the matrix. Nothing here uses an SVD or an eigendecomposition: the iterations are built from
matrix products only, so they are exactly equivariant under orthogonal changes of basis
(``f(U G V^T) = U f(G) V^T`` up to rounding) and run on any device. All arithmetic happens in the
input's dtype, so float64 inputs give float64-accurate results.

* :func:`newton_schulz` -- the fixed-step quintic iteration used by Muon. Cheap, *approximate*: it
  returns ``U S' V^T`` with ``S'`` roughly in [0.7, 1.2] rather than the exact polar factor.
* :func:`polar` -- the exact polar factor ``U V^T`` (for ``G = U S V^T``), iterated to convergence.
* :func:`inverse_sqrt_psd` -- ``(S + eps I)^(-1/2)`` for a symmetric positive semi-definite ``S``.
* :func:`nuclear_norm_via_polar` -- ``|G|_* = <G, polar(G)>``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "MUON_NS_COEFFICIENTS",
    "newton_schulz",
    "polar",
    "inverse_sqrt_psd",
    "nuclear_norm_via_polar",
]

#: Keller Jordan's quintic Newton-Schulz coefficients (a, b, c), as in ``torch.optim.Muon``.
MUON_NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)


def _check_matrix_batch(x: Tensor, what: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"{what} must have shape (..., m, n) with at least 2 dims, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")


#: An iteration whose progress stalls within this factor of ``tol`` is treated as converged
#: (rounding noise); above it, a stall is the transient of a small singular value and we go on.
_STAGNATION_FACTOR = 1e3


def _settled(error: float, previous: float, tol: float) -> bool:
    """Stopping rule of the fixed-point iterations: converged (``error <= tol``), or stalled at
    rounding level (no longer decreasing while within ``_STAGNATION_FACTOR * tol``)."""
    return error <= tol or (error >= previous and error < _STAGNATION_FACTOR * tol)


def _default_tolerance(dtype: torch.dtype, n: int) -> float:
    return 10.0 * n * torch.finfo(dtype).eps


def newton_schulz(
    G: Tensor,
    steps: int = 5,
    eps: float = 1e-7,
    coefficients: tuple[float, float, float] = MUON_NS_COEFFICIENTS,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Muon's quintic Newton-Schulz orthogonalisation of ``G`` (shape ``(..., m, n)``).

    With ``X_0 = G / max(|G|_F, eps)`` (Frobenius norm per matrix, so every singular value is <= 1)
    and ``A_k = X_k X_k^T``, each step is

        X_{k+1} = a X_k + (b A_k + c A_k^2) X_k,

    i.e. every singular value goes through ``p(s) = a s + b s^3 + c s^5`` while the singular vectors
    stay fixed. With the default coefficients ``p`` pushes all singular values into roughly
    [0.7, 1.2] in five steps, so the result approximates the polar factor ``U V^T`` of
    ``G = U S V^T`` (use :func:`polar` when the exact factor is needed). Tall matrices (``m > n``)
    are transposed so that the Gram matrix is the smaller ``min(m, n)`` square. Leading axes are a
    batch (layers, attention heads, MoE experts): each matrix is normalised and iterated on its own.

    This is ``torch.optim.Muon``'s iteration operation for operation (``addmm``/``baddbmm`` with the
    same operands), so a single matrix with ``dtype=torch.bfloat16`` gives torch's bits. The
    arithmetic runs in ``dtype`` (``None``: ``G``'s dtype) and the result has that dtype.

    Args:
        G: a matrix or a batch of matrices, floating point.
        steps: number of quintic steps (>= 0).
        eps: floor of the Frobenius norm before dividing, so a zero matrix maps to zero.
        coefficients: the polynomial coefficients ``(a, b, c)``.
        dtype: the arithmetic dtype.
    """
    _check_matrix_batch(G, "G")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if len(coefficients) != 3:
        raise ValueError(f"coefficients must be three floats (a, b, c), got {coefficients!r}")
    a, b, c = coefficients
    X = G.to(dtype or G.dtype, copy=True)
    if X.numel() == 0:  # a matrix with no rows or columns (or an empty batch) is its own factor
        return X
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    if X.ndim == 2:
        fused, norm = torch.addmm, X.norm()
    else:
        batch = X.shape[:-2]
        X = X.reshape(-1, *X.shape[-2:])
        fused, norm = torch.baddbmm, torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True)
    X = X.div_(norm.clamp(min=eps))
    for _ in range(steps):
        gram = X @ X.mT
        X = fused(X, fused(gram, gram, gram, beta=b, alpha=c), X, beta=a)
    if X.ndim == 3 and G.ndim != 3:
        X = X.reshape(*batch, *X.shape[-2:])
    return X.mT if transposed else X


def polar(
    G: Tensor,
    *,
    tol: float | None = None,
    max_iter: int = 100,
    warmup_steps: int = 5,
) -> Tensor:
    """The orthogonal polar factor ``U V^T`` of ``G = U S V^T``, iterated to convergence.

    Method (SVD-free): normalise ``X_0 = G / |G|_F`` so every singular value lies in (0, 1]; run
    ``warmup_steps`` quintic Muon steps (:func:`newton_schulz`), which lift small singular values
    by a factor ~3.4 per step and leave all of them in about [0.7, 1.2]; then iterate the cubic
    Newton-Schulz map

        X_{k+1} = X_k (3 I - X_k^T X_k) / 2,    s -> s (3 - s^2) / 2,

    which converges quadratically to 1 for every singular value in (0, sqrt(3)), until the update
    ``|X_{k+1} - X_k|_F`` (largest over the batch) falls below ``tol`` (or stalls at rounding
    level, within 10^3 ``tol``). Zero
    singular values stay zero, so a rank-deficient ``G`` gives the partial isometry on its range
    (the minimum-norm polar factor). The number of iterations grows like log(cond(G)); ``max_iter``
    bounds it and a ``RuntimeError`` reports non-convergence.

    Args:
        G: ``(..., m, n)`` floating-point tensor.
        tol: stopping threshold on the Frobenius size of one update; default
            ``1000 * min(m, n) * machine epsilon`` of the dtype.
        max_iter: maximum number of cubic iterations.
        warmup_steps: quintic steps before the cubic polish (0 gives the pure cubic iteration).
    """
    _check_matrix_batch(G, "G")
    if G.numel() == 0:
        return G.clone()
    transposed = G.shape[-2] > G.shape[-1]
    X = G.mT if transposed else G  # wide: (..., k, n) with k <= n
    k = X.shape[-2]
    tol = 100.0 * _default_tolerance(X.dtype, k) if tol is None else tol
    X = newton_schulz(X, steps=warmup_steps, eps=0.0)  # with 0 steps: just X / |X|_F
    X = torch.nan_to_num(X)  # an all-zero matrix stays zero
    previous_change = float("inf")
    for _ in range(max_iter):
        X_next = 1.5 * X - 0.5 * (X @ X.mT) @ X
        change = torch.linalg.matrix_norm(X_next - X).max().item()
        X = X_next
        if _settled(change, previous_change, tol):
            break
        previous_change = change
    else:
        raise RuntimeError(
            f"polar() did not converge in {max_iter} iterations (last update {change:.3e} > tol {tol:.3e}); "
            "the input is probably very ill-conditioned"
        )
    return X.mT if transposed else X


def inverse_sqrt_psd(
    S: Tensor,
    eps: float = 0.0,
    *,
    tol: float | None = None,
    max_iter: int = 100,
) -> Tensor:
    """``(S + eps I)^(-1/2)`` for symmetric positive semi-definite ``S`` of shape ``(..., n, n)``.

    Method: the coupled Newton-Schulz iteration (Higham, *Functions of Matrices*, eq. 6.35), an
    inverse-free variant of Denman-Beavers. With ``A = sym(S) + eps I`` scaled by ``c = |A|_F`` so
    that its eigenvalues lie in (0, 1], start from ``Y_0 = A / c``, ``Z_0 = I`` and iterate

        T = (3 I - Z_k Y_k) / 2,    Y_{k+1} = Y_k T,    Z_{k+1} = T Z_k,

    so ``Y -> (A/c)^(1/2)`` and ``Z -> (A/c)^(-1/2)``; the result is ``Z / sqrt(c)``. In the
    eigenbasis of ``A`` this is the cubic map ``s -> s (3 - s^2) / 2`` on ``s = sqrt(lambda / c)``:
    quadratic convergence once ``s`` is near 1, a factor 1.5 per step before that, so the number
    of steps grows like log(cond(A)). Iteration stops when the residual ``|I - Z Y|_F`` (largest
    over the batch) is below ``tol`` (or stalls at rounding level); ``max_iter`` bounds it.

    ``eps`` regularises singular inputs (e.g. the Gram matrix of a centred matrix, which always has
    the null vector ``1``); with ``eps = 0`` the input must be positive definite.
    """
    _check_matrix_batch(S, "S")
    n = S.shape[-1]
    if S.shape[-2] != n:
        raise ValueError(f"S must be square in its last two dims, got {tuple(S.shape)}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    identity = torch.eye(n, dtype=S.dtype, device=S.device)
    A = 0.5 * (S + S.mT) + eps * identity
    scale = torch.linalg.matrix_norm(A, keepdim=True)
    if bool((scale == 0).any()):
        raise ValueError("inverse_sqrt_psd got a zero matrix with eps=0: its inverse square root is undefined")
    tol = _default_tolerance(S.dtype, n) * 100.0 if tol is None else tol
    Y = A / scale
    Z = identity.expand_as(A)
    previous_residual = float("inf")
    for _ in range(max_iter):
        T = 0.5 * (3.0 * identity - Z @ Y)
        Y, Z = Y @ T, T @ Z
        residual = torch.linalg.matrix_norm(identity - Z @ Y).max().item()
        if residual != residual or residual == float("inf"):
            raise RuntimeError(
                "inverse_sqrt_psd() diverged: the input is not positive definite (singular or "
                "indefinite); pass eps > 0 to regularise a singular PSD matrix"
            )
        if _settled(residual, previous_residual, tol):
            break
        previous_residual = residual
    else:
        raise RuntimeError(
            f"inverse_sqrt_psd() did not converge in {max_iter} iterations (residual {residual:.3e}); "
            "increase eps or max_iter"
        )
    Z = 0.5 * (Z + Z.mT)
    return Z / scale.sqrt()


def nuclear_norm_via_polar(G: Tensor, polar_factor: Tensor | None = None) -> Tensor:
    """Nuclear norm ``|G|_* = <G, polar(G)> = sum of singular values``, one value per matrix.

    ``<G, U V^T> = tr(V S U^T U V^T) = tr(S)``. Pass ``polar_factor`` when it is already known (or
    an approximation of it: the optimizers use the factor of their own spectral map, so their
    "nuclear norm" is ``<G, Phi(G)>``). Returns shape ``G.shape[:-2]``.
    """
    _check_matrix_batch(G, "G")
    P = polar(G) if polar_factor is None else polar_factor
    if P.shape != G.shape:
        raise ValueError(f"polar_factor shape {tuple(P.shape)} does not match G {tuple(G.shape)}")
    return (G * P).sum(dim=(-2, -1))
