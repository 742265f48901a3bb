"""ONNX Runtime backend: runs a bundle's graphs (CPU, or CUDA where onnxruntime-gpu is installed).

No torch import here: an inference-only install runs bundles with numpy + onnxruntime.
"""

from __future__ import annotations

import numpy as np

from asap_deploy.errors import BundleError, InputError, MissingDependencyError, UsageError

from .base import IMAGE, IMAGE_FLOAT, Engine


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


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"

    def __init__(self, bundle, precision: str = "fp32", providers: list[str] | None = None,
                 intra_op_threads: int | None = None):
        super().__init__(bundle.config, precision)
        ort = _ort()
        self.bundle = bundle
        bundle.file("asap", precision)  # BundleError now if the precision was not exported
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
            try:
                self._sessions[graph] = ort.InferenceSession(str(path), self._options, providers=self.providers)
            except _ort_errors() as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise BundleError(f"{path}: ONNX Runtime cannot load this graph (an operator it does not know, or "
                                  f"an invalid graph; re-export the bundle with `asap export`): {first}") from exc
        return self._sessions[graph]

    def describe(self) -> dict:
        return {**super().describe(), "providers": self.providers, "onnxruntime": _ort().__version__}

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

    def _generate(self, labels, instances):
        img, f = self._run("asap", [IMAGE, IMAGE_FLOAT], labels=labels, instances=instances)
        return {IMAGE: img, IMAGE_FLOAT: f}

    def _predict_params(self, labels, instances):
        return self._run("predictor", ["params"], labels=labels, instances=instances)[0]

    def _pixelwise(self, labels, params):
        img, f = self._run("pixelwise", [IMAGE, IMAGE_FLOAT], labels=labels, params=params)
        return {IMAGE: img, IMAGE_FLOAT: f}
