"""The TensorRT SpatialMLP plugin's enqueue path on a GPU, without TensorRT.

Run from the repository root on a machine with a CUDA GPU (no install, no TensorRT needed):

    PYTHONPATH=. python benchmarks/gpu_plugin.py [--runs 20] [--json PATH] [--dry]

Needs torch (CUDA) for the reference, Triton (>= 3.6) to compile the kernels ahead of time, and
cuda-python. For each case it

1. compiles the fused kernel ahead of time for this GPU's SM (as `asap build-engine` does),
   packs it into the plugin's `kernels` field bytes, and rebuilds the plugin state from the
   serialized fields (plugins/plugin_core.py: the same objects the TensorRT plugin holds);
2. allocates ids (int32), the parameter grid (N,P,H/S,W/S, fp32 or fp16) and the RGB output
   (N,H,W,3) with cuda-python (cuMemAlloc), creates a stream, and calls
   `plugin_core.enqueue_from_descs`, the function the plugin's IPluginV3 `enqueue` runs, with
   descriptors, raw device pointers and the raw stream;
3. compares with the PyTorch fp32 reference (`asap_deploy.model.pixelwise`): max abs on the float
   output, PSNR and the largest level difference on the 8-bit output; and times the enqueue with
   CUDA events (median of --runs).

Prints a table; writes JSON to --json (or $OUT/gpu_plugin.json when $OUT is set). Exit status 1
when a check fails. `--dry` compiles and packs for sm_86 and stops before any CUDA call (a check
of this script on a machine without a GPU).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import sys
import tempfile
import traceback
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import asap_deploy  # noqa: E402

try:  # installed: asap_deploy.plugins; from a checkout with PYTHONPATH=.: alias the top-level folders
    importlib.import_module("asap_deploy.plugins.plugin_core")
except ImportError:
    for sub in ("plugins", "engines", "export"):
        mod = importlib.import_module(sub)
        sys.modules[f"asap_deploy.{sub}"] = mod
        setattr(asap_deploy, sub, mod)

from asap_deploy.config import ModelConfig  # noqa: E402
from asap_deploy.plugins import aot, plugin_core  # noqa: E402
from asap_deploy.plugins.spec import kernel_spec, node_attributes  # noqa: E402

PSNR_MIN_DB = {"fp32": 40.0, "fp16": 40.0}
MAX_ABS_MAX = {"fp32": 2e-2, "fp16": 2.5e-2}
CASES = [  # (label_nc, N, H, W)
    (13, 1, 256, 256),
    (13, 1, 1024, 1024),
    (35, 2, 512, 1024),
    (35, 1, 1024, 2048),
]


def config(label_nc: int) -> ModelConfig:
    return ModelConfig(label_nc=label_nc, contain_dontcare_label=False, instance_edges=False, crop_size=1024)  # S=64


def make_params(torch, cfg, n, h, w, seed):
    """Public-layout grid (N, P, h, w) with activations of order one."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    ch = cfg.mlp_channels
    for li, (cin, cout) in enumerate(zip(ch[:-1], ch[1:])):
        scale = 0.4 if li == 0 else 1.5 / math.sqrt(cin)
        parts.append(0.1 * torch.randn(n, cout, h, w, generator=g))
        parts.append(scale * torch.randn(n, cin * cout, h, w, generator=g))
    return torch.cat(parts, 1)


