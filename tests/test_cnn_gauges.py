"""Channel-scaling gauges of convolutional networks (docs/gauges.md, "Convolutional networks").

Discovery on a plain CNN (conv-ReLU-maxpool, conv-BatchNorm-ReLU, conv-ReLU-avgpool, flatten,
Linear-ReLU, Linear), a CIFAR ResNet-18 and small models that exercise one rule each; the claimed
gauges are checked against hand-written group actions (written here with plain tensor indexing, not
with the library's AxisRef) and by the function they leave unchanged (float64, train and eval mode);
DDCAdam and DDCMuon must be equivariant to 1e-10 over 30 steps with weight decay where AdamW fails.
"""

from __future__ import annotations

import copy
import functools
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gaugeopt
from gaugeopt import DDCAdam, DDCMuon
from gaugeopt.models import PlainCNN, PlainCNNConfig, ResNet18, ResNet18Config
from gaugeopt.testing import check_equivariance

STEPS = 30
EPS_REASON = "only up to eps"


# the warning of models built to lack some family (tests/test_discovery.py tests it)
MISSING_FAMILIES = r"ignore:find_gauges\(\w+\). (no gauge family|fewer families):UserWarning"


def _batches(shape: tuple[int, ...], classes: int, n: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, *shape, dtype=torch.float64, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    return [(x[i::4], y[i::4]) for i in range(4)]


@functools.cache
def _plain():
    torch.manual_seed(0)
    model = PlainCNN(PlainCNNConfig(widths=(4, 6, 5), hidden=7)).double()
    batches = _batches((1, 8, 8), 10)
    return model, gaugeopt.find_gauges(model, batches[0][0][:2], output="logits"), batches


@functools.cache
def _resnet():
    torch.manual_seed(0)
    model = ResNet18(ResNet18Config(widths=(4, 4, 6, 6), num_classes=5)).double()
    batches = _batches((3, 8, 8), 5)
    return model, gaugeopt.find_gauges(model, batches[0][0][:2], output="logits"), batches


MODELS = {"plain_cnn": _plain, "resnet18": _resnet}


def cross_entropy(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _log_probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(model(x), dim=-1)


def _scale_rows(t: torch.Tensor, a: torch.Tensor) -> None:
    t.mul_(a.reshape(-1, *[1] * (t.dim() - 1)))


def _divide_columns(t: torch.Tensor, a: torch.Tensor, block: int = 1) -> None:
    """Columns (axis 1) of ``t`` divided by ``a``, each entry of ``a`` owning ``block`` columns."""
    for c in range(len(a)):
        t[:, c * block:(c + 1) * block] /= a[c]


# --------------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------------


def test_plain_cnn_families_and_skipped():
    model, gauges, _ = _plain()
    found = {f.name: f for f in gauges}
    assert set(found) == {"channel_scale:conv1", "channel_scale:bn2", "channel_scale:conv3", "neuron_scale:fc1",
                          "logit_shift:fc2"}
    assert found["channel_scale:conv1"].parameters == ("conv1.weight", "conv1.bias", "conv2.weight")
    assert found["channel_scale:bn2"].parameters == ("bn2.weight", "bn2.bias", "conv3.weight")
    # conv3's channels reach fc1 through avgpool and flatten: each owns a block of 2 x 2 columns
    (block,) = found["channel_scale:conv3"].divided
    assert (block.name, block.axis, block.inner) == ("fc1.weight", 1, 4)
    (skip,) = gauges.skipped
    assert skip.site == "conv2" and "BatchNorm2d bn2" in skip.reason and EPS_REASON in skip.reason


def test_resnet18_discovery_is_fast_and_lists_every_conv():
    torch.manual_seed(0)
    model = ResNet18()
    start = time.perf_counter()
    gauges = gaugeopt.find_gauges(model, torch.randn(2, 3, 32, 32), output="logits")
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"find_gauges on ResNet-18 took {elapsed:.1f} s"
    kinds = [f.kind for f in gauges]
    # 8 blocks' inner BatchNorm, 4 residual streams, the classifier's logit shift
    assert kinds.count("channel_scale") == 12 and kinds.count("logit_shift") == 1
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert {s.site for s in gauges.skipped} == convs  # every conv feeds a BatchNorm
    assert all(EPS_REASON in s.reason for s in gauges.skipped)
    stream = gauges["channel_scale:layer2.0.bn2"]  # stage 2: the shortcut's norm and both blocks' last norm
    assert {r.name for r in stream.multiplied} == {
        "layer2.0.bn2.weight", "layer2.0.bn2.bias", "layer2.0.shortcut.1.weight", "layer2.0.shortcut.1.bias",
        "layer2.1.bn2.weight", "layer2.1.bn2.bias"}
    assert {r.name for r in stream.divided} == {"layer2.1.conv1.weight", "layer3.0.conv1.weight",
                                                "layer3.0.shortcut.0.weight"}
    assert {r.name for r in gauges["channel_scale:layer4.0.bn2"].divided} == {"layer4.1.conv1.weight", "fc.weight"}


class _Sequence(nn.Module):
    """``head(flatten(body(x)))`` for a body built from the modules given."""

    def __init__(self, *body: nn.Module, head: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*body)
        self.head = head

    def forward(self, x):
        return self.head(torch.flatten(self.body(x), 1))


class _Concatenation(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 3, 3, padding=1)
        self.c = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.c(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)).mean((2, 3))


class _InputResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.out = nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 3, 1)

    def forward(self, x):
        return self.out(F.relu(self.conv(x)) + x).mean((2, 3))


