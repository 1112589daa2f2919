"""The devinterp LLC wrapper: one small real run, and the error when devinterp is missing."""

import sys

import pytest
import torch

from gaugeopt.dds.benchmarks import half_squared_error, rrr_checkpoint

pytest.importorskip("devinterp")


def test_small_real_llc_run():
    from gaugeopt.dds import estimate_llc

    model, x, y = rrr_checkpoint(M=3, N=3, H=2, r=1, samples=64, noise=1.0, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    estimate = estimate_llc(model, x, y, loss=half_squared_error, lr=1e-3, localization=1.0,
                            num_chains=1, num_draws=20, batch_size=64, num_init_loss_batches=1)
    # Full-batch SGLD from the exact empirical minimiser: every sampled loss is >= the initial one.
    assert estimate.llc_mean > 0
    assert len(estimate.loss_trace) == 1 and len(estimate.loss_trace[0]) == 20
    assert estimate.forward_backward_passes == 20 and estimate.samples_processed == 20 * 64
    with torch.no_grad():
        expected_init_loss = float(half_squared_error(model(x), y).mean())
    assert estimate.init_loss == pytest.approx(expected_init_loss, rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert "loss_trace" not in estimate.as_dict()


def test_bad_arguments():
    from gaugeopt.dds import estimate_llc

    model, x, y = rrr_checkpoint(M=3, N=3, H=2, r=1, samples=16, noise=1.0, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        estimate_llc(model, x, y, loss=half_squared_error, lr=1e-3, localization=1.0, batch_size=17)
    with pytest.raises(ValueError, match="targets"):
        estimate_llc(model, x, y[:3], loss=half_squared_error, lr=1e-3, localization=1.0)


def test_missing_devinterp_names_the_extra(monkeypatch):
    from gaugeopt.dds import estimate_llc

    monkeypatch.setitem(sys.modules, "devinterp.slt.llc", None)  # makes the import fail
    model, x, y = rrr_checkpoint(M=3, N=3, H=2, r=1, samples=16, noise=1.0, seed=0)
    with pytest.raises(ImportError, match=r"pip install gaugeopt\[llc\]"):
        estimate_llc(model, x, y, loss=half_squared_error, lr=1e-3, localization=1.0, batch_size=8)
