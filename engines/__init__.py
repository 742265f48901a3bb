"""Inference backends behind one Engine interface, and benchmarking.

Backends import their runtimes lazily: `asap_deploy.engines` itself needs only numpy.
"""

from __future__ import annotations

from asap_deploy.errors import UsageError, did_you_mean

from .base import IMAGE, IMAGE_FLOAT, Engine

# Backends that run a bundle (the torch reference is built from the bundle's weights).
BACKENDS = ("torch", "onnxruntime", "tensorrt")


def check_backend(name: str) -> str:
    """Reject an unknown backend name, suggesting the nearest valid one (never running a guess)."""
    if name in BACKENDS:
        return name
    raise UsageError(f"unknown backend {name!r}{did_you_mean(name, BACKENDS)} (choose from: {', '.join(BACKENDS)})")


def create_engine(name: str, bundle, precision: str = "fp32", **options) -> Engine:
    """An Engine of backend `name` running `bundle` at `precision`."""
    name = check_backend(name)
    if name == "onnxruntime":
        from .onnxruntime_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine(bundle, precision, **options)
    if name == "tensorrt":
        from .tensorrt import TensorRTEngine  # engines built by `asap build-engine`; needs a GPU

        return TensorRTEngine(bundle, precision, **options)
    if precision != "fp32":
        raise UsageError(f"the torch backend is the fp32 reference; precision {precision!r} is not available for it")
    from .torch_engine import TorchEngine

    return TorchEngine.from_bundle(bundle, **options)


__all__ = ["BACKENDS", "Engine", "IMAGE", "IMAGE_FLOAT", "check_backend", "create_engine"]
