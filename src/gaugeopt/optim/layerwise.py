"""Symmetry-compatible maps ``Phi``: pure functions on tensors, and their registry :data:`MAPS`.

Vocabulary. A *rule* (:mod:`gaugeopt.optim.rules`) turns a gradient and its state into a canonical
direction; a *map* (this module) is a stateless matrix function ``Phi`` that the rule
:class:`~gaugeopt.optim.rules.MomentumMap` applies to the momentum (:class:`~gaugeopt.optim.rules.Muon`
applies the ``muon`` map). The ``rule`` of a :class:`~gaugeopt.optim.symcompat.SymmetryCompatible`
param group is a map's name or ``"adamw"`` (elementwise Adam, no map).

A block whose parameter symmetry group is ``G`` is updated with a map that commutes with ``G``:
``Phi(g . M) = g . Phi(M)`` (Lau & Su, "Symmetry-Compatible Principle for Optimizer Design").
The optimizer (:class:`gaugeopt.optim.symcompat.SymmetryCompatible`) applies ``Phi`` to the EMA
momentum ``M``; since momentum is linear in the gradients, an equivariant ``Phi`` makes the whole
trajectory equivariant.

Conventions. A *work matrix* ``X`` has the block's geometric units as its rows (vocabulary rows of
an embedding, neurons of a SwiGLU gate, experts of a router). ``orientation="col"`` applies the
same map to the transpose and transposes back, e.g. for a SwiGLU down projection ``(d, d_ff)``
whose neurons are columns. Every map accepts one matrix ``(r, c)`` or a batch ``(..., r, c)``
(MoE expert stacks); batch entries never interact. ``P = I - 1 1^T / r`` denotes centring over
the rows (removing the mean row), the projection that kills a shared row shift ``M + 1 v^T``.

=========================  ========================================================  ==========================
map                        Phi(X)                                                    equivariant under
=========================  ========================================================  ==========================
muon                       s * NS5(X) per (head) block, s = sqrt(max(1, rows/cols))  O x O (per head block)
row_norm                   each row / (|row| + eps)                                  row perm. x O(cols)
centered_row_norm          P row_norm(P X)                                           row perm. x O(cols) + shift
right_spectral             nu^a X (X^T X + eps)^(-1/2)                               O(rows) x O(cols)
centered_right_spectral    P right_spectral(P X)                                     row perm. x O(cols) + shift
left_spectral              nu^a (X X^T + eps)^(-1/2) X  (the same matrix)            O(rows) x O(cols)
centered_left_spectral     P left_spectral(P X)                                      row perm. x O(cols) + shift
hybrid                     nu(Y)^a Y (Y^T Y + eps)^(-1/2),  Y = row_norm(X)          row perm. x O(cols)
centered_hybrid            P hybrid with Y = P row_norm(P X)                         row perm. x O(cols) + shift
=========================  ========================================================  ==========================

"+ shift": also invariant under a shared row shift ``X + 1 v^T`` and horizontal (``1^T Phi = 0``).
(Centred maps commute with the orthogonal maps of the rows that fix ``1``, permutations included.)

``nu(Y) = <Y, U>`` with ``U`` the map's own orthogonal factor is the nuclear norm ``|Y|_*`` (up
to the ``eps`` damping) and ``a = alpha`` (1 in the paper's runs: spectral steps then scale with
the momentum, unlike Muon's, so their learning rates are not interchangeable with Muon's).

The right and left spectral maps are the same matrix for every ``eps`` (:func:`damped_polar`);
both names are kept because the paper assigns them to different blocks, and the implementation
always inverts the smaller Gram matrix.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .matrix_functions import MUON_NS_COEFFICIENTS, NSCoefficients, inverse_sqrt_psd, newton_schulz
from .symmetry import center_rows

__all__ = [
    "Orientation",
    "AdjustLR",
    "LayerwiseMap",
    "MAPS",
    "center_rows",
    "row_normalize",
    "muon_update",
    "muon_lr_scale",
    "row_norm_update",
    "centered_row_norm_update",
    "damped_polar",
    "spectral_update",
    "hybrid_update",
    "get_map",
    "apply_map",
]

Orientation = Literal["row", "col"]
AdjustLR = Literal["original", "match_rms_adamw", "none"]
ORIENTATIONS: tuple[str, ...] = ("row", "col")


def _damping_floor(dtype: torch.dtype) -> float:
    """Least damping of :func:`damped_polar`, relative to the Frobenius norm of the Gram matrix.

    ``100 u`` (``u`` the unit roundoff): rounding the Gram matrix of a rank-deficient momentum must
    not make it indefinite (``10 u`` still failed in float32 trials). ``1e-12``: a floor on the
    relative damping bounds the spectrum of the damped Gram matrix from below, which fixes the
    length of its inverse square root's schedule in advance (:func:`_inverse_sqrt_floor`).
    """
    return max(100.0 * torch.finfo(dtype).eps, 1e-12)


def _inverse_sqrt_floor(dtype: torch.dtype) -> float:
    """A lower bound on the eigenvalues of ``A / |A|_F`` for :func:`damped_polar`'s damped Gram matrix
    ``A = G + d I`` with ``d >= f |G|_F`` (``f`` the :func:`_damping_floor`): ``lambda_min(A) >= d / 2``
    (rounding may make ``G`` indefinite by less than half the floor: the floor's purpose) and
    ``|A|_F <= |G|_F + d sqrt(n)``, so the ratio is at least ``(f / 2) / (1 + f sqrt(n)) >= f / 4``
    for any ``n <= 1 / f^2``; with it :func:`inverse_sqrt_psd` runs a fixed schedule (13 quintic
    steps in float64) and reads nothing back from the device."""
    return _damping_floor(dtype) / 4


ADJUST_LR_CHOICES: tuple[str, ...] = ("original", "match_rms_adamw", "none")


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


def row_normalize(X: Tensor, eps: float = 1e-8) -> Tensor:
    """Each row divided by ``(|row|_2 + eps)``; with ``eps = 0`` a row whose norm is 0 (or underflows
    to 0) maps to zero instead of NaN."""
    denominator = torch.linalg.vector_norm(X, dim=-1, keepdim=True) + eps
    if eps > 0:
        return X / denominator
    return torch.where(denominator > 0, X / denominator.clamp_min(torch.finfo(X.dtype).tiny), 0.0)


def _nuclear_scale(Y: Tensor, U: Tensor, alpha: float) -> Tensor:
    """``<Y, U>^alpha`` per matrix, shaped to broadcast over the last two axes."""
    if alpha == 0:
        return torch.ones((), dtype=Y.dtype, device=Y.device)
    nu = (Y * U).sum(dim=(-2, -1), keepdim=True).clamp_min(0.0)
    return nu.pow(alpha)


def muon_lr_scale(shape: tuple[int, int] | torch.Size, adjust_lr: str) -> float:
    """Muon's shape factor ``s`` for a ``(rows, cols)`` matrix: the step is ``lr * s * NS(U)``, as
    ``torch.optim.Muon``'s ``adjust_lr_fn``."""
    rows, cols = shape
    if adjust_lr == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr == "none":
        return 1.0
    raise ValueError(f"adjust_lr must be one of {ADJUST_LR_CHOICES}, got {adjust_lr!r}")


# ----------------------------------------------------------------------------------------------
# Update maps
# ----------------------------------------------------------------------------------------------


def _scaled(X: Tensor, dtype: torch.dtype, scale: float) -> Tensor:
    """``X.to(dtype) * scale`` for a Newton-Schulz result ``X`` (a tensor of the step's own), bit for
    bit, in one pass or none: ``X`` itself where neither changes it, ``X`` scaled in place in its own
    dtype, and from a narrower dtype (bfloat16 iterations) the product with a one-element ``dtype``
    tensor of ``X``'s rank, which type promotion computes in ``dtype`` from the exactly converted
    entries (a 0-d tensor would not promote), so no converted copy is written and read again."""
    if X.dtype == dtype:
        return X if scale == 1 else X.mul_(scale)
    if scale == 1:
        return X.to(dtype)
    if torch.promote_types(X.dtype, dtype) != dtype:  # iterations in a wider dtype: convert, then scale
        return X.to(dtype).mul_(scale)
    return torch.mul(X, torch.full((1,) * X.dim(), scale, dtype=dtype, device=X.device))


def muon_update(
    M: Tensor,
    *,
    heads: int | None = None,
    head_axis: Literal["row", "col"] = "row",
    head_index: tuple[tuple[int, ...], ...] | None = None,
    ns_steps: int = 5,
    ns_eps: float = 1e-7,
    ns_coefficients: NSCoefficients = MUON_NS_COEFFICIENTS,
    adjust_lr: str = "original",
    dtype: torch.dtype | None = None,
    block_scale: bool = True,
    out_dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Tensor:
    """Muon: ``s * NS(B)`` for every block ``B`` of ``M`` (shape ``(..., rows, cols)``).

    Without ``heads`` or ``head_index`` the block is the whole matrix (or each matrix of a batch,
    e.g. MoE experts stored as one ``(E, rows, cols)`` tensor: batched per-expert Muon). With
    ``heads = H`` the matrix is cut into ``H`` equal contiguous blocks along its rows
    (``head_axis="row"``: Q/K/V projections, ``(H * head_dim, d)``) or its columns
    (``head_axis="col"``: the output projection, ``(d, H * head_dim)``); ``head_index[h]`` gives the
    indices of block ``h`` instead (any partition of that axis). Each block is orthogonalised on its
    own, which keeps the map equivariant under independent per-block rotations. ``NS`` is
    :func:`~gaugeopt.optim.matrix_functions.newton_schulz` with ``ns_coefficients`` (one quintic, one
    per step, or ``"polar_express"``), run in ``dtype`` (``None``: ``M``'s); the result is in
    ``out_dtype`` (``None``: ``M``'s). ``overwrite``: ``M`` is the caller's scratch, which the
    iteration may start in (:func:`~gaugeopt.optim.matrix_functions.newton_schulz`). The scale ``s`` is ``sqrt(max(1, rows/cols))`` (``adjust_lr="original"``, Keller Jordan's
    Muon), ``0.2 sqrt(max(rows, cols))`` (``"match_rms_adamw"``, Moonshot) or 1 (``"none"``), as in
    ``torch.optim.Muon``, for the block's shape (``block_scale=True``) or the whole matrix's.
    """
    if M.ndim < 2:
        raise ValueError(f"muon needs a matrix or a batch of matrices, got shape {tuple(M.shape)}")
    if head_axis not in ORIENTATIONS:
        raise ValueError(f"head_axis must be 'row' or 'col', got {head_axis!r}")
    rows, cols = M.shape[-2], M.shape[-1]
    ns = dict(steps=ns_steps, eps=ns_eps, coefficients=ns_coefficients, dtype=dtype)
    out_dtype = out_dtype or M.dtype
    split = rows if head_axis == "row" else cols
    if head_index is None and (heads is None or heads == 1):
        return _scaled(newton_schulz(M, **ns, overwrite=overwrite), out_dtype, muon_lr_scale((rows, cols), adjust_lr))
    if head_index is None:
        if heads < 1 or split % heads:
            raise ValueError(
                f"heads={heads} does not divide the {head_axis} axis of size {split} (shape {tuple(M.shape)})")
        head_index = tuple(tuple(range(h * (split // heads), (h + 1) * (split // heads))) for h in range(heads))
    head_index = tuple(tuple(block) for block in head_index)
    if not _partitions(head_index, split):
        raise ValueError(f"head blocks of sizes {[len(block) for block in head_index]} do not partition the "
                         f"{head_axis} axis of a {tuple(M.shape)} matrix into equal blocks")
    index = torch.tensor(head_index).to(M.device, non_blocking=True)  # an upload that waits for nothing
    if head_axis == "row":
        blocks = M[..., index, :]  # (..., heads, head_dim, cols)
    else:
        blocks = M[..., index].movedim(-2, -3)  # (..., rows, heads, head_dim) -> (..., heads, rows, head_dim)
    shape = blocks.shape[-2:] if block_scale else (rows, cols)
    ortho = _scaled(newton_schulz(blocks, **ns, overwrite=True), out_dtype, muon_lr_scale(shape, adjust_lr))
    out = ortho.new_empty(M.shape)
    if head_axis == "row":
        out[..., index, :] = ortho
    else:
        out[..., index] = ortho.movedim(-3, -2)
    return out


_PARTITIONS: dict[tuple, bool] = {}


@torch.compiler.assume_constant_result  # a compiled step takes the answer as a constant
def _partitions(blocks: tuple[tuple[int, ...], ...], size: int) -> bool:
    """Whether equal-sized ``blocks`` of indices partition ``range(size)``: checked on the host once per
    layout (the same check on a device tensor would read its answer back at every step)."""
    key = (blocks, size)
    if key not in _PARTITIONS:
        _PARTITIONS[key] = len({len(block) for block in blocks}) == 1 and \
            sorted(i for block in blocks for i in block) == list(range(size))
    return _PARTITIONS[key]


def row_norm_update(X: Tensor, *, eps: float = 1e-8) -> Tensor:
    """Row-norm: ``Phi(X)_i = X_i / (|X_i| + eps)``.

    Equivariant under row permutations (``Phi(Pi X) = Pi Phi(X)``) and right orthogonal maps
    (``|X_i Q| = |X_i|``), i.e. token permutation x O(d) for an embedding.
    """
    return row_normalize(X, eps)


def centered_row_norm_update(X: Tensor, *, eps: float = 1e-8) -> Tensor:
    """Centred row-norm: ``P row_norm(P X)``.

    ``P`` removes a shared row shift before the map (invariance: ``Phi(X + 1 v^T) = Phi(X)``) and
    after it (horizontality: ``1^T Phi = 0``, so the update never moves the shift gauge). ``P``
    commutes with row permutations, so equivariance of the row map is kept.
    """
    return center_rows(row_normalize(center_rows(X), eps))


def damped_polar(Y: Tensor, eps: float = 1e-8, *, rows_centered: bool = False) -> Tensor:
    """``Y (Y^T Y + eps I)^(-1/2) = (Y Y^T + eps I)^(-1/2) Y = U diag(s / sqrt(s^2 + eps)) V^T``.

    The two one-sided forms are the same matrix for every ``eps`` (write ``Y = U S V^T``), so this
    computes the inverse square root of the *smaller* Gram matrix (``cols x cols`` for a tall
    vocabulary matrix, ``rows x rows`` for a wide router) with :func:`inverse_sqrt_psd`. For
    ``eps -> 0`` it is the polar factor ``U V^T``.

    ``rows_centered=True`` promises ``1^T Y = 0``. The left Gram ``Y Y^T`` then has the null
    vector ``1``; adding ``c 1 1^T / rows`` (``c`` its mean eigenvalue) lifts that eigenvalue from
    ``eps`` to ``c + eps`` without changing the result (``1`` is orthogonal to the columns of ``Y``),
    which keeps the inverse square root well conditioned.

    Finite for every finite ``Y``: each matrix is first divided by a power of two ``p`` that brings its
    largest entry into ``[1, 2)`` (exact in floating point, and ``Y (Y^T Y + eps I)^(-1/2)`` is
    unchanged when ``Y`` becomes ``Y / p`` and ``eps`` becomes ``eps / p^2``, capped at ``1 / u^2``
    where it swamps the Gram matrix anyway), so the Gram matrix cannot overflow or underflow; and the
    damping is at least ``max(100 u, 1e-12) |G|_F`` (``u`` the dtype's unit roundoff, ``G`` the
    scaled Gram matrix; :func:`_damping_floor` says why), so that the inverse square root of a
    rank-deficient ``Y`` (a momentum that touched few rows) converges. The floor is gauge invariant
    (``|G|_F`` is) and below ``eps`` in float64 at ordinary scales.

    The Gram matrix squares the condition number of ``Y``, so the map runs in float64 whatever
    ``Y``'s dtype (the result is rounded back to it): in float32 the floor would damp singular values
    below about ``0.4%`` of ``sqrt(|G|_F)``, which moved the centred hybrid step of a small LM head
    by 1e-2 to 4e-1 relative to its float64 value. MPS has no float64; there it runs in ``Y``'s dtype.
    """
    if Y.numel() == 0:
        return Y.clone()
    if Y.dtype != torch.float64 and Y.device.type != "mps":
        return damped_polar(Y.double(), eps, rows_centered=rows_centered).to(Y.dtype)
    rows, cols = Y.shape[-2], Y.shape[-1]
    largest = Y.abs().amax(dim=(-2, -1), keepdim=True)
    power = torch.ldexp(torch.ones_like(largest), torch.frexp(largest).exponent - 1)  # |Y / power| in [1, 2)
    Y = Y / power
    gram = Y.mT @ Y if rows >= cols else Y @ Y.mT
    if rows < cols and rows_centered:
        mean_eigenvalue = gram.diagonal(dim1=-2, dim2=-1).mean(dim=-1)[..., None, None]
        ones = torch.full((rows, rows), 1.0 / rows, dtype=Y.dtype, device=Y.device)
        gram = gram + mean_eigenvalue * ones
    unit_roundoff = torch.finfo(Y.dtype).eps
    floor = _damping_floor(Y.dtype) * torch.linalg.matrix_norm(gram, keepdim=True)
    # eps / power^2 overflows for a tiny Y; past 1 / u^2 the damping swamps |G| <= 4 rows cols anyway
    damping = torch.maximum((eps / power.double().square()).clamp(max=unit_roundoff**-2).to(Y.dtype), floor)
    damping = torch.where(damping > 0, damping, torch.ones_like(damping))  # Y = 0 and eps = 0: any value
    identity = torch.eye(gram.shape[-1], dtype=Y.dtype, device=Y.device)
    inverse_sqrt = inverse_sqrt_psd(gram + damping * identity, lower_bound=_inverse_sqrt_floor(Y.dtype))
    return Y @ inverse_sqrt if rows >= cols else inverse_sqrt @ Y


def spectral_update(X: Tensor, *, eps: float = 1e-8, alpha: float = 1.0, centered: bool = False) -> Tensor:
    """One-sided spectral map ``nu^alpha X (X^T X + eps I)^(-1/2)`` (= ``nu^alpha (X X^T + eps I)^(-1/2) X``).

    The paper's "one-sided right spectral" (embeddings, LM heads) and "left spectral" (routers)
    maps differ only in which Gram matrix they invert, and the two are equal (see
    :func:`damped_polar`); both registry names use this function, which picks the smaller Gram.
    ``nu = <X, U>`` with ``U`` the damped polar factor is the nuclear norm ``|X|_*`` up to ``eps``.
    With ``centered=True`` the map acts on ``P X`` (for the router: the left Gram ``X_c X_c^T`` is
    singular along ``1``, which :func:`damped_polar` deflates) and the result is re-centred (exact arithmetic
    keeps it centred already; the projection removes rounding).
    """
    Y = center_rows(X) if centered else X
    U = damped_polar(Y, eps, rows_centered=centered)
    out = _nuclear_scale(Y, U, alpha) * U
    return center_rows(out) if centered else out


def hybrid_update(X: Tensor, *, eps: float = 1e-8, alpha: float = 1.0, centered: bool = False) -> Tensor:
    """Hybrid: row-normalise, then right polar, times the nuclear norm of the row-normalised matrix.

    ``Y = row_norm(X)`` (centred: ``Y = P row_norm(P X)``), ``U = Y (Y^T Y + eps I)^(-1/2)``,
    ``Phi = nu(Y)^alpha U`` with ``nu(Y) = <Y, U>``. Every row of ``Y`` has norm ~1, so
    ``nu(Y)`` is of order ``sqrt(rows * rank)``: hybrid steps are much larger than row-norm steps
    at the same learning rate.
    """
    Y = row_normalize(center_rows(X) if centered else X, eps)
    if centered:
        Y = center_rows(Y)
    U = damped_polar(Y, eps, rows_centered=centered)
    out = _nuclear_scale(Y, U, alpha) * U
    return center_rows(out) if centered else out


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerwiseMap:
    """One entry of the map registry :data:`MAPS`.

    Attributes:
        name: registry key, which a param group's ``rule`` names to take this map on its momentum.
        function: the map on a work tensor (rows = units), a matrix ``(r, c)`` or a batch ``(..., r, c)``.
        options: keyword options the map accepts (group hyperparameters of the same name).
        centered: whether the map is horizontal for the shared row shift (``1^T Phi = 0``).
        symmetry: the group the map is equivariant under, in words.
        matrix_products: whether the map multiplies matrices (Newton-Schulz, polar factors), as
            opposed to scaling rows by their norms.
    """

    name: str
    function: Callable[..., Tensor]
    options: tuple[str, ...]
    centered: bool
    symmetry: str
    matrix_products: bool = True


def _with(fn: Callable[..., Tensor], **fixed: object) -> Callable[..., Tensor]:
    def bound(X: Tensor, **options: object) -> Tensor:
        return fn(X, **fixed, **options)

    bound.__name__ = fn.__name__ + "".join(f"[{k}={v}]" for k, v in fixed.items())
    bound.__doc__ = fn.__doc__
    return bound


_SPECTRAL_OPTIONS = ("eps", "alpha")

MAPS: dict[str, LayerwiseMap] = {
    entry.name: entry
    for entry in (
        LayerwiseMap("muon", muon_update, ("heads", "ns_steps", "ns_eps", "ns_coefficients", "adjust_lr"),
                     False, "O(rows) x O(cols), per head block"),
        LayerwiseMap("row_norm", row_norm_update, ("eps",), False, "row permutation x O(cols)", matrix_products=False),
        LayerwiseMap("centered_row_norm", centered_row_norm_update, ("eps",), True,
                     "row permutation x O(cols) x shared row shift", matrix_products=False),
        LayerwiseMap("right_spectral", _with(spectral_update, centered=False), _SPECTRAL_OPTIONS, False,
                     "O(rows) x O(cols)"),
        LayerwiseMap("centered_right_spectral", _with(spectral_update, centered=True), _SPECTRAL_OPTIONS, True,
                     "row permutation x O(cols) x shared row shift"),
        LayerwiseMap("left_spectral", _with(spectral_update, centered=False), _SPECTRAL_OPTIONS, False,
                     "O(rows) x O(cols)"),
        LayerwiseMap("centered_left_spectral", _with(spectral_update, centered=True), _SPECTRAL_OPTIONS, True,
                     "row permutation x O(cols) x shared row shift"),
        LayerwiseMap("hybrid", _with(hybrid_update, centered=False), _SPECTRAL_OPTIONS, False,
                     "row permutation x O(cols)"),
        LayerwiseMap("centered_hybrid", _with(hybrid_update, centered=True), _SPECTRAL_OPTIONS, True,
                     "row permutation x O(cols) x shared row shift"),
    )
}


def get_map(name: str) -> LayerwiseMap:
    """The registry entry for ``name``; a ``ValueError`` lists the known maps otherwise."""
    try:
        return MAPS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown map {name!r}; known maps: {', '.join(MAPS)}") from None


def apply_map(name: str, M: Tensor, orientation: Orientation = "row", **options: object) -> Tensor:
    """``Phi(M)`` for the registered map ``name`` on a matrix ``(r, c)`` or batch ``(..., r, c)``.

    ``orientation="col"`` applies the row map to ``M^T`` and transposes back (for ``muon`` it only
    selects the axis that ``heads`` splits, since Newton-Schulz commutes with transposition).
    ``options`` must be among the map's ``options``; ``None`` values are ignored.
    """
    phi = get_map(name)
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    if M.ndim < 2:
        raise ValueError(f"map {name!r} needs a matrix or a batch of matrices, got shape {tuple(M.shape)}")
    unknown = set(options) - set(phi.options)
    if unknown:
        raise ValueError(f"map {name!r} takes options {phi.options}, got unexpected {sorted(unknown)}")
    options = {k: v for k, v in options.items() if v is not None}
    if name == "muon":
        return muon_update(M, head_axis=orientation, **options)  # type: ignore[arg-type]
    if orientation == "col":
        return phi.function(M.mT, **options).mT
    return phi.function(M, **options)
