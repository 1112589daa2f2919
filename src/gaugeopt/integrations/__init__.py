"""Integrations with training frameworks: :mod:`gaugeopt.integrations.hf` (the Hugging Face ``Trainer``).

``import gaugeopt`` does not import these modules, so the frameworks they serve stay optional.
"""
