"""Discovery at scale and in any precision.

- The answers of the algorithm before the probes were confined to the sub-graph from each projection
  to its attention input (``tests/data/discovery_reference.json``) are reproduced in every detail.
- Layers built alike are measured once; a layer unlike the analysed ones is analysed in full, and
  every family it gets is a symmetry.
- A probe whose sub-graph writes into a tensor computed outside it, or reads one overwritten later,
  runs the whole graph.
- The rotation algebra matches the known commutant of positional maps with repeated, close and
  zero frequencies.
- Half-precision and float32 models are analysed in float64 on a copy and get the float64 families,
  bound to the model as given, which discovery leaves untouched.
- A model on which no family (or no family of a kind its structure offers) is found says so.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import discovery_reference as reference
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gaugeopt import find_gauges
from gaugeopt.gauges import discovery
from gaugeopt.models import TransformerLM, TransformerLMConfig
from gaugeopt.models.blocks import RotaryEmbedding

TOL = 1e-10
ANSWERS = json.loads((Path(__file__).parent / "data" / "discovery_reference.json").read_text())


def _assert_same_answer(found: dict, expected: dict) -> None:
    assert [f["name"] for f in found["families"]] == [f["name"] for f in expected["families"]]
    for got, want in zip(found["families"], expected["families"]):
        got, want = dict(got), dict(want)
        assert got.pop("span", [0.0]) == pytest.approx(want.pop("span", [0.0]), abs=1e-9), got["name"]
        assert got == want, got["name"]
    for key in ("skipped", "input_layers", "output_layers"):
        assert found[key] == expected[key], key


@pytest.mark.parametrize("key", list(reference.LM_CONFIGS))
def test_reference_models_get_the_answers_of_the_whole_model_probes(key):
    _assert_same_answer(reference.signature(reference.discover(key)[2]), ANSWERS[key])


@pytest.mark.parametrize("key", list(reference.HF_CONFIGS))
def test_transformers_models_get_the_answers_of_the_whole_model_probes(key):
    pytest.importorskip("transformers")
    _assert_same_answer(reference.signature(reference.discover(key)[2]), ANSWERS[key])


# --------------------------------------------------------------------------------------------------
# One analysis per layer structure
# --------------------------------------------------------------------------------------------------


def _lm(**kw) -> TransformerLM:
    torch.manual_seed(0)
    base = dict(vocab_size=11, d_model=32, n_heads=2, n_layers=3, d_ff=24, max_seq_len=8)
    model = TransformerLM(TransformerLMConfig(**{**base, **kw})).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def _tokens(batch=1, seq=8, vocab=11):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


def _counting_basis_probes(monkeypatch) -> list[str]:
    """Record the projection each basis measurement (one probe per channel) is made for."""
    measured: list[str] = []
    original = discovery._Graph.basis_responses

    def counted(self, source, sink):
        measured.append(source.target)
        return original(self, source, sink)

    monkeypatch.setattr(discovery._Graph, "basis_responses", counted)
    return measured


def _assert_every_family_is_a_symmetry(model, gauges, x):
    before = model(x).log_softmax(-1)
    gen = torch.Generator().manual_seed(0)
    for family in gauges:
        moved = copy.deepcopy(model)
        gauges.apply(moved, gauges.sample(gen, families=family.name, spread=1.0))
        change = ((moved(x).log_softmax(-1) - before).norm() / before.norm()).item()
        assert change <= TOL, (family.name, change)


@pytest.mark.parametrize("kv_heads", [None, 1])
def test_layers_built_alike_are_measured_once_whatever_the_depth(monkeypatch, kv_heads):
    measured, counts = _counting_basis_probes(monkeypatch), {}
    for layers in (1, 4):
        gauges = find_gauges(_lm(n_layers=layers, n_kv_heads=kv_heads), _tokens(), output="logits")
        assert {f.kind for f in gauges} >= {"qk_rotation", "vo_rotation"}
        counts[layers] = list(measured)
        measured.clear()
    # query and value (and with fewer kv heads, the key: its output has another width), in layer 0 only
    assert counts[4] == counts[1] == (["blocks.0.attn.q_proj", "blocks.0.attn.v_proj"] if kv_heads is None else
                                      ["blocks.0.attn.q_proj", "blocks.0.attn.k_proj", "blocks.0.attn.v_proj"])


def test_a_layer_unlike_the_analysed_ones_is_analysed_in_full(monkeypatch):
    """Layer 1 has no RoPE and layer 2 rotates half of each head: their random probes do not match
    layer 0's maps, so they are measured and get their own algebras (not layer 0's)."""
    model = _lm()
    head_dim = 16
    model.blocks[1].attn.rotary = None
    model.blocks[2].attn.rotary = RotaryEmbedding(head_dim, head_dim // 2, base=100.0).double()
    x = _tokens()
    measured = _counting_basis_probes(monkeypatch)
    gauges = find_gauges(model, x, output="logits")
    generators = [gauges[f"qk_rotation:blocks.{i}.attn"].algebra.shape[0] for i in range(3)]
    # planes of full RoPE; all of so(16) without; 4 planes and so(8) on the rest with half of the dims rotating
    assert generators == [head_dim // 2, head_dim * (head_dim - 1) // 2, head_dim // 4 + 8 * 7 // 2]
    # layer 1's query and key maps are the identity, which layer 0's value map is: nothing new to measure
    assert measured == ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj", "blocks.2.attn.q_proj"]
    _assert_every_family_is_a_symmetry(model, gauges, _tokens(batch=2))


# --------------------------------------------------------------------------------------------------
# Probes that cannot run on the recorded values
# --------------------------------------------------------------------------------------------------


class _PositionScaledAttention(nn.Module):
    """Tokens -> attention -> logits, the query scaled per position by a copy of a buffer: out of
    place, in place into the copy (``scale.mul_(q)``: the probe's sub-graph writes into a tensor
    computed outside it), or out of place with the copy zeroed in place after use (the recorded
    value of the copy is not the one the query read)."""

    def __init__(self, mode: str, vocab=11, d=16, heads=2, seq=8):
        super().__init__()
        self.mode, self.heads = mode, heads
        self.embed = nn.Embedding(vocab, d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.head = nn.Linear(d, vocab)
        self.register_buffer("position_scale", torch.linspace(0.5, 2.0, seq).reshape(1, 1, seq, 1))

    def forward(self, tokens):
        x = self.embed(tokens)
        b, t, d = x.shape

        def split(y):
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scale = self.position_scale[:, :, :t].expand(q.shape).clone()
        q = scale.mul_(q) if self.mode == "in place" else scale * q
        if self.mode == "overwritten later":
            scale.zero_()
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(self.o(y.transpose(1, 2).reshape(b, t, d)))


@pytest.mark.parametrize("mode", ["in place", "overwritten later"])
def test_a_probe_that_cannot_start_from_the_recorded_values_runs_the_whole_graph(mode):
    answers = {}
    for variant in ("out of place", mode):
        torch.manual_seed(0)
        model = _PositionScaledAttention(variant).double()
        x = _tokens()
        before = model(x)
        gauges = find_gauges(model, x, output="logits")
        answers[variant] = [(f.name, f.dim) for f in gauges]
        assert torch.equal(model(x), before)  # the probes did not write into the model's tensors
        _assert_every_family_is_a_symmetry(model, gauges, _tokens(batch=2))
    assert answers[mode] == answers["out of place"]
    # a scalar per position commutes with every rotation of a head: all of so(8) per head
    assert ("qk_rotation", 2 * 28) in [(name.split(":")[0], dim) for name, dim in answers[mode]]


# --------------------------------------------------------------------------------------------------
# The rotation algebra: known commutants
# --------------------------------------------------------------------------------------------------


@st.composite
def _positional_maps(draw):
    """Relative rotations R(theta_j (n - m)) in planes grouped by frequency (groups of equal
    frequency; neighbouring groups 1e-6 or 0.3 apart), a fixed block of size ``rest`` (frequency 0),
    all conjugated by a random orthogonal matrix; and the dimension of their commutant in so(d):
    u(m) (dimension m^2) for m planes of one frequency, so(rest) on the fixed block."""
    sizes = draw(st.lists(st.integers(1, 2), min_size=1, max_size=3))
    gaps = draw(st.lists(st.sampled_from([1e-6, 0.3]), min_size=len(sizes), max_size=len(sizes)))
    rest = draw(st.integers(0, 3))
    seed = draw(st.integers(0, 2**16))
    frequencies = [0.2 + sum(gaps[: i + 1]) for i in range(len(sizes))]
    d = 2 * sum(sizes) + rest
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    pairs = []
    for delta in range(-7, 8):
        rotation = torch.eye(d, dtype=torch.float64)
        start = 0
        for size, theta in zip(sizes, frequencies):
            c, s = math.cos(theta * delta), math.sin(theta * delta)
            for _ in range(size):
                rotation[start:start + 2, start:start + 2] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
                start += 2
        pairs.append(q @ rotation @ q.T)
    return torch.stack(pairs), d, sum(m * m for m in sizes) + rest * (rest - 1) // 2


@settings(max_examples=25, deadline=None)
@given(maps=_positional_maps())
def test_the_rotation_algebra_is_the_known_commutant(maps):
    pairs, d, expected = maps
    algebra = discovery._commutant_algebra(pairs, d)
    assert algebra.shape[0] == expected
    gram = algebra.reshape(len(algebra), -1) @ algebra.reshape(len(algebra), -1).T
    assert torch.allclose(gram, torch.eye(len(algebra), dtype=torch.float64), atol=1e-12)  # orthonormal
    assert torch.allclose(algebra, -algebra.transpose(1, 2), atol=1e-14)
    for a in pairs:
        assert (a @ algebra - algebra @ a).abs().max() <= 1e-11


# --------------------------------------------------------------------------------------------------
# Precision: the analysis runs in float64
# --------------------------------------------------------------------------------------------------


def _signature(gauges):
    return [(f.name, f.dim, f.parameters, getattr(f, "blocks", None)) for f in gauges]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_gets_the_float32_families_bound_to_it(dtype):
    model32 = _lm(n_kv_heads=1, rope="partial").float()
    model = copy.deepcopy(model32).to(dtype).train()
    x = _tokens()
    expected = _signature(find_gauges(model32, x, output="logits"))
    state = {name: p.detach().clone() for name, p in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every norm keeps its family: nothing to warn about
        gauges = find_gauges(model, x, output="logits")
    assert _signature(gauges) == expected and len(expected) == 5 * 3 + 2  # 2 norms, SwiGLU, qk, vo per layer
    assert gauges.model is model and all(m.training for m in model.modules())
    assert all(torch.equal(p, state[name]) and p.dtype == state[name].dtype for name, p in model.state_dict().items())
    element = gauges.sample(torch.Generator().manual_seed(0))
    gauges.apply(model, element)  # acts on the half-precision parameters themselves
    assert next(model.parameters()).dtype == dtype
    assert not torch.equal(model.blocks[0].norm1.weight, state["blocks.0.norm1.weight"])


@pytest.mark.parametrize("rope", ["full", "partial"])
def test_a_float32_model_with_slow_rope_gets_only_true_symmetries(rope):
    """theta 1e6 over 8 positions: generators mixing the slowest planes commute with the positional
    maps to ~1e-9, which float32 arithmetic cannot tell from 0 (analysed in float32 they were claimed,
    and moved the log-probabilities by ~1e-3). Analysed in float64, the float32 model gets the
    families of its float64 copy, each a symmetry."""
    model32 = _lm(rope=rope, rope_base=1e6).float()
    model64 = copy.deepcopy(model32).double()
    x = _tokens()
    gauges = find_gauges(model32, x, output="logits")
    assert _signature(gauges) == _signature(find_gauges(model64, x, output="logits"))
    _assert_every_family_is_a_symmetry(model64, gauges.bind(model64), _tokens(batch=2))


# --------------------------------------------------------------------------------------------------
# Saying when families are missing
# --------------------------------------------------------------------------------------------------


def test_finding_no_family_warns_and_says_what_to_try():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.GELU(), nn.Linear(8, 3)).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    with pytest.warns(UserWarning, match=r"no gauge family found.*output='logits'") as record:
        gauges = find_gauges(model, x)
    assert len(gauges) == 0 and len(record) == 1
    assert gauges.notes and gauges.notes[-1] in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # declared logits: the output layer's shift is found, nothing to say
        assert find_gauges(model, x, output="logits").kinds == ("logit_shift",)


def test_a_kind_missing_at_every_site_its_structure_offers_warns():
    """Post-norm blocks: every block norm feeds the residual stream, but the final norm feeds the head,
    so norm scaling is found (no warning); with a tied head the final norm's family goes too."""
    model = _lm(post_norm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "norm_scale" in find_gauges(model, _tokens(), output="logits").kinds
    model.head.weight = model.embed.weight
    with pytest.warns(UserWarning, match=r"fewer families than the model's structure suggests: no norm_scale at "
                                         r"any of the 7 norms \(add_\d+ adds it to a tensor that is not scaled alike "
                                         r"\(residual stream\?\) \(and 4 alike\);.*\); no logit_shift at the one "
                                         r"output layer \(parameter embed.weight is tied"):
        gauges = find_gauges(model, _tokens(), output="logits")
    assert "norm_scale" not in gauges.kinds and "qk_rotation" in gauges.kinds


# --------------------------------------------------------------------------------------------------
# The benchmark's code paths (the timings themselves are the benchmark's business)
# --------------------------------------------------------------------------------------------------


def test_the_discovery_benchmark_checks_its_known_answers_and_runs_the_llama_path(tmp_path):
    pytest.importorskip("transformers")
    from benchmarks.discovery import expected_lm_families, lm_config, main

    assert sum(expected_lm_families(lm_config(768, 12)).values()) == 351744  # the model: 62 families
    assert main(["--widths", "64", "--depths", "2", "--width-for-depths", "64", "--layers-for-widths", "2",
                 "--llama", "tiny", "--llama-dtype", "bfloat16", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "discovery.json").read_text())
    assert [(r["width"], r["layers"], r["families"]) for r in results["lm"]] == [(64, 2, 12)]
    llama = results["llama"]
    assert llama["tiny_same_on_cpu"] and llama["kinds"] == {"norm_scale": 4, "neuron_scale": 2, "qk_rotation": 2,
                                                            "vo_rotation": 2}
    assert f"{llama['wall_s']:.1f} s" in (tmp_path / "discovery.md").read_text()
