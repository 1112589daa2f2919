"""Gauges and DDCAdam on timm's ``vit_tiny_patch16_224`` (random weights, 32 x 32 images, 2 blocks).

Skipped where ``timm`` cannot be imported: it imports ``torchvision``, whose Linux wheels on PyPI are
built against the CUDA build of torch and do not load beside the CPU build pinned for development.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

try:
    import timm
except Exception as err:  # noqa: BLE001 - ImportError, or torchvision's ops failing to load
    pytest.skip(f"timm cannot be imported here ({type(err).__name__}: {err})", allow_module_level=True)

from gaugeopt import DDCAdam, find_gauges  # noqa: E402
from gaugeopt.testing import check_equivariance  # noqa: E402

CLASSES = 10


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    # the vit_tiny_patch16_224 architecture (width 192, 3 heads) with 2 of its 12 blocks, on 32 x 32 images
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2,
                              num_classes=CLASSES).double().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    images = torch.randn(1, 3, 32, 32, generator=gen, dtype=torch.float64)
    return model, find_gauges(model, images, output="logits")


def _images(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_gauge_summary(vit):
    _, gauges = vit
    expected = {"logit_shift:head", "norm_scale:norm"} | {
        f"norm_scale:blocks.{i}.{norm}" for i in range(2) for norm in ("norm1", "norm2")}
    assert {f.name for f in gauges} == expected
    assert sum(f.dim for f in gauges) == 5 * 192 + 192 + 1  # the head has a bias
    # norms: 5 gains + 5 biases; consumers: 2 qkv, 2 fc1, the head (weight and, for its shift, bias)
    assert len(gauges.parameters_touched()) == 16
    reasons = {(s.family, s.site): s.reason for s in gauges.skipped}
    assert any("fused qkv" in r for r in reasons.values())  # one qkv Linear: no head rotations claimed
    assert "mlp.act" in reasons[("neuron_scale", "blocks.0.mlp.fc1")]  # nn.GELU stops the neuron scaling


def test_logits_invariant_under_each_kind_and_product(vit):
    model, gauges = vit
    x = _images(2, 1)
    before = model(x).log_softmax(-1)
    gen = torch.Generator().manual_seed(3)
    for kinds in [*gauges.kinds, None]:
        moved = copy.deepcopy(model)
        gauges.apply(moved, gauges.sample(gen, families=kinds, spread=1.0))
        assert max((a - b).abs().max().item() for a, b in zip(moved.parameters(), model.parameters())) > 1e-3
        error = ((moved(x).log_softmax(-1) - before).norm() / before.norm()).item()
        assert error <= 1e-10, (kinds, error)


def test_ddc_adam_is_equivariant_over_20_steps(vit):
    model, gauges = vit
    labels = torch.randint(0, CLASSES, (2,), generator=torch.Generator().manual_seed(0))
    batches = [(_images(2, seed), labels) for seed in range(4)]
    result = check_equivariance(lambda m, g: DDCAdam(m.parameters(), g, lr=1e-2, weight_decay=0.1), model, gauges,
                                batches, lambda m, b: F.cross_entropy(m(b[0]), b[1]), steps=20)
    assert result.displacement > 1e-2
    assert result.error <= 1e-8, (result.error, result.worst_parameter)
