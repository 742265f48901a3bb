"""`asap doctor`: what is installed and usable here, and what to install for what is missing.
The machine description (`machine_info`) lives in engines/machine.py.

Every check is a `Check(name, status, version, detail, fix)` with status "ok", "missing" or
"warn"; nothing here raises for a missing piece, and nothing is changed on disk (the TensorRT-RTX
parser-library link is only looked for, not made).
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Check:
    name: str
    status: str  # ok | missing | warn
    version: str = ""
    detail: str = ""
    fix: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


from asap_deploy.engines.machine import dist_version, gpu_info, importable, machine_info, machine_line  # noqa: F401 - the machine line the CLI prints


# ---- checks -------------------------------------------------------------------------------------------
def check_torch() -> Check:
    if not importable("torch"):
        return Check("torch", "missing", detail="the PyTorch reference, training, export and the authors' baseline",
                     fix="pip install 'asap-deploy[torch]'")
    import torch

    from asap_deploy.engines import registry

    cuda = torch.cuda.is_available()
    detail = f"CUDA build {torch.version.cuda or 'none'}; " + (f"GPU: {torch.cuda.get_device_name(0)}" if cuda
                                                               else "runs on the CPU")
    ok, why = registry.TORCH_CUDA.available()
    detail += "; torch-cuda backend: " + ("usable" if ok else f"not usable ({why})")
    return Check("torch", "ok", torch.__version__, detail)


def check_onnxruntime() -> Check:
    if not importable("onnxruntime"):
        return Check("onnxruntime", "missing", fix="pip install onnxruntime (or onnxruntime-gpu for CUDA)")
    import onnxruntime

    from asap_deploy.engines import registry

    has_cuda, _ = registry.BY_NAME["onnxruntime-cuda"].available()
    return Check("onnxruntime", "ok", onnxruntime.__version__, "providers: " + ", ".join(registry.ort_providers()),
                 "" if has_cuda else "for the CUDA provider: pip uninstall onnxruntime && pip install onnxruntime-gpu")


def check_openvino() -> Check:
    from asap_deploy.engines import registry

    if not registry.OPENVINO.available()[0]:
        return Check("openvino", "missing", detail="the openvino CPU backend (fp32, bf16, int8)",
                     fix="pip install 'asap-deploy[openvino]'")
    caps = registry.openvino_capabilities()
    ok, why = registry.OPENVINO.available(None, "bf16")
    detail = f"CPU capabilities: {', '.join(caps) or 'none reported'}; bf16: " + ("yes" if ok else f"no ({why})")
    return Check("openvino", "ok", dist_version("openvino") or "?", detail)


def check_cuda() -> list[Check]:
    g = gpu_info()
    if "error" in g:
        fix = ("pip install cuda-python" if "cuda-python" in g["error"] else
               "install the NVIDIA driver on a machine with an NVIDIA GPU (CPU-only machines: the torch, onnxruntime "
               "and openvino backends run on the CPU; TensorRT-RTX engines can still be built)")
        return [Check("CUDA driver/device", "missing", detail=g["error"], fix=fix)]
    out = []
    for d in g["devices"]:
        out.append(Check(f"GPU {d['index']}", "ok", f"sm_{d['sm']}",
                         f"{d['name']}, {d['memory_mib']} MiB; driver {g.get('driver', '?')}, CUDA driver API "
                         f"{g.get('cuda_driver_api', '?')}"))
    return out


def check_tensorrt() -> list[Check]:
    from asap_deploy.plugins import trt_compat

    out = []
    for flavor, module in trt_compat.MODULES.items():
        label = "TensorRT" if flavor == "tensorrt" else "TensorRT-RTX"
        if not importable(module):
            out.append(Check(label, "missing", fix=trt_compat.INSTALL[flavor]))
            continue
        try:
            trt = trt_compat.import_trt(flavor)
            version = trt_compat.trt_version(trt)
        except (ImportError, OSError, trt_compat.TrtUnavailable) as exc:
            out.append(Check(label, "warn", detail=f"installed but does not import: {exc}", fix=trt_compat.INSTALL[flavor]))
            continue
        detail = "builds and runs engines (needs a GPU)" if flavor == "tensorrt" else "builds engines without a GPU"
        out.append(Check(label, "ok", version, detail))
        if flavor == "rtx":
            out.append(rtx_parser_check())
    return out


def rtx_parser_check() -> Check:
    """Whether libtensorrt_rtx.so (the parser-bug workaround, plugins/trt_compat.py) is in place."""
    from asap_deploy.plugins import trt_compat

    name = "TensorRT-RTX parser library workaround"
    try:
        libs = trt_compat.rtx_libs_dir()
    except trt_compat.TrtUnavailable as exc:
        return Check(name, "warn", detail=exc.message, fix=trt_compat.INSTALL["rtx"])
    if (libs / trt_compat.RTX_LIB).exists():
        return Check(name, "ok", detail=f"{libs / trt_compat.RTX_LIB} present")
    for d in filter(None, os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)):
        if (Path(d) / trt_compat.RTX_LIB).exists():
            return Check(name, "ok", detail=f"{Path(d) / trt_compat.RTX_LIB} on LD_LIBRARY_PATH")
    writable = os.access(libs, os.W_OK)
    return Check(name, "warn", detail=f"{trt_compat.RTX_LIB} not in place yet (the wheel ships only "
                 f"{trt_compat.RTX_LIB_VERSIONED}); {libs} is {'writable' if writable else 'read-only'}",
                 fix="nothing to do: asap build-engine " + ("creates the link there" if writable else
                                                            "links it in a cache folder and restarts itself with "
                                                            "LD_LIBRARY_PATH"))


def check_triton() -> Check:
    if not importable("triton"):
        return Check("triton", "missing", detail="the fused kernel (GPU JIT, CPU interpreter, AOT compile)",
                     fix="pip install 'asap-deploy[gpu]'")
    v = dist_version("triton") or "?"
    return Check("triton", "ok", v, "AOT compile for any sm without a GPU; TRITON_INTERPRET=1 runs the kernel on CPU")


def kernel_cache(cache_dir: Path | None = None) -> dict[str, int]:
    """AOT kernels in the cache of asap build-engine, counted per architecture (sm_XX -> count)."""
    from asap_deploy.engines.build import kernel_cache_dir

    d = Path(cache_dir) if cache_dir else kernel_cache_dir()
    counts: dict[str, int] = {}
    if d.is_dir():
        for f in d.glob("*/*_sm*.json"):
            m = re.search(r"_sm(\d+)\.json$", f.name)
            if m:
                counts[f"sm_{m.group(1)}"] = counts.get(f"sm_{m.group(1)}", 0) + 1
    return dict(sorted(counts.items()))


def check_kernels(cache_dir: Path | None = None) -> Check:
    from asap_deploy.engines.build import kernel_cache_dir

    d = Path(cache_dir) if cache_dir else kernel_cache_dir()
    counts = kernel_cache(d)
    if not counts:
        return Check("AOT kernels (cache)", "warn", detail=f"none cached in {d}",
                     fix="they are compiled on demand by asap build-engine (or: asap compile-kernels -o DIR)")
    return Check("AOT kernels (cache)", "ok", detail=f"{d}: " + ", ".join(f"{a}: {n}" for a, n in counts.items()))


def check_pillow() -> Check:
    v = dist_version("pillow")
    if not v:
        return Check("pillow", "missing", detail="reading label maps (asap infer)", fix="pip install pillow")
    return Check("pillow", "ok", v, "label maps: gray ids, palette (mode P) and colour PNGs")


def check_matplotlib() -> Check:
    v = dist_version("matplotlib")
    if not v:
        return Check("matplotlib", "missing", detail="PNG charts of asap bench / train", fix="pip install matplotlib")
    return Check("matplotlib", "ok", v, "bench charts, loss curves")


def run_checks(cache_dir: Path | None = None) -> list[Check]:
    checks = [check_torch(), check_onnxruntime(), check_openvino(), check_pillow(), check_matplotlib()]
    checks += check_cuda()
    checks += check_tensorrt()
    checks += [check_triton(), check_kernels(cache_dir)]
    return checks


def usable_backends(checks: list[Check]) -> dict[str, str]:
    """What can run here, from the checks (for the summary line)."""
    st = {c.name: c.status for c in checks}
    gpu = any(c.name.startswith("GPU ") and c.status == "ok" for c in checks)
    out = {"torch": "yes" if st.get("torch") == "ok" else "no (install torch)"}
    ort = next((c for c in checks if c.name == "onnxruntime"), None)
    out["onnxruntime"] = ("yes (" + ort.detail.removeprefix("providers: ") + ")") if ort and ort.status == "ok" else "no"
    ov = next((c for c in checks if c.name == "openvino"), None)
    if ov and ov.status == "ok":
        out["openvino"] = "yes (fp32, bf16, int8)" if "bf16: yes" in ov.detail else "yes (fp32, int8; no bf16 here)"
    else:
        out["openvino"] = "no (pip install 'asap-deploy[openvino]')"
    trt = st.get("TensorRT") == "ok" or st.get("TensorRT-RTX") == "ok"
    out["tensorrt"] = "yes" if trt and gpu else ("build only (no GPU)" if trt else "no")
    return out
