"""The machine a report was measured on: CPU, cores, load, OS, GPUs with driver/CUDA, library
versions (every benchmark report and `asap doctor` carry it). Nothing here raises for a missing
piece: a missing GPU or library is described, not an error."""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import sys
from pathlib import Path


def dist_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def importable(module: str) -> bool:
    """Whether `module` can be imported here (found, and not blocked by sys.modules[module] = None)."""
    try:
        return importlib.util.find_spec(module) is not None and sys.modules.get(module, True) is not None
    except (ValueError, ImportError):
        return False


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def gpu_info() -> dict:
    """{'devices': [{'name', 'sm', 'memory_mib'}], 'driver': 'x.y', 'cuda_driver_api': int} or {'error': why}."""
    from asap_deploy.plugins.cuda_driver import cuda_device_count

    n, why = cuda_device_count()
    if n == 0:
        return {"error": why}
    from cuda.bindings import driver

    out: dict = {"devices": []}
    err, v = driver.cuDriverGetVersion()
    if int(err) == 0:
        out["cuda_driver_api"] = f"{int(v) // 1000}.{int(v) % 1000 // 10}"
    for i in range(n):
        from asap_deploy.plugins.cuda_driver import device_sm

        sm, name = device_sm(i)
        _, dev = driver.cuDeviceGet(i)
        err, mem = driver.cuDeviceTotalMem(dev)
        out["devices"].append({"index": i, "name": name, "sm": sm, "memory_mib": int(mem) // 2**20 if int(err) == 0 else None})
    try:  # the display driver version is in /proc on Linux
        m = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", Path("/proc/driver/nvidia/version").read_text())
        if m:
            out["driver"] = m.group(1)
    except OSError:
        pass
    return out


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("asap-deploy", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "torch", "triton", "tensorrt",
                 "tensorrt-rtx-cu13", "cuda-python", "pillow", "opencv-python-headless"):
        v = dist_version(dist)
        if v:
            out[dist] = v
    return out


def machine_info() -> dict:
    """CPU model and cores, load, OS, GPU(s) with driver/CUDA, library versions."""
    info = {"cpu": cpu_model(), "cores": os.cpu_count(), "os": platform.platform(),
            "load_avg": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "gpu": gpu_info(), "libraries": library_versions()}
    if "torch" in sys.modules and sys.modules["torch"] is not None:
        torch = sys.modules["torch"]
        info["torch_threads"] = torch.get_num_threads()
        info["torch_cuda"] = torch.version.cuda
    return info


def machine_line(info: dict) -> str:
    g = info.get("gpu", {})
    gpu = ", ".join(f"{d['name']} (sm_{d['sm']})" for d in g.get("devices", [])) or "no GPU"
    if g.get("driver") or g.get("cuda_driver_api"):
        gpu += f", driver {g.get('driver', '?')}, CUDA {g.get('cuda_driver_api', '?')}"
    load = info.get("load_avg")
    return (f"{info['cpu']} ({info['cores']} cores{', load ' + ' '.join(map(str, load)) if load else ''}); {gpu}; "
            + ", ".join(f"{k} {v}" for k, v in info["libraries"].items() if k in ("torch", "onnxruntime", "onnxruntime-gpu",
                                                                                 "openvino", "tensorrt", "tensorrt-rtx-cu13",
                                                                                 "numpy")))


# ---- what the CPU offers: its flags and its single-precision GEMM rate (the pixelwise stage's floor) ----
# the flags that decide which kernels the runtimes pick (fp32 FMA width, int8 dot products, bf16, AMX)
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_flags() -> dict:
    """{'model': CPU model name, 'flags': those of CPU_FLAGS the CPU reports (Linux /proc/cpuinfo;
    empty elsewhere)}. A virtual machine may hide flags its host has."""
    found: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("flags", "features")):
                found = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {"model": cpu_model(), "flags": [f for f in CPU_FLAGS if f in found]}


def pixelwise_flops(mlp_channels, pixels: int) -> int:
    """Multiply-adds x 2 of the pixelwise MLP on `pixels` pixels: 2 * pixels * sum(c_in * c_out) over
    its layers (mlp_channels = ModelConfig.mlp_channels, e.g. [37, 64, 64, 64, 64, 3]). The one-hot
    first layer counted as a full matmul, as the authors' code computes it."""
    ch = list(mlp_channels)
    return 2 * int(pixels) * sum(a * b for a, b in zip(ch[:-1], ch[1:]))


def sgemm_floor_ms(flops: float, gflops: float) -> float:
    """The time `flops` take at `gflops` GFLOP/s, in ms: the floor no fp32 implementation beats."""
    return flops / (gflops * 1e9) * 1e3


SGEMM_SQUARE = 1024  # the large square sgemm: 1024 x 1024 @ 1024 x 1024 (2.1 GFLOP)
SGEMM_TILE_PIXELS = 1 << 18  # the pixelwise-shaped one: tiles of S*S pixels, 2^18 pixels in all


def _matmul_session(a_shape: tuple[int, ...], b_shape: tuple[int, ...], threads: int):
    """An ONNX Runtime CPU session of one fp32 MatMul (MLAS sgemm, as the onnxruntime backend runs its
    matmuls), `threads` intra-op threads."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    out_shape = (*a_shape[:-1], b_shape[-1])
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "sgemm",
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT, a_shape),
                               helper.make_tensor_value_info("B", TensorProto.FLOAT, b_shape)],
                              [helper.make_tensor_value_info("C", TensorProto.FLOAT, out_shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _best_gflops(a_shape, b_shape, flops: int, threads: int, budget_s: float, min_calls: int = 3) -> dict:
    import time

    import numpy as np

    rng = np.random.default_rng(0)
    feeds = {"A": rng.standard_normal(a_shape, dtype=np.float32), "B": rng.standard_normal(b_shape, dtype=np.float32)}
    sess = _matmul_session(a_shape, b_shape, threads)
    sess.run(None, feeds)  # warm-up (thread pool, packing buffers)
    times: list[float] = []
    end = time.perf_counter() + budget_s
    while len(times) < min_calls or time.perf_counter() < end:
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"a": list(a_shape), "b": list(b_shape), "gflop": flops / 1e9, "calls": len(times),
            "best_ms": best * 1e3, "gflops": flops / best / 1e9}


def sgemm_rates(threads: int, S: int = 64, width: int = 64, budget_s: float = 0.4) -> dict:  # noqa: N803
    """The machine's single-precision GEMM rate with `threads` threads, in GFLOP/s from the best of
    >= 3 calls and `budget_s` seconds per shape, measured with ONNX Runtime's MatMul (MLAS: the
    sgemm the onnxruntime backend's pixelwise stage runs on):
      square    SGEMM_SQUARE^2 @ SGEMM_SQUARE^2, the machine's sgemm peak;
      tiles     the pixelwise stage's shape: a batch of per-tile (S*S x width) @ (width x width),
                SGEMM_TILE_PIXELS pixels in all.
    `gflops`: the higher of the two, the rate the floor is computed with (a strict floor)."""
    n = SGEMM_SQUARE
    square = _best_gflops((n, n), (n, n), 2 * n * n * n, threads, budget_s)
    tiles_n = max(1, SGEMM_TILE_PIXELS // (S * S))
    tiles = _best_gflops((tiles_n, S * S, width), (tiles_n, width, width), 2 * tiles_n * S * S * width * width,
                         threads, budget_s)
    tiles["tiles"] = tiles_n
    return {"library": f"onnxruntime {dist_version('onnxruntime') or dist_version('onnxruntime-gpu') or '?'} MatMul "
                       "(MLAS sgemm), fp32", "threads": threads, "square": square, "tiles": tiles,
            "gflops": max(square["gflops"], tiles["gflops"])}
