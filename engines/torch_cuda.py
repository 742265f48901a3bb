"""`torch-cuda`: the PyTorch backend on a CUDA GPU as a deployment path. No TensorRT, no ONNX.

What runs where, per precision (`precision`):
  predictor   fp16: the low-res stream in fp16, channels-last (tensor cores), with every
                    normalisation layer (InstanceNorm) run in fp32 (`Fp32Island`: its mean and
                    variance reductions); its input (one-hot or the tent pre-downsample computed
                    from the ids, a weighted sum) is built in fp32 and cast once. The grid comes
                    out fp16 channels-last = the layout the fused kernel reads without a re-pack.
              fp32: the fp32 model with TF32 off (cuDNN and matmul), so it matches the CPU reference.
  pixelwise   fp16: the fused Triton kernel (plugins/kernel.py, JIT; fp16 dots, fp32 accumulation);
                    `run` has it write the 8-bit image directly.
              fp32: the per-tile PyTorch path in fp32 (`asap_deploy.model.pixelwise`): the kernel's
                    fp16 dots would not meet the fp32 thresholds of `asap validate`.
              A config the kernel cannot take (plugins/spec.py `kernel_spec`) runs the per-tile path.
  8-bit       on the GPU, rounded half to even as `asap_deploy.io.to_uint8`; only the arrays a call
              returns are copied back (`run`: the uint8 image alone).
CUDA graphs (`cuda_graph=True`): the device work of each call kind (run, generate, predictor,
pixelwise) for one input signature is captured on the SECOND call with that signature (the first
runs eagerly: Triton compiles, cuDNN picks its algorithms, constants reach the device) and replayed
from then on; at most `max_graphs` graphs are kept (the least recently used is dropped). A capture
that fails is ended (torch.cuda.graph ends it on the way out), dropped, and the engine runs eagerly
from then on: one note in `notes` and one RuntimeWarning.
Host buffers: inputs are staged in pinned (page-locked) host memory and copied asynchronously on
the engine's own stream; outputs come back into pinned buffers; one synchronisation per call.
`last_phases()` gives the H2D / GPU compute / D2H milliseconds of the last call (CUDA events), as
engines/tensorrt.py does.
Threads: one lock per engine; the engine's device and stream are made current around each call, so
any thread may call it (asap serve calls engines from PyTriton's handler thread).

The CUDA parts are isolated behind `GraphOps` (capture / replay / release) and the engine's
`device`: tests drive `GraphCache` and the whole engine on the CPU with a stand-in for the graph
operations and the Triton interpreter for the fused kernel.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from asap_deploy.errors import MissingDependencyError, UsageError, require_torch

from .base import IMAGE, IMAGE_FLOAT, Engine
from .torch_engine import TorchEngine, _kernel_supports, bundle_source, model_from_bundle

PRECISIONS = ("fp32", "fp16")  # the registry row's (engines/registry.py)
PHASES = ("h2d_ms", "gpu_compute_ms", "d2h_ms")  # as engines/tensorrt.py reports them
# per-tile fp32 path on a GPU: 2**18 pixels per chunk (64 tiles at S=64, two 65-channel fp32 buffers
# of 136 MiB) instead of the CPU's cache-sized 2**12: a few large batched matmuls, not one per tile
GPU_CHUNK_PIXELS = 1 << 18
DEFAULT_MAX_GRAPHS = 8
MAX_GRAPHS = 64
PARAMS = "params"
# call kinds: what each captures and returns (the device work between the uploads and downloads)
KINDS = {"image": (IMAGE,), "generate": (IMAGE, IMAGE_FLOAT), "predictor": (PARAMS,),
         "pixelwise": (IMAGE, IMAGE_FLOAT)}


# ---- availability --------------------------------------------------------------------------------
def torch_cuda_runtime() -> tuple[bool, str]:
    """(usable here, why) for the torch-cuda backend: PyTorch with CUDA, a visible device, Triton.
    Never raises; does not create a CUDA context (torch.cuda.is_available only counts devices)."""
    from .machine import importable

    if not importable("torch"):
        return False, "PyTorch is not installed (pip install 'asap-deploy[torch]')"
    import torch

    if torch.version.cuda is None:
        return False, (f"this PyTorch ({torch.__version__}) is a CPU-only build: install a CUDA build of torch "
                       "to run on a GPU")
    if not torch.cuda.is_available():
        return False, (f"PyTorch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device "
                       "(no GPU, no driver, or CUDA_VISIBLE_DEVICES hides it)")
    if not importable("triton"):
        return False, "Triton is not installed (pip install 'asap-deploy[gpu]'): the fused pixelwise kernel needs it"
    n = torch.cuda.device_count()
    return True, f"PyTorch {torch.__version__} with CUDA {torch.version.cuda}, {n} device(s)"


def require_torch_cuda() -> None:
    ok, why = torch_cuda_runtime()
    if not ok:
        raise MissingDependencyError(f"the torch-cuda backend needs PyTorch on a CUDA GPU: {why}")


# ---- the fp16 predictor ----------------------------------------------------------------------------
def _norm_types(nn) -> tuple[type, ...]:
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.instancenorm import _InstanceNorm

    return (_InstanceNorm, _BatchNorm, nn.GroupNorm, nn.LayerNorm)


def _island_class():
    from torch import nn

    class Fp32Island(nn.Module):
        """Runs `inner` in fp32 on an input of any float dtype and returns the input's dtype (the
        normalisation layers of an fp16 predictor: their mean/variance reductions stay fp32)."""

        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner.float()

        def forward(self, x):
            return self.inner(x.float()).to(x.dtype)

    return Fp32Island


def half_predictor(stream, channels_last: bool = True):
    """A copy of the low-res stream for fp16 inference: every module in fp16 except the
    normalisation layers, each wrapped in an `Fp32Island`; channels-last memory format (4-D
    weights) when `channels_last`. The input is cast by the caller (fp32 -> fp16 once)."""
    torch = require_torch("the fp16 predictor")
    nn = torch.nn
    island = _island_class()
    norms = _norm_types(nn)
    m = copy.deepcopy(stream).half().eval()

    def wrap(parent):
        for name, child in parent.named_children():
            if isinstance(child, norms):
                setattr(parent, name, island(child))
            else:
                wrap(child)

    wrap(m)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    return m


def fp32_modules(module) -> list[str]:
    """Names of the modules of `module` that hold fp32 parameters (what an fp16 predictor keeps fp32)."""
    import torch

    return [n for n, m in module.named_modules()
            if any(p.dtype == torch.float32 for p in m.parameters(recurse=False))]


# ---- CUDA graphs: the logic, with the CUDA operations injected -----------------------------------
class GraphOps:
    """The CUDA-graph operations the cache needs (torch.cuda here; a stand-in in the CPU tests)."""

    def capture(self, fn: Callable[[], dict]) -> tuple[Any, dict]:
        """Capture fn's device work; (graph, its outputs: tensors the replays write)."""
        raise NotImplementedError

    def replay(self, graph: Any) -> None:
        raise NotImplementedError

    def release(self, graph: Any) -> None:
        raise NotImplementedError


