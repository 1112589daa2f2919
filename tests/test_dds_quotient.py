"""HorizontalProjection: the quotient metric's projection removes exactly the gauge-orbit part."""

import pytest
import torch

from gaugeopt import find_gauges
from gaugeopt.dds import HorizontalProjection, TrajectoryRecorder, flatten_parameters
from gaugeopt.models import TransformerLM, TransformerLMConfig


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model = TransformerLM(TransformerLMConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2, d_ff=16,
                                              max_seq_len=8)).double()
    gauges = find_gauges(model, torch.randint(0, 11, (2, 3)), output="logits")
    return model, gauges, HorizontalProjection(gauges, model)


def test_projection_is_orthogonal_to_every_orbit_direction_and_idempotent(lm):
    model, gauges, projection = lm
    delta = torch.randn(projection.size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    horizontal = projection(delta)
    basis = projection.vertical_basis()
    assert basis.shape == (projection.size, sum(f.dim for f in gauges))
    assert float(torch.sparse.mm(basis.t(), horizontal.unsqueeze(1)).abs().max()) < 1e-10 * float(delta.norm())
    torch.testing.assert_close(projection(horizontal), horizontal)
    assert float(horizontal.norm()) < float(delta.norm())  # something vertical was removed


def test_a_pure_gauge_move_has_no_horizontal_length_to_first_order(lm):
    model, gauges, projection = lm
    for spread in (1e-3, 1e-4):
        before = flatten_parameters(model)
        element = gauges.sample(torch.Generator().manual_seed(2), spread=spread)
        gauges.apply(model, element)
        move = flatten_parameters(model) - before
        gauges.apply_inverse(model, element)
        # the chord of a finite group element leaves the orbit at second order in its size
        assert float(projection(move).norm()) < 30 * spread * float(move.norm())


def test_recorder_measures_chords_in_the_quotient_metric(lm):
    model, gauges, projection = lm
    tokens = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(3))

    def loss(logits, targets):
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")

    recorder = TrajectoryRecorder(model, tokens, tokens, loss=loss, sites=["head"], project_horizontal=projection)
    recorder.record(0)
    before = flatten_parameters(model)
    element = gauges.sample(torch.Generator().manual_seed(4), spread=1e-4)
    gauges.apply(model, element)  # a gauge move: (almost) no quotient length
    euclidean = float((flatten_parameters(model) - before).norm())
    recorder.record(1)
    gauges.apply_inverse(model, element)
    assert recorder.remaining_arc_length()[0] < 1e-2 * euclidean


def test_wrong_size_is_refused(lm):
    with pytest.raises(ValueError, match="parameters"):
        lm[2](torch.zeros(3, dtype=torch.float64))
