"""One prepared GPU check of everything in asap-deploy that only a GPU can show (issue 15).

Run from the repository root on a machine with an NVIDIA GPU (no network, no TensorRT needed):

    PYTHONPATH=. python benchmarks/gpu_check.py [--out DIR] [--only SECTIONS] [--budget 450]

and on any machine, as a check of the script itself (CPU, Triton interpreter, tiny sizes; the
GPU-only sections are marked skipped with the reason):

    PYTHONPATH=. python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check

No installation is needed: from a checkout, `asap_deploy/__init__.py` adds the checkout to the
package's path, so engines/, plugins/ and export/ import as asap_deploy.engines etc. (an installed
wheel maps them with setuptools' package-dir). The script also puts the repository root on
sys.path itself, so `python benchmarks/gpu_check.py` works without PYTHONPATH too.
Needs numpy, torch (with CUDA for the GPU sections), Triton and cuda-python.

Results: DIR/gpu_check.json (machine-readable) and DIR/gpu_check.md (tables), rewritten after
every section, so a run cut short still leaves what it measured. DIR defaults to $OUT/gpu_check
when $OUT is set (the lent GPU machines bring $OUT back), else benchmarks/results/gpu_check.
The folder is asap's (ownership marker): a folder holding files asap did not write is refused,
and only the two report files are ever replaced. Exit status: 0 all sections passed or skipped,
1 a check failed or a section errored or timed out, 2 bad usage.

Sections (each independent: one that fails records its error and the rest go on; on a GPU each
runs in its own process, so a crashed or hung section or a sticky CUDA error cannot take the
others with it; each has a timeout, and the whole run a budget, default 450 s):
  environment      driver, GPU, SM, memory, library versions, which backends are usable
  kernel           the fused kernel, Triton JIT and ahead-of-time cubin (and PTX) through the
                   driver-only launcher, vs the fp32 CPU reference on random inputs and on the
                   authors' fixtures (tests/fixtures/authors): max abs, PSNR of the 8-bit image
  torch_cuda       the torch-cuda backend (fp16, fp32) vs the PyTorch fp32 CPU reference at the
                   thresholds of `asap validate`, on a random model and the authors' checkpoints;
                   CUDA-graph replays identical to the eager run
  latency          1024x1024, per stage (predictor, pixelwise, end to end, and the fused kernel
                   alone): torch-cuda fp16, the authors' forward in fp16 (torch.autocast), torch-cuda
                   fp32; CUDA events around each call, percentile table (engines/bench.py's
                   statistics); the issue's targets (pixelwise <= 60 us, whole <= 150 us, >= 10x)
  plugin_enqueue   the TensorRT plugin's exact enqueue path (plugins/plugin_core.py
                   enqueue_from_descs, no TensorRT) with device pointers of torch tensors
  graph_capture    CUDA-graph capture and replay of the driver launch vs plain launches (outputs,
                   device and host time per call); engines/tensorrt.py's runner with graphs on
  capture_failure  defect 2: a capture that fails mid-way (an exception, and a real invalidation by
                   a synchronising call) in engines/tensorrt.py's runner and in torch-cuda: the
                   stream stays usable, the output is right, one note
  threads          defect 1: engines/tensorrt.py's runner `run` from a second thread (context
                   push/pop), the same launch without the push, torch-cuda from a second thread
The TensorRT runner sections drive engines/tensorrt.py's real `_GraphRunner` (context handling,
buffers, capture and fallback) with the real CUDA driver and a stand-in for TensorRT's execution
context whose enqueue is the plugin's; TensorRT itself is never needed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/gpu_check.py` from anywhere, PYTHONPATH or not
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

SCHEMA, SCHEMA_VERSION = "asap-deploy/gpu-check", 1
KIND = "gpu-check"  # ownership-marker kind of the output folder
JSON_NAME, MD_NAME = "gpu_check.json", "gpu_check.md"
FIXTURES = ROOT / "tests" / "fixtures" / "authors"
FIXTURE_NAMES = ("facades_s64", "cityscapes_s16", "dontcare_s32")
# the fused kernel (fp16 dots, fp32 accumulation) against the fp32 reference, float output in [-1, 1]
KERNEL_PSNR_DB, KERNEL_MAX_ABS = 40.0, 2e-2
TARGETS = {"pixelwise_us": 60.0, "whole_us": 150.0, "speedup_vs_authors_fp16": 10.0}  # H100/H200, 1024x1024, fp16


# ---- results -------------------------------------------------------------------------------------
class SectionSkipped(Exception):
    """Raised by a section that cannot run here (the reason is recorded)."""


class SectionTimeout(Exception):
    pass


class Result:
    """What one section found: checks (passed True/False, or None for information) and data."""

    def __init__(self, name: str):
        self.name, self.checks, self.data = name, [], {}

    def check(self, what: str, passed: bool | None, **values) -> bool | None:
        values = {k: _plain(v) for k, v in values.items()}
        self.checks.append({"name": what, "passed": passed, **values})
        mark = {True: "ok", False: "FAILED", None: "info"}[passed]
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        print(f"  [{self.name}] {mark}: {what}" + (f" ({shown})" if shown else ""), flush=True)
        return passed

    def info(self, what: str, **values) -> None:
        self.check(what, None, **values)

    def guard(self, what: str, fn: Callable[[], Any]) -> Any:
        """fn(); an exception becomes a failed check naming it (the section goes on)."""
        try:
            return fn()
        except (SectionSkipped, SectionTimeout, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - recorded, the section goes on
            self.check(what, False, error=f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:2000])
            traceback.print_exc(limit=6)
            return None


def _plain(v):
    if isinstance(v, (np.floating, np.integer, np.bool_)):
        return v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ---- shared helpers ------------------------------------------------------------------------------
@dataclass
class Ctx:
    smoke: bool
    cuda: bool
    seed: int
    kernel_cache: Path
    own_cache: bool = False  # made by this run (a temporary folder, removed at the end)

    @property
    def size(self) -> tuple[int, int]:
        return (64, 64) if self.smoke else (1024, 1024)

    def random_config(self):
        """facades-like (13 labels, S=64 at 1024 crop) on a GPU; S=16 and a small low-res stream in --smoke."""
        from asap_deploy.config import ModelConfig, preset

        if self.smoke:
            return ModelConfig(label_nc=13, crop_size=256, lr_width=16, lr_max_width=32, lr_depth=2)
        return preset("facades")

    def cc(self) -> int:
        """This GPU's SM (sm_90 stands in for it in --smoke: compiled, never launched)."""
        if not self.cuda:
            return 90
        import torch

        major, minor = torch.cuda.get_device_capability()
        return major * 10 + minor


def need_gpu(ctx: Ctx) -> None:
    if not ctx.cuda:
        raise SectionSkipped("needs a CUDA GPU" + (" (--smoke: CPU only)" if ctx.smoke else ""))


def make_params(cfg, n: int, h: int, w: int, seed: int):
    """A public-layout grid (N, P, h, w), fp32 on the CPU, with activations of order one."""
    import torch

    g = torch.Generator().manual_seed(seed)
    parts = []
    for li, (cin, cout) in enumerate(zip(cfg.mlp_channels[:-1], cfg.mlp_channels[1:])):
        std = 0.35 if li == 0 else 1.6 / math.sqrt(cin)
        parts.append(torch.randn(n, cout, h, w, generator=g) * 0.1)
        parts.append(torch.randn(n, cin * cout, h, w, generator=g) * std)
    return torch.cat(parts, 1)