class TorchGraphOps(GraphOps):
    """torch.cuda.CUDAGraph captured on the engine's stream (thread-local capture mode: other
    threads' CUDA calls do not invalidate it, and its own illegal calls fail it)."""

    def __init__(self, torch, stream):
        self.torch, self.stream = torch, stream

    def capture(self, fn):
        torch = self.torch
        g = torch.cuda.CUDAGraph()
        # torch.cuda.graph ends the capture on the way out, also when fn raises
        with torch.cuda.graph(g, stream=self.stream, capture_error_mode="thread_local"):
            out = fn()
        return g, out

    def replay(self, graph):
        graph.replay()

    def release(self, graph):
        graph.reset()


@dataclass
class Entry:
    """Static buffers of one (call kind, input signature), and its graph once captured."""

    key: tuple
    dev_in: dict[str, Any]  # device inputs the device work reads (the graph's fixed addresses)
    host_in: dict[str, Any]  # pinned staging of the inputs
    out: dict[str, Any] | None = None  # device outputs: the graph's (static) or the last eager run's
    host_out: dict[str, Any] = field(default_factory=dict)  # pinned, made on the first download
    graph: Any = None
    runs: int = 0


class GraphCache:
    """Entries per key, least recently used dropped beyond `max_entries`. `call(key, build, compute)`:
    the first call of a key runs `compute` eagerly, the second captures it (then replays), later
    ones replay. A failed capture turns graphs off for good and tells `note` once."""

    def __init__(self, ops: GraphOps | None, max_entries: int, enabled: bool, note: Callable[[str, str], None]):
        self.ops, self.max_entries, self.enabled, self._note = ops, max_entries, enabled and ops is not None, note
        self.entries: OrderedDict[tuple, Entry] = OrderedDict()
        self.captures = self.replays = self.eager = 0

    def entry(self, key: tuple, build: Callable[[], Entry]) -> Entry:
        e = self.entries.get(key)
        if e is not None:
            self.entries.move_to_end(key)
            return e
        while len(self.entries) >= self.max_entries:
            _, old = self.entries.popitem(last=False)
            self._drop(old)
        e = self.entries[key] = build()
        return e

    def call(self, e: Entry, compute: Callable[[Entry], dict]) -> dict:
        """Run `e`'s device work (eager, capture + replay, or replay); its device outputs."""
        if self.enabled and e.runs >= 1:
            if e.graph is None:
                self._capture(e, compute)
            if e.graph is not None:
                self.ops.replay(e.graph)
                self.replays += 1
                e.runs += 1
                return e.out
        e.out = compute(e)
        self.eager += 1
        e.runs += 1
        return e.out

    def _capture(self, e: Entry, compute: Callable[[Entry], dict]) -> None:
        try:
            e.graph, e.out = self.ops.capture(lambda: compute(e))
            self.captures += 1
        except Exception as exc:  # noqa: BLE001 - any capture failure: run eagerly instead, said once
            e.graph = e.out = None
            self.enabled = False
            self._note("cuda_graph", f"CUDA graph capture failed ({type(exc).__name__}: {' '.join(str(exc).split())}); "
                                     "running without CUDA graphs from now on")

    def _drop(self, e: Entry) -> None:
        if e.graph is not None and self.ops is not None:
            self.ops.release(e.graph)
        e.graph = e.out = None
        e.dev_in.clear()
        e.host_in.clear()
        e.host_out.clear()

    def clear(self) -> None:
        while self.entries:
            self._drop(self.entries.popitem()[1])


