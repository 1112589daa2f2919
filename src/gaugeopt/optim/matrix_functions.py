"""Matrix functions behind the orthogonalising optimizers, as pure functions on (batched) tensors.

Every function accepts a single matrix ``(m, n)`` or a batch ``(..., m, n)`` and treats the last two
axes as the matrix. Nothing here uses an SVD or an eigendecomposition: the iterations are built from
matrix products only, so they are exactly equivariant under orthogonal changes of basis
(``f(U G V^T) = U f(G) V^T`` up to rounding) and run on any device. All arithmetic happens in the
input's dtype, so float64 inputs give float64-accurate results.

* :func:`newton_schulz` -- the fixed-step quintic iteration used by Muon. Cheap, *approximate*: it
  returns ``U S' V^T`` with ``S'`` roughly in [0.7, 1.2] rather than the exact polar factor. Its
  coefficients are one quintic for every step (Keller Jordan's, torch's) or one per step
  (:func:`polar_express_coefficients`).
* :func:`polar` -- the exact polar factor ``U V^T`` (for ``G = U S V^T``), iterated to convergence.
* :func:`inverse_sqrt_psd` -- ``(S + eps I)^(-1/2)`` for a symmetric positive semi-definite ``S``:
  iterated to convergence, or, given a lower bound on its spectrum, a fixed schedule that reads
  nothing back from the device.
* :func:`nuclear_norm_via_polar` -- ``|G|_* = <G, polar(G)>``.

The quintic schedules come from one construction (Amsel, Persson, Musco & Gower, *The Polar Express*,
2025): on an interval ``[l, u]`` of singular values, the odd quintic ``p(s) = a s + b s^3 + c s^5``
closest to 1 in the max norm equioscillates at four points (``l``, its two critical points, ``u``),
and composing these greedily, each step designed for the interval the previous one left, is the best
composition of quintics for the worst singular value in ``[l, u]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "MUON_NS_COEFFICIENTS",
    "POLAR_EXPRESS",
    "Quintic",
    "NSCoefficients",
    "newton_schulz",
    "ns_coefficient_schedule",
    "coefficients_setting",
    "polar_express_coefficients",
    "polar",
    "inverse_sqrt_psd",
    "nuclear_norm_via_polar",
]

#: The coefficients ``(a, b, c)`` of one odd quintic ``p(s) = a s + b s^3 + c s^5``.
Quintic = tuple[float, float, float]
#: What :func:`newton_schulz` accepts as its coefficients: one quintic for every step, one quintic
#: per step, or the name of a schedule (:data:`POLAR_EXPRESS`).
NSCoefficients = Quintic | Sequence[Quintic] | str

#: Keller Jordan's quintic Newton-Schulz coefficients (a, b, c), as in ``torch.optim.Muon``.
MUON_NS_COEFFICIENTS: Quintic = (3.4445, -4.7750, 2.0315)
#: The name of the Polar Express schedule (:func:`polar_express_coefficients` with its defaults).
POLAR_EXPRESS = "polar_express"


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


# ----------------------------------------------------------------------------------------------
# Quintic schedules (computed on the host, in Python floats)
# ----------------------------------------------------------------------------------------------


def _quintic(p: Quintic, s: float) -> float:
    a, b, c = p
    return s * (a + s * s * (b + c * s * s))


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    """``matrix @ x = rhs`` by Gaussian elimination with partial pivoting (the 4 x 4 systems of the
    Remez exchange, in Python floats: nothing is dispatched to torch or traced by ``torch.compile``)."""
    n = len(rhs)
    rows = [[*row, value] for row, value in zip(matrix, rhs)]
    for k in range(n):
        pivot = max(range(k, n), key=lambda i: abs(rows[i][k]))
        rows[k], rows[pivot] = rows[pivot], rows[k]
        for i in range(k + 1, n):
            factor = rows[i][k] / rows[k][k]
            rows[i] = [x - factor * y for x, y in zip(rows[i], rows[k])]
    x = [0.0] * n
    for k in reversed(range(n)):
        x[k] = (rows[k][n] - sum(rows[k][j] * x[j] for j in range(k + 1, n))) / rows[k][k]
    return x


def _minimax_odd_quintic(lower: float, upper: float) -> Quintic:
    """The odd quintic closest to 1 in the max norm on ``[lower, upper]`` (``0 < lower <= upper``).

    Remez exchange: the optimum ``p`` with error ``E`` equioscillates, ``p = 1 - E`` at ``lower``,
    ``1 + E`` at its local maximum ``q``, ``1 - E`` at its local minimum ``r`` and ``1 + E`` at
    ``upper``. For given ``q, r`` these are four linear equations in ``(a, b, c, E)``; ``q, r`` then
    move to the critical points of the solution (``p'(s) = a + 3 b s^2 + 5 c s^4 = 0``) until ``E``
    settles. As ``lower -> upper`` the optimum tends to the quintic with ``p(upper) = 1`` and
    ``p' = p'' = 0`` there, ``(15/8, -10/8, 3/8)`` scaled to ``upper``, which is returned once the
    interval is that narrow (the linear system is singular to rounding there).
    """
    if lower / upper > 1 - 5e-6:
        return (15 / 8 / upper, -10 / 8 / upper**3, 3 / 8 / upper**5)
    q, r = (3 * lower + upper) / 4, (lower + 3 * upper) / 4
    error = math.inf
    for _ in range(100):
        points = ((lower, 1.0), (q, -1.0), (r, 1.0), (upper, -1.0))
        a, b, c, new_error = _solve([[s, s**3, s**5, sign] for s, sign in points], [1.0] * 4)
        root = math.sqrt(9 * b * b - 20 * a * c)
        q, r = math.sqrt((-3 * b - root) / (10 * c)), math.sqrt((-3 * b + root) / (10 * c))
        if abs(new_error - error) <= 1e-15:
            break
        error = new_error
    return (a, b, c)


def _greedy_step(lower: float, upper: float, safety: float, cushion: float) -> Quintic:
    """One step of the greedy composition for singular values in ``[lower, upper]``: the optimum on
    ``[max(lower, cushion upper), upper]``, rescaled when the cushion cut the interval so that
    ``p(lower) + p(upper) = 2`` (centred on 1 over the whole interval: a step designed for a tiny
    ``lower`` would have very large coefficients, which amplify rounding), taken as ``p(s / safety)``
    (it then also behaves on values up to ``safety upper``, which rounding may produce)."""
    a, b, c = _minimax_odd_quintic(max(lower, cushion * upper), upper)
    if cushion * upper > lower:
        scale = 2 / (_quintic((a, b, c), lower) + _quintic((a, b, c), upper))
        a, b, c = scale * a, scale * b, scale * c
    return (a / safety, b / safety**3, c / safety**5)


_SCHEDULES: dict[tuple, tuple[Quintic, ...]] = {}


@torch.compiler.assume_constant_result  # a compiled caller gets the schedule as constants, untraced
def polar_express_coefficients(steps: int = 5, *, lower: float = 1e-3, safety: float = 1.01,
                               cushion: float = 0.02) -> tuple[Quintic, ...]:
    """The Polar Express schedule (Amsel et al., 2025): one quintic per Newton-Schulz step, for
    :func:`newton_schulz` on singular values in ``[lower, 1]`` after its Frobenius normalisation.

    Greedy composition (the module docstring): step ``t`` is the odd quintic closest to 1 in the max
    norm on ``[l_t, u_t]``, with ``l_0 = lower``, ``u_0 = 1``, ``l_{t+1} = p_t(l_t)``,
    ``u_{t+1} = 2 - l_{t+1}``; with a ``cushion`` (the lower end is taken as at least ``cushion u_t``,
    the quintic then re-centred on 1) and a ``safety`` factor for rounding: every step but the last
    is ``p_t(s / safety)``, and the first also takes the margin the authors put in the normalisation
    (``X_0 = G / (safety |G|_F)``, the same as ``G / |G|_F`` and one more ``s / safety`` in exact
    arithmetic). The defaults are the authors': ``lower = 1e-3``, ``safety = 1.01``,
    ``cushion = 0.02``. Singular values below ``lower`` still grow, just not to 1 in ``steps``
    steps. Five steps bring the singular values of a 512 x 512 matrix with spectrum ``1/i`` to
    within 0.10 of the exact polar factor in relative Frobenius norm, where Muon's fixed
    coefficients :data:`MUON_NS_COEFFICIENTS` stay 0.18 away (``tests/test_matrix_functions.py``).
    """
    if not (isinstance(steps, int) and steps >= 0):
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if not (0 < lower <= 1 and safety >= 1 and 0 <= cushion < 1):
        raise ValueError(f"need 0 < lower <= 1, safety >= 1, 0 <= cushion < 1; got lower={lower}, "
                         f"safety={safety}, cushion={cushion}")
    key = ("polar_express", steps, lower, safety, cushion)
    if key not in _SCHEDULES:
        l, u, schedule = lower, 1.0, []
        for t in range(steps):
            p = _greedy_step(l, u, safety if t < steps - 1 else 1.0, cushion)
            schedule.append(p)
            l = min(_quintic(p, l), 1.0)  # the safety factor may pull a converged step below 1
            u = 2 - l
        if schedule:
            a, b, c = schedule[0]
            schedule[0] = (a / safety, b / safety**3, c / safety**5)
        _SCHEDULES[key] = tuple(schedule)
    return _SCHEDULES[key]


@torch.compiler.assume_constant_result
def _converging_schedule(lower: float, tol: float) -> tuple[Quintic, ...]:
    """The greedy quintics for values in ``[lower, 1]`` (cushion 0.02, no safety factor), as many as
    it takes to bring every one of them within ``tol`` of 1 (13 for ``lower = 5e-7``, ``tol`` at
    float64 rounding; the cubic ``s (3 - s^2) / 2`` takes 41)."""
    key = ("converging", lower, tol)
    if key not in _SCHEDULES:
        l, u, schedule = lower, 1.0, []
        while 1 - l > tol:
            if len(schedule) == 100:
                raise RuntimeError(f"no quintic schedule converges from {lower} to within {tol} in 100 steps")
            p = _greedy_step(l, u, 1.0, 0.02)
            schedule.append(p)
            l = min(_quintic(p, l), 1.0)
            u = 2 - l
        _SCHEDULES[key] = tuple(schedule)
    return _SCHEDULES[key]


def _is_quintic(value: object) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 3 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in value)


def ns_coefficient_schedule(coefficients: NSCoefficients, steps: int, *, name: str = "coefficients"
                            ) -> tuple[Quintic, ...]:
    """The quintic of each of ``steps`` Newton-Schulz steps: ``coefficients`` itself at every step
    when it is one quintic ``(a, b, c)``; as given when it is a sequence of ``steps`` quintics; the
    schedule it names when it is :data:`POLAR_EXPRESS` (:func:`polar_express_coefficients` designed
    for ``steps`` steps). Anything else is a ``ValueError`` naming ``name``."""
    if isinstance(coefficients, str) and coefficients == POLAR_EXPRESS:
        return polar_express_coefficients(steps)
    if _is_quintic(coefficients):
        return (tuple(float(x) for x in coefficients),) * steps
    if isinstance(coefficients, (tuple, list)) and coefficients and all(_is_quintic(p) for p in coefficients):
        if len(coefficients) != steps:
            raise ValueError(f"{name} gives {len(coefficients)} per-step quintics for {steps} Newton-Schulz steps")
        return tuple(tuple(float(x) for x in p) for p in coefficients)
    raise ValueError(f"{name} must be three finite numbers (a, b, c), a sequence of one such triple per "
                     f"Newton-Schulz step, or {POLAR_EXPRESS!r}; got {coefficients!r}")


def coefficients_setting(coefficients: NSCoefficients) -> NSCoefficients:
    """``coefficients`` as an optimizer's param group keeps it: a name as it is, a quintic or a
    sequence of quintics as tuples (lists from a checkpoint or a config included), so settings compare
    and hash by value."""
    if isinstance(coefficients, (tuple, list)):
        return tuple(coefficients_setting(c) for c in coefficients)
    return coefficients


# ----------------------------------------------------------------------------------------------
# The iterations
# ----------------------------------------------------------------------------------------------


def newton_schulz(
    G: Tensor,
    steps: int = 5,
    eps: float = 1e-7,
    coefficients: NSCoefficients = MUON_NS_COEFFICIENTS,
    dtype: torch.dtype | None = None,
    *,
    overwrite: bool = False,
) -> Tensor:
    """Muon's quintic Newton-Schulz orthogonalisation of ``G`` (shape ``(..., m, n)``).

    With ``X_0 = G / max(|G|_F, eps)`` (Frobenius norm per matrix, so every singular value is <= 1)
    and ``A_k = X_k X_k^T``, step ``k`` is

        X_{k+1} = a_k X_k + (b_k A_k + c_k A_k^2) X_k,

    i.e. every singular value goes through ``p_k(s) = a_k s + b_k s^3 + c_k s^5`` while the singular
    vectors stay fixed. ``coefficients`` is one quintic for every step (the default, Keller Jordan's,
    pushes all singular values into roughly [0.7, 1.2] in five steps), one quintic per step, or
    ``"polar_express"`` (:func:`ns_coefficient_schedule`); either way the result approximates the
    polar factor ``U V^T`` of ``G = U S V^T`` (use :func:`polar` when the exact factor is needed).
    Tall matrices (``m > n``) are transposed so that the Gram matrix is the smaller ``min(m, n)``
    square. Leading axes are a batch (layers, attention heads, MoE experts): each matrix is
    normalised and iterated on its own, in one batched product per step.

    This is ``torch.optim.Muon``'s iteration operation for operation (``addmm``/``baddbmm`` with the
    same operands), so a single matrix with ``dtype=torch.bfloat16`` gives torch's bits. The
    arithmetic runs in ``dtype`` (``None``: ``G``'s dtype) and the result has that dtype.

    Args:
        G: a matrix or a batch of matrices, floating point.
        steps: number of quintic steps (>= 0).
        eps: floor of the Frobenius norm before dividing, so a zero matrix maps to zero.
        coefficients: ``(a, b, c)``, a sequence of ``steps`` of them, or ``"polar_express"``.
        dtype: the arithmetic dtype.
        overwrite: ``G`` is the caller's scratch: when it is already in ``dtype`` the iteration
            starts in its memory instead of a copy.
    """
    _check_matrix_batch(G, "G")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    schedule = ns_coefficient_schedule(coefficients, steps)
    X = G if overwrite and G.dtype == (dtype or G.dtype) else G.to(dtype or G.dtype, copy=True)
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
    for a, b, c in schedule:
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
    lower_bound: float | None = None,
    tol: float | None = None,
    max_iter: int = 100,
) -> Tensor:
    """``(S + eps I)^(-1/2)`` for symmetric positive semi-definite ``S`` of shape ``(..., n, n)``.

    Method: a coupled Newton-Schulz iteration (Higham, *Functions of Matrices*, eq. 6.35, an
    inverse-free variant of Denman-Beavers). With ``A = sym(S) + eps I`` scaled by ``c = |A|_F`` so
    that its eigenvalues lie in (0, 1], start from ``Y_0 = A / c``, ``Z_0 = I`` and iterate

        X_k = Z_k Y_k,    T = a_k I + b_k X_k + c_k X_k^2,    Y_{k+1} = Y_k T,    Z_{k+1} = T Z_k,

    so ``Y -> (A/c)^(1/2)`` and ``Z -> (A/c)^(-1/2)``; the result is ``Z / sqrt(c)``. In the
    eigenbasis of ``A`` every ``s = sqrt(lambda / c)`` goes through the odd quintic
    ``p_k(s) = a_k s + b_k s^3 + c_k s^5`` (``x_{k+1} = x_k (a_k + b_k x_k + c_k x_k^2)^2`` for
    ``x = s^2``), so the iteration converges when the composition of the ``p_k`` maps every ``s``
    to 1. Two ways to stop:

    * ``lower_bound`` given, a lower bound known in advance on the eigenvalues of ``A / |A|_F``: the
      quintics are the greedy minimax schedule for ``s`` in ``[sqrt(lower_bound), 1]``, as many as
      bring the smallest such ``s`` to 1 within the dtype's rounding, computed on the host from the
      bound (13 steps for ``lower_bound = 2.5e-13`` in float64). Nothing is read back from the
      device, so the call costs no host synchronisation and compiles into one graph; an input whose
      spectrum does fall below the bound is not detected (its smallest eigenvalues' inverse square
      roots come out too small).
    * otherwise the cubic ``p(s) = s (3 - s^2) / 2`` until the residual ``|I - Z Y|_F`` (largest over
      the batch) is below ``tol`` (or stalls at rounding level), reading the residual on the host
      every step; ``max_iter`` bounds it and a singular or indefinite input raises. The cubic grows
      small ``s`` by 1.5 per step, so the step count grows like log(cond(A)).

    ``eps`` regularises singular inputs (e.g. the Gram matrix of a centred matrix, which always has
    the null vector ``1``); with ``eps = 0`` the input must be positive definite.
    """
    _check_matrix_batch(S, "S")
    n = S.shape[-1]
    if S.shape[-2] != n:
        raise ValueError(f"S must be square in its last two dims, got {tuple(S.shape)}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if lower_bound is not None and not 0 < lower_bound <= 1:
        raise ValueError(f"lower_bound must be in (0, 1], got {lower_bound}")
    identity = torch.eye(n, dtype=S.dtype, device=S.device)
    A = 0.5 * (S + S.mT) + eps * identity
    scale = torch.linalg.matrix_norm(A, keepdim=True)
    Y = A / scale
    Z = identity.expand_as(A)
    X = Y  # Z_0 Y_0
    if lower_bound is not None:
        for quintic in _converging_schedule(math.sqrt(lower_bound), 2 * torch.finfo(S.dtype).eps):
            Y, Z, X = _coupled_step(Y, Z, X, quintic, identity)
    else:
        if bool((scale == 0).any()):
            raise ValueError("inverse_sqrt_psd got a zero matrix with eps=0: its inverse square root is undefined")
        tol = _default_tolerance(S.dtype, n) * 100.0 if tol is None else tol
        previous_residual = float("inf")
        for _ in range(max_iter):
            Y, Z, X = _coupled_step(Y, Z, X, (1.5, -0.5, 0.0), identity)
            residual = torch.linalg.matrix_norm(identity - X).max().item()
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


def _coupled_step(Y: Tensor, Z: Tensor, X: Tensor, quintic: Quintic, identity: Tensor
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """One step of :func:`inverse_sqrt_psd`'s coupled iteration from ``X = Z Y``: the new ``Y``,
    ``Z`` and their product."""
    a, b, c = quintic
    T = a * identity + b * X
    if c:
        T = T + c * (X @ X)
    Y, Z = Y @ T, T @ Z
    return Y, Z, Z @ Y


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