def _reasons(model: nn.Module, shape: tuple[int, ...]) -> dict[str, str]:
    gauges = gaugeopt.find_gauges(model.double(), torch.randn(2, *shape, dtype=torch.float64), output="logits")
    return {s.site: s.reason for s in gauges.skipped if s.family == "channel_scale"}


@pytest.mark.filterwarnings(MISSING_FAMILIES)
@pytest.mark.parametrize("model, shape, site, words", [
    (_Sequence(nn.Conv2d(2, 4, 3), nn.ReLU6(), nn.Conv2d(4, 3, 3), head=nn.Linear(12, 2)), (2, 6, 6), "body.0",
     "not positively homogeneous"),
    (_Sequence(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2), head=nn.Linear(16, 2)), (2, 6, 6), "body.0",
     "grouped convolution"),
    (_Sequence(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=4), head=nn.Linear(16, 2)), (2, 6, 6), "body.0",
     "depthwise"),
    (_Sequence(nn.Conv2d(2, 4, 3), nn.GELU(), nn.Conv2d(4, 3, 3), head=nn.Linear(12, 2)), (2, 6, 6), "body.0",
     "not known to commute"),
    (_Sequence(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.GroupNorm(2, 4), head=nn.Linear(64, 2)), (2, 6, 6), "body.0",
     "mix the 2 channels"),
    (_Concatenation(), (2, 5, 5), "a", "channel concatenation"),
    (_InputResidual(), (2, 5, 5), "conv", "model input"),
])
def test_candidates_left_out_with_reasons(model, shape, site, words):
    reasons = _reasons(model, shape)
    assert site in reasons and words in reasons[site], reasons


def test_grouped_producers_and_strided_dilated_convs_are_claimed():
    model = _Sequence(nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2, bias=False), nn.LeakyReLU(0.1),
                      nn.Conv1d(4, 6, 3, groups=2, padding=1, padding_mode="reflect"), nn.Dropout(0.0), nn.ReLU(),
                      nn.MaxPool1d(2), head=nn.Linear(12, 3)).double()
    gauges = gaugeopt.find_gauges(model, torch.randn(2, 3, 9, dtype=torch.float64), output="logits")
    assert {f.name for f in gauges if f.kind == "channel_scale"} == {"channel_scale:body.2"}  # the grouped conv's outputs
    assert "grouped convolution" in next(s.reason for s in gauges.skipped if s.site == "body.0")


# --------------------------------------------------------------------------------------------------
# The group action, by hand
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_plain_cnn_action_by_hand():
    """The sampled element applied with plain indexing equals GaugeSet.apply and leaves the log
    probabilities unchanged (train mode, batch statistics)."""
    model, gauges, batches = _plain()
    scalings = ["channel_scale:conv1", "channel_scale:bn2", "channel_scale:conv3", "neuron_scale:fc1"]
    element = gauges.sample(torch.Generator().manual_seed(3), families=scalings)
    a1, a2, a3, a4 = (element[name]["scale"] for name in scalings)
    by_hand = copy.deepcopy(model)
    _scale_rows(by_hand.conv1.weight, a1), _scale_rows(by_hand.conv1.bias, a1)
    _divide_columns(by_hand.conv2.weight, a1)
    _scale_rows(by_hand.bn2.weight, a2), _scale_rows(by_hand.bn2.bias, a2)
    _divide_columns(by_hand.conv3.weight, a2)
    _scale_rows(by_hand.conv3.weight, a3), _scale_rows(by_hand.conv3.bias, a3)
    _divide_columns(by_hand.fc1.weight, a3, block=4)  # 2 x 2 positions per channel after the pools
    _scale_rows(by_hand.fc1.weight, a4), _scale_rows(by_hand.fc1.bias, a4)
    _divide_columns(by_hand.fc2.weight, a4)
    by_library = copy.deepcopy(model)
    gauges.apply(by_library, element)
    for (name, p), q in zip(by_hand.named_parameters(), by_library.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-14, atol=0, msg=name)
    x = batches[0][0]
    for m in (model, by_hand):
        m.train()
    assert (_log_probs(by_hand, x) - _log_probs(model, x)).abs().max() < 1e-12


