"""OpenVINO backend: runs a bundle's graphs on the CPU in fp32, bf16 or int8.

    precision  graphs it compiles               OpenVINO's inference precision hint
    fp32       predictor.onnx ...               f32
    bf16       predictor.onnx ... (the fp32)    bf16 (refused on a CPU without bf16 units)
    int8       predictor.int8.onnx ... (QDQ)    f32 for the layers left un-quantized

The graphs are read from the bundle's checked bytes (never a path) and compiled from memory. The
pixelwise node is the custom `asap.SpatialMLP`, which OpenVINO does not know: its model-local ONNX
function (standard ops) is inlined first. Large batches run as the ORT engine runs them: the
predictor once, then the pixelwise graph in blocks of whole S x S tiles (`tile_blocks`).

No torch import here: an inference-only install runs bundles with numpy + openvino.
"""

from __future__ import annotations

import re
import threading

import numpy as np

from asap_deploy.errors import BundleError, InputError, UsageError, require_module
from asap_deploy.precisions import QUANTIZED, graph_precision

from .scaled import SCALED_GRAPH
from .tiled import TiledGraphEngine

# INFERENCE_PRECISION_HINT per precision this engine runs (its registry row lists the same)
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
DEVICE = "CPU"

# Pixels (batch x H x W) per run of the pixelwise graph above which it runs in blocks of whole
# tiles (and the end-to-end work as the predictor, then the pixelwise blocks). A whole 1024x1024
# run holds the MLP's 64-channel activations: +880 MiB peak RSS on the facades preset, blocks of
# 2^18 pixels none above what loading took; their time was within noise of one run (2-core Xeon,
# load ~5: median 2.15 s vs 1.99 s, min 1.99 s vs 1.91 s; 2^17: 2.24 s / 2.01 s).
DEFAULT_PIXELS_PER_RUN = 1 << 18


def _ov():
    return require_module("openvino", "the openvino backend")


