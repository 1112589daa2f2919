"""Closed-form learning coefficient of reduced-rank regression (Aoyagi and Watanabe, 2005).

The model is ``y = B A x`` with ``A`` (H x M) and ``B`` (N x H): M inputs, N outputs, width H; the
true map has rank r (0 <= r <= H). The real log canonical threshold lambda and its multiplicity m
are, using the first case whose condition holds:

* Case 2, ``M + H < N + r``: ``lambda = (H M - H r + N r) / 2``, m = 1
* Case 3, ``N + H < M + r``: ``lambda = (H N - H r + M r) / 2``, m = 1
* Case 4, ``M + N < H + r``: ``lambda = M N / 2``, m = 1
* Case 1, otherwise: ``lambda = (2 (H + r)(M + N) - (M - N)^2 - (H + r)^2) / 8``, with m = 1 when
  ``M + H + N + r`` is even, and ``+ 1/8`` and m = 2 when it is odd.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RRRLearningCoefficient:
    """lambda (the RLCT), its multiplicity and which Aoyagi-Watanabe case gave it (1 to 4)."""

    lambda_: float
    multiplicity: int
    case: int


def _check_dimensions(M: int, N: int, H: int, r: int) -> None:
    for name, value in (("M", M), ("N", N), ("H", H), ("r", r)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    for name, value in (("M", M), ("N", N), ("H", H)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if not 0 <= r <= min(H, M, N):
        raise ValueError(f"the true rank r must lie in [0, min(H, M, N)] = [0, {min(H, M, N)}], "
                         f"got {r}")


def rrr_learning_coefficient(*, M: int, N: int, H: int, r: int) -> RRRLearningCoefficient:
    """lambda, multiplicity and case for M inputs, N outputs, width H and true rank r."""
    _check_dimensions(M, N, H, r)
    if M + H < N + r:
        return RRRLearningCoefficient((H * M - H * r + N * r) / 2, 1, case=2)
    if N + H < M + r:
        return RRRLearningCoefficient((H * N - H * r + M * r) / 2, 1, case=3)
    if M + N < H + r:
        return RRRLearningCoefficient(M * N / 2, 1, case=4)
    numerator = 2 * (H + r) * (M + N) - (M - N) ** 2 - (H + r) ** 2
    if (M + H + N + r) % 2 == 1:
        return RRRLearningCoefficient((numerator + 1) / 8, 2, case=1)
    return RRRLearningCoefficient(numerator / 8, 1, case=1)


def rrr_lambda(*, M: int, N: int, H: int, r: int) -> float:
    """The RLCT lambda of reduced-rank regression (see :func:`rrr_learning_coefficient`)."""
    return rrr_learning_coefficient(M=M, N=N, H=H, r=r).lambda_


def rrr_grid(M: int = 10, N: int = 5,
             widths: tuple[int, ...] = (2, 3, 4, 5)) -> list[dict[str, int]]:
    """The cells (M, N, H, r) with H in ``widths`` and 1 <= r <= H: the paper's 14-cell grid."""
    return [{"M": M, "N": N, "H": H, "r": r} for H in widths for r in range(1, H + 1)]
