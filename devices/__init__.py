"""Devices: the API the runtime (`absorber.runtime`) uses to open ONNX Runtime sessions on a device.

Stable API (imports onnxruntime, numpy, psutil and the standard library only; never torch):

- ``Profile`` (dataclass) and the shipped profiles (``profiles.json``: laptop-cpu, edge-arm, tiny, cuda):
  ``get_profile(name_or_json_path)``, ``list_profiles()``, ``default_profile()`` (picked from this machine).
- ``resolve_providers(device="auto", available=None) -> list[str]``: auto|cpu|cuda[:i]|tensorrt|dml|coreml|
  openvino|qnn|xnnpack|rocm -> ordered ORT providers ending with CPUExecutionProvider; a named device this
  onnxruntime build lacks raises AbsorberError (one line, with what to install).
- ``provider_options(device, profile, available=None) -> list[dict]`` aligned with that list.
- ``session_options(profile=None, extra_config=None) -> onnxruntime.SessionOptions`` (threads, arena, graph
  optimization level, session config entries; ``extra_config``, e.g. from a bundle manifest, wins).
- ``session_kwargs(profile, device, extra_config)`` -> {sess_options, providers, provider_options} for
  ``onnxruntime.InferenceSession(path, **kwargs)``.
- Memory planner: ``predict(bundle, n, m, k) -> Prediction`` (peak RSS, term by term),
  ``plan(bundle, budget_bytes, k)``, ``choose_window(bundle, budget_bytes, k) -> (n, m)``,
  ``parse_size("1.5GB") -> bytes``; `bundle` is an ``absorber.bundle_format.Bundle`` (``load_bundle(folder)``).
- ``describe()``: the facts `absorber devices` prints.

CLI: ``absorber devices [--json]`` (command.py), ``absorber plan BUNDLE --memory-budget 1GB`` (plan_command.py).
Calibration of the planner (measures the runtime; lives with the benchmarks, which this package never imports):
``python -m absorber.bench.calibrate BUNDLE`` (benchmarks/planner.md).
"""
from __future__ import annotations

from absorber.devices.machine import describe
from absorber.devices.planner import Prediction, choose_window, parse_size, plan, predict
from absorber.devices.profiles import Profile, default_profile, get_profile, list_profiles
from absorber.devices.providers import CPU, parse_device, provider_options, resolve_providers
from absorber.devices.session import session_kwargs, session_options

__all__ = [
    "Profile", "get_profile", "list_profiles", "default_profile",
    "resolve_providers", "provider_options", "parse_device", "CPU",
    "session_options", "session_kwargs",
    "predict", "plan", "choose_window", "parse_size", "Prediction",
    "describe",
]