def make_labels(cfg, n: int, h: int, w: int, seed: int) -> np.ndarray:
    """n label maps of irregular blobs from numpy alone (the GPU machine may lack OpenCV): a coarse
    random grid of ids read through smoothly warped coordinates, so regions have wavy borders that
    cross tile borders."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, h, w), dtype=cfg.label_dtype)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    for i in range(n):
        gh, gw = (int(v) for v in rng.integers(3, 10, size=2))
        coarse = rng.integers(0, cfg.n_label_channels, (gh, gw))
        fy, fx, py, px = rng.uniform(1, 3), rng.uniform(1, 3), rng.uniform(0, 6.3), rng.uniform(0, 6.3)
        wy = y + 0.06 * h * np.sin(2 * np.pi * fx * x / w + px)
        wx = x + 0.06 * w * np.sin(2 * np.pi * fy * y / h + py)
        cy = np.clip((wy * gh / h).astype(np.int64), 0, gh - 1)
        cx = np.clip((wx * gw / w).astype(np.int64), 0, gw - 1)
        out[i] = coarse[cy, cx]
    return out


def read_gray_png(path: Path) -> np.ndarray:
    """An 8/16-bit grayscale, non-interlaced PNG -> (H, W) array, with zlib alone (the fixtures'
    label and instance maps), for a GPU machine without Pillow or OpenCV."""
    import struct
    import zlib

    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path}: not a PNG")
    pos, idat, head = 8, [], None
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            head = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + length
    w, h, depth, color, _, _, interlace = head
    if color != 0 or depth not in (8, 16) or interlace:
        raise ValueError(f"{path}: only 8/16-bit grayscale non-interlaced PNGs are read here")
    bpp = depth // 8
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, 1 + w * bpp)
    rows = np.zeros((h, w * bpp), np.int32)
    for r in range(h):
        f, line = raw[r, 0], raw[r, 1:].astype(np.int32)
        prev = rows[r - 1] if r else np.zeros(w * bpp, np.int32)
        if f in (0, 2):
            rows[r] = (line + (prev if f == 2 else 0)) & 255
            continue
        cur = np.zeros(w * bpp, np.int32)
        for i in range(w * bpp):
            a = cur[i - bpp] if i >= bpp else 0
            b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
            if f == 1:
                pred = a
            elif f == 3:
                pred = (a + b) // 2
            else:  # 4: Paeth
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            cur[i] = (line[i] + pred) & 255
        rows[r] = cur
    if bpp == 1:
        return rows.astype(np.uint8)
    return (rows[:, 0::2] * 256 + rows[:, 1::2]).astype(np.uint16)


def read_map(path: Path, reader) -> np.ndarray:
    """asap_deploy.io's reader (Pillow / OpenCV), else the zlib-only one."""
    try:
        return reader(path)
    except ImportError:
        return read_gray_png(path)
    except Exception as exc:  # noqa: BLE001 - a MissingDependencyError when neither Pillow nor OpenCV is here
        if type(exc).__name__ != "MissingDependencyError":
            raise
        return read_gray_png(path)


def reference_pixelwise(cfg, labels: np.ndarray, params) -> np.ndarray:
    """The fp32 CPU reference of the pixelwise stage: (N, H, W, 3) float32."""
    import torch

    from asap_deploy.model import pixelwise

    idx = torch.from_numpy(cfg.channel_index(labels, check=False))
    with torch.inference_mode():
        return pixelwise(idx, params.float().cpu(), cfg).numpy()


def image_compare(got: np.ndarray, ref: np.ndarray) -> dict:
    """Float RGB in [-1, 1] vs the reference: max/mean abs, PSNR and largest level of the 8-bit images."""
    from asap_deploy.engines.validate import psnr_u8
    from asap_deploy.io import to_uint8

    got = np.asarray(got, np.float32)
    d = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    g8, r8 = to_uint8(got), to_uint8(ref)
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()), "psnr_db": psnr_u8(r8, g8),
            "max_levels": int(np.abs(g8.astype(np.int32) - r8.astype(np.int32)).max()),
            "finite": bool(np.isfinite(got).all())}


def kernel_ok(m: dict) -> bool:
    return m["finite"] and m["psnr_db"] >= KERNEL_PSNR_DB and m["max_abs"] <= KERNEL_MAX_ABS


def load_fixture(name: str) -> dict:
    """An authors' fixture (in the repository: the GPU machine gets it with the checkout)."""
    from asap_deploy.checkpoints import load_generator
    from asap_deploy.io import read_instance_map, read_label_map

    d = FIXTURES / name
    meta = json.loads((d / "meta.json").read_text())
    model, ck = load_generator(d / "latest_net_G.pth")
    cfg = ck.config
    labels = np.stack([read_map(d / f"label_{i}.png", read_label_map) for i in range(meta["batch"])])
    inst = (np.stack([read_map(d / f"instance_{i}.png", read_instance_map) for i in range(meta["batch"])]).astype(np.int32)
            if cfg.instance_edges else None)
    return {"name": name, "cfg": cfg, "model": model, "labels": labels, "instances": inst,
            "params": np.load(d / "params.npy"), "output": np.load(d / "output.npy").transpose(0, 2, 3, 1)}


def plugin_pack(ctx: Ctx, cfg, pairs):
    """The kernels `asap build-engine` would pack for this GPU (AOT, no GPU needed; cached)."""
    from asap_deploy.engines.build import plugin_kernels

    return plugin_kernels(cfg, [ctx.cc()], list(pairs), cache_dir=ctx.kernel_cache)


def plugin_core_for(cfg, pack):
    """The plugin state as TensorRT rebuilds it from the serialized fields (plugins/plugin_core.py)."""
    from asap_deploy.plugins import plugin_core
    from asap_deploy.plugins.spec import node_attributes

    fields = plugin_core.field_arrays(plugin_core.normalize_attributes(node_attributes(cfg)), pack)
    blob = fields.pop("kernels").view(np.uint8).tobytes()
    return plugin_core.SpatialMLPCore(fields, pack_bytes=blob)


def desc(dims, type_name):
    return SimpleNamespace(dims=tuple(dims), type=type_name)


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "int32": torch.int32}[name]


class PluginCase:
    """Device tensors of one pixelwise case and the plugin's enqueue on them (raw pointers)."""

    def __init__(self, cfg, labels: np.ndarray, params, dt: str, core):
        import torch

        self.cfg, self.dt, self.core = cfg, dt, core
        n, H, W = labels.shape  # noqa: N806
        self.shape = (n, H, W)
        self.ids = torch.from_numpy(cfg.channel_index(labels, check=False).astype(np.int32)).cuda()
        self.params = params.to(torch_dtype(dt)).contiguous().cuda()
        self.out = torch.zeros((n, H, W, cfg.output_nc), dtype=torch_dtype(dt), device="cuda")

    def enqueue(self, stream: int) -> str:
        from asap_deploy.plugins.plugin_core import enqueue_from_descs

        n, H, W = self.shape  # noqa: N806
        ind = [desc((n, H, W), "int32"), desc(tuple(self.params.shape), self.dt)]
        outd = [desc(tuple(self.out.shape), self.dt)]
        return enqueue_from_descs(self.core, ind, outd, [self.ids.data_ptr(), self.params.data_ptr()],
                                  [self.out.data_ptr()], int(stream), lambda t: t)


# ---- a stand-in for TensorRT around the real runner (engines/tensorrt.py) -------------------------------
class _FakeTrt:
    __version__ = "stand-in"
    TensorIOMode = SimpleNamespace(INPUT="input", OUTPUT="output")

    @staticmethod
    def nptype(dt):
        return dt


class _PluginContext:
    """TensorRT's execution context for a one-layer pixelwise network, its enqueue = the plugin's
    (plugin_core.enqueue_from_descs with the bound addresses). `fail`: None, "raise" (an exception
    on the execution number `fail_at`) or "sync" (a stream synchronisation inside it: a real,
    driver-side invalidation when that execution is being captured)."""

    def __init__(self, core, params_shape, dt: str, fail: str | None = None, fail_at: int = 2):
        self.core, self.params_shape, self.dt, self.fail, self.fail_at = core, params_shape, dt, fail, fail_at
        self.shapes, self.addr, self.executions = {}, {}, 0

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)

    def get_tensor_shape(self, name):
        n, h, w = self.shapes["ids"]
        return (n, h, w, 3)

    def set_tensor_address(self, name, ptr):
        self.addr[name] = int(ptr)

    def execute_async_v3(self, stream):
        from asap_deploy.plugins.cuda_driver import driver
        from asap_deploy.plugins.plugin_core import enqueue_from_descs

        self.executions += 1
        if self.executions == self.fail_at and self.fail == "raise":
            raise RuntimeError("enqueue failed (injected, inside the capture)")
        if self.executions == self.fail_at and self.fail == "sync":
            drv = driver()
            handle = getattr(drv, "CUstream", int)(int(stream))  # (a stand-in driver takes the int)
            drv.cuStreamSynchronize(handle)  # not capturable: the driver invalidates the capture
        n, h, w = self.shapes["ids"]
        ind = [desc((n, h, w), "int32"), desc(self.shapes["params"], self.dt)]
        enqueue_from_descs(self.core, ind, [desc((n, h, w, 3), self.dt)], [self.addr["ids"], self.addr["params"]],
                           [self.addr["rgb"]], int(stream), lambda t: t)
        return True


class _PluginEngine:
    def __init__(self, context, dt: str):
        self.context, self.io = context, {"ids": ("input", np.int32), "params": ("input", np.dtype(dt.replace("fp", "float"))),
                                         "rgb": ("output", np.dtype(dt.replace("fp", "float")))}
        self.num_io_tensors = 3

    def get_tensor_name(self, i):
        return list(self.io)[i]

    def get_tensor_mode(self, name):
        return self.io[name][0]

    def get_tensor_dtype(self, name):
        return self.io[name][1]

    def create_execution_context(self):
        return self.context


