"""Newton-Schulz (Muon's coefficients and the Polar Express schedule), polar factor, inverse square
root and nuclear norm against SVD / eigh references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.dispatch import HostReads
from gaugeopt.optim.matrix_functions import (
    MUON_NS_COEFFICIENTS,
    inverse_sqrt_psd,
    newton_schulz,
    ns_coefficient_schedule,
    nuclear_norm_via_polar,
    polar,
    polar_express_coefficients,
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


# --------------------------------------------------------------------------------------------------
# Per-step coefficients and the Polar Express schedule
# --------------------------------------------------------------------------------------------------


def _singular_value_path(s: torch.Tensor, schedule) -> torch.Tensor:
    for a, b, c in schedule:
        s = a * s + b * s**3 + c * s**5
    return s


def test_polar_express_is_closer_to_the_polar_factor_than_muons_coefficients(capsys):
    """The known answer of issue 31: a 512 x 512 matrix with singular values 1/i, five steps, against
    its exact polar factor (SVD in float64); relative Frobenius distance. Muon's fixed coefficients
    leave 0.18, Polar Express 0.10 (bfloat16 arithmetic adds a little to both)."""
    g = torch.Generator().manual_seed(0)
    n = 512
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))[0]
    G = (U / torch.arange(1, n + 1, dtype=F64)) @ V.mT
    exact = svd_polar(G)
    distance = {(name, str(dtype).removeprefix("torch.")):
                rel_err(newton_schulz(G, coefficients=c, dtype=dtype).double(), exact)
                for name, c in (("muon", MUON_NS_COEFFICIENTS), ("polar_express", "polar_express"))
                for dtype in (F64, torch.bfloat16)}
    with capsys.disabled():
        print("\n5-step distance to the polar factor, 512 x 512, s_i = 1/i:",
              ", ".join(f"{name} {dtype} {d:.4f}" for (name, dtype), d in distance.items()))
    assert distance["polar_express", "float64"] <= 0.10 and distance["polar_express", "bfloat16"] <= 0.11
    assert 0.17 <= distance["muon", "float64"] <= 0.19 and distance["muon", "bfloat16"] >= 0.17


def test_polar_express_steps_are_the_scalar_polynomials_of_its_schedule():
    """Newton-Schulz with a per-step schedule acts on the singular values only, step k through its own
    quintic; ``"polar_express"`` is the schedule of :func:`polar_express_coefficients`."""
    G = well_conditioned((12, 7), seed=1, cond=300.0)
    schedule = polar_express_coefficients(5)
    assert len(schedule) == 5 and len(set(schedule)) == 5
    X = newton_schulz(G, coefficients=schedule)
    assert torch.equal(X, newton_schulz(G, coefficients="polar_express"))
    U, s, Vh = torch.linalg.svd(G, full_matrices=False)
    inner = U.mT @ X @ Vh.mT
    assert (inner - torch.diag_embed(torch.diagonal(inner))).abs().max() < 1e-12
    expected = _singular_value_path(s / G.norm(), schedule)
    assert torch.allclose(torch.diagonal(inner), expected, atol=1e-12)
    assert (expected - 1).abs().max() < (_singular_value_path(s / G.norm(), [MUON_NS_COEFFICIENTS] * 5) - 1).abs().max()
    assert newton_schulz(G, steps=3, coefficients=[MUON_NS_COEFFICIENTS] * 3).equal(newton_schulz(G, steps=3))


def test_polar_express_reproduces_the_published_schedule_of_lau_and_su():
    """Known answer: the first quintic Lau & Su's reference publishes (Polar Express with lower bound
    1e-3, safety 1.02, cushion 0.02, five steps), before the normalisation margin this schedule folds
    into it; every step but the last is ``p(s / safety)``."""
    first, *_, last = polar_express_coefficients(5, safety=1.02)
    unfolded = (first[0] * 1.02, first[1] * 1.02**3, first[2] * 1.02**5)
    for ours, theirs in zip(unfolded, (8.156554524902461, -22.48329292557795, 15.878769915207462)):
        assert ours == pytest.approx(theirs, rel=1e-9)
    longer = polar_express_coefficients(6, safety=1.02)  # the same intervals; its fifth step is not its last
    assert longer[:4] == polar_express_coefficients(5, safety=1.02)[:4]
    assert longer[4] == pytest.approx((last[0] / 1.02, last[1] / 1.02**3, last[2] / 1.02**5), rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(lower=st.floats(1e-4, 0.9), width=st.floats(0.01, 1.0))
def test_each_schedule_step_is_the_minimax_quintic_of_its_interval(lower, width):
    """The Remez answer on [l, u] equioscillates: |1 - p| reaches its maximum E at l, at both interior
    extrema and at u with alternating signs, and nowhere exceeds it (a fine grid)."""
    from gaugeopt.optim.matrix_functions import _minimax_odd_quintic, _quintic

    upper = min(1.0, lower + width)
    if upper / lower > 1 + 1e-4:
        p = _minimax_odd_quintic(lower, upper)
        grid = [lower + (upper - lower) * k / 4000 for k in range(4001)]
        error = max(abs(1 - _quintic(p, s)) for s in grid)
        a, b, c = p
        root = math.sqrt(9 * b * b - 20 * a * c)
        q, r = (math.sqrt((-3 * b - sign * root) / (10 * c)) for sign in (1, -1))
        signs = [_quintic(p, s) - 1 for s in (lower, q, r, upper)]
        assert [x > 0 for x in signs] == [False, True, False, True]
        assert all(abs(abs(x) - error) <= 1e-9 * max(error, 1e-3) for x in signs), (signs, error)


@pytest.mark.parametrize("coefficients, message", [
    ((1.0, 2.0), "three finite numbers"), ("polar_expres", "polar_express"), ([(1.0, 2.0, 3.0)] * 4, "4 per-step"),
    ((1.0, math.nan, 0.0), "finite"), ([], "three finite numbers"),
])
def test_bad_coefficients_are_named(coefficients, message):
    with pytest.raises(ValueError, match=message):
        ns_coefficient_schedule(coefficients, 5, name="ns_coefficients")
    with pytest.raises(ValueError, match="coefficients"):
        newton_schulz(torch.eye(3), coefficients=coefficients)


# --------------------------------------------------------------------------------------------------
# Inverse square roots on a fixed schedule: no host reads
# --------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 48), log_cond=st.floats(0.0, 12.0), batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_inverse_sqrt_on_a_fixed_schedule_matches_the_float64_answer(n, log_cond, batch, seed):
    """Known answer: ``A = Q diag(lambda) Q^T`` with eigenvalues down to ``lower_bound |A|_F``
    (the bound promised), against ``Q diag(lambda^(-1/2)) Q^T``; the error is rounding times the
    condition number, like that of the converged iteration and of ``eigh``'s own answer."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=F64))[0]
    bound = 2.5e-13
    eigenvalues = torch.logspace(0, -log_cond, n, dtype=F64).expand(batch, n) * 3.0
    A = (Q * eigenvalues.unsqueeze(-2)) @ Q.mT
    floor = bound * torch.linalg.matrix_norm(A, keepdim=True)[..., 0]
    eigenvalues = torch.maximum(eigenvalues, floor)  # at or above the bound, the worst case included
    A = (Q * eigenvalues.unsqueeze(-2)) @ Q.mT
    exact = (Q * eigenvalues.rsqrt().unsqueeze(-2)) @ Q.mT
    with HostReads() as reads:
        result = inverse_sqrt_psd(A, lower_bound=bound)
    assert reads.total == 0
    condition = (eigenvalues.max() / eigenvalues.min()).item()
    assert rel_err(result, exact) <= 1e-14 * max(condition, 1.0) + 1e-13, (rel_err(result, exact), condition)


