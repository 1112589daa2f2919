"""gaugeopt.optim.roles: the one parameter classifier behind DDCMuon's Muon/Adam split and
symmetry_param_groups. The split with gauges equals the rule it replaced (written out below as the
oracle), the two readers agree on every role, and what changed (the LM head without gauges) changed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gaugeopt import find_gauges
from gaugeopt.gauges.families import LogitShift
from gaugeopt.models import MoEConfig, MoELM, PlainCNN, PlainCNNConfig, TransformerLM, TransformerLMConfig
from gaugeopt.optim.baselines import MuonWithAdamW
from gaugeopt.optim.ddc_muon import muon_parameter_names
from gaugeopt.optim.roles import (
    CONV_KERNEL,
    INPUT_LAYER,
    LM_HEAD,
    MOE_EXPERT_TENSOR,
    MUON_HIDDEN_ROLES,
    OUTPUT_LAYER,
    ROLES,
    parameter_roles,
)
from gaugeopt.optim.symcompat import ROLE_DEFAULTS, classify_parameters

from test_symcompat_classify import BadHeads  # attention whose head count contradicts its shapes


def old_muon_parameter_names(model: nn.Module, gauges=None) -> set[str]:
    """The rule muon_parameter_names followed before the classifier was shared: every 2-D parameter or
    conv kernel except nn.Embedding tables, the logit_shift weight and gauges' input/output layers."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    excluded: set[str] = set()
    if gauges is not None:
        excluded |= {f.weight for f in gauges if isinstance(f, LogitShift) and f.kind == "logit_shift"}
        excluded |= {*gauges.input_layers, *gauges.output_layers}
    kernels = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))}
    return {n for n, p in model.named_parameters()
            if (p.ndim == 2 or id(p) in kernels) and id(p) not in embeddings and n not in excluded}


def _lm():
    model = TransformerLM(TransformerLMConfig(vocab_size=11, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2,
                                              d_ff=24, max_seq_len=8))
    return model, (torch.randint(0, 11, (1, 6), generator=torch.Generator().manual_seed(0)),), {}


def _moe():
    model = MoELM(MoEConfig(vocab_size=13, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, n_experts=3, top_k=2,
                            d_ff=8, max_seq_len=8, router_bias=True))
    return model, (torch.randint(0, 13, (1, 6), generator=torch.Generator().manual_seed(0)),), {}


def _cnn():
    model = PlainCNN(PlainCNNConfig())
    # a 4-D kernel's role has no default rule: symmetry_param_groups needs an override for them
    return model, (torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)),), {"conv*.weight": "adamw"}


def _llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=32, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    return model, ({"input_ids": ids, "use_cache": False},), {}


MODELS = {"transformer_lm": _lm, "moe_lm": _moe, "plain_cnn": _cnn, "hf_llama": _llama}


@pytest.fixture(params=list(MODELS), scope="module")
def found(request):
    torch.manual_seed(0)
    model, example, overrides = MODELS[request.param]()
    example = example[0] if len(example) == 1 else example
    return request.param, model, find_gauges(model, example, output="logits"), overrides


def test_muon_split_with_gauges_is_the_old_rule(found):
    key, model, gauges, _ = found
    hidden = muon_parameter_names(model, gauges)
    assert hidden == old_muon_parameter_names(model, gauges), key
    assert hidden  # every one of these models has hidden matrices


def test_both_readers_give_every_parameter_the_same_role(found):
    key, model, _, overrides = found
    roles = {row.name: row for row in parameter_roles(model)}
    rows = classify_parameters(model, overrides)
    assert [r.name for r in rows] == list(roles), key
    for row in rows:
        assert row.role == roles[row.name].role, (key, row.name)
        assert row.aliases == roles[row.name].aliases
        assert (row.source == "default") == roles[row.name].fallback or row.source.startswith("override")


