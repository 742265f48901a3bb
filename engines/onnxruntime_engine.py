"""ONNX Runtime backend: runs a bundle's graphs (CPU, or CUDA where onnxruntime-gpu is installed).

No torch import here: an inference-only install runs bundles with numpy + onnxruntime.
"""

from __future__ import annotations

import numpy as np

from asap_deploy.errors import BundleError, InputError, MissingDependencyError, UsageError
from asap_deploy.precisions import QUANTIZED

from .scaled import SCALED_GRAPH
from .tiled import TiledGraphEngine

# Pixels (batch x H x W) per run of the pixelwise graph. ONNX Runtime keeps every MLP layer's
# activation for a whole run (64 channels fp32: 0.9 GiB at 1024x1024, 3.5 GiB at 2048x2048), so
# larger work runs in blocks of whole S x S tiles, which is exact: a tile needs only its own labels,
# parameters and the per-tile positional encoding. 2^17 pixels: ~0.2 GiB peak, and as fast as one
# run at 1024x1024 (benchmarks/ONNX_SPEED.md).
DEFAULT_PIXELS_PER_RUN = 1 << 17


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - onnxruntime is a base dependency
        raise MissingDependencyError("the onnxruntime backend needs onnxruntime: pip install onnxruntime") from exc
    return onnxruntime


def _ort_errors() -> tuple[type[BaseException], ...]:
    """onnxruntime's own exception classes (Fail, InvalidGraph, NotImplemented, ...: they derive
    from Exception directly), plus the RuntimeError/ValueError its Python layer raises."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
             "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")
    return tuple(getattr(state, n) for n in names if isinstance(getattr(state, n, None), type)) + (RuntimeError,
                                                                                                 ValueError)


class OnnxRuntimeEngine(TiledGraphEngine):
    name = "onnxruntime"

    def __init__(self, bundle, precision: str = "fp32", providers: list[str] | None = None,
                 intra_op_threads: int | None = None, pixels_per_run: int = DEFAULT_PIXELS_PER_RUN):
        super().__init__(bundle.config, precision)
        if pixels_per_run < 1:
            raise UsageError(f"pixels_per_run must be >= 1 (got {pixels_per_run})")
        self.pixels_per_run = pixels_per_run
        ort = _ort()
        self.bundle = bundle
        try:
            bundle.file("asap", precision)  # BundleError now if the precision was not exported
        except BundleError as exc:
            if precision != QUANTIZED:
                raise
            raise BundleError(f"{exc.message}; write int8 graphs with: asap quantize {bundle.path} --calib MAPS") \
                from None
        available = ort.get_available_providers()
        self.providers = providers or ["CPUExecutionProvider"]
        missing = [p for p in self.providers if p not in available]
        if missing:
            raise UsageError(f"ONNX Runtime provider(s) {', '.join(missing)} not available here "
                             f"(available: {', '.join(available)})")
        self._options = ort.SessionOptions()
        self._options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            self._options.intra_op_num_threads = intra_op_threads
        self._sessions: dict[str, object] = {}

    def session(self, graph: str):
        """The InferenceSession of one graph (created on first use)."""
        if graph not in self._sessions:
            ort = _ort()
            path = self.bundle.file(graph, self.precision)
            # the checked bytes, not the path: a regular file inside the bundle, size and sha256 as the
            # manifest says, no external data (ONNX Runtime would follow a location written in it)
            data = self.bundle.graph_bytes(graph, self.precision)
            try:
                self._sessions[graph] = ort.InferenceSession(data, self._options, providers=self.providers)
            except _ort_errors() as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise BundleError(f"{path}: ONNX Runtime cannot load this graph (an operator it does not know, or "
                                  f"an invalid graph; re-export the bundle with `asap export`): {first}") from exc
        return self._sessions[graph]

    def scaled_mlp(self, ids, params, u_y, u_x):
        """The scaled pixelwise stage (asap infer --scale): the `pixelwise_scaled` graph, built from
        the bundle's config on first use (bundles carry no file for it), on this engine's providers."""
        if SCALED_GRAPH not in self._sessions:
            from .scaled import scaled_pixelwise_graph

            opts = _ort().SessionOptions()
            opts.graph_optimization_level = _ort().GraphOptimizationLevel.ORT_ENABLE_ALL
            self._sessions[SCALED_GRAPH] = _ort().InferenceSession(
                scaled_pixelwise_graph(self.config).SerializeToString(), opts, providers=list(self.providers))
        return self._sessions[SCALED_GRAPH].run(["rgb"], {"ids": ids, "params": np.ascontiguousarray(params, np.float32),
                                                          "u_y": u_y, "u_x": u_x})[0]

    def describe(self) -> dict:
        return {**super().describe(), "providers": self.providers, "onnxruntime": _ort().__version__,
                "intra_op_threads": self._options.intra_op_num_threads or "default (all cores)"}

    def close(self) -> None:
        self._sessions.clear()

    def _feeds(self, graph: str, **arrays) -> dict[str, np.ndarray]:
        names = [i.name for i in self.session(graph).get_inputs()]
        return {k: arrays[k] for k in names}

    def _run(self, graph: str, outputs: list[str], **arrays):
        """session.run with onnxruntime's errors (e.g. a map too small for the model's reflection
        padding) as an InputError that says which input shape failed."""
        feeds = self._feeds(graph, **arrays)
        try:
            return self.session(graph).run(outputs, feeds)
        except _ort_errors() as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            shape = "x".join(map(str, arrays["labels"].shape))
            raise InputError(f"ONNX Runtime could not run {graph} on label maps of shape {shape} (N x H x W): "
                             f"{first}") from exc
