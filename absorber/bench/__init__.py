"""Benchmarks and peers: measurements OF the project, kept out of the method package.

One module per job, each runnable as ``python -m absorber.bench.<module>``:

- ``speed``: absorption and decode speed, phases and peak RSS of the runtime vs the PyTorch reference, each
  measurement in its own process (the engine of ``absorber bench``).
- ``plot``: the RSS-against-tokens plot of ``absorber bench --plot``.
- ``optimum_peer``: decode speed vs optimum-onnx's ``ORTModelForCausalLM`` in its own venv
  (``absorber bench --optimum``).
- ``export_quality``: sizes, logit and gradient error of fp32/int8/int4 bundles vs torch (benchmarks/export.md).
- ``calibrate``: the memory planner's prediction vs the measured peak RSS of one round of the real runtime
  (benchmarks/planner.md).

Dependency rule: the method (``absorber``), ``absorber.export``, ``absorber.runtime`` and ``absorber.devices``
never import ``absorber.bench``; only the CLI verb (``absorber/commands/bench.py``) and ``benchmarks/scripts/``
do. Bench code reads bundle manifests through ``absorber.runtime.bundle.open_bundle`` (the ``Bundle`` class).
"""
