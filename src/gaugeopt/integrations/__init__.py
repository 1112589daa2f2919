"""Integrations with training frameworks: :mod:`gaugeopt.integrations.hf` (the Hugging Face ``Trainer``).

Each module imports its framework when it is imported itself, so ``import gaugeopt`` never needs them.
"""
