"""symmetry_param_groups: roles found from model structure, overrides, tied weights, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gaugeopt.models import MoEConfig, MoELM, TransformerLM, TransformerLMConfig
from gaugeopt.models.blocks import MLP, Attention
from gaugeopt.optim import SymmetryCompatible, symmetry_param_groups
from gaugeopt.optim.symcompat import ParamClassification, classify_parameters, format_table


def table(model, overrides=None, **kwargs) -> dict[str, ParamClassification]:
    return {row.name: row for row in classify_parameters(model, overrides, **kwargs)}


def tiny_lm(**overrides) -> TransformerLM:
    config = dict(vocab_size=11, d_model=16, n_layers=2, n_heads=4, d_ff=24, max_seq_len=8)
    config.update(overrides)
    return TransformerLM(TransformerLMConfig(**config))


def expected_block_roles(prefix: str, mlp: str) -> dict[str, tuple[str, str, str, int | None]]:
    return {
        f"{prefix}.norm1.weight": ("vector", "adamw", "row", None),
        f"{prefix}.norm2.weight": ("vector", "adamw", "row", None),
        f"{prefix}.attn.q_proj.weight": ("attention_qkv", "muon", "row", 4),
        f"{prefix}.attn.k_proj.weight": ("attention_qkv", "muon", "row", 2),
        f"{prefix}.attn.v_proj.weight": ("attention_qkv", "muon", "row", 2),
        f"{prefix}.attn.o_proj.weight": ("attention_out", "muon", "col", 4),
        f"{prefix}.{mlp}.gate.weight": ("swiglu_gate_up", "muon", "row", None),
        f"{prefix}.{mlp}.up.weight": ("swiglu_gate_up", "muon", "row", None),
        f"{prefix}.{mlp}.down.weight": ("swiglu_down", "muon", "col", None),
    }


def roles_of(rows: dict[str, ParamClassification]) -> dict[str, tuple[str, str, str, int | None]]:
    return {name: (r.role, r.rule, r.orientation, r.heads) for name, r in rows.items()}


def test_transformer_lm_roles_with_grouped_query_attention():
    model = tiny_lm(n_kv_heads=2)
    expected = {
        "embed.weight": ("embedding", "hybrid", "row", None),
        "norm.weight": ("vector", "adamw", "row", None),
        "head.weight": ("lm_head", "centered_hybrid", "row", None),
    }
    for i in range(2):
        expected.update(expected_block_roles(f"blocks.{i}", "ffn"))
    rows = table(model)
    assert roles_of(rows) == expected
    assert all(r.source == "auto" for r in rows.values())
    # observing the forward pass finds the same LM head
    assert roles_of(table(model, example_inputs=(torch.zeros(1, 4, dtype=torch.long),))) == expected


def test_moe_lm_roles_router_and_experts():
    model = MoELM(MoEConfig(vocab_size=13, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=3,
                            top_k=2, d_ff=8, max_seq_len=8, router_bias=True))
    expected = {
        "embed.weight": ("embedding", "hybrid", "row", None),
        "norm.weight": ("vector", "adamw", "row", None),
        "head.weight": ("lm_head", "centered_hybrid", "row", None),
    }
    for i in range(2):
        block = expected_block_roles(f"blocks.{i}", "ffn")
        expected.update({k: v for k, v in block.items() if ".ffn." not in k})
        expected[f"blocks.{i}.moe.router.weight"] = ("moe_router", "centered_left_spectral", "row", None)
        expected[f"blocks.{i}.moe.router.bias"] = ("vector", "adamw", "row", None)
        for e in range(3):
            expert = f"blocks.{i}.moe.experts.{e}"
            expected[f"{expert}.gate.weight"] = ("moe_expert_gate_up", "muon", "row", None)
            expected[f"{expert}.up.weight"] = ("moe_expert_gate_up", "muon", "row", None)
            expected[f"{expert}.down.weight"] = ("moe_expert_down", "muon", "col", None)
    assert roles_of(table(model)) == expected


class TiedLM(nn.Module):
    """Embedding and output head share one weight; the MLP is not gated."""

    def __init__(self, vocab: int = 10, d: int = 8):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.mlp = MLP(d, 16, "relu")
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.tok.weight

    def forward(self, tokens):
        return self.out(self.mlp(self.tok(tokens)))


def test_tied_embedding_head_appears_once_with_its_role():
    model = TiedLM()
    rows = table(model)
    assert list(rows) == ["tok.weight", "mlp.up.weight", "mlp.down.weight"]
    tied = rows["tok.weight"]
    assert (tied.role, tied.rule, tied.aliases) == ("tied_embedding_head", "row_norm", ("out.weight",))
    assert "out.weight" in tied.note and "shift" in tied.note
    # the non-gated MLP gets the documented conservative default, marked as such
    assert rows["mlp.up.weight"].role == "matrix" and rows["mlp.up.weight"].source == "default"
    assert roles_of(table(model, example_inputs=(torch.zeros(1, 3, dtype=torch.long),))) == roles_of(rows)
    groups = symmetry_param_groups(model, verbose=False)
    assert sum(len(g["params"]) for g in groups) == 3  # tied weight listed once
    # an override may address the tied weight by either of its names
    assert table(model, {"out.weight": "centered_row_norm"})["tok.weight"].rule == "centered_row_norm"


def test_table_is_printed(capsys):
    model = tiny_lm()
    symmetry_param_groups(model)
    printed = capsys.readouterr().out
    assert "blocks.1.attn.o_proj.weight" in printed and "attention_out" in printed and "lm_head" in printed
    rows = classify_parameters(model)
    assert printed.strip() == format_table(rows).strip()
    assert "embed.weight" in str(rows[0]) and "hybrid" in str(rows[0])


def test_groups_feed_the_optimizer_and_carry_names():
    model = tiny_lm()
    groups = symmetry_param_groups(model, verbose=False)
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    heads = {g["role"]: g["heads"] for g in groups if g["role"].startswith("attention")}
    assert heads == {"attention_qkv": 4, "attention_out": 4}
    opt = SymmetryCompatible(groups)
    tokens = torch.randint(0, 11, (2, 8))
    model(tokens).logsumexp(-1).mean().backward()
    opt.step()


def test_overrides_by_pattern():
    model = tiny_lm()
    rows = table(model, {
        "blocks.*.ffn.gate.weight": {"rule": "hybrid", "lr": 1e-4},
        "blocks.*.ffn.down.weight": "row_norm",
        "head.weight": {"rule": "centered_hybrid", "alpha": 0.5},
        "embed.weight": {"weight_decay": 0.1},
    })
    gate = rows["blocks.0.ffn.gate.weight"]
    assert (gate.role, gate.rule, gate.lr, gate.source) == ("swiglu_gate_up", "hybrid", 1e-4, "override blocks.*.ffn.gate.weight")
    down = rows["blocks.1.ffn.down.weight"]
    assert (down.rule, down.orientation, down.heads) == ("row_norm", "col", None)  # the role keeps its orientation
    assert rows["head.weight"].options == {"alpha": 0.5}
    embed = rows["embed.weight"]
    assert (embed.rule, embed.lr, embed.options) == ("hybrid", 0.01, {"weight_decay": 0.1})  # role defaults kept
    assert gate.lr == 1e-4 and down.lr == 0.05  # explicit lr, else the new rule's default lr
    groups = symmetry_param_groups(model, {"head.weight": {"rule": "centered_hybrid", "alpha": 0.5}}, verbose=False)
    head_group = next(g for g in groups if g["role"] == "lm_head")
    assert head_group["alpha"] == 0.5 and head_group["param_names"] == ["head.weight"]
    SymmetryCompatible(groups)


def test_override_errors_name_the_parameter_or_pattern():
    model = tiny_lm()
    with pytest.raises(ValueError, match=r"blocks\.0\.ffn\.up\.weight is matched by several"):
        classify_parameters(model, {"blocks.0.ffn.*": "row_norm", "*.up.weight": "hybrid"})
    with pytest.raises(ValueError, match=r"'blocks\.\*\.mlp\.\*' matches no"):
        classify_parameters(model, {"blocks.*.mlp.*": "row_norm"})
    with pytest.raises(ValueError, match="known rules"):
        classify_parameters(model, {"head.weight": "rownorm"})
    with pytest.raises(ValueError, match="unknown key"):
        classify_parameters(model, {"head.weight": {"learning_rate": 0.1}})


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.proj = nn.Linear(8, 4)


def test_unclassifiable_parameters_are_errors_until_overridden():
    model = ConvNet()
    with pytest.raises(ValueError, match=r"conv\.weight \(2, 1, 3, 3\).*override"):
        classify_parameters(model)
    rows = table(model, {"conv.weight": "adamw"})
    assert rows["conv.weight"].rule == "adamw" and rows["conv.weight"].source == "override conv.weight"
    assert rows["proj.weight"].role == "matrix" and rows["proj.weight"].source == "default"


def test_frozen_parameters_are_skipped():
    model = tiny_lm()
    model.embed.weight.requires_grad_(False)
    assert "embed.weight" not in table(model)


class BadHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention(16, 4)
        self.attn.n_heads = 3  # contradicts the 16-wide projections


def test_attention_head_counts_are_checked_against_shapes():
    with pytest.raises(ValueError, match="not a multiple of 3 heads"):
        classify_parameters(BadHeads())


class ExpertStack(nn.Module):
    """An MoE layer storing its experts as 3-D tensors (HF style) with a router."""

    def __init__(self, d: int = 6, f: int = 4, experts: int = 3):
        super().__init__()
        self.router = nn.Linear(d, experts, bias=False)
        self.experts = nn.Module()
        self.experts.gate_up = nn.Parameter(torch.randn(experts, 2 * f, d))
        self.experts.down = nn.Parameter(torch.randn(experts, d, f))
        self.shared = nn.Linear(d, experts + 1)


def test_three_d_expert_tensors_get_batched_muon():
    rows = table(ExpertStack())
    assert rows["router.weight"].role == "moe_router"
    assert (rows["experts.gate_up"].role, rows["experts.gate_up"].rule) == ("moe_expert_tensor", "muon")
    assert rows["experts.down"].role == "moe_expert_tensor"
    groups = symmetry_param_groups(ExpertStack(), verbose=False)
    SymmetryCompatible(groups)


class _BareRouter(nn.Module):
    """A router holding its weight directly (as Hugging Face's Mixtral router does)."""

    def __init__(self, experts: int, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, d))


class _StackedMoE(nn.Module):
    def __init__(self, experts: int = 4, d: int = 6, routers: int = 1):
        super().__init__()
        self.experts = nn.Module()
        self.experts.down = nn.Parameter(torch.randn(experts, d, 8))
        self.gate = _BareRouter(experts, d)
        if routers == 2:
            self.other = nn.Linear(d, experts)


def test_a_router_module_with_a_bare_weight_is_the_moe_router():
    model = _StackedMoE()
    roles = {c.name: c.role for c in classify_parameters(model)}
    assert roles["gate.weight"] == "moe_router" and roles["experts.down"] == "moe_expert_tensor"


def test_two_router_candidates_are_refused_with_the_override_hint():
    with pytest.raises(ValueError, match="cannot tell which is the router: give the router an override"):
        classify_parameters(_StackedMoE(routers=2))
