"""The symmetry-compatible stack trains the smoke-size MoE language model on character-level text."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gaugeopt.dds.router import router_diagnostics
from gaugeopt.models import MoEConfig, MoELM
from gaugeopt.optim import SymmetryCompatible, symmetry_param_groups

data = pytest.importorskip("gaugeopt.data")


@pytest.fixture
def one_thread():
    """Tiny matmuls: one intra-op thread avoids oversubscribing a shared CPU (much faster here)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_stack_trains_smoke_moe_and_logs_router_diagnostics(capsys, one_thread):
    try:
        split = data.char_lm_split(data.load_text(max_chars=20_000), val_fraction=0.1)
    except data.MissingDataError as missing:
        pytest.skip(str(missing))
    torch.manual_seed(0)
    model = MoELM(MoEConfig(vocab_size=split.vocab.size, d_model=32, n_layers=2, n_heads=4, n_experts=4,
                            top_k=2, d_ff=32, max_seq_len=32))
    groups = symmetry_param_groups(model)
    table = capsys.readouterr().out
    assert "moe_router" in table and "moe_expert_down" in table and "lm_head" in table
    optimizer = SymmetryCompatible(groups)
    generator = torch.Generator().manual_seed(0)
    probe, _ = data.lm_eval_windows(split.val, 32, max_windows=8)
    losses, log = [], []
    for step in range(60):
        inputs, targets = data.sample_lm_batch(split.train, 16, 32, generator)
        logits, aux = model(inputs, return_aux=True)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten()) + aux
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 20 == 19:
            log.append({"step": step + 1, "loss": loss.item(), "routers": router_diagnostics(model, probe)})
    first, last = losses[0], sum(losses[-10:]) / 10
    assert first > math.log(split.vocab.size) - 0.3  # starts near uniform
    assert last < first - 1.0, f"loss went from {first:.3f} to {last:.3f}"
    assert [entry["step"] for entry in log] == [20, 40, 60]
    for entry in log:
        assert len(entry["routers"]) == 2
        for row in entry["routers"]:
            assert sum(row["f"]) == pytest.approx(1.0)
            for key in ("load_cv", "max_load", "dead_fraction", "z_loss", "logit_rms", "logit_max"):
                assert math.isfinite(row[key]), key
    assert all(torch.isfinite(p).all() for p in model.parameters())
