"""Plug-ins for other libraries' training loops. Each module imports its library; import the one you use.

* :mod:`gaugeopt.integrations.hf`: Hugging Face ``transformers.Trainer``
  (``pip install gaugeopt[hf]``): :class:`~gaugeopt.integrations.hf.DeadDirectionCallback`, the dead-direction
  monitor (:mod:`gaugeopt.monitor`) logging through the Trainer's reporters.
* :mod:`gaugeopt.integrations.lightning`: Lightning (``pip install gaugeopt[lightning]``):
  :class:`~gaugeopt.integrations.lightning.DeadDirectionCallback`, the monitor logging through the
  Trainer's loggers.
"""
