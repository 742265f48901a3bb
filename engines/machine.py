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
    for dist in ("asap-deploy", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "torch", "triton", "tensorrt",
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
                                                                                 "tensorrt", "tensorrt-rtx-cu13", "numpy")))