def make_ids(torch, cfg, n, H, W, seed):  # noqa: N803
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, cfg.n_label_channels, (n, 1, max(1, H // 32), max(1, W // 32)), generator=g)
    return torch.nn.functional.interpolate(coarse.float(), size=(H, W), mode="nearest")[:, 0].to(torch.int32)


def plugin_state(cfg, cc: int, pairs, workdir: Path) -> plugin_core.SpatialMLPCore:
    """Compile, pack, serialize as the plugin's fields, and read back as TensorRT would."""
    metas = [aot.compile_variant(aot.Variant(kernel_spec(cfg), pd, od), cc, workdir) for pd, od in pairs]
    pack = plugin_core.pack_from_metadata(metas, workdir)
    fields = plugin_core.field_arrays(plugin_core.normalize_attributes(node_attributes(cfg)), pack)
    blob = fields.pop("kernels").view("uint8").tobytes()
    return plugin_core.SpatialMLPCore(fields, pack_bytes=blob)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--dry", action="store_true", help="compile + pack for sm_86, no GPU calls")
    args = ap.parse_args()
    out_json = args.json or (Path(os.environ["OUT"]) / "gpu_plugin.json" if os.environ.get("OUT") else None)

    import torch

    from asap_deploy.model import pixelwise

    rows, failed = [], False
    work = Path(tempfile.mkdtemp(prefix="asap-gpu-plugin-"))
    if args.dry:
        st = plugin_state(config(13), 86, [("fp32", "fp32"), ("fp16", "fp16")], work)
        print(f"dry run: pack of {len(st.pack_bytes)} bytes, kernels {st.pack.dtypes()} for sm_{st.pack.archs()}")
        return 0

    from cuda.bindings import driver as drv

    from asap_deploy.plugins.cuda_driver import check

    def ck(res, what):
        return check(drv, res, what)

    ck(drv.cuInit(0), "cuInit")
    dev = ck(drv.cuDeviceGet(0), "cuDeviceGet")
    ctx = ck(drv.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
    ck(drv.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    attr = drv.CUdevice_attribute
    cc = 10 * ck(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "cc") + \
        ck(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "cc")
    name = ck(drv.cuDeviceGetName(64, dev), "name")
    name = name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)
    stream = ck(drv.cuStreamCreate(1), "cuStreamCreate")
    print(f"GPU {name} (sm_{cc}); torch {torch.__version__}; kernels compiled ahead of time for sm_{cc}")
    states = {}
    for label_nc, n, H, W in CASES:  # noqa: N806
        cfg = config(label_nc)
        if label_nc not in states:
            states[label_nc] = plugin_state(cfg, cc, [("fp32", "fp32"), ("fp16", "fp16")], work / str(label_nc))
        st = states[label_nc]
        S, P = cfg.S, cfg.num_params  # noqa: N806
        ids = make_ids(torch, cfg, n, H, W, seed=H + W)
        params = make_params(torch, cfg, n, H // S, W // S, seed=n + H)
        ref = pixelwise(ids.long(), params, cfg).float()  # fp32 reference on CPU
        ref8 = ((ref + 1) * 127.5).round().clamp(0, 255)
        for dt in ("fp32", "fp16"):
            row = {"labels": label_nc, "shape": f"{n}x{H}x{W}", "dtype": dt}
            ptrs = []
            try:
                tdt = torch.float32 if dt == "fp32" else torch.float16
                host = {"ids": ids.contiguous().numpy(), "params": params.to(tdt).contiguous().numpy()}
                out_bytes = n * H * W * 3 * (4 if dt == "fp32" else 2)
                dptr = {}
                for k, a in host.items():
                    dptr[k] = int(ck(drv.cuMemAlloc(a.nbytes), f"cuMemAlloc {k}"))
                    ptrs.append(dptr[k])
                    ck(drv.cuMemcpyHtoD(dptr[k], a.ctypes.data, a.nbytes), f"upload {k}")
                dptr["out"] = int(ck(drv.cuMemAlloc(out_bytes), "cuMemAlloc out"))
                ptrs.append(dptr["out"])
                desc = lambda dims, t: SimpleNamespace(dims=dims, type=t)  # noqa: E731
                ind = [desc((n, H, W), "int32"), desc((n, P, H // S, W // S), dt)]
                outd = [desc((n, H, W, 3), dt)]
                enqueue = lambda: plugin_core.enqueue_from_descs(  # noqa: E731
                    st, ind, outd, [dptr["ids"], dptr["params"]], [dptr["out"]], int(stream), lambda t: t)
                row["loaded_as"] = enqueue()
                ck(drv.cuStreamSynchronize(stream), "sync")
                import numpy as np

                got = np.empty((n, H, W, 3), np.float32 if dt == "fp32" else np.float16)
                ck(drv.cuMemcpyDtoH(got.ctypes.data, dptr["out"], got.nbytes), "download")
                got = torch.from_numpy(got.astype(np.float32))
                got8 = ((got + 1) * 127.5).round().clamp(0, 255)
                mse = float(((got8 - ref8) ** 2).mean())
                row["max_abs"] = float((got - ref).abs().max())
                row["psnr_db"] = 10 * math.log10(255.0**2 / max(mse, 1e-12))
                row["max_levels"] = int((got8 - ref8).abs().max())
                ev0, ev1 = ck(drv.cuEventCreate(0), "event"), ck(drv.cuEventCreate(0), "event")
                for _ in range(3):
                    enqueue()
                times = []
                for _ in range(args.runs):
                    ck(drv.cuEventRecord(ev0, stream), "record")
                    enqueue()
                    ck(drv.cuEventRecord(ev1, stream), "record")
                    ck(drv.cuEventSynchronize(ev1), "sync")
                    times.append(float(ck(drv.cuEventElapsedTime(ev0, ev1), "elapsed")))
                row["median_ms"] = statistics.median(times)
                row["ok"] = row["psnr_db"] >= PSNR_MIN_DB[dt] and row["max_abs"] <= MAX_ABS_MAX[dt]
            except Exception as exc:  # noqa: BLE001 - a failed case is a row of the table, not the end of the run
                row["ok"], row["error"] = False, f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            finally:
                for p in ptrs:
                    drv.cuMemFree(p)
            failed |= not row["ok"]
            rows.append(row)
    cols = ("labels", "shape", "dtype", "loaded_as", "max_abs", "psnr_db", "max_levels", "median_ms", "ok")
    print(" | ".join(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "-")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        print(" | ".join(cells) + (f"  ({r['error']})" if "error" in r else ""))
    print(f"thresholds: PSNR >= {PSNR_MIN_DB} dB, max abs <= {MAX_ABS_MAX} (float output vs fp32 PyTorch)")
    if out_json:
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps({"gpu": name, "sm": cc, "rows": rows}, indent=2))
    print("PASSED" if not failed else "FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