@torch.no_grad()
def test_resnet_residual_stream_by_hand():
    """Stage 1's stream: the stem norm and both blocks' last norms times a, every reader's columns
    divided by a; unchanged in train and in eval mode."""
    model, gauges, batches = _resnet()
    a = torch.exp(torch.randn(4, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    scaled = copy.deepcopy(model)
    for norm in (scaled.bn1, scaled.layer1[0].bn2, scaled.layer1[1].bn2):
        _scale_rows(norm.weight, a), _scale_rows(norm.bias, a)
    for conv in (scaled.layer1[0].conv1, scaled.layer1[1].conv1, scaled.layer2[0].conv1, scaled.layer2[0].shortcut[0]):
        _divide_columns(conv.weight, a)
    x = batches[0][0]
    for mode in (True, False):
        model.train(mode), scaled.train(mode)
        assert (_log_probs(scaled, x) - _log_probs(model, x)).abs().max() < 1e-12
    model.train()
    family = gauges["channel_scale:bn1"]
    assert {r.name for r in family.multiplied} == {"bn1.weight", "bn1.bias", "layer1.0.bn2.weight", "layer1.0.bn2.bias",
                                                   "layer1.1.bn2.weight", "layer1.1.bn2.bias"}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@torch.no_grad()
def test_sampled_gauges_leave_log_probabilities_unchanged(name, train):
    model, gauges, batches = MODELS[name]()
    moved = copy.deepcopy(model)
    gauges.apply(moved, gauges.sample(torch.Generator().manual_seed(7)))
    model.train(train), moved.train(train)
    try:
        x = batches[1][0]
        assert (_log_probs(moved, x) - _log_probs(model, x)).abs().max() < 1e-12
    finally:
        model.train()


# --------------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------------


OPTIMIZERS = {
    "DDCAdam": lambda m, g: DDCAdam(m.parameters(), g, lr=1e-2, weight_decay=0.1),
    "DDCMuon": lambda m, g: DDCMuon(m.parameters(), g, lr=0.02, weight_decay=0.1, adam_lr=1e-2),
}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_ddc_optimizers_are_equivariant(name, optimizer):
    model, gauges, batches = MODELS[name]()
    result = check_equivariance(OPTIMIZERS[optimizer], model, gauges, batches, cross_entropy, steps=STEPS)
    assert result.error <= 1e-10, f"{optimizer} on {name}: {result.error:.2e}"


@pytest.mark.parametrize("name", MODELS)
def test_adamw_is_not_equivariant(name):
    model, gauges, batches = MODELS[name]()
    make = lambda m, g: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)  # noqa: E731
    assert check_equivariance(make, model, gauges, batches, cross_entropy, steps=STEPS).error >= 1e-3


def test_flattened_pair_with_conv1d_is_equivariant():
    """An isolated pair whose consumer owns blocks of columns (Conv1d -> flatten -> Linear), stepped
    with the rebalancing onto the section."""
    torch.manual_seed(0)
    model = _Sequence(nn.Conv1d(2, 3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool1d(4), head=nn.Linear(12, 3)).double()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 2, 6, dtype=torch.float64, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    batches = [(x[i::4], y[i::4]) for i in range(4)]
    gauges = gaugeopt.find_gauges(model, x[:2], output="logits")
    assert gauges["channel_scale:body.0"].divided[0].inner == 4
    make = lambda m, g: DDCAdam(m.parameters(), g, lr=1e-2, weight_decay=0.1)  # noqa: E731
    assert check_equivariance(make, model, gauges, batches, cross_entropy, steps=STEPS).error <= 1e-10


def test_ddc_muon_steps_conv_kernels_as_matrices():
    model, gauges, _ = _plain()
    rules = {row.parameter: row.rule for row in DDCMuon(model.parameters(), gauges).split(print_table=False)}
    assert rules["conv2.weight"] == rules["conv3.weight"] == rules["fc1.weight"] == "muon"
    assert rules["conv1.weight"] == "adam"  # reads the input
