"""onnxruntime.SessionOptions from a Profile (and a bundle manifest's config entries)."""
from __future__ import annotations

from absorber.errors import AbsorberError

_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}


def _threads(requested: int) -> int:
    """0 stays 0 (ORT default); an explicit count is capped at the CPUs this process may use, because ORT
    spins one thread per count and oversubscribing a small board makes every op slower."""
    if requested <= 0:
        return 0
    from absorber.devices.machine import logical_cpus
    return min(requested, logical_cpus())


def session_options(profile=None, extra_config: dict | None = None, providers: list[str] | None = None):
    """An onnxruntime.SessionOptions for `profile` (default: default_profile()).

    extra_config: ORT session config entries (e.g. from a bundle manifest), applied after the profile's, so
    they win. providers: the list the session will use; DirectML needs mem patterns off and sequential mode.
    """
    import onnxruntime as ort

    from absorber.devices.profiles import default_profile, get_profile
    if profile is None:
        profile = default_profile()
    elif isinstance(profile, str):
        profile = get_profile(profile)
    so = ort.SessionOptions()
    so.intra_op_num_threads = _threads(profile.threads)
    so.inter_op_num_threads = max(0, int(profile.inter_threads))
    so.enable_cpu_mem_arena = bool(profile.enable_cpu_mem_arena)
    so.enable_mem_pattern = bool(getattr(profile, "enable_mem_pattern", True))
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[profile.graph_optimization_level])
    except KeyError:
        raise AbsorberError(f"graph_optimization_level must be one of {', '.join(_LEVELS)} "
                            f"(got {profile.graph_optimization_level!r})") from None
    if providers and "DmlExecutionProvider" in providers:
        so.enable_mem_pattern = False
    config = dict(profile.session_config)
    config.update({str(k): str(v) for k, v in (extra_config or {}).items()})
    for k, v in config.items():
        try:
            so.add_session_config_entry(k, v)
        except Exception as e:  # ORT raises a plain RuntimeError/Fail on a rejected entry
            raise AbsorberError(f"onnxruntime rejected session config {k}={v!r}: {e}".splitlines()[0]) from None
    return so


def session_kwargs(profile=None, device: str | None = None, extra_config: dict | None = None,
                   available: list[str] | None = None) -> dict:
    """Keyword arguments for onnxruntime.InferenceSession(path, **kwargs): sess_options, providers,
    provider_options. device defaults to the profile's device."""
    from absorber.devices.profiles import default_profile, get_profile
    from absorber.devices.providers import provider_options, resolve_providers
    if profile is None:
        profile = default_profile()
    elif isinstance(profile, str):
        profile = get_profile(profile)
    dev = device or profile.device
    provs = resolve_providers(dev, available)
    return {"sess_options": session_options(profile, extra_config, provs),
            "providers": provs,
            "provider_options": provider_options(dev, profile, providers=provs)}