class _PluginRuntime:
    def __init__(self, engine):
        self.engine = engine

    def deserialize_cuda_engine(self, blob):
        return self.engine


def driver_context():
    """(driver module, the device's primary context, a new non-blocking stream), as TensorRTEngine sets them up."""
    from asap_deploy.plugins.cuda_driver import check, driver

    drv = driver()
    check(drv, drv.cuInit(0), "cuInit")
    dev = check(drv, drv.cuDeviceGet(0), "cuDeviceGet")
    ctx = check(drv, drv.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
    check(drv, drv.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    stream = check(drv, drv.cuStreamCreate(1), "cuStreamCreate")
    return drv, ctx, stream


def make_runner(core, cfg, n, H, W, dt, ctx, stream, notes: list, cuda_graph: bool, fail=None):  # noqa: N803
    """engines/tensorrt.py's _GraphRunner around the stand-in engine."""
    from asap_deploy.engines.tensorrt import _GraphRunner

    S = cfg.S  # noqa: N806
    context = _PluginContext(core, (n, cfg.num_params, H // S, W // S), dt, fail)
    runner = _GraphRunner(_FakeTrt, _PluginRuntime(_PluginEngine(context, dt)), Path("pixelwise.stand-in.engine"),
                          {}, b"", stream, cuda_graph, ctx, lambda key, text: notes.append(text))
    return runner, context


def runner_feeds(cfg, labels: np.ndarray, params, dt: str) -> dict:
    return {"ids": cfg.channel_index(labels, check=False).astype(np.int32),
            "params": params.numpy().astype(dt.replace("fp", "float"))}


def stream_idle(drv, stream) -> bool:
    """True when `stream` is not capturing (a stream left capturing fails every later call)."""
    from asap_deploy.plugins.cuda_driver import check

    status = check(drv, drv.cuStreamIsCapturing(stream), "cuStreamIsCapturing")
    return int(status) == int(drv.CUstreamCaptureStatus.CU_STREAM_CAPTURE_STATUS_NONE)


# ---- timing ----------------------------------------------------------------------------------------------
def time_device(fn: Callable[[], Any], stream=None, min_iters: int = 50, min_s: float = 1.0,
                warmup_s: float = 0.3) -> tuple[list[float], float]:
    """Per-call seconds from CUDA events recorded around each call on `stream` (None: torch's current
    stream), calls back to back (the device timeline of a call, host launch gaps included); and the
    wall time of the timed calls."""
    import torch

    t_end = time.perf_counter() + warmup_s
    fn()
    while time.perf_counter() < t_end:
        fn()
    torch.cuda.synchronize()
    pairs = []
    start = time.perf_counter()
    while len(pairs) < min_iters or time.perf_counter() - start < min_s:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(stream)
        fn()
        b.record(stream)
        pairs.append((a, b))
        if len(pairs) % 64 == 0:
            b.synchronize()  # keep the queue short
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return [a.elapsed_time(b) / 1e3 for a, b in pairs], wall


def time_host(fn: Callable[[], Any], min_iters: int = 20, min_s: float = 1.0, warmup_s: float = 0.3,
              sync: Callable[[], None] | None = None) -> tuple[list[float], float]:
    """Per-call wall seconds (perf_counter), each call finished (`sync`) before the next."""
    t_end = time.perf_counter() + warmup_s
    fn()
    while time.perf_counter() < t_end:
        fn()
    samples = []
    start = time.perf_counter()
    while len(samples) < min_iters or time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        samples.append(time.perf_counter() - t0)
    return samples, time.perf_counter() - start


def stats(samples: list[float], wall: float, images: int = 1) -> dict:
    from asap_deploy.engines.bench import summarize

    s = summarize(samples, images, wall)
    return {k: s[k] for k in ("iterations", "median_ms", "mean_ms", "min_ms", "max_ms", "p90_ms", "p95_ms", "p99_ms",
                              "cv", "throughput_ips")}


# ---- sections --------------------------------------------------------------------------------------------
def sec_environment(ctx: Ctx, r: Result) -> None:
    env = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
           "numpy": np.__version__}
    for mod, attr in (("torch", "__version__"), ("triton", "__version__"), ("onnxruntime", "__version__"),
                      ("cupy", "__version__"), ("cuda.bindings", "__version__"), ("tensorrt", "__version__"),
                      ("tensorrt_rtx", "__version__")):
        try:
            m = __import__(mod, fromlist=["_"])
            env[mod] = str(getattr(m, attr, "?"))
        except Exception as exc:  # noqa: BLE001 - not installed (or broken): say so
            env[mod] = f"not available ({type(exc).__name__})"
    import asap_deploy

    env["asap_deploy"] = asap_deploy.__version__
    try:
        env["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True, timeout=10).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        env["commit"] = "?"
    import torch

    env["torch_cuda"] = torch.version.cuda
    env["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    try:
        import onnxruntime

        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except Exception:  # noqa: BLE001
        pass
    if ctx.cuda:
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, sm=f"sm_{p.major}{p.minor}", gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   multiprocessors=p.multi_processor_count, devices=torch.cuda.device_count())
        from asap_deploy.plugins.cuda_driver import check, driver

        drv = driver()
        v = int(check(drv, drv.cuDriverGetVersion(), "cuDriverGetVersion"))
        env["cuda_driver_api"] = f"{v // 1000}.{(v % 1000) // 10}"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if smi.returncode == 0:
            env["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    r.data["environment"] = env
    for k, v in env.items():
        print(f"  {k}: {v}", flush=True)
    from asap_deploy.engines import registry

    usable = {b.name: b.available(None, "fp16" if b.name == "torch-cuda" else "fp32") for b in registry.BACKENDS}
    r.data["backends"] = {k: {"usable": ok, "why": why} for k, (ok, why) in usable.items()}
    if ctx.cuda:
        r.check("a CUDA device is visible to PyTorch", True, gpu=env["gpu"], sm=env["sm"])
        ok, why = usable["torch-cuda"]
        r.check("the torch-cuda backend is usable here", ok, why=why)
    else:
        r.info("no CUDA device (--smoke)", torch_cuda_backend=usable["torch-cuda"][1])


def sec_kernel(ctx: Ctx, r: Result) -> None:
    import torch

    from asap_deploy.plugins.torch_op import spatial_mlp

    dev = "cuda" if ctx.cuda else "cpu"
    interp = not ctx.cuda
    cfg = ctx.random_config()
    H, W = ctx.size  # noqa: N806
    S = cfg.S  # noqa: N806
    labels = make_labels(cfg, 1, H, W, ctx.seed)
    params = make_params(cfg, 1, H // S, W // S, ctx.seed)
    ref = reference_pixelwise(cfg, labels, params)
    ids = torch.from_numpy(labels.astype(np.int32)).to(dev)
    where = f"random {H}x{W}, S={S}, {cfg.n_label_channels} labels"
    jit = {}  # params dtype -> the JIT kernel's output on the public (N, P, h, w) grid, as the plugin reads it
    # fp16/fp32 params in the public layout (the plugin's), and fp32 re-packed to fp16 channels-last first
    for pd, repack in (("fp16", False), ("fp32", False), ("fp32", True)):
        layout = "re-packed to fp16 channels-last" if repack else "public layout"

        def run_jit(pd=pd, repack=repack):
            p = params.to(torch_dtype(pd)).to(dev)
            out = spatial_mlp(ids, p, cfg, repack=repack, interpret=interp)
            u8 = spatial_mlp(ids, p, cfg, out_dtype=torch.uint8, repack=repack, interpret=interp)
            return out.float().cpu().numpy(), u8.cpu().numpy()

        got = r.guard(f"JIT kernel, {pd} params, {layout} ({where})", run_jit)
        if got is None:
            continue
        out, u8 = got
        if not repack:
            jit[pd] = out
        m = image_compare(out, ref)
        r.check(f"JIT kernel{' (interpreter)' if interp else ''}, {pd} params, {layout} vs fp32 reference ({where})",
                kernel_ok(m), **m)
        from asap_deploy.io import to_uint8

        lv = int(np.abs(u8.astype(np.int32) - to_uint8(out).astype(np.int32)).max())
        r.check(f"JIT kernel, {pd} params, {layout}: 8-bit output = conversion of its float output (<= 1 level)",
                lv <= 1, max_levels=lv)

    # ahead of time, without a GPU (cached), then through the driver-only launcher
    pairs = [("fp32", "fp32")] if ctx.smoke else [("fp32", "fp32"), ("fp16", "fp16")]
    pack = r.guard(f"AOT compile for sm_{ctx.cc()}", lambda: plugin_pack(ctx, cfg, pairs))
    if pack is None:
        return
    for k in pack.kernels:
        meta = k.meta
        info = {key: meta[key] for key in ("shared", "static_shared", "shared_limit", "num_warps", "ptx_target",
                                           "ptx_version", "cuda_version", "triton_version") if key in meta}
        try:  # registers / stack from the cubin itself (plugins/aot.py, where it has the reader)
            from asap_deploy.plugins.aot import cubin_info

            info.update(cubin_info(k.cubin, meta["kernel_name"]))
        except (ImportError, Exception):  # noqa: BLE001 - information only
            pass
        r.info(f"AOT kernel sm_{k.cc} {k.params_dtype}->{k.out_dtype}", **info, cubin_bytes=len(k.cubin))
    if not ctx.cuda:
        r.info("driver-only launch of the AOT kernels skipped: needs a CUDA GPU (--smoke)")
    else:
        from asap_deploy.plugins.launcher import DriverKernel, grid_for
        from asap_deploy.plugins.plugin_core import launch_values, normalize_attributes
        from asap_deploy.plugins.spec import node_attributes

        attrs = normalize_attributes(node_attributes(cfg))
        cids = torch.from_numpy(cfg.channel_index(labels, check=False).astype(np.int32)).cuda()
        for k in pack.kernels:
            for image in ("cubin", "ptx"):
                def run_aot(k=k, image=image):
                    data = k.cubin if image == "cubin" else k.ptx + b"\0"
                    kern = DriverKernel(k.meta, data).load()
                    p = params.to(torch_dtype(k.params_dtype)).contiguous().cuda()
                    out = torch.zeros((1, H, W, 3), dtype=torch_dtype(k.out_dtype), device="cuda")
                    kern.launch(grid_for(kern.meta, N=1, H=H, W=W),
                                launch_values(cids.data_ptr(), p.data_ptr(), out.data_ptr(), 1, H, W, attrs),
                                torch.cuda.current_stream().cuda_stream)
                    torch.cuda.synchronize()
                    return out.float().cpu().numpy()

                what = f"AOT {image} sm_{k.cc} {k.params_dtype}->{k.out_dtype} through the driver launcher"
                out = r.guard(what, run_aot)
                if out is None:
                    continue
                m = image_compare(out, ref)
                if k.params_dtype in jit:
                    m["max_abs_vs_jit"] = float(np.abs(out - jit[k.params_dtype]).max())
                ok = kernel_ok(m) and m.get("max_abs_vs_jit", 0.0) <= (1e-3 if k.out_dtype == "fp32" else 2e-3)
                r.check(f"{what} vs fp32 reference ({where})", ok, **m)

    # the authors' fixtures: their labels and their parameter grid
    names = ("cityscapes_s16",) if ctx.smoke else FIXTURE_NAMES
    for name in names:
        def run_fixture(name=name):
            fx = load_fixture(name)
            fcfg, lab = fx["cfg"], fx["labels"]
            p = torch.from_numpy(fx["params"])
            fref = reference_pixelwise(fcfg, lab, p)
            res = {"ref": fref, "authors": fx["output"], "cfg": fcfg}
            res["jit"] = spatial_mlp(torch.from_numpy(lab.astype(np.int32)).to(dev), p.to(dev), fcfg,
                                     interpret=interp).float().cpu().numpy()
            if ctx.cuda and fcfg.S == cfg.S:  # the AOT kernel of the random case's variant (cached): no new compile
                from asap_deploy.plugins.launcher import DriverKernel, grid_for
                from asap_deploy.plugins.plugin_core import launch_values, normalize_attributes
                from asap_deploy.plugins.spec import node_attributes

                k = plugin_pack(ctx, fcfg, [("fp32", "fp32")]).kernels[0]
                kern = DriverKernel(k.meta, k.cubin).load()
                n, h, w = lab.shape
                cid = torch.from_numpy(fcfg.channel_index(lab, check=False).astype(np.int32)).cuda()
                pc = p.contiguous().cuda()
                out = torch.zeros((n, h, w, 3), device="cuda")
                kern.launch(grid_for(kern.meta, N=n, H=h, W=w),
                            launch_values(cid.data_ptr(), pc.data_ptr(), out.data_ptr(), n, h, w,
                                          normalize_attributes(node_attributes(fcfg))),
                            torch.cuda.current_stream().cuda_stream)
                torch.cuda.synchronize()
                res["aot"] = out.cpu().numpy()
            return res

        res = r.guard(f"authors' fixture {name}", run_fixture)
        if res is None:
            continue
        shape = "x".join(map(str, res["ref"].shape[:3]))
        for path in ("jit", "aot"):
            if path in res:
                m = image_compare(res[path], res["ref"])
                m["psnr_vs_authors_output_db"] = image_compare(res[path], res["authors"])["psnr_db"]
                r.check(f"{path.upper()} kernel on the authors' fixture {name} ({shape}, S={res['cfg'].S}) vs fp32 "
                        f"reference", kernel_ok(m), **m)


def sec_plugin_enqueue(ctx: Ctx, r: Result) -> None:
    import torch

    from asap_deploy.plugins.plugin_core import normalize_attributes
    from asap_deploy.plugins.spec import node_attributes

    cfg = ctx.random_config()
    pairs = [("fp32", "fp32")] if ctx.smoke else [("fp32", "fp32"), ("fp16", "fp16")]
    pack = plugin_pack(ctx, cfg, pairs)
    core = plugin_core_for(cfg, pack)
    r.check("plugin fields round trip (attributes, kernel pack)", core.attrs == normalize_attributes(node_attributes(cfg))
            and core.pack.archs() == [ctx.cc()] and sorted(core.pack.dtypes()) == sorted(pairs),
            archs=core.pack.archs(), dtypes=core.pack.dtypes(), pack_bytes=len(core.pack_bytes))
    k, how = core.pack.select(ctx.cc(), "fp32", "fp32")
    r.check(f"the pack selects the exact cubin for sm_{ctx.cc()}", how == "cubin" and k.cc == ctx.cc(), how=how)
    need_gpu(ctx)
    H, W = ctx.size  # noqa: N806
    S = cfg.S  # noqa: N806
    for n in (1, 2):
        labels = make_labels(cfg, n, H if n == 1 else 512, W if n == 1 else 512, ctx.seed + n)
        params = make_params(cfg, n, labels.shape[1] // S, labels.shape[2] // S, ctx.seed + n)
        ref = reference_pixelwise(cfg, labels, params)
        for dt in ("fp32", "fp16"):
            def run(dt=dt):
                case = PluginCase(cfg, labels, params, dt, core)
                how = case.enqueue(torch.cuda.current_stream().cuda_stream)
                torch.cuda.synchronize()
                return how, case.out.float().cpu().numpy()

            shape = "x".join(map(str, labels.shape))
            got = r.guard(f"plugin enqueue {dt} {shape}", run)
            if got is not None:
                m = image_compare(got[1], ref)
                r.check(f"plugin enqueue_from_descs with device pointers, {dt}, {shape} vs fp32 reference", kernel_ok(m),
                        loaded_as=got[0], **m)
    # defect 5: a params tensor whose grid does not fit the ids must be refused, not read out of bounds
    labels = make_labels(cfg, 1, 256, 256, ctx.seed)
    big = make_params(cfg, 1, 256 // S + 1, 256 // S + 1, ctx.seed)  # larger: nothing outside it is read

    def wrong_shape():
        case = PluginCase(cfg, labels, big, "fp32", core)
        try:
            case.enqueue(torch.cuda.current_stream().cuda_stream)
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - the refusal is what we want
            return f"{type(exc).__name__}: {exc}"
        return None

    refused = r.guard("plugin enqueue with a params grid that does not fit the ids", wrong_shape)
    r.check("plugin enqueue refuses params (N, P, h+1, w+1) for ids (N, H, W) (defect 5)", refused is not None,
            error=refused)


def sec_graph_capture(ctx: Ctx, r: Result) -> None:
    need_gpu(ctx)
    import torch

    from asap_deploy.plugins.cuda_driver import check

    cfg = ctx.random_config()
    H, W = ctx.size  # noqa: N806
    core = plugin_core_for(cfg, plugin_pack(ctx, cfg, [("fp32", "fp32"), ("fp16", "fp16")]))
    labels = make_labels(cfg, 1, H, W, ctx.seed)
    labels2 = make_labels(cfg, 1, H, W, ctx.seed + 7)
    params = make_params(cfg, 1, H // cfg.S, W // cfg.S, ctx.seed)
    ref, ref2 = reference_pixelwise(cfg, labels, params), reference_pixelwise(cfg, labels2, params)
    drv, dctx, stream = driver_context()
    s = int(stream)
    case = PluginCase(cfg, labels, params, "fp16", core)
    torch.cuda.synchronize()
    mode = drv.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL

    def direct():
        case.enqueue(s)
        check(drv, drv.cuStreamSynchronize(stream), "sync")
        plain = case.out.float().cpu().numpy()
        check(drv, drv.cuStreamBeginCapture(stream, mode), "cuStreamBeginCapture")
        try:
            case.enqueue(s)
        finally:
            ended = drv.cuStreamEndCapture(stream)
        graph = check(drv, ended, "cuStreamEndCapture")
        gexec = check(drv, drv.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
        drv.cuGraphDestroy(graph)
        case.out.zero_()
        torch.cuda.synchronize()
        check(drv, drv.cuGraphLaunch(gexec, stream), "cuGraphLaunch")
        check(drv, drv.cuStreamSynchronize(stream), "sync")
        replay = case.out.float().cpu().numpy()
        r.check("graph replay of the plugin's driver launch = the plain launch (bitwise)",
                bool(np.array_equal(replay, plain)), max_abs=float(np.abs(replay - plain).max()))
        r.check("plain launch vs fp32 reference", kernel_ok(image_compare(plain, ref)), **image_compare(plain, ref))
        case.ids.copy_(torch.from_numpy(cfg.channel_index(labels2, check=False).astype(np.int32)))  # same buffer
        torch.cuda.synchronize()
        check(drv, drv.cuGraphLaunch(gexec, stream), "cuGraphLaunch")
        check(drv, drv.cuStreamSynchronize(stream), "sync")
        m = image_compare(case.out.float().cpu().numpy(), ref2)
        r.check("a replay reads the buffers' new contents (new label map, same addresses)", kernel_ok(m), **m)
        return gexec

    gexec = r.guard("capture of the plugin's driver launch (cuStreamBeginCapture .. cuGraphInstantiate)", direct)

    def timing():  # K back-to-back calls between two events, and the host's launch cost
        K = 200  # noqa: N806
        ev0, ev1 = check(drv, drv.cuEventCreate(0), "event"), check(drv, drv.cuEventCreate(0), "event")
        out = {}
        for name, launch in (("plain enqueue", lambda: case.enqueue(s)),
                             ("graph replay", lambda: check(drv, drv.cuGraphLaunch(gexec, stream), "cuGraphLaunch"))):
            for _ in range(10):
                launch()
            check(drv, drv.cuStreamSynchronize(stream), "sync")
            check(drv, drv.cuEventRecord(ev0, stream), "record")
            t0 = time.perf_counter()
            for _ in range(K):
                launch()
            host = (time.perf_counter() - t0) / K
            check(drv, drv.cuEventRecord(ev1, stream), "record")
            check(drv, drv.cuEventSynchronize(ev1), "sync")
            dev_ms = float(check(drv, drv.cuEventElapsedTime(ev0, ev1), "elapsed")) / K
            out[name] = {"device_us_per_call": dev_ms * 1e3, "host_us_per_launch": host * 1e6}
            r.info(f"{name}: {K} back-to-back calls at {H}x{W} fp16", **out[name])
        r.data["timing"] = out
        for e in (ev0, ev1):
            drv.cuEventDestroy(e)

    if gexec is not None:
        r.guard("timing plain launches vs graph replays", timing)
        drv.cuGraphExecDestroy(gexec)

    def runner_part():  # engines/tensorrt.py's runner with CUDA graphs on: plain run, capture, replays
        notes: list[str] = []
        runner, context = make_runner(core, cfg, 1, H, W, "fp16", dctx, stream, notes, cuda_graph=True)
        outs = [runner.run(runner_feeds(cfg, labels, params, "fp16"))["rgb"].astype(np.float32) for _ in range(3)]
        r.check("TensorRT runner (graphs on): plain run, capture, replay give the same image", all(
            np.array_equal(o, outs[0]) for o in outs) and kernel_ok(image_compare(outs[0], ref)),
            executions=context.executions, **image_compare(outs[-1], ref))
        o4 = runner.run(runner_feeds(cfg, labels2, params, "fp16"))["rgb"].astype(np.float32)
        r.check("TensorRT runner replay with a new label map (no new execution: replayed)",
                kernel_ok(image_compare(o4, ref2)) and context.executions == 2, executions=context.executions,
                phases=getattr(runner, "last_phases", None), **image_compare(o4, ref2))
        r.check("no capture note, stream idle", not notes and stream_idle(drv, stream), notes=notes)
        runner.close()

    r.guard("engines/tensorrt.py runner with CUDA graphs", runner_part)
    drv.cuStreamDestroy(stream)


def sec_capture_failure(ctx: Ctx, r: Result) -> None:
    need_gpu(ctx)
    import torch

    cfg = ctx.random_config()
    H, W = 256, 256  # noqa: N806
    core = plugin_core_for(cfg, plugin_pack(ctx, cfg, [("fp32", "fp32")]))
    labels = make_labels(cfg, 1, H, W, ctx.seed)
    params = make_params(cfg, 1, H // cfg.S, W // cfg.S, ctx.seed)
    ref = reference_pixelwise(cfg, labels, params)
    drv, dctx, stream = driver_context()
    for fail in ("raise", "sync"):
        def run(fail=fail):
            notes: list[str] = []
            runner, context = make_runner(core, cfg, 1, H, W, "fp32", dctx, stream, notes, cuda_graph=True, fail=fail)
            outs = [runner.run(runner_feeds(cfg, labels, params, "fp32"))["rgb"] for _ in range(4)]
            idle = stream_idle(drv, stream)
            runner.close()
            return outs, notes, idle, context.executions, runner.cuda_graph

        got = r.guard(f"TensorRT runner, capture failing by {fail}", run)
        if got is None:
            continue
        outs, notes, idle, executions, graphs_on = got
        ok = all(kernel_ok(image_compare(o, ref)) for o in outs) and idle and len(notes) == 1 and not graphs_on
        r.check(f"TensorRT runner: a capture failing mid-way ({'exception' if fail == 'raise' else 'cuStreamSynchronize inside it'}) "
                "ends, the stream stays usable, the output is right, one note (defect 2)", ok, stream_idle=idle,
                notes=notes, executions=executions, **image_compare(outs[-1], ref))
    drv.cuStreamDestroy(stream)

    # torch-cuda: a capture broken by a real synchronising call; eager from then on
    from asap_deploy.engines.torch_cuda import TorchCudaEngine
    from asap_deploy.random_model import random_generator

    model = random_generator(cfg, ctx.seed)
    for precision in ("fp16", "fp32"):
        def run_engine(precision=precision):
            eng = TorchCudaEngine(model, precision)
            plain = eng._compute

            def breaking(kind, e):
                out = plain(kind, e)
                if torch.cuda.is_current_stream_capturing():
                    torch.cuda.current_stream().synchronize()  # illegal while capturing
                return out

            eng._compute = breaking
            with contextlib.ExitStack() as st:
                import warnings

                st.enter_context(warnings.catch_warnings())
                warnings.simplefilter("ignore")
                outs = [eng.run(labels) for _ in range(4)]
            after = torch.ones(4, device="cuda").sum().item()  # the device still works
            return outs, eng.notes, eng.cuda_graph, after

        got = r.guard(f"torch-cuda {precision}, capture broken by a synchronisation", run_engine)
        if got is None:
            continue
        outs, notes, graphs_on, after = got
        ok = all(np.array_equal(o, outs[0]) for o in outs) and len(notes) == 1 and not graphs_on and after == 4.0
        r.check(f"torch-cuda {precision}: a failed capture is ended, noted once, and the engine runs eagerly", ok,
                notes=notes, calls=len(outs))


def sec_threads(ctx: Ctx, r: Result) -> None:
    need_gpu(ctx)
    import torch

    cfg = ctx.random_config()
    H, W = 256, 256  # noqa: N806
    pack = plugin_pack(ctx, cfg, [("fp32", "fp32")])
    core = plugin_core_for(cfg, pack)
    labels = make_labels(cfg, 1, H, W, ctx.seed)
    params = make_params(cfg, 1, H // cfg.S, W // cfg.S, ctx.seed)
    ref = reference_pixelwise(cfg, labels, params)
    drv, dctx, stream = driver_context()

    def in_thread(fn):
        box = {}

        def target():
            try:
                box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - handed back
                box["error"] = exc

        t = threading.Thread(target=target, name="handler")
        t.start()
        t.join(60)
        if t.is_alive():
            raise TimeoutError("the thread did not finish in 60 s")
        if "error" in box:
            raise box["error"]
        return box["value"]

    for graphs in (False, True):
        def run(graphs=graphs):
            notes: list[str] = []
            runner, _ = make_runner(core, cfg, 1, H, W, "fp32", dctx, stream, notes, cuda_graph=graphs)
            main = runner.run(runner_feeds(cfg, labels, params, "fp32"))["rgb"]
            others = [in_thread(lambda: runner.run(runner_feeds(cfg, labels, params, "fp32"))["rgb"]) for _ in range(3)]
            in_thread(runner.close)
            return main, others, notes

        got = r.guard(f"TensorRT runner run from a second thread (graphs {'on' if graphs else 'off'})", run)
        if got is not None:
            main, others, notes = got
            ok = all(np.array_equal(o, main) for o in others) and kernel_ok(image_compare(main, ref)) and not notes
            r.check(f"TensorRT runner `run` and `close` from another thread, graphs {'on' if graphs else 'off'} "
                    "(context push/pop, defect 1)", ok, notes=notes, **image_compare(others[-1], ref))

    # the mechanism of defect 1: a driver call from a thread with no current context
    def no_push():
        err, ptr = in_thread(lambda: drv.cuMemAlloc(1024))
        if int(err) == 0:
            drv.cuMemFree(ptr)
        return drv.cuGetErrorName(err)[1].decode() if int(err) else "CUDA_SUCCESS"

    r.info("cuMemAlloc from a new thread without pushing the context (why the runner pushes it)",
           result=r.guard("driver call without a context", no_push))

    def plugin_no_push():
        case = PluginCase(cfg, labels, params, "fp32", core)
        torch.cuda.synchronize()
        how = in_thread(lambda: (case.enqueue(int(stream)), drv.cuStreamSynchronize(stream))[0])
        return how, image_compare(case.out.cpu().numpy(), ref)

    got = r.guard("the plugin's enqueue from a new thread", plugin_no_push)
    if got is not None:
        r.check("the plugin's enqueue from a new thread without a context (the launcher makes the primary context "
                "current)", kernel_ok(got[1]), loaded_as=got[0], **got[1])
    drv.cuStreamDestroy(stream)

    from asap_deploy.engines.torch_cuda import TorchCudaEngine
    from asap_deploy.random_model import random_generator

    def torch_cuda_thread():
        eng = TorchCudaEngine(random_generator(cfg, ctx.seed), "fp16")
        main = eng.run(labels)
        others = [in_thread(lambda: eng.run(labels)) for _ in range(3)]
        return main, others, eng.notes

    got = r.guard("torch-cuda run from a second thread", torch_cuda_thread)
    if got is not None:
        main, others, notes = got
        r.check("torch-cuda `run` from other threads = from the creating thread (graph replays included)",
                all(np.array_equal(o, main) for o in others) and not notes, notes=notes)
    torch.cuda.synchronize()


def sec_torch_cuda(ctx: Ctx, r: Result) -> None:
    need_gpu(ctx)
    import warnings

    from asap_deploy.engines.base import IMAGE
    from asap_deploy.engines.torch_cuda import TorchCudaEngine
    from asap_deploy.engines.torch_engine import TorchEngine
    from asap_deploy.engines.validate import THRESHOLDS, failures, image_metrics, params_metrics, psnr_u8
    from asap_deploy.random_model import random_generator

    def reference(ref, labels, inst) -> dict:
        rp = ref.predict_params(labels, inst)
        return {"labels": labels, "inst": inst, "params": rp, "pixelwise": ref.pixelwise(labels, rp),
                "end_to_end": ref.generate(labels, inst)}

    def compare(eng, want: dict, what: str) -> None:
        t = THRESHOLDS[eng.precision]
        labels, inst = want["labels"], want["inst"]
        res = {"predictor": params_metrics(want["params"], eng.predict_params(labels, inst)),
               "pixelwise": image_metrics(want["pixelwise"], eng.pixelwise(labels, want["params"])),
               "end_to_end": image_metrics(want["end_to_end"], eng.generate(labels, inst))}
        for stage, m in res.items():
            fails = failures(stage, m, t)
            keep = {k: m[k] for k in ("cosine", "max_abs", "mean_abs", "psnr_db", "max_levels") if k in m}
            r.check(f"torch-cuda {eng.precision} {stage} vs torch fp32 CPU ({what})", not fails, failures=fails, **keep)
        runs = [eng.run(labels, inst) for _ in range(3)]  # eager, captured + replayed, replayed
        gen = eng.generate(labels, inst)[IMAGE]
        lv = int(np.abs(runs[0].astype(np.int32) - gen.astype(np.int32)).max())
        p = psnr_u8(want["end_to_end"][IMAGE], runs[0])
        r.check(f"torch-cuda {eng.precision}: run x3 (eager, captured, replayed) identical, within 1 level of generate, "
                f"PSNR >= {t.psnr_db:g} dB ({what})", all(np.array_equal(x, runs[0]) for x in runs) and lv <= 1
                and p >= t.psnr_db, levels_vs_generate=lv, psnr_db=p, cuda_graph=eng.describe()["cuda_graph"],
                notes=eng.notes)

    cfg = ctx.random_config()
    model = random_generator(cfg, ctx.seed)
    ref = TorchEngine(model)
    inputs = [(n, h, w, reference(ref, make_labels(cfg, n, h, w, ctx.seed + h), None))
              for n, (h, w) in ((2, (512, 512)), (1, ctx.size))]
    for precision in ("fp16", "fp32"):
        def run(precision=precision):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                eng = TorchCudaEngine(model, precision)
                r.info(f"torch-cuda {precision}", **{k: v for k, v in eng.describe().items() if k != "notes"})
                for n, h, w, want in inputs:
                    compare(eng, want, f"random model, {n}x{h}x{w}")
                eng.close()
            return [str(x.message) for x in caught if "torch-cuda" in str(x.message)]

        said = r.guard(f"torch-cuda {precision} on a random model", run)
        if said:
            r.check(f"torch-cuda {precision}: no warnings", False, warnings=said)
    for name in FIXTURE_NAMES:
        def run_fixture(name=name):
            fx = load_fixture(name)
            eng = TorchCudaEngine(fx["model"], "fp16")
            shape = "x".join(map(str, fx["labels"].shape))
            compare(eng, reference(TorchEngine(fx["model"]), fx["labels"], fx["instances"]),
                    f"authors' checkpoint {name}, {shape}")
            got = eng.generate(fx["labels"], fx["instances"])["image_float"]
            m = image_compare(got, fx["output"])
            r.check(f"torch-cuda fp16 vs the authors' own output ({name})", m["psnr_db"] >= THRESHOLDS["fp16"].psnr_db, **m)

        r.guard(f"torch-cuda on the authors' fixture {name}", run_fixture)


def sec_latency(ctx: Ctx, r: Result) -> None:
    import torch

    from asap_deploy.engines.authors import AuthorsForward
    from asap_deploy.engines.torch_engine import TorchEngine
    from asap_deploy.plugins.torch_op import spatial_mlp
    from asap_deploy.random_model import random_generator

    cfg = ctx.random_config()
    H, W = ctx.size  # noqa: N806
    S = cfg.S  # noqa: N806
    model = random_generator(cfg, ctx.seed)
    labels = make_labels(cfg, 1, H, W, ctx.seed)
    rows: list[dict] = []
    r.data["rows"] = rows
    r.data["size"] = [H, W]
    r.data["timing"] = ("CUDA events around each call on its stream, calls back to back (device timeline per call, "
                        "host launch gaps included); 'end_to_end (host arrays)': wall clock through Engine.run, numpy "
                        "in and out (H2D, D2H, synchronisation included)") if ctx.cuda else \
        "--smoke: wall clock on the CPU (a check of the script, not a measurement)"

    def add(backend: str, stage: str, fn: Callable[[], tuple[list[float], float]], **extra):
        def go():
            samples, wall = fn()
            row = {"backend": backend, "stage": stage, **stats(samples, wall), **extra}
            rows.append(row)
            r.info(f"{backend} {stage}", median_us=row["median_ms"] * 1e3, p90_us=row["p90_ms"] * 1e3,
                   p99_us=row["p99_ms"] * 1e3, iterations=row["iterations"])

        r.guard(f"latency {backend} {stage}", go)

    if not ctx.cuda:  # --smoke: the table code on the CPU
        eng = TorchEngine(model)
        params = eng.predict_params(labels)
        kw = {"min_iters": 2, "min_s": 0.0, "warmup_s": 0.0}
        add("torch fp32 (CPU)", "predictor", lambda: time_host(lambda: eng.predict_params(labels), **kw))
        add("torch fp32 (CPU)", "pixelwise", lambda: time_host(lambda: eng.pixelwise(labels, params), **kw))
        add("torch fp32 (CPU)", "end_to_end", lambda: time_host(lambda: eng.run(labels), **kw))
        a = AuthorsForward(model)
        lt = torch.from_numpy(labels.astype(np.int64))
        with torch.inference_mode():
            onehot = a.encode(lt)
            p = a.lowres(onehot)

        def inf(f):
            def call():
                with torch.inference_mode():
                    return f()
            return call

        add("authors fp32 (CPU)", "end_to_end", lambda: time_host(inf(lambda: a(onehot)), **kw))
        add("authors fp32 (CPU)", "pixelwise", lambda: time_host(inf(lambda: a.pixelwise(onehot, p)), **kw))
        r.info("torch-cuda and the authors' fp16 rows skipped: need a CUDA GPU (--smoke)")
        _summary(r, rows)
        return

    from asap_deploy.engines.authors import full_res_encoding
    from asap_deploy.engines.torch_cuda import TorchCudaEngine

    for precision in ("fp16", "fp32"):
        name = f"torch-cuda {precision}"

        def engine_rows(precision=precision, name=name):
            eng = TorchCudaEngine(model, precision)
            params = eng.predict_params(labels)
            for stage, kind, kw in (("predictor", "predictor", {}), ("pixelwise", "pixelwise", {"params": params}),
                                    ("end_to_end", "image", {})):
                fn = eng.prepared(kind, labels, **kw)
                add(name, stage, lambda fn=fn: time_device(fn, eng.stream))
            phases: dict[str, list[float]] = {}

            def host_run():
                eng.run(labels)
                for k, v in eng.last_phases().items():
                    phases.setdefault(k, []).append(v)

            add(name, "end_to_end (host arrays)", lambda: time_host(host_run))
            if rows and rows[-1]["stage"] == "end_to_end (host arrays)":
                rows[-1]["phases_ms"] = {k: float(np.median(v)) for k, v in phases.items()}
            if precision == "fp16":  # the fused kernel alone, 8-bit out, on the predictor's own grid layout
                ids = torch.from_numpy(labels).cuda()
                grid = torch.from_numpy(params).cuda().to(torch.float16, memory_format=torch.channels_last)
                add(name, "fused kernel alone (8-bit out)", lambda: time_device(
                    lambda: spatial_mlp(ids, grid, cfg, out_dtype=torch.uint8, validate=False)))
            r.info(f"{name} engine", **{k: v for k, v in eng.describe().items() if k in ("cuda_graph", "notes", "pixelwise")})
            eng.close()

        r.guard(f"latency {name}", engine_rows)

    def authors_rows():
        gen = model.to("cuda")
        a = AuthorsForward(gen)
        lt = torch.from_numpy(labels.astype(np.int64)).cuda()
        with torch.inference_mode():
            onehot = a.encode(lt)
            a._pe = full_res_encoding(1, H, W, S).cuda()  # their cached encoding (built at the first call)
            with torch.autocast("cuda", dtype=torch.float16):
                p = a.lowres(onehot)

        def run(f):
            def call():
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
                    return f()
            return call

        add("authors fp16 (autocast)", "predictor", lambda: time_device(run(lambda: a.lowres(onehot))))
        add("authors fp16 (autocast)", "pixelwise", lambda: time_device(run(lambda: a.pixelwise(onehot, p))))
        add("authors fp16 (autocast)", "end_to_end", lambda: time_device(run(lambda: a(onehot))))

    r.guard("latency authors fp16", authors_rows)
    _summary(r, rows)


def _summary(r: Result, rows: list[dict]) -> None:
    by = {(x["backend"], x["stage"]): x for x in rows}
    base = {s: by.get(("authors fp16 (autocast)", s)) for s in ("predictor", "pixelwise", "end_to_end")}
    for x in rows:
        b = base.get(x["stage"])
        x["speedup_vs_authors_fp16"] = b["median_ms"] / x["median_ms"] if b and x["median_ms"] > 0 else None
    ours = by.get(("torch-cuda fp16", "end_to_end"))
    pix = by.get(("torch-cuda fp16", "fused kernel alone (8-bit out)"))
    if ours is None:
        return
    targets = {"pixelwise_us": (pix["median_ms"] * 1e3 if pix else None, TARGETS["pixelwise_us"], "le"),
               "whole_us": (ours["median_ms"] * 1e3, TARGETS["whole_us"], "le"),
               "speedup_vs_authors_fp16": (ours.get("speedup_vs_authors_fp16"), TARGETS["speedup_vs_authors_fp16"], "ge")}
    r.data["targets"] = {}
    for k, (v, limit, how) in targets.items():
        met = None if v is None else (v <= limit if how == "le" else v >= limit)
        r.data["targets"][k] = {"value": v, "target": limit, "met": met}
        r.info(f"target {k} {'<=' if how == 'le' else '>='} {limit:g}", value=v, met=met)


@dataclass
class Section:
    name: str
    title: str
    fn: Callable[[Ctx, Result], None]
    timeout_s: int
    smoke_timeout_s: int = 60


SECTIONS = [  # run in this order: what matters most first, in case the budget runs out
    Section("environment", "Environment", sec_environment, 60),
    Section("kernel", "Fused kernel: JIT and AOT through the driver vs the fp32 reference", sec_kernel, 240, 120),
    Section("torch_cuda", "torch-cuda backend vs the PyTorch fp32 reference", sec_torch_cuda, 180),
    Section("latency", "Latency per stage at 1024x1024 (--smoke: 64x64 on the CPU)", sec_latency, 180),
    Section("plugin_enqueue", "The plugin's enqueue path with device pointers", sec_plugin_enqueue, 120),
    Section("graph_capture", "CUDA-graph capture and replay of the driver launch", sec_graph_capture, 120),
    Section("capture_failure", "A capture failing mid-way (defect 2)", sec_capture_failure, 120),
    Section("threads", "Calls from a second thread (defect 1)", sec_threads, 90),
]
BY_NAME = {s.name: s for s in SECTIONS}


# ---- running sections ------------------------------------------------------------------------------------
@contextlib.contextmanager
def _alarm(seconds: float):
    """SectionTimeout after `seconds` in the main thread (Python code only: a hung C call is not
    interrupted; on a GPU each section also runs in its own process, killed at its timeout)."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def handler(signum, frame):
        raise SectionTimeout(f"ran past its {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def run_in_process(sec: Section, ctx: Ctx, timeout: float) -> dict:
    r = Result(sec.name)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"title": sec.title}
    try:
        with _alarm(timeout):
            sec.fn(ctx, r)
        failed = [c for c in r.checks if c["passed"] is False]
        out["status"] = "failed" if failed else "passed"
    except SectionSkipped as exc:
        if r.checks:  # what could run here ran: its checks decide, the rest is said
            failed = [c for c in r.checks if c["passed"] is False]
            out.update(status="failed" if failed else "passed", reason=f"the rest of this section {exc}")
        else:
            out.update(status="skipped", reason=str(exc))
    except SectionTimeout as exc:
        out.update(status="timeout", reason=str(exc))
    except Exception as exc:  # noqa: BLE001 - recorded; the other sections go on
        out.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-6000:])
        traceback.print_exc()
    out.update(seconds=round(time.perf_counter() - t0, 2), checks=r.checks, data=_plain(r.data))
    return out


def run_isolated(sec: Section, args, timeout: float) -> dict:
    """The section in a child process (a crash, a hang or a sticky CUDA error stays there)."""
    fd, res_path = tempfile.mkstemp(prefix=f"gpu_check_{sec.name}_", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", sec.name, "--child-result", res_path,
           "--seed", str(args.seed), "--budget", str(int(timeout))]
    if args.smoke:
        cmd.append("--smoke")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=timeout + 15, stdout=None, stderr=subprocess.PIPE, text=True)
        sys.stderr.write(proc.stderr or "")
        text = Path(res_path).read_text() if os.path.getsize(res_path) else ""
        if text:
            res = json.loads(text)
            if res.get("status") != "passed" and proc.stderr:
                res["stderr"] = proc.stderr[-6000:]
            return res
        return {"title": sec.title, "status": "error", "seconds": round(time.perf_counter() - t0, 2), "checks": [],
                "error": f"the section's process ended with status {proc.returncode} and no result",
                "stderr": (proc.stderr or "")[-6000:]}
    except subprocess.TimeoutExpired as exc:
        return {"title": sec.title, "status": "timeout", "seconds": round(time.perf_counter() - t0, 2), "checks": [],
                "reason": f"its process ran past {timeout + 15:.0f} s and was killed",
                "stderr": (exc.stderr or "")[-6000:] if isinstance(exc.stderr, str) else ""}
    finally:
        with contextlib.suppress(OSError):
            os.unlink(res_path)


# ---- the report --------------------------------------------------------------------------------------------
def verdict(sections: dict) -> str:
    bad = [n for n, s in sections.items() if s["status"] in ("failed", "error", "timeout")]
    return "FAILED" if bad else "PASSED"


def markdown(rep: dict) -> str:
    env = rep["sections"].get("environment", {}).get("data", {}).get("environment", {})
    lines = [f"# GPU check ({'smoke run on the CPU' if rep['mode'] == 'smoke' else 'GPU run'})", "",
             f"**{rep['verdict']}** | {rep['started']} | {rep['seconds']:.0f} s | `{rep['command']}`", ""]
    if env:
        lines += [f"Machine: {env.get('gpu', 'no GPU')} {env.get('sm', '')}, driver "
                  f"{env.get('nvidia_smi', env.get('cuda_driver_api', '-'))}; torch {env.get('torch')} (CUDA "
                  f"{env.get('torch_cuda')}), Triton {env.get('triton')}, cuda-python {env.get('cuda.bindings')}, "
                  f"Python {env.get('python')}, commit {env.get('commit')}", ""]
    lines += ["| section | status | seconds | checks ok / failed / info |", "| --- | --- | ---: | --- |"]
    for name, s in rep["sections"].items():
        cs = s.get("checks", [])
        counts = f"{sum(c['passed'] is True for c in cs)} / {sum(c['passed'] is False for c in cs)} / " \
                 f"{sum(c['passed'] is None for c in cs)}"
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', 0):.1f} | {counts} |")
    for name, s in rep["sections"].items():
        lines += ["", f"## {s.get('title', name)} (`{name}`): {s['status']}"]
        for key in ("reason", "error"):
            if s.get(key):
                lines += ["", f"{key}: {s[key]}"]
        if name == "latency" and s.get("data", {}).get("rows"):
            d = s["data"]
            lines += ["", f"{d['size'][0]}x{d['size'][1]}, batch 1. {d['timing']}. Percentiles: trtexec's rule.", "",
                      "| backend | stage | median us | p90 us | p95 us | p99 us | min us | cv | x authors fp16 |",
                      "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for x in d["rows"]:
                sp = x.get("speedup_vs_authors_fp16")
                cv = x.get("cv")
                lines.append(f"| {x['backend']} | {x['stage']} | {x['median_ms'] * 1e3:.1f} | {x['p90_ms'] * 1e3:.1f} | "
                             f"{x['p95_ms'] * 1e3:.1f} | {x['p99_ms'] * 1e3:.1f} | {x['min_ms'] * 1e3:.1f} | "
                             f"{'-' if cv is None else f'{cv:.2f}'} | {'-' if sp is None else f'{sp:.1f}'} |")
            for k, t in d.get("targets", {}).items():
                v = t["value"]
                lines.append(f"\nTarget {k}: {'-' if v is None else f'{v:.1f}'} vs {t['target']:g}: "
                             f"{ {True: 'met', False: 'NOT met', None: 'not measured'}[t['met']] }")
        if s.get("checks"):
            lines += ["", "| check | result | values |", "| --- | --- | --- |"]
            for c in s["checks"]:
                res = {True: "ok", False: "**FAILED**", None: "info"}[c["passed"]]
                vals = ", ".join(f"{k}={_fmt(v)}" for k, v in c.items() if k not in ("name", "passed"))
                lines.append(f"| {c['name']} | {res} | {vals.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def prepare_out(out: Path) -> None:
    """The output folder: absent, empty or asap's gpu-check folder (never another's files)."""
    from asap_deploy.io import check_file_replaceable, claim_files, owned_folder

    owned_folder(out, KIND, "GPU check report")
    out.mkdir(parents=True, exist_ok=True)
    for name in (JSON_NAME, MD_NAME):
        check_file_replaceable(out / name, "GPU check report", overwrite=True)
    claim_files(out, KIND, [JSON_NAME, MD_NAME])


def write_report(out: Path, rep: dict) -> None:
    from asap_deploy.io import write_json, write_text

    write_json(out / JSON_NAME, json.loads(json.dumps(rep, default=str)))
    write_text(out / MD_NAME, markdown(rep))


def default_out() -> Path:
    return Path(os.environ["OUT"]) / "gpu_check" if os.environ.get("OUT") else ROOT / "benchmarks" / "results" / "gpu_check"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", type=Path, default=None, help="report folder (default: $OUT/gpu_check when $OUT is set, "
                                                           "else benchmarks/results/gpu_check)")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny sizes: checks the script")
    ap.add_argument("--only", default="", help=f"comma-separated sections (of: {', '.join(BY_NAME)})")
    ap.add_argument("--skip", default="", help="comma-separated sections to leave out")
    ap.add_argument("--budget", type=int, default=450, help="seconds for the whole run (30..3600; default 450)")
    ap.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                    help="each section in its own process (auto: on a GPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.child and not 30 <= args.budget <= 3600:
        ap.error("--budget must be in 30..3600 seconds")
    if not 0 <= args.seed < 2**31:
        ap.error("--seed must be in 0..2**31-1")
    for opt in ("only", "skip"):
        bad = [n for n in getattr(args, opt).split(",") if n and n not in BY_NAME]
        if bad:
            ap.error(f"--{opt}: unknown section(s) {', '.join(bad)} (choose from: {', '.join(BY_NAME)})")
    return args


def make_ctx(args) -> Ctx:
    import torch

    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        torch.set_num_threads(1)  # a shared CI machine: steadier than fighting over its cores
    cuda = torch.cuda.is_available() and not args.smoke
    given = os.environ.get("ASAP_KERNEL_CACHE")
    cache = Path(given or tempfile.mkdtemp(prefix="asap_gpu_check_kernels_"))
    os.environ["ASAP_KERNEL_CACHE"] = str(cache)  # shared with the sections' processes
    return Ctx(smoke=args.smoke, cuda=cuda, seed=args.seed, kernel_cache=cache, own_cache=not given)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:  # one section, in its own process, for run_isolated
        ctx = make_ctx(args)
        res = run_in_process(BY_NAME[args.child], ctx, args.budget)
        Path(args.child_result).write_text(json.dumps(res, default=str))
        return 0
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        print("gpu_check needs PyTorch (pip install 'asap-deploy[torch]')", file=sys.stderr)
        return 2
    out = (args.out or default_out()).resolve()
    try:
        prepare_out(out)
    except Exception as exc:  # noqa: BLE001 - an AsapError saying why the folder is refused
        print(f"gpu_check: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    ctx = make_ctx(args)
    if not ctx.cuda and not args.smoke:
        print("gpu_check: no CUDA device here: the GPU sections will be skipped (use --smoke for the CPU check "
              "of this script)", flush=True)
    isolate = args.isolate == "yes" or (args.isolate == "auto" and ctx.cuda)
    only = [n for n in args.only.split(",") if n] or list(BY_NAME)
    skip = {n for n in args.skip.split(",") if n}
    t_start = time.perf_counter()
    rep = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "mode": "smoke" if args.smoke else "gpu",
           "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "isolated": isolate, "budget_s": args.budget, "thresholds": {"kernel_psnr_db": KERNEL_PSNR_DB,
                                                                       "kernel_max_abs": KERNEL_MAX_ABS},
           "targets": TARGETS, "sections": {}, "seconds": 0.0, "verdict": "RUNNING"}
    for sec in SECTIONS:
        if sec.name not in only or sec.name in skip:
            continue
        left = args.budget - (time.perf_counter() - t_start)
        limit = min(sec.smoke_timeout_s if args.smoke else sec.timeout_s, left)
        print(f"== {sec.name}: {sec.title} (limit {limit:.0f} s)", flush=True)
        if limit < 15:
            res = {"title": sec.title, "status": "skipped", "seconds": 0.0, "checks": [],
                   "reason": f"the run's budget of {args.budget} s is spent"}
        elif isolate:
            res = run_isolated(sec, args, limit)
        else:
            res = run_in_process(sec, ctx, limit)
        rep["sections"][sec.name] = res
        print(f"== {sec.name}: {res['status'].upper()} in {res.get('seconds', 0):.1f} s"
              + (f" ({res.get('reason') or res.get('error')})" if res.get("reason") or res.get("error") else ""), flush=True)
        rep["seconds"] = time.perf_counter() - t_start
        write_report(out, rep)  # after every section: a run cut short keeps what it measured
    rep["verdict"] = verdict(rep["sections"])
    rep["seconds"] = time.perf_counter() - t_start
    write_report(out, rep)
    if ctx.own_cache:
        import shutil

        shutil.rmtree(ctx.kernel_cache, ignore_errors=True)
    print(f"{rep['verdict']} | {rep['seconds']:.0f} s | {out / JSON_NAME} | {out / MD_NAME}", flush=True)
    return 0 if rep["verdict"] == "PASSED" else 1


if __name__ == "__main__":
    sys.exit(main())
