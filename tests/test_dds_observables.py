"""Positive spectra and site observables: the Gram trick, thresholds, and bad input."""

import math

import pytest
import torch

from gaugeopt.dds import positive_spectrum, second_moment_eigenvalues, site_observables


def _direct_nonzero(data: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the h x h matrix X^T X / N, computed the expensive way."""
    return torch.linalg.eigvalsh(data.T @ data / data.shape[0])


@pytest.mark.parametrize("samples,width", [(5, 40), (40, 5), (12, 12)])
def test_gram_trick_matches_the_direct_positive_spectrum(samples, width):
    data = torch.randn(samples, width, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    direct = _direct_nonzero(data)
    direct = direct[direct > 1e-10 * direct.max()]
    spectrum = positive_spectrum(data)
    assert spectrum.rank == min(samples, width) == direct.numel()
    torch.testing.assert_close(spectrum.eigenvalues, direct, rtol=1e-10, atol=0)
    assert math.isclose(spectrum.logdet, float(direct.log().sum()), rel_tol=1e-10)
    assert spectrum.min == pytest.approx(float(direct[0]), rel=1e-10)


def test_gram_path_is_the_small_matrix():
    # 3 samples in width 500: only the 3 x 3 Gram is diagonalised.
    data = torch.randn(3, 500, dtype=torch.float64)
    assert second_moment_eigenvalues(data).numel() == 3


def test_threshold_drops_exact_zero_directions():
    basis = torch.randn(50, 3, dtype=torch.float64)
    data = basis @ torch.randn(3, 8, dtype=torch.float64)  # rank 3 in width 8
    spectrum = positive_spectrum(data, rel_tol=1e-10)
    assert spectrum.rank == 3
    assert spectrum.tau == pytest.approx(1e-10 * float(_direct_nonzero(data).max()))


def test_site_observables_values():
    x = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))  # N = h = 3
    d = torch.diag(torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64))
    row = site_observables("s", x, d)
    assert row.width == 3 and row.samples == 3
    assert row.sigma2_min_X == pytest.approx(1.0)  # smallest squared singular value of X
    assert row.lambda_min_A == pytest.approx(1.0 / 3)
    assert row.lambda_min_G == pytest.approx(0.25**2 / 3)
    assert row.logdet_G == pytest.approx(math.log(1 / 3) + math.log(0.25 / 3) + math.log(0.25**2 / 3))
    assert row.rank_G == row.rank_A == 3


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="same"):
        site_observables("s", torch.ones(4, 3), torch.ones(4, 2))
    with pytest.raises(ValueError, match="identically zero"):
        site_observables("s", torch.ones(4, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"\(N, h\)"):
        positive_spectrum(torch.ones(3))
    with pytest.raises(ValueError, match="non-finite"):
        positive_spectrum(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="rel_tol"):
        positive_spectrum(torch.ones(2, 2), rel_tol=0.0)
