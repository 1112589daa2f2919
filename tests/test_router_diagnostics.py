"""Router diagnostics: hand-checked statistics and agreement with the MoE model's own routing."""

from __future__ import annotations

import math

import pytest
import torch

from gaugeopt.dds.router import router_diagnostics, router_statistics
from gaugeopt.models import MoEConfig, MoELM, TransformerLM, TransformerLMConfig


def test_statistics_on_hand_made_logits():
    # 4 tokens, 4 experts, top-1: experts 0, 0, 1, 2 win; expert 3 never does.
    logits = torch.tensor([[2.0, 0.0, 0.0, 0.0], [3.0, 1.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 5.0, -1.0]])
    stats = router_statistics(logits, top_k=1)
    assert stats["f"] == pytest.approx([0.5, 0.25, 0.25, 0.0])
    assert stats["P"] == pytest.approx(torch.softmax(logits.double(), -1).mean(0).tolist())
    f = torch.tensor([0.5, 0.25, 0.25, 0.0], dtype=torch.float64)
    assert stats["load_cv"] == pytest.approx((f.std(unbiased=False) / f.mean()).item())
    assert stats["max_load"] == pytest.approx(0.5) and stats["max_load_ratio"] == pytest.approx(2.0)
    assert stats["dead_fraction"] == pytest.approx(0.25)
    lse = torch.logsumexp(logits.double(), -1)
    assert stats["z_loss"] == pytest.approx((lse**2).mean().item())
    assert stats["logit_rms"] == pytest.approx(math.sqrt((logits.double() ** 2).mean().item()))
    assert stats["logit_max"] == pytest.approx(5.0)
    assert (stats["n_experts"], stats["top_k"], stats["tokens"]) == (4, 1, 4)


def test_balanced_routing_has_zero_cv_and_no_dead_experts():
    logits = torch.eye(3).repeat(5, 1) * 4.0  # every expert wins 5 of 15 tokens
    stats = router_statistics(logits, top_k=1)
    assert stats["load_cv"] == pytest.approx(0.0, abs=1e-12)
    assert stats["dead_fraction"] == 0.0 and stats["max_load_ratio"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="top_k"):
        router_statistics(logits, top_k=4)


def test_one_row_per_moe_layer_matching_the_models_routing():
    torch.manual_seed(0)
    config = MoEConfig(vocab_size=17, d_model=16, n_layers=3, n_heads=2, n_experts=5, top_k=2, d_ff=8, max_seq_len=12)
    model = MoELM(config)
    tokens = torch.randint(0, 17, (3, 12))
    rows = router_diagnostics(model, tokens)
    assert [r["layer"] for r in rows] == ["blocks.0.moe", "blocks.1.moe", "blocks.2.moe"]
    # recompute layer 1's load from the model's own route() on that layer's input
    captured = {}
    handle = model.blocks[1].moe.register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    with torch.no_grad():
        model(tokens)
    handle.remove()
    probs, indices, _ = model.blocks[1].moe.route(captured["x"].reshape(-1, 16))
    load = torch.bincount(indices.reshape(-1), minlength=5).double() / indices.numel()
    assert rows[1]["f"] == pytest.approx(load.tolist())
    assert rows[1]["P"] == pytest.approx(probs.double().mean(0).tolist(), abs=1e-6)
    assert rows[1]["tokens"] == 36
    for row in rows:
        assert sum(row["f"]) == pytest.approx(1.0) and sum(row["P"]) == pytest.approx(1.0)
        numbers = [row[k] for k in ("load_cv", "max_load", "dead_fraction", "z_loss", "logit_rms", "logit_max")]
        assert all(math.isfinite(v) for v in numbers)
    assert not any(h for m in model.modules() for h in m._forward_hooks.values())  # hooks removed


def test_models_without_moe_layers_are_rejected():
    with pytest.raises(ValueError, match="no MoE layer"):
        router_diagnostics(TransformerLM(TransformerLMConfig(d_model=16, n_layers=1)), torch.zeros(1, 4, dtype=torch.long))