def cpu_capabilities(core=None) -> list[str]:
    """OpenVINO's OPTIMIZATION_CAPABILITIES of the CPU (FP32, BF16, INT8, ...)."""
    core = core if core is not None else _ov().Core()
    return [str(c) for c in core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")]


def bf16_support(capabilities: list[str]) -> tuple[bool, str]:
    """(the CPU runs bf16, why) from OpenVINO's capabilities of it."""
    if "BF16" in capabilities:
        return True, "the CPU has bf16 units (OpenVINO reports BF16)"
    return False, ("this CPU has no bf16 units: OpenVINO reports " + (", ".join(capabilities) or "no capabilities")
                   + " for it, no BF16 (bf16 needs AVX512_BF16 or AMX units, else run fp32 or int8)")


# lines of OpenVINO's errors that only say where or give generic advice
_NOISE = ("Exception from ", "Check '", "To facilitate", "Summary:", "While validating", "FrontEnd API failed",
          "Model wasn't fully converted")


def ov_message(exc: BaseException) -> str:
    """The line of an OpenVINO error that says what went wrong (the others are source locations,
    failed checks and generic advice), with the node it names."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    said = [ln for ln in lines if not ln.startswith(_NOISE)] or lines or [type(exc).__name__]
    node = next((m.group(1) for ln in lines if (m := re.search(r"node with name '([^']+)'", ln))), None)
    text = said[-1].removeprefix("-- ")[:400]
    return f"{text} (node {node})" if node and node not in text else text


class OpenVinoEngine(TiledGraphEngine):
    name = "openvino"

    def __init__(self, bundle, precision: str = "fp32", intra_op_threads: int | None = None,
                 pixels_per_run: int = DEFAULT_PIXELS_PER_RUN):
        super().__init__(bundle.config, precision)
        if precision not in HINTS:
            raise UsageError(f"the openvino backend runs {', '.join(HINTS)}, not {precision!r}")
        if pixels_per_run < 1:
            raise UsageError(f"pixels_per_run must be >= 1 (got {pixels_per_run})")
        if intra_op_threads is not None and intra_op_threads < 0:
            raise UsageError(f"intra_op_threads must be >= 0 (0: all cores; got {intra_op_threads})")
        ov = _ov()
        self.bundle = bundle
        self.pixels_per_run = pixels_per_run
        self.files = graph_precision(precision)  # the bundle files it reads (bf16 reads the fp32 ones)
        try:
            bundle.file("asap", self.files)  # BundleError now if the bundle lacks them
        except BundleError as exc:
            if self.files != QUANTIZED:
                raise
            raise BundleError(f"{exc.message}; write int8 graphs with: asap quantize {bundle.path} --calib MAPS") \
                from None
        self._core = ov.Core()
        self.capabilities = cpu_capabilities(self._core)
        if precision == "bf16":
            ok, why = bf16_support(self.capabilities)
            if not ok:
                raise UsageError(f"--precision bf16 on the openvino backend: {why}")
        self.threads = intra_op_threads or 0
        self._config = {"INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": "LATENCY"}
        if self.threads:
            self._config["INFERENCE_NUM_THREADS"] = self.threads
        self._compiled: dict[str, object] = {}
        self._requests: dict[str, object] = {}
        self._lock = threading.Lock()  # one infer request per graph: one run at a time

    # ---- compiling ----------------------------------------------------------------------------
    def _compile(self, model_proto, where: str):
        """An OpenVINO compiled model of an ONNX ModelProto (local functions inlined), from memory."""
        from onnx.inliner import inline_local_functions

        ov = _ov()
        try:
            data = inline_local_functions(model_proto).SerializeToString()
            model = self._core.read_model(data, b"")
            return self._core.compile_model(model, DEVICE, dict(self._config))
        except (RuntimeError, ValueError, TypeError) as exc:  # OpenVINO raises RuntimeError subclasses
            raise BundleError(f"{where}: OpenVINO {ov.__version__.split('-')[0]} cannot compile this graph (an "
                              f"operator it does not map, or an invalid graph; re-export the bundle with `asap "
                              f"export`): {ov_message(exc)}") from exc

    def request(self, graph: str):
        """The infer request of one graph (compiled on first use)."""
        if graph not in self._requests:
            path = self.bundle.file(graph, self.files)
            # the checked bytes, not the path: size and sha256 as the manifest says, no external data
            model = self.bundle.graph_model(graph, self.files)
            compiled = self._compile(model, str(path))
            self._compiled[graph] = compiled
            self._requests[graph] = compiled.create_infer_request()
        return self._requests[graph]

    def scaled_mlp(self, ids, params, u_y, u_x):
        """The scaled pixelwise stage (asap infer --scale): the `pixelwise_scaled` graph built from
        the bundle's config (bundles carry no file for it), compiled like the others."""
        with self._lock:
            if SCALED_GRAPH not in self._requests:
                from .scaled import scaled_pixelwise_graph

                compiled = self._compile(scaled_pixelwise_graph(self.config), f"the {SCALED_GRAPH} graph")
                self._compiled[SCALED_GRAPH] = compiled
                self._requests[SCALED_GRAPH] = compiled.create_infer_request()
            feeds = {"ids": ids, "params": np.ascontiguousarray(params, np.float32), "u_y": u_y, "u_x": u_x}
            req = self._requests[SCALED_GRAPH]
            try:
                req.infer(feeds)
            except (RuntimeError, ValueError, TypeError) as exc:
                raise InputError(f"OpenVINO could not run {SCALED_GRAPH} on ids of shape "
                                 f"{'x'.join(map(str, np.shape(ids)))}: {ov_message(exc)}") from exc
            return np.array(req.get_tensor("rgb").data, copy=True)

    def describe(self) -> dict:
        return {**super().describe(), "openvino": _ov().__version__, "device": DEVICE,
                "cpu": self._core.get_property(DEVICE, "FULL_DEVICE_NAME"),
                "inference_precision_hint": HINTS[self.precision], "graphs": self.files,
                "threads": self.threads or "default (all cores)", "cpu_capabilities": list(self.capabilities),
                "pixels_per_run": self.pixels_per_run}

    def close(self) -> None:
        with self._lock:
            self._requests.clear()
            self._compiled.clear()

    # ---- running ------------------------------------------------------------------------------
    def _run(self, graph: str, outputs: list[str], **arrays) -> list[np.ndarray]:
        """One run of `graph`; OpenVINO's errors (e.g. a map too small for the model's reflection
        padding) as an InputError that says which input shape failed."""
        with self._lock:
            req = self.request(graph)
            feeds = {}
            for port in self._compiled[graph].inputs:
                name = port.get_any_name()
                feeds[name] = arrays[name]
            try:
                req.infer(feeds)
                return [np.array(req.get_tensor(name).data, copy=True) for name in outputs]
            except (RuntimeError, ValueError, TypeError) as exc:
                shape = "x".join(map(str, arrays["labels"].shape))
                raise InputError(f"OpenVINO could not run {graph} on label maps of shape {shape} (N x H x W): "
                                 f"{ov_message(exc)}") from exc
