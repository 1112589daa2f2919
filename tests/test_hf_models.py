"""Gauges and DDCAdam on Hugging Face ``transformers`` models built from tiny configs (random weights).

Per model: the discovered families (kinds, sites, group dimensions, parameters touched), the
invariance of the log-probabilities under each kind and their product (float64, 1e-10), and DDCAdam's
equivariance over 20 steps (``gaugeopt.testing.check_equivariance``, 1e-8). Skipped without the
``hf`` extra.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from gaugeopt import DDCAdam, DDCMuon, SymmetryCompatible, find_gauges, symmetry_param_groups  # noqa: E402
from gaugeopt.testing import check_equivariance  # noqa: E402

VOCAB, SEQ = 64, 8
# the warning of models built to lack some family (tests/test_discovery.py tests it)
MISSING_FAMILIES = r"ignore:find_gauges\(\w+\). (no gauge family|fewer families):UserWarning"
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=32)


def _layers(*names: str) -> set[str]:
    return {name.format(i=i) for name in names for i in range(2)}


DECODER_NORMS = ("norm_scale:model.layers.{i}.input_layernorm", "norm_scale:model.layers.{i}.post_attention_layernorm")
SWIGLU = ("neuron_scale:model.layers.{i}.mlp.up_proj",)
HEAD = {"norm_scale:model.norm", "logit_shift:lm_head"}

# name -> (model factory, expected family names, number of parameters touched, total group dimension)
MODELS = {
    # RMSNorm, SwiGLU, grouped-query attention with RoPE (one plane generator per frequency: 4 for head_dim 8)
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, tie_word_embeddings=False)),
              HEAD | _layers(*DECODER_NORMS, *SWIGLU, "qk_rotation:model.layers.{i}.self_attn",
                             "vo_rotation:model.layers.{i}.self_attn"),
              2 * 9 + 2, 32 + 32 + 2 * (32 + 32 + 48 + 2 * 4 + 2 * 28)),
    # as Llama, but q_norm/k_norm (per-dim RMSNorm gains inside each head) leave no query/key rotation
    "qwen3": (lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**COMMON, tie_word_embeddings=False)),
              HEAD | _layers(*DECODER_NORMS, *SWIGLU, "vo_rotation:model.layers.{i}.self_attn"),
              2 * 9 + 2, 32 + 32 + 2 * (32 + 32 + 48 + 2 * 28)),
    # (1 + w) norm gains and q/k norms: only the gated-GELU neurons and the value/output rotations;
    # embedding and head tied (the default), so no logit shift
    "gemma3": (lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**COMMON, sliding_window=4)),
               _layers(*SWIGLU, "vo_rotation:model.layers.{i}.self_attn"),
               2 * 4, 2 * (48 + 2 * 28)),
    # MoE (Mixtral: RoPE attention without q/k norms, so the query/key rotations stay). The experts
    # module loops over the experts the router picked (Python control flow on tensor values): it is
    # kept whole, so neither the router shift nor expert neuron scaling is claimed, and the norm
    # feeding the router and experts has no gauge either.
    "mixtral": (lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        **{**COMMON, "intermediate_size": 16}, num_local_experts=4, num_experts_per_tok=2,
        experts_implementation="eager", tie_word_embeddings=False)),
        HEAD | _layers(DECODER_NORMS[0], "qk_rotation:model.layers.{i}.self_attn",
                       "vo_rotation:model.layers.{i}.self_attn"),
        2 * 5 + 2, 32 + 32 + 2 * (32 + 2 * 4 + 2 * 28)),
    # LayerNorm into Conv1D (weights stored (in, out)), GELU MLP, fused qkv, tied embedding and head:
    # nothing is claimed, and every candidate is listed with its reason
    "gpt2": (lambda: _gpt2(), set(), 0, 0),
    # the same with its own head: the head's logit shift and the final LayerNorm's scaling come back
    "gpt2-untied": (lambda: _untie(_gpt2()), {"logit_shift:lm_head", "norm_scale:transformer.ln_f"}, 3, 32 + 32),
    # Llama's layout with constant multipliers: the embeddings, the residual branches and the attention
    # scores are scaled, and the logits divided by logits_scaling, which keeps the head's logit shift
    "granite": (lambda: transformers.GraniteForCausalLM(transformers.GraniteConfig(
        **COMMON, tie_word_embeddings=False, logits_scaling=4.0, embedding_multiplier=3.0, residual_multiplier=0.5,
        attention_multiplier=0.3)),
        HEAD | _layers(*DECODER_NORMS, *SWIGLU, "qk_rotation:model.layers.{i}.self_attn",
                       "vo_rotation:model.layers.{i}.self_attn"),
        2 * 9 + 2, 32 + 32 + 2 * (32 + 32 + 48 + 2 * 4 + 2 * 28)),
    # post-norm encoder with absolute positions, traced from input_ids alone (token_type_ids come from a
    # buffer): attention rotations of so(8) per head (biases rotate along), and the last LayerNorm, which
    # feeds the MLM transform alone; the decoder is tied to the word embeddings, so no logit shift
    "bert-mlm": (lambda: transformers.BertForMaskedLM(transformers.BertConfig(**COMMON)),
                 {"norm_scale:bert.encoder.layer.1.output.LayerNorm"} | _layers(
                     "qk_rotation:bert.encoder.layer.{i}.attention.self",
                     "vo_rotation:bert.encoder.layer.{i}.attention.self"),
                 3 + 2 * (4 + 3), 32 + 2 * 2 * 4 * 28),
}
WITH_GAUGES = [key for key, (_, expected, _, _) in MODELS.items() if expected]


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0))


def _untie(model):
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    return model


def _jitter(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights moved off their init (gains off 1, biases off 0) so no symmetry is trivial."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def _tokens(batch: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def _log_probs(model, ids):
    return model(input_ids=ids).logits.log_softmax(-1)


def _next_token_loss(model, ids):
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


_FOUND: dict = {}


def _found(key):
    """The model (float64, weights jittered) and its gauges, built once per test module."""
    if key not in _FOUND:
        make, expected, touched, dimension = MODELS[key]
        torch.manual_seed(0)
        model = _jitter(make().double().eval())
        with warnings.catch_warnings():  # GPT-2, Qwen3, Gemma3, BERT lack some family by design
            warnings.filterwarnings("ignore", r"find_gauges\(\w+\). (no gauge family|fewer families)", UserWarning)
            gauges = find_gauges(model, {"input_ids": _tokens(1, 0), "use_cache": False}, output="logits")
        _FOUND[key] = (key, model, gauges, expected, touched, dimension)
    return _FOUND[key]


@pytest.fixture(params=list(MODELS))
def hf_model(request):
    return _found(request.param)


@pytest.fixture(params=WITH_GAUGES)
def hf_model_with_gauges(request):
    return _found(request.param)


def test_gauge_summary(hf_model):
    key, _, gauges, expected, touched, dimension = hf_model
    rows = gauges.summary(print_table=False)
    assert {r.family + ":" + r.name.split(":", 1)[1] for r in rows} == expected, (key, str(rows))
    assert len(gauges.parameters_touched()) == touched, key
    assert sum(r.dimension for r in rows) == dimension, key


def test_log_probabilities_invariant_under_each_kind_and_product(hf_model_with_gauges):
    key, model, gauges, *_ = hf_model_with_gauges
    ids = _tokens(2, 1)
    before = _log_probs(model, ids)
    gen = torch.Generator().manual_seed(3)
    for kinds in [*gauges.kinds, None]:
        moved = copy.deepcopy(model)
        gauges.apply(moved, gauges.sample(gen, families=kinds, spread=1.0))
        change = max((a - b).abs().max().item() for a, b in zip(moved.parameters(), model.parameters()))
        assert change > 1e-3, (key, kinds)  # the element really moved the weights
        error = ((_log_probs(moved, ids) - before).norm() / before.norm()).item()
        assert error <= 1e-10, (key, kinds, error)


def test_ddc_adam_is_equivariant_over_20_steps(hf_model_with_gauges):
    key, model, gauges, *_ = hf_model_with_gauges
    batches = [_tokens(2, seed) for seed in range(4)]
    result = check_equivariance(lambda m, g: DDCAdam(m.parameters(), g, lr=1e-2, weight_decay=0.1),
                                model, gauges, batches, _next_token_loss, steps=20)
    assert result.displacement > 1e-2, key
    assert result.error <= 1e-8, (key, result.error, result.worst_parameter)


def test_adamw_fails_the_same_equivariance_check():
    _, model, gauges, *_ = _found("llama")
    batches = [_tokens(2, seed) for seed in range(4)]
    result = check_equivariance(lambda m, g: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
                                model, gauges, batches, _next_token_loss, steps=20)
    assert result.error > 1e-3


@pytest.mark.parametrize("key", ["llama", "mixtral"])
def test_ddc_muon_is_equivariant_over_20_steps(key):
    _, model, gauges, *_ = _found(key)
    batches = [_tokens(2, seed) for seed in range(4)]
    result = check_equivariance(lambda m, g: DDCMuon(m.named_parameters(), g, lr=1e-2, adam_lr=1e-2, ns_dtype=None),
                                model, gauges, batches, _next_token_loss, steps=20)
    assert result.displacement > 1e-2, key
    assert result.error <= 1e-8, (key, result.error, result.worst_parameter)


@pytest.mark.parametrize("optimizer", ["DDCAdam", "DDCMuon"])
def test_parameters_held_in_one_buffer_train_a_llama_as_before_and_save_pretrained_reloads(optimizer, tmp_path):
    """``stack_parameters=True`` on a Hugging Face Llama: the same trajectory bit for bit as the
    default over 3 steps (DDCMuon at its bfloat16 default), the parameters the option moved share a
    buffer, and ``save_pretrained`` / ``from_pretrained`` give back exactly the trained weights."""
    _, template, gauges, *_ = _found("llama")
    make = {"DDCAdam": lambda m, g, **kw: DDCAdam(m.parameters(), g, lr=1e-2, weight_decay=0.1, **kw),
            "DDCMuon": lambda m, g, **kw: DDCMuon(m.parameters(), g, lr=1e-2, adam_lr=1e-2, **kw)}[optimizer]
    runs = []
    for held in (False, True):
        model = copy.deepcopy(template)
        opt = make(model, gauges.bind(model), stack_parameters=held)
        for seed in range(3):
            opt.zero_grad()
            _next_token_loss(model, _tokens(2, seed)).backward()
            opt.step()
        runs.append(model)
    plain, held = runs
    for (name, p), q in zip(plain.named_parameters(), held.parameters()):
        assert torch.equal(p, q), name
    ups = [layer.mlp.up_proj.weight for layer in held.model.layers]
    assert len({p.untyped_storage().data_ptr() for p in ups}) == 1
    held.save_pretrained(tmp_path)
    loaded = type(held).from_pretrained(tmp_path, dtype=torch.float64)
    for (name, p), q in zip(held.named_parameters(), loaded.parameters()):
        assert torch.equal(p, q), name


SYMMETRY_ROLES = {
    "llama": {"embedding", "attention_qkv", "attention_out", "swiglu_gate_up", "swiglu_down", "vector", "lm_head"},
    "qwen3": {"embedding", "attention_qkv", "attention_out", "swiglu_gate_up", "swiglu_down", "vector", "lm_head"},
    "gemma3": {"tied_embedding_head", "attention_qkv", "attention_out", "swiglu_gate_up", "swiglu_down", "vector"},
    # Conv1D and the fused c_attn are plain matrices to it (whole-matrix Muon)
    "gpt2": {"tied_embedding_head", "embedding", "vector", "matrix"},
    # transformers 5 stacks the experts into 3-D tensors; the router is a module with a bare weight
    "mixtral": {"embedding", "attention_qkv", "attention_out", "moe_router", "moe_expert_tensor", "vector", "lm_head"},
}


@pytest.mark.parametrize("key", list(SYMMETRY_ROLES))
def test_symmetry_param_groups_cover_the_model_and_step(key):
    _, model, *_ = _found(key)
    model = copy.deepcopy(model)
    groups = symmetry_param_groups(model, verbose=False)
    assert {g["role"] for g in groups} == SYMMETRY_ROLES[key]
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = SymmetryCompatible(groups)
    _next_token_loss(model, _tokens(2, 1)).backward()
    optimizer.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()) if p.grad is not None)


def test_gpt2_tied_head_carries_no_logit_shift_and_the_summary_says_so(capsys):
    _, model, gauges, *_ = _found("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "logit_shift" not in gauges.kinds
    reasons = {(s.family, s.site): s.reason for s in gauges.skipped}
    assert "tied" in reasons[("logit_shift", "lm_head")]
    assert "tied" in reasons[("norm_scale", "transformer.ln_f")]  # its consumer is the tied head
    assert "Conv1D" in reasons[("norm_scale", "transformer.h.0.ln_1")]
    gauges.summary(show_skipped=True)
    printed = capsys.readouterr().out
    assert "logit_shift" in printed and "transformer.wte.weight is tied" in printed


def test_mixtral_experts_are_kept_whole_with_a_reason():
    _, _, gauges, *_ = _found("mixtral")
    reasons = {s.site: s.reason for s in gauges.skipped if s.family == "all"}
    assert set(reasons) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    assert all("tensor values" in r for r in reasons.values())
    assert not any("experts" in p or "gate" in p for p in gauges.parameters_touched())


@pytest.mark.filterwarnings(MISSING_FAMILIES)
def test_data_dependent_control_flow_at_the_top_keeps_the_model_whole():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 4)

        def forward(self, x):
            y = self.layer(x)
            return y if y.sum() > 0 else -y

    gauges = find_gauges(Branchy(), torch.randn(2, 4))
    assert len(gauges) == 0
    assert [(s.site, s.family) for s in gauges.skipped] == [("Branchy", "all")]
    assert "tensor values" in gauges.skipped[0].reason


@pytest.mark.filterwarnings(MISSING_FAMILIES)
@pytest.mark.parametrize("training", [False, True])
def test_discovery_leaves_every_module_in_its_mode(training):
    model = MODELS["gpt2"][0]().double().train(training)  # GPT-2 has dropout: a mode change would show
    find_gauges(model, {"input_ids": _tokens(1, 0), "use_cache": False}, output="logits")
    assert all(m.training == training for m in model.modules())


def test_eager_attention_gives_the_same_families_as_sdpa():
    config = transformers.LlamaConfig(**COMMON, tie_word_embeddings=False, attn_implementation="eager")
    model = _jitter(transformers.LlamaForCausalLM(config).double().eval())
    gauges = find_gauges(model, {"input_ids": _tokens(1, 0), "use_cache": False}, output="logits")
    assert {f.name for f in gauges} == MODELS["llama"][1]


def test_granite_keeps_the_logit_shift_through_logits_scaling():
    _, model, gauges, *_ = _found("granite")
    assert model.config.logits_scaling == 4.0
    ids = _tokens(2, 1)
    before = _log_probs(model, ids)
    moved = copy.deepcopy(model)
    with torch.no_grad():  # add one vector v to every row of the head: each logit moves by <v, h> / 4
        moved.lm_head.weight += torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0),
                                            dtype=torch.float64)
    assert (moved(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() > 1e-2
    assert (_log_probs(moved, ids) - before).abs().max() < 1e-12
    assert "logit_shift" in gauges.kinds and gauges["logit_shift:lm_head"].dim == model.config.hidden_size


@pytest.mark.filterwarnings(MISSING_FAMILIES)
def test_a_logit_shift_that_does_not_survive_is_listed_with_its_reason():
    """Soft-capped logits (cap * tanh(z / cap), as in Gemma 2) do change under the shift: the head's
    logit_shift is left out, and the skipped list says where the shift is seen."""

    class SoftCapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, tie_word_embeddings=False))

        def forward(self, input_ids):
            return 30.0 * torch.tanh(self.inner(input_ids=input_ids, use_cache=False).logits / 30.0)

    gauges = find_gauges(SoftCapped().double(), _tokens(1, 0), output="logits")
    assert "logit_shift" not in gauges.kinds
    reasons = {(s.family, s.site): s.reason for s in gauges.skipped}
    assert "tanh" in reasons[("logit_shift", "inner.lm_head")]


@pytest.mark.filterwarnings(MISSING_FAMILIES)
def test_bert_traces_from_input_ids_alone_as_with_token_type_ids():
    _, model, gauges, *_ = _found("bert-mlm")
    ids = _tokens(1, 0)
    with_types = find_gauges(model, {"input_ids": ids, "token_type_ids": torch.zeros_like(ids)}, output="logits")
    assert [f.name for f in with_types] == [f.name for f in gauges]
    assert find_gauges(model, {"input_ids": ids}, output="logits").skipped == gauges.skipped


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_llama_gets_exactly_the_float32_families(dtype):
    """Discovery reads a float64 copy: the norms keep their gains' action and the query/key rotations
    their dimension (one plane per RoPE frequency, 4 per kv head), whatever the model's precision."""
    torch.manual_seed(0)
    model32 = _jitter(MODELS["llama"][0]().eval())
    example = {"input_ids": _tokens(1, 0), "use_cache": False}

    def signature(gauges):
        return [(f.name, f.dim, f.parameters, getattr(f, "blocks", None)) for f in gauges]

    expected = signature(find_gauges(model32, example, output="logits"))
    assert {name for name, *_ in expected} == MODELS["llama"][1]
    half = copy.deepcopy(model32).to(dtype)
    gauges = find_gauges(half, example, output="logits")
    assert signature(gauges) == expected
    assert gauges["qk_rotation:model.layers.0.self_attn"].algebra.shape[0] == 4
    assert gauges.model is half and next(half.parameters()).dtype == dtype


def test_gpt2_with_no_family_at_all_warns_once_with_the_reasons():
    _, model, *_ = _found("gpt2")
    with pytest.warns(UserWarning, match=r"find_gauges\(GPT2LMHeadModel\): no gauge family found.*"
                                         r"fused qkv is not analysed.*transformer.wte.weight is tied") as record:
        gauges = find_gauges(model, {"input_ids": _tokens(1, 0), "use_cache": False}, output="logits")
    assert len(gauges) == 0 and len(record) == 1 and gauges.notes[-1] in str(record[0].message)


def test_qwen3_query_key_norms_leave_no_query_key_rotation_and_a_warning_says_so():
    _, model, *_ = _found("qwen3")
    with pytest.warns(UserWarning, match=r"fewer families than the model's structure suggests: no qk_rotation at "
                                         r"any of the 2 attentions \(.*not linear per position") as record:
        gauges = find_gauges(model, {"input_ids": _tokens(1, 0), "use_cache": False}, output="logits")
    assert len(record) == 1 and "vo_rotation" in gauges.kinds
