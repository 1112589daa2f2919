"""Plug-ins for other libraries' training loops. Each module imports its library; import the one you use
(``import gaugeopt`` imports none of them, so the frameworks stay optional).

* :mod:`gaugeopt.integrations.hf`: Hugging Face ``transformers.Trainer`` (``pip install gaugeopt[hf]``):
  :func:`~gaugeopt.integrations.hf.optimizer_cls_and_kwargs`, a gaugeopt optimizer in one argument, and
  :class:`~gaugeopt.integrations.hf.DeadDirectionCallback`, the dead-direction monitor
  (:mod:`gaugeopt.monitor`) logging through the Trainer's reporters.
* :mod:`gaugeopt.integrations.lightning`: Lightning (``pip install gaugeopt[lightning]``):
  :class:`~gaugeopt.integrations.lightning.DeadDirectionCallback`, the monitor logging through the
  Trainer's loggers.
"""