# ---- the engine --------------------------------------------------------------------------------------
class TorchCudaEngine(TorchEngine):
    """The generator on a CUDA GPU at `precision` fp16 (the fast path) or fp32 (exact)."""

    name = "torch-cuda"

    def __init__(self, model, precision: str = "fp16", device: str = "cuda", *, cuda_graph: bool = True,
                 max_graphs: int = DEFAULT_MAX_GRAPHS, fused: bool | None = None, channels_last: bool = True,
                 graph_ops: GraphOps | None = None, interpret: bool = False):
        """`device` "cuda[:i]"; "cpu" only with `graph_ops` given or `cuda_graph=False` and
        `interpret=True` for the fused kernel (the tests' stand-in for a GPU). `fused` (default:
        fp16 where the kernel takes the config) runs the pixelwise stage with the fused kernel."""
        torch = require_torch("the torch-cuda backend")
        from asap_deploy.limits import check_range

        if precision not in PRECISIONS:
            raise UsageError(f"the torch-cuda backend runs {', '.join(PRECISIONS)}, not {precision!r}")
        check_range("max_graphs", max_graphs, 1, MAX_GRAPHS)
        dev = torch.device(device)
        if dev.type == "cuda":
            require_torch_cuda()
        elif graph_ops is None and cuda_graph:
            raise UsageError("the torch-cuda engine off a GPU needs graph_ops (a stand-in) or cuda_graph=False")
        super(TorchEngine, self).__init__(model.cfg, precision)  # Engine.__init__: TorchEngine's is fp32-only
        self._torch = torch
        self.device = dev
        self.source = "model"
        self.model = copy.deepcopy(model).float().eval().to(dev)  # the caller's model stays where it is
        self.half = precision == "fp16"
        self.fused = (self.half and _kernel_supports(model.cfg)) if fused is None else bool(fused)
        self.channels_last = channels_last
        self.predictor = half_predictor(self.model.lowres_stream, channels_last) if self.half else self.model.lowres_stream
        self._interpret = interpret
        self._cuda = dev.type == "cuda"
        self._lock = threading.Lock()
        self._stream = torch.cuda.Stream(dev) if self._cuda else None
        if graph_ops is None and self._cuda:
            graph_ops = TorchGraphOps(torch, self._stream)
        self.cache = GraphCache(graph_ops, max_graphs, cuda_graph,
                                lambda key, text: self._note_once(key, f"torch-cuda: {text}"))
        self._events = [torch.cuda.Event(enable_timing=True) for _ in range(4)] if self._cuda else []
        self._phases: dict[str, float] = {}

    @classmethod
    def from_bundle(cls, bundle, precision: str = "fp16", **options) -> "TorchCudaEngine":
        """The bundle's generator (weights read back from predictor.onnx, sha256-checked) on the GPU."""
        require_torch_cuda() if str(options.get("device", "cuda")).startswith("cuda") else None
        eng = cls(model_from_bundle(bundle), precision, **options)
        eng.source = bundle_source(bundle)
        return eng

    @classmethod
    def from_checkpoint(cls, path, config=None, preset=None, precision: str = "fp16", **options) -> "TorchCudaEngine":
        from asap_deploy.checkpoints import load_generator

        if str(options.get("device", "cuda")).startswith("cuda"):
            require_torch_cuda()
        model, _ = load_generator(path, config, preset)
        eng = cls(model, precision, **options)
        eng.source = f"checkpoint {path}"
        return eng

    # ---- what it says about itself -------------------------------------------------------------
    @property
    def cuda_graph(self) -> bool:
        return self.cache.enabled

    def describe(self) -> dict:
        torch = self._torch
        gpu = torch.cuda.get_device_name(self.device) if self._cuda else str(self.device)
        return {"backend": self.name, "precision": self.precision, "device": str(self.device), "gpu": gpu,
                "source": self.source,
                "predictor": ("fp16, InstanceNorm in fp32" + (", channels-last" if self.channels_last else "")
                              if self.half else "fp32 (TF32 off)"),
                "pixelwise": ("fused Triton kernel" + (" (interpreter)" if self._interpret else " (JIT)")
                              if self.fused else "per-tile PyTorch fp32"),
                "cuda_graph": self.cache.enabled, "max_graphs": self.cache.max_entries, "pinned_host_buffers": self._cuda,
                "notes": self.notes}

    def last_phases(self) -> dict[str, float]:
        """H2D / GPU compute / D2H milliseconds of the last call (CUDA events; empty off a GPU)."""
        out, self._phases = self._phases, {}
        return out

    # ---- device work (capturable: no host synchronisation, no pageable copies) ---------------------
    def _channel_index(self, ids):
        """Label ids -> int64 channel index (ids were checked on the host: no check here, it would sync)."""
        cfg = self.config
        idx = ids.long()
        if cfg.accepts_dontcare_id:
            from asap_deploy.config import DONTCARE_ID

            idx = idx.masked_fill(idx == DONTCARE_ID, cfg.n_label_channels - 1)
        return idx

    def _params(self, ids, instances):
        """(channel index, parameter grid: fp16 channels-last or fp32 NCHW)."""
        torch = self._torch
        idx = self._channel_index(ids)
        x = self.model.lowres_input(idx, instances)  # fp32: one-hot, or the tent downsample of the ids
        if self.half:
            fmt = torch.channels_last if self.channels_last else torch.contiguous_format
            return idx, self.predictor(x.to(dtype=torch.float16, memory_format=fmt))
        return idx, self.predictor(x)

    def _pixels(self, ids, idx, params, kinds: tuple[str, ...]) -> dict:
        torch = self._torch
        from asap_deploy.plugins.torch_op import spatial_mlp, to_uint8

        out = {}
        if self.fused:
            if IMAGE_FLOAT not in kinds:  # the 8-bit image straight from the kernel
                out[IMAGE] = spatial_mlp(ids, params, self.config, out_dtype=torch.uint8, validate=False,
                                         interpret=self._interpret)
                return out
            rgb = spatial_mlp(ids, params, self.config, validate=False, interpret=self._interpret)
        else:
            from asap_deploy.model import pixelwise

            rgb = pixelwise(idx, params.float(), self.config, chunk_pixels=GPU_CHUNK_PIXELS)
        out[IMAGE_FLOAT] = rgb
        out[IMAGE] = to_uint8(rgb)
        return out

    def _compute(self, kind: str, e: Entry) -> dict:
        d = e.dev_in
        if kind == "pixelwise":
            ids = d["labels"]
            return self._pixels(ids, self._channel_index(ids), d["params"], KINDS[kind])
        idx, params = self._params(d["labels"], d.get("instances"))
        if kind == "predictor":
            return {PARAMS: params.float().contiguous()}
        return self._pixels(d["labels"], idx, params, KINDS[kind])

    @contextlib.contextmanager
    def _exact(self):
        """fp32: TF32 off for cuDNN and matmul during the call (also what a capture records)."""
        if not self._cuda or self.half:
            yield
            return
        b = self._torch.backends
        old = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # newer torch prefers fp32_precision; the flags still work
            b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = False, False
        try:
            yield
        finally:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = old

    @contextlib.contextmanager
    def _on_device(self):
        torch = self._torch
        if not self._cuda:
            with torch.inference_mode(), self._exact():
                yield
            return
        with torch.inference_mode(), torch.cuda.device(self.device), torch.cuda.stream(self._stream), self._exact():
            yield

    # ---- host side: pinned staging, one call ------------------------------------------------------
    def _entry(self, kind: str, inputs: dict[str, np.ndarray]) -> Entry:
        key = (kind,) + tuple((n, a.shape, a.dtype.str) for n, a in inputs.items())

        def build() -> Entry:
            torch = self._torch
            dev_in, host_in = {}, {}
            for n, a in inputs.items():
                dt = torch.from_numpy(a[:0]).dtype
                host_in[n] = torch.empty(a.shape, dtype=dt, pin_memory=self._cuda)
                dev_in[n] = torch.empty(a.shape, dtype=dt, device=self.device)
            return Entry(key, dev_in, host_in)

        return self.cache.entry(key, build)

    def _upload(self, e: Entry, inputs: dict[str, np.ndarray]) -> None:
        for n, a in inputs.items():
            np.copyto(e.host_in[n].numpy(), a, casting="no")
            e.dev_in[n].copy_(e.host_in[n], non_blocking=self._cuda)

    def _download(self, e: Entry, out: dict, names: tuple[str, ...]) -> None:
        torch = self._torch
        for n in names:
            t = out[n]
            h = e.host_out.get(n)
            if h is None or h.shape != t.shape or h.dtype != t.dtype:
                h = e.host_out[n] = torch.empty(t.shape, dtype=t.dtype, pin_memory=self._cuda)
            h.copy_(t, non_blocking=self._cuda)

    def _call(self, kind: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = KINDS[kind]
        with self._lock, self._on_device():
            e = self._entry(kind, inputs)
            ev = self._events
            if ev:
                ev[0].record(self._stream)
            self._upload(e, inputs)
            if ev:
                ev[1].record(self._stream)
            out = self.cache.call(e, lambda entry: self._compute(kind, entry))
            if ev:
                ev[2].record(self._stream)
            self._download(e, out, names)
            if ev:
                ev[3].record(self._stream)
                self._stream.synchronize()
                self._phases = {p: float(ev[i].elapsed_time(ev[i + 1])) for i, p in enumerate(PHASES)}
            # copies: the pinned buffers are reused by the next call
            return {n: e.host_out[n].numpy().copy() for n in names}

    @staticmethod
    def _feeds(labels: np.ndarray, instances: np.ndarray | None) -> dict[str, np.ndarray]:
        return {"labels": labels} if instances is None else {"labels": labels, "instances": instances}

    def prepared(self, kind: str, labels: np.ndarray, instances: np.ndarray | None = None,
                 params: np.ndarray | None = None) -> Callable[[], dict]:
        """For benchmarks: the inputs uploaded once (checked as by the public methods), then a
        callable running only the device work of `kind` (image, generate, predictor, pixelwise) on
        the engine's stream: eager, capture or replay as `call` would. It does not synchronise."""
        if kind not in KINDS:
            raise UsageError(f"unknown call kind {kind!r} (choose from: {', '.join(KINDS)})")
        labels, instances = self.check_inputs(labels, instances, need_instances=kind != "pixelwise")
        if kind == "pixelwise":
            n, h, w = labels.shape
            want = (n, self.config.num_params, h // self.config.S, w // self.config.S)
            if params is None or tuple(np.shape(params)) != want:
                from asap_deploy.errors import InputError

                raise InputError(f"parameter grid has shape {None if params is None else tuple(np.shape(params))}, "
                                 f"expected {want}")
        feeds = ({"labels": labels, "params": np.ascontiguousarray(params, np.float32)} if kind == "pixelwise"
                 else self._feeds(labels, instances))
        with self._lock, self._on_device():
            e = self._entry(kind, feeds)
            self._upload(e, feeds)

        def run() -> dict:
            with self._lock, self._on_device():
                return self.cache.call(e, lambda entry: self._compute(kind, entry))

        return run

    @property
    def stream(self):
        """The engine's CUDA stream (None off a GPU): what `prepared` callables run on."""
        return self._stream

    # ---- the Engine hooks ------------------------------------------------------------------------
    def run(self, labels: np.ndarray, instances: np.ndarray | None = None, *, ids_checked: bool = False) -> np.ndarray:
        """labels (N,H,W) ids [+ instances] -> uint8 RGB (N,H,W,3); only the 8-bit image comes back."""
        labels, instances = self.check_inputs(labels, instances, ids_checked=ids_checked)
        return self._call("image", self._feeds(labels, instances))[IMAGE]

    def _generate(self, labels, instances):
        return self._call("generate", self._feeds(labels, instances))

    def _predict_params(self, labels, instances):
        return self._call("predictor", self._feeds(labels, instances))[PARAMS]

    def _pixelwise(self, labels, params):
        return self._call("pixelwise", {"labels": labels, "params": np.ascontiguousarray(params, np.float32)})

    # no scaled pixelwise stage (asap infer --scale runs on torch, onnxruntime, openvino: the registry)
    scaled_mlp = Engine.scaled_mlp

    def close(self) -> None:
        with self._lock:
            self.cache.clear()