def test_damped_polar_matches_the_svd_answer_without_host_reads():
    """The spectral and hybrid maps' damped polar factor ``U diag(s / sqrt(s^2 + eps)) V^T`` of
    well-conditioned, ill-conditioned and rank-deficient matrices against the SVD answer in float64
    (to rounding times the damped Gram matrix's condition number), from float32 against the float64
    answer of the rounded input, with no value read back from the device."""
    from gaugeopt.optim.layerwise import damped_polar

    g = torch.Generator().manual_seed(3)
    eps = 1e-8
    for (m, n), spectrum in (((40, 12), torch.logspace(0, -2, 12)), ((12, 40), torch.logspace(0, -6, 12)),
                             ((30, 10), torch.cat([torch.logspace(0, -1, 6), torch.zeros(4)]))):
        U = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=F64))[0]
        V = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=F64))[0]
        s = spectrum.to(F64)
        Y = (U * s) @ V.mT
        exact = (U * (s / (s**2 + eps).sqrt())) @ V.mT
        with HostReads() as reads:
            ours, single = damped_polar(Y, eps), damped_polar(Y.float(), eps)
        assert reads.total == 0
        condition = ((s.max() ** 2 + eps) / (s.min() ** 2 + eps)).item()
        assert rel_err(ours, exact) <= 1e-15 * condition + 1e-13, ((m, n), rel_err(ours, exact), condition)
        assert rel_err(single.double(), damped_polar(Y.float().double(), eps)) <= 1e-6


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
        (lambda: inverse_sqrt_psd(torch.eye(3), lower_bound=0.0), ValueError),
        (lambda: polar_express_coefficients(5, lower=0.0), ValueError),
        (lambda: polar_express_coefficients(5, safety=0.9), ValueError),
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
