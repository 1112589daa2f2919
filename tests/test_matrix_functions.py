"""Newton-Schulz, polar factor, inverse square root and nuclear norm against SVD / eigh references."""

from __future__ import annotations

import pytest
import torch

from gaugeopt.optim.matrix_functions import (
    MUON_NS_COEFFICIENTS,
    inverse_sqrt_psd,
    newton_schulz,
    nuclear_norm_via_polar,
    polar,
)

F64 = torch.float64
SHAPES = [(6, 6), (9, 4), (4, 9), (3, 7, 5), (2, 3, 4, 6)]


def well_conditioned(shape: tuple[int, ...], seed: int, cond: float = 20.0) -> torch.Tensor:
    """Random matrices U diag(s) V^T with singular values log-spaced in [1/cond, 1] times a scale."""
    g = torch.Generator().manual_seed(seed)
    *lead, m, n = shape
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(*lead, m, k, generator=g, dtype=F64))[0]
    V = torch.linalg.qr(torch.randn(*lead, n, k, generator=g, dtype=F64))[0]
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), k, dtype=F64) * 3.7
    return (U * s) @ V.mT


def svd_polar(G: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    return U @ Vh


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=F64))[0]


@pytest.mark.parametrize("shape", SHAPES)
def test_polar_matches_svd(shape):
    for seed in range(3):
        G = well_conditioned(shape, seed)
        assert rel_err(polar(G), svd_polar(G)) <= 1e-6
        assert rel_err(polar(G), svd_polar(G)) <= 1e-12  # in practice it converges to rounding


def test_polar_handles_ill_conditioning_and_rank_deficiency():
    G = well_conditioned((30, 10), seed=4, cond=1e6)
    assert rel_err(polar(G), svd_polar(G)) <= 1e-10
    G[:, :3] = 0.0  # rank 7: the polar factor is the partial isometry on the range
    U, s, Vh = torch.linalg.svd(G, full_matrices=False)
    rank = int((s > 1e-12 * s[0]).sum())
    assert rank == 7
    assert rel_err(polar(G), U[:, :rank] @ Vh[:rank]) <= 1e-10
    assert torch.equal(polar(torch.zeros(3, 5, dtype=F64)), torch.zeros(3, 5, dtype=F64))


@pytest.mark.parametrize("shape", SHAPES)
def test_nuclear_norm_via_polar_matches_singular_values(shape):
    G = well_conditioned(shape, seed=7)
    reference = torch.linalg.svdvals(G).sum(dim=-1)
    assert nuclear_norm_via_polar(G).shape == reference.shape
    assert torch.allclose(nuclear_norm_via_polar(G), reference, rtol=1e-10, atol=0)


@pytest.mark.parametrize("n", [1, 5, 16])
@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_inverse_sqrt_psd_matches_eigh(n, eps):
    A = well_conditioned((2, n + 3, n), seed=n)
    S = A.mT @ A
    evals, evecs = torch.linalg.eigh(S)
    reference = (evecs * (evals + eps).rsqrt().unsqueeze(-2)) @ evecs.mT
    result = inverse_sqrt_psd(S, eps)
    assert rel_err(result, reference) <= 1e-6
    assert rel_err(result, reference) <= 1e-12
    assert torch.allclose(result, result.mT, atol=0)  # symmetric by construction


def test_inverse_sqrt_psd_needs_eps_for_singular_input():
    A = torch.randn(3, 6, dtype=F64, generator=torch.Generator().manual_seed(0))
    S = A.mT @ A  # 6 x 6 of rank 3
    with pytest.raises(RuntimeError, match="eps"):
        inverse_sqrt_psd(S)
    R = inverse_sqrt_psd(S, eps=1e-8)
    assert rel_err(A @ R, svd_polar(A)) <= 1e-6  # A (A^T A + eps)^(-1/2) ~ polar(A)


