"""Reference models: shapes and known answers the experiments rely on."""

from __future__ import annotations

import pytest
import torch

from gaugeopt.models import ViT, ViTConfig


def test_vit_patches_square_images_in_raster_order_channel_major():
    model = ViT(ViTConfig(image_size=4, patch_size=2, channels=2))
    images = torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).reshape(2, 2, 4, 4)
    tokens = model.patchify(images)
    assert tokens.shape == (2, 4, 8) and model.config.num_patches == 4
    # patch (row 0, col 1) of image 1: channel 0's 2x2 block, then channel 1's
    assert torch.equal(tokens[1, 1], torch.cat((images[1, 0, :2, 2:].flatten(), images[1, 1, :2, 2:].flatten())))


def test_vit_takes_one_row_signals_with_one_row_patches():
    model = ViT(ViTConfig(image_size=(1, 40), patch_size=(1, 4), d_model=16, n_heads=2, d_ff=32))
    signals = torch.randn(3, 1, 1, 40)
    tokens = model.patchify(signals)
    assert tokens.shape == (3, 10, 4) and model.config.num_patches == 10
    assert torch.equal(tokens.reshape(3, 40), signals.reshape(3, 40))  # consecutive windows
    assert model(signals).shape == (3, 10)


def test_vit_rejects_patches_that_do_not_tile_the_image():
    with pytest.raises(ValueError, match="not divisible"):
        ViT(ViTConfig(image_size=(1, 40), patch_size=(1, 6)))