def test_gauge_evidence_only_adds_head_input_and_output_layers(found):
    key, model, gauges, _ = found
    plain = {row.name: row.role for row in parameter_roles(model)}
    with_gauges = {row.name: row.role for row in parameter_roles(model, gauges=gauges)}
    assert set(plain) == set(with_gauges)
    changed = {name: (plain[name], role) for name, role in with_gauges.items() if role != plain[name]}
    assert all(role in (LM_HEAD, INPUT_LAYER, OUTPUT_LAYER) for _, role in changed.values()), (key, changed)
    for name in {f.weight for f in gauges if isinstance(f, LogitShift) and f.kind == "logit_shift"}:
        assert with_gauges[name] == LM_HEAD
    if key == "plain_cnn":
        assert with_gauges["conv1.weight"] == INPUT_LAYER and with_gauges["conv2.weight"] == CONV_KERNEL


def test_roles_are_the_vocabulary_and_the_hidden_roles_exclude_the_ends():
    assert set(ROLE_DEFAULTS) <= set(ROLES)
    assert set(ROLES) - set(ROLE_DEFAULTS) == {CONV_KERNEL, INPUT_LAYER, OUTPUT_LAYER}
    assert MUON_HIDDEN_ROLES <= set(ROLES)
    assert not {"embedding", "lm_head", "tied_embedding_head", INPUT_LAYER, OUTPUT_LAYER, MOE_EXPERT_TENSOR,
                "vector"} & MUON_HIDDEN_ROLES


def test_without_gauges_the_structural_lm_head_takes_adamw():
    model, _, _ = _lm()
    matrices = {n for n, p in model.named_parameters() if p.ndim == 2 and n != "embed.weight"}
    assert "head.weight" in old_muon_parameter_names(model)  # the old rule gave it Muon
    assert muon_parameter_names(model) == matrices - {"head.weight"}
    assert "head.weight" not in MuonWithAdamW(model, None).muon_names
    head = next(row for row in parameter_roles(model) if row.name == "head.weight")
    assert (head.role, head.muon_hidden) == (LM_HEAD, False)


class _Stray3D(nn.Module):
    """A 3-D tensor outside any MoE expert container (and no convolution's)."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(1, 4, 8))
        self.proj = nn.Linear(8, 8)


def test_an_unknown_three_d_tensor_has_no_role_and_is_an_error():
    model = _Stray3D()
    rows = {row.name: row for row in parameter_roles(model)}
    assert rows["table"].role is None and "3-D" in rows["table"].error
    assert rows["proj.weight"].role == "matrix" and rows["proj.weight"].fallback
    with pytest.raises(ValueError, match=r"table \(1, 4, 8\): a 3-D tensor outside an MoE expert container; "
                                         r"add an override"):
        classify_parameters(model)
    assert muon_parameter_names(model) == {"proj.weight"}


class _ExpertStack(nn.Module):
    def __init__(self, d: int = 6, f: int = 4, experts: int = 3):
        super().__init__()
        self.router = nn.Linear(d, experts, bias=False)
        self.experts = nn.Module()
        self.experts.gate_up = nn.Parameter(torch.randn(experts, 2 * f, d))
        self.experts.down = nn.Parameter(torch.randn(experts, d, f))


def test_three_d_expert_stacks_are_not_ddc_muon_hidden_matrices():
    roles = {row.name: row.role for row in parameter_roles(_ExpertStack())}
    assert roles == {"router.weight": "moe_router", "experts.gate_up": MOE_EXPERT_TENSOR,
                     "experts.down": MOE_EXPERT_TENSOR}
    assert muon_parameter_names(_ExpertStack()) == {"router.weight"} == old_muon_parameter_names(_ExpertStack())


def test_a_contradictory_module_raises_for_roles_but_not_for_the_muon_split():
    with pytest.raises(ValueError, match="not a multiple of 3 heads"):
        parameter_roles(BadHeads())
    assert muon_parameter_names(BadHeads()) == old_muon_parameter_names(BadHeads())


def test_frozen_parameters_keep_their_muon_split():
    model, _, _ = _lm()
    model.blocks[0].attn.q_proj.weight.requires_grad_(False)
    assert "blocks.0.attn.q_proj.weight" not in {row.name for row in parameter_roles(model)}
    assert "blocks.0.attn.q_proj.weight" in muon_parameter_names(model)
