"""Closed-form RLCT of reduced-rank regression in all four Aoyagi-Watanabe cases."""

import pytest

from gaugeopt.dds import rrr_grid, rrr_lambda, rrr_learning_coefficient

# devinterp's own test cells, (M, H, N) with true rank 0, and values worked out by hand:
#   (5,3,5): case 1, M+H+N = 13 odd:  (2*3*10 - 0 - 9 + 1) / 8 = 52/8 = 6.5
#   (5,4,5): case 1, 14 even:         (2*4*10 - 0 - 16) / 8    = 64/8 = 8
#   (4,3,8): case 2, 4+3 < 8:         H M / 2 = 12/2 = 6
#   (8,3,4): case 3, 4+3 < 8:         H N / 2 = 12/2 = 6
#   (3,8,4): case 4, 3+4 < 8:         M N / 2 = 12/2 = 6
DEVINTERP_CELLS = [
    ((5, 3, 5), 1, 6.5, 2),
    ((5, 4, 5), 1, 8.0, 1),
    ((4, 3, 8), 2, 6.0, 1),
    ((8, 3, 4), 3, 6.0, 1),
    ((3, 8, 4), 4, 6.0, 1),
]


@pytest.mark.parametrize("cell,case,value,multiplicity", DEVINTERP_CELLS)
def test_devinterp_cells(cell, case, value, multiplicity):
    M, H, N = cell
    coefficient = rrr_learning_coefficient(M=M, N=N, H=H, r=0)
    assert (coefficient.case, coefficient.lambda_, coefficient.multiplicity) == (case, value, multiplicity)


@pytest.mark.parametrize(
    "M,N,H,r,case,value",
    [
        # case 2, M + H < N + r: (H M - H r + N r) / 2
        (2, 9, 3, 1, 2, (3 * 2 - 3 * 1 + 9 * 1) / 2),  # 6.0
        # case 3, N + H < M + r: (H N - H r + M r) / 2
        (10, 5, 3, 2, 3, (3 * 5 - 3 * 2 + 10 * 2) / 2),  # 14.5
        # case 4, M + N < H + r: M N / 2
        (2, 2, 6, 2, 4, 2.0),
        # case 1 even (M+H+N+r = 14): (2*(3+1)*(5+5) - 0 - 16) / 8 = 8
        (5, 5, 3, 1, 1, 8.0),
        # case 1 odd (M+H+N+r = 13): (2*(3+1)*(4+5) - 1 - 16 + 1) / 8 = 7
        (4, 5, 3, 1, 1, 7.0),
    ],
)
def test_each_case_by_hand(M, N, H, r, case, value):
    coefficient = rrr_learning_coefficient(M=M, N=N, H=H, r=r)
    assert coefficient.case == case
    assert coefficient.lambda_ == value
    assert rrr_lambda(M=M, N=N, H=H, r=r) == value


def test_full_rank_is_regular_count():
    # r = H: the model is regular at the truth; lambda = d / 2 with d = H (M + N - H).
    for M, N, H in [(10, 5, 3), (6, 6, 4), (4, 7, 2)]:
        assert rrr_lambda(M=M, N=N, H=H, r=H) == H * (M + N - H) / 2


def test_paper_grid_is_fourteen_case_3_cells():
    cells = rrr_grid()
    assert len(cells) == 14
    assert {rrr_learning_coefficient(**c).case for c in cells} == {3}
    assert rrr_lambda(M=10, N=5, H=2, r=1) == 9.0


def test_bad_dimensions():
    with pytest.raises(ValueError, match="true rank"):
        rrr_lambda(M=3, N=3, H=2, r=3)
    with pytest.raises(ValueError, match="at least 1"):
        rrr_lambda(M=0, N=3, H=2, r=0)
    with pytest.raises(TypeError, match="int"):
        rrr_lambda(M=3.0, N=3, H=2, r=0)


def test_noise_edge_is_the_marchenko_pastur_edge_of_a_fitted_pure_noise_map():
    import torch

    from gaugeopt.dds import second_moment_eigenvalues
    from gaugeopt.experiments.rrr import noise_edge

    assert noise_edge(9, 4, 100, 2.0) == pytest.approx(25 * 2.0 / 100)
    # least squares on pure noise (teacher 0): the fitted outputs' eigenvalues sit at or below the edge
    generator = torch.Generator().manual_seed(0)
    M, N, n = 40, 20, 4000
    x = torch.randn(n, M, generator=generator, dtype=torch.float64)
    y = torch.randn(n, N, generator=generator, dtype=torch.float64)
    fitted = x @ torch.linalg.lstsq(x, y).solution
    top = float(second_moment_eigenvalues(fitted)[-1])
    assert 0.8 * noise_edge(M, N, n, 1.0) < top < 1.1 * noise_edge(M, N, n, 1.0)
    with pytest.raises(ValueError, match="positive sizes"):
        noise_edge(0, 4, 100, 1.0)


@pytest.mark.parametrize("H, r", [(2, 1), (4, 2), (4, 4)])
def test_the_active_count_reads_the_true_rank_of_a_least_squares_checkpoint(H, r):
    from gaugeopt.dds import dead_direction_signatures
    from gaugeopt.experiments.rrr import OUTPUT_SITE, gaussian_nll, noise_edge_active_count, rrr_checkpoint

    model, x, y = rrr_checkpoint(10, 5, H, r, samples=1000, noise=1.0, seed=0)
    reading = dead_direction_signatures(model, x, y, loss=gaussian_nll(1.0), sites=[OUTPUT_SITE])
    count = noise_edge_active_count(model, x, y, reading.spectra[OUTPUT_SITE]["A"])
    assert count["active_count"] == r
    assert count["noise_variance"] == pytest.approx(1.0, abs=0.1)