def test_newton_schulz_is_an_approximate_polar_factor_with_exact_singular_vectors():
    G = well_conditioned((12, 7), seed=1, cond=100.0)
    X = newton_schulz(G)
    U, s, Vh = torch.linalg.svd(G, full_matrices=False)
    inner = U.mT @ X @ Vh.mT  # diagonal: NS acts on the singular values only
    off_diagonal = inner - torch.diag_embed(torch.diagonal(inner, dim1=-2, dim2=-1))
    assert off_diagonal.abs().max() < 1e-12
    values = torch.diagonal(inner)
    assert values.min() > 0.6 and values.max() < 1.25  # Muon's band, not exactly 1
    # same singular-value polynomial as five explicit steps of p(s) = a s + b s^3 + c s^5
    a, b, c = MUON_NS_COEFFICIENTS
    x = s / (G.norm() + 1e-7)
    for _ in range(5):
        x = a * x + b * x**3 + c * x**5
    assert torch.allclose(values, x, atol=1e-12)


def test_newton_schulz_batched_transposed_and_equivariant():
    G = well_conditioned((4, 10, 6), seed=2)
    batched = newton_schulz(G)
    assert batched.dtype == F64 and batched.shape == G.shape
    for i in range(4):
        assert torch.allclose(batched[i], newton_schulz(G[i]), atol=1e-14)
        assert torch.allclose(batched[i], newton_schulz(G[i].mT).mT, atol=1e-14)
    Q, R = random_orthogonal(10, 3), random_orthogonal(6, 4)
    assert torch.allclose(newton_schulz(Q @ G @ R), Q @ batched @ R, atol=1e-12)
    assert torch.equal(newton_schulz(torch.zeros(3, 4, dtype=F64)), torch.zeros(3, 4, dtype=F64))
    assert newton_schulz(G.float()).dtype == torch.float32


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: newton_schulz(torch.ones(3)), ValueError),
        (lambda: newton_schulz(torch.ones(3, 3, dtype=torch.int64)), TypeError),
        (lambda: newton_schulz(torch.ones(3, 3), steps=-1), ValueError),
        (lambda: polar(torch.ones(4)), ValueError),
        (lambda: inverse_sqrt_psd(torch.ones(3, 4)), ValueError),
        (lambda: inverse_sqrt_psd(torch.eye(3), eps=-1.0), ValueError),
        (lambda: inverse_sqrt_psd(torch.zeros(3, 3)), ValueError),
        (lambda: nuclear_norm_via_polar(torch.ones(3, 4), torch.ones(4, 3)), ValueError),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error):
    with pytest.raises(error):
        call()


@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (0, 0), (3, 0, 5), (0, 3, 5)])
def test_matrices_without_elements_map_to_themselves(shape):
    """A parameter with no rows or columns (or an empty batch of matrices) has an empty polar factor;
    Newton-Schulz used to fail reshaping it."""
    from gaugeopt.optim.layerwise import damped_polar, hybrid_update, spectral_update

    G = torch.empty(shape, dtype=F64)
    for function in (newton_schulz, polar, damped_polar, spectral_update, hybrid_update):
        out = function(G)
        assert out.shape == G.shape and out.dtype == F64, function.__name__


def test_damped_polar_of_a_float32_matrix_is_its_float64_value_rounded():
    """The Gram matrix squares the condition number: formed in float32, its damping floor moved the
    factor of a matrix with a singular value 1e-2 of the largest by tens of percent."""
    from gaugeopt.optim.layerwise import damped_polar

    g = torch.Generator().manual_seed(5)
    U = torch.linalg.qr(torch.randn(12, 6, generator=g, dtype=F64))[0]
    V = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=F64))[0]
    Y = (U * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.1, 0.01], dtype=F64)) @ V.mT
    exact = damped_polar(Y.float().double())
    assert rel_err(damped_polar(Y.float()).double(), exact) < 1e-6
    assert damped_polar(Y.float()).dtype == torch.float32
