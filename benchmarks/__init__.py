"""Benchmarks of gaugeopt's optimizers and of DDS against their peers, run with ``python -m benchmarks``.

``python -m benchmarks`` measures, side by side in one process, and writes ``docs/benchmarks.md`` and
``docs/benchmarks_step_time.png`` from what it measured (see :mod:`benchmarks.__main__`):

* :mod:`benchmarks.optimizer_steps`: optimizer step time and state memory on the reference language
  model (DDCAdam vs ``torch.optim.AdamW(foreach=True)``, DDCMuon vs Muon + AdamW, the layerwise
  ``SymmetryCompatible`` stack vs AdamW) and step time against parameter count;
* :mod:`benchmarks.dds_vs_llc`: one DDS reading against one devinterp LLC estimate per checkpoint;
* :mod:`benchmarks.report`: the markdown report and the plot.

Measurements run on their own: ``python -m benchmarks.muon_equivariance`` (DDCMuon's equivariance by
Newton-Schulz dtype and coefficients, docs/ddc_muon.md), ``python -m benchmarks.compiled`` (the
compiled steps as inductor builds them from a cold cache, docs/ddc.md), and the other modules with a
``__main__``.
"""
