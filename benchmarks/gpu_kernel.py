"""The fused pixelwise kernel on a GPU: correctness, the driver-only launch, and latency.

Run from the repository root on a machine with a CUDA GPU (no install needed, no TensorRT):

    PYTHONPATH=. python benchmarks/gpu_kernel.py [--kernel-dir DIR] [--runs 100] [--json PATH]

Needs torch with CUDA, Triton (>= 3.6) and cuda-python. Prints a table; writes JSON to --json (or
to $OUT/gpu_kernel.json when $OUT is set). Exit status 1 when a correctness check fails.

1. Correctness of the fused kernel (Triton JIT) against the PyTorch fp32 per-tile reference
   (`asap_deploy.model.pixelwise`) at 1024x1024, S=64, random parameters of realistic scale:
   max/mean abs on the float output, PSNR and max level difference on the 8-bit output; the
   kernel's uint8 output against the conversion of its float output.
2. The driver-only launch: a cubin compiled WITHOUT a GPU (from --kernel-dir, e.g. written by
   `asap compile-kernels` on a CPU machine, else compiled here in a subprocess that sees no GPU),
   loaded with cuModuleLoadData and launched with cuLaunchKernel on torch's stream: same output
   as the JIT kernel.
3. Latency of the pixelwise stage (labels + parameter grid -> RGB) at 1024x1024 and 1024x2048,
   S=64, facades (13) and cityscapes (35) label counts: the authors' forward as their code
   computes it (fp16), our per-tile PyTorch (fp16), torch.compile of it, the fused kernel (with and
   without the re-pack pre-pass) and the fused kernel through the driver launcher. CUDA-event
   timing of each call: warm-up, then median and p90 of --runs runs; ratio of each to the fused one.

`--smoke` runs every code path on the CPU at tiny sizes (Triton interpreter, wall-clock timing):
a check of this script, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from asap_deploy.config import ModelConfig  # noqa: E402
from asap_deploy.model import label_channels, one_hot, pixelwise  # noqa: E402

try:  # installed: asap_deploy.plugins; from a checkout with PYTHONPATH=.: plugins
    from asap_deploy.plugins import aot, launcher, torch_op  # noqa: E402
except ImportError:
    from plugins import aot, launcher, torch_op  # noqa: E402

PSNR_MIN_DB, MAX_ABS_MAX = 40.0, 2e-2
SWEEP = [(128, 4, 4), (128, 4, 8), (128, 2, 8), (64, 4, 4), (128, 1, 4), (256, 1, 8)]  # BLOCK_P, ITERS, warps


def percentile(samples, p):
    """trtexec's rule: sorted[max(n - 1 - int((1 - p/100) * n), 0)]."""
    s = sorted(samples)
    return s[max(len(s) - 1 - int((1 - p / 100) * len(s)), 0)]


def time_fn(fn, runs, warmup, cuda):
    """Per-call latency in microseconds: CUDA events around each call (GPU time of the stream)."""
    for _ in range(warmup):
        fn()
    samples = []
    if cuda:
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
        for a, b in events:
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize()
        samples = [a.elapsed_time(b) * 1e3 for a, b in events]
    else:
        for _ in range(runs):
            t = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t) * 1e6)
    return {"median_us": statistics.median(samples), "p90_us": percentile(samples, 90), "runs": runs}


def make_params(cfg, n, h, w, device, seed=0):
    """Public-layout grid with activations of order one (per-layer scaled random weights)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    parts = []
    ch = cfg.mlp_channels
    for li, (cin, cout) in enumerate(zip(ch[:-1], ch[1:])):
        std = 0.35 if li == 0 else 1.6 / math.sqrt(cin)
        parts.append(torch.randn(n, cout, h, w, generator=g) * 0.1)
        parts.append(torch.randn(n, cin * cout, h, w, generator=g) * std)
    return torch.cat(parts, 1).to(device)


def make_labels(cfg, n, H, W, device, seed=0):  # noqa: N803
    """Blob-like label maps (nearest-upsampled random ids), int32."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    coarse = torch.randint(0, cfg.n_label_channels, (n, 1, max(1, H // 32), max(1, W // 32)), generator=g)
    lab = torch.nn.functional.interpolate(coarse.float(), size=(H, W), mode="nearest")[:, 0]
    return lab.to(torch.int32).to(device)


def psnr_u8(a, b):
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def load_authors():
    try:
        from benchmarks.authors_forward import AuthorsForward, full_res_encoding
    except ImportError:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from authors_forward import AuthorsForward, full_res_encoding  # type: ignore
    return AuthorsForward, full_res_encoding


class _GenStub:
    """What AuthorsForward needs from a generator for its pixelwise stage."""

    def __init__(self, cfg):
        self.cfg, self.lowres_stream = cfg, None


def compile_cubin_without_gpu(cfg, spec, cc, params_dtype="fp16"):
    """AOT-compile in a subprocess that sees no GPU (CUDA_VISIBLE_DEVICES='')."""
    out = Path(tempfile.mkdtemp(prefix="asap_kernels_"))
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "try:\n    from asap_deploy.plugins import aot\nexcept ImportError:\n    from plugins import aot\n"
        "from asap_deploy.config import ModelConfig\n"
        "cfg = ModelConfig.from_json(%r)\n"
        "v = aot.variants_for([cfg], params_dtypes=[%r], out_dtypes=['fp32'], block_p=%d, iters=%d, num_warps=%d)\n"
        "aot.compile_kernels([%d], %r, v, repack_dtypes=['fp32', 'fp16'])\n"
    ) % (str(ROOT), cfg.to_json(), params_dtype, spec.BLOCK_P, spec.ITERS, spec.num_warps, cc, str(out))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    if res.returncode:
        raise RuntimeError(f"AOT compile failed:\n{res.stderr[-3000:]}")
    return out


class Report:
    def __init__(self):
        self.rows, self.failures = [], []

    def add(self, section, name, **values):
        self.rows.append({"section": section, "name": name, **values})
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        print(f"[{section}] {name}: {shown}", flush=True)

    def fail(self, section, name, exc):
        msg = f"{type(exc).__name__}: {exc}"
        self.rows.append({"section": section, "name": name, "status": "failed", "error": msg})
        self.failures.append(f"{section}/{name}: {msg}")
        print(f"[{section}] {name}: FAILED {msg}", flush=True)
        traceback.print_exc(limit=4)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel-dir", type=Path, help="AOT kernels written by `asap compile-kernels` (else compiled here "
                                                    "in a subprocess without a GPU).")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--no-sweep", action="store_true", help="Skip the block-size sweep of the fused kernel.")
    ap.add_argument("--no-compile", action="store_true", help="Skip torch.compile.")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, Triton interpreter: checks the script.")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("no CUDA device: run with --smoke for a CPU check of this script", file=sys.stderr)
        return 2
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        args.runs, args.warmup = min(args.runs, 3), 1
    dev = torch.device("cuda" if cuda else "cpu")
    rep = Report()
    import triton

    info = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
            "device": torch.cuda.get_device_name() if cuda else "cpu (smoke)"}
    if cuda:
        cc = torch.cuda.get_device_capability()
        info["cc"] = f"sm_{cc[0]}{cc[1]}"
    try:
        from cuda.bindings import driver as _drv  # noqa: F401
        import cuda.bindings as _cb

        info["cuda-python"] = getattr(_cb, "__version__", "?")
    except ImportError:
        info["cuda-python"] = "missing"
    print(" | ".join(f"{k} {v}" for k, v in info.items()), flush=True)

    sizes = [(1024, 1024), (1024, 2048)] if cuda else [(64, 64), (64, 128)]
    crop = 1024 if cuda else 256  # S = 64 on the GPU; S = 16 in the smoke run
    cfgs = {"facades13": ModelConfig(label_nc=13, crop_size=crop),
            "cityscapes35": ModelConfig(label_nc=35, crop_size=crop)}
    runs, warm = args.runs, args.warmup

    # ---- 1. correctness --------------------------------------------------------------------
    cfg = cfgs["facades13"]
    H, W = sizes[0]  # noqa: N806
    S = cfg.S  # noqa: N806
    labels = make_labels(cfg, 1, H, W, dev)
    params32 = make_params(cfg, 1, H // S, W // S, dev)
    params16 = params32.half()
    idx = label_channels(labels, cfg)
    with torch.no_grad():
        ref = pixelwise(idx, params32, cfg)
    ref_u8 = torch_op.to_uint8(ref)
    best = torch_op.kernel_spec(cfg)
    fused_out = None
    for name, p in (("fp16 params", params16), ("fp32 params", params32)):
        try:
            out = torch_op.spatial_mlp(labels, p, cfg)
            out_u8 = torch_op.spatial_mlp(labels, p, cfg, out_dtype=torch.uint8)
            if cuda:
                torch.cuda.synchronize()
            err = (out - ref).abs()
            m = {"max_abs": float(err.max()), "mean_abs": float(err.mean()),
                 "psnr_db": psnr_u8(out_u8, ref_u8), "max_levels": int((out_u8.int() - ref_u8.int()).abs().max()),
                 "u8_vs_conversion_max_levels": int((out_u8.int() - torch_op.to_uint8(out).int()).abs().max())}
            ok = m["psnr_db"] >= PSNR_MIN_DB and m["max_abs"] <= MAX_ABS_MAX and m["u8_vs_conversion_max_levels"] <= 1
            rep.add("correctness", f"fused JIT, {name}, {H}x{W}", **m, status="ok" if ok else "FAILED")
            if not ok:
                rep.failures.append(f"correctness/{name}: {m}")
            if fused_out is None:
                fused_out = out
        except Exception as exc:  # noqa: BLE001 - the table goes on
            rep.fail("correctness", name, exc)

    # ---- block-size sweep (fused kernel alone, pre-packed fp16 params) -----------------------
    packed = torch_op.repack_params(params16)
    if cuda and not args.no_sweep:
        results = []
        for bp, it, nw in SWEEP:
            try:
                spec = torch_op.kernel_spec(cfg, block_p=bp, iters=it, num_warps=nw)
                t = time_fn(lambda: torch_op.spatial_mlp(labels, packed, cfg, block_p=bp, iters=it, num_warps=nw,
                                                         validate=False), runs, warm, cuda)
                results.append((t["median_us"], spec))
                rep.add("sweep", f"BLOCK_P={bp} ITERS={it} warps={nw}", **t)
            except Exception as exc:  # noqa: BLE001
                rep.fail("sweep", f"BLOCK_P={bp} ITERS={it} warps={nw}", exc)
        if results:
            best = min(results, key=lambda r: r[0])[1]
    print(f"fused kernel configuration: BLOCK_P={best.BLOCK_P} ITERS={best.ITERS} num_warps={best.num_warps}")

    # ---- 2. the driver-only launch of a cubin compiled without a GPU -------------------------
    drv_kernels = {}
    if cuda:
        try:
            major, minor = torch.cuda.get_device_capability()
            cc = major * 10 + minor
            kdir = args.kernel_dir or compile_cubin_without_gpu(cfg, best, cc)
            path = launcher.find_kernel(kdir, cc, S=S, params_dtype="fp16", out_dtype="fp32")
            k = launcher.DriverKernel.from_json(path).load()
            rp = launcher.DriverKernel.from_json(launcher.find_kernel(kdir, cc, S=S, kind="repack",
                                                                      params_dtype="fp32")).load()
            drv_kernels = {"mlp": k, "repack": rp}
            out = torch.empty(1, H, W, 3, device=dev)
            P = cfg.num_params  # noqa: N806
            buf = torch.empty(1 * (H // S) * (W // S), P, device=dev, dtype=torch.float16)

            def run_driver(params_src=params32, out=out):
                stream = torch.cuda.current_stream().cuda_stream
                nt = buf.shape[0]
                rp.launch(launcher.grid_for(rp.meta, n_tiles=nt, P=P),
                          {"src_ptr": params_src.data_ptr(), "s_sn": params_src.stride(0), "s_sc": params_src.stride(1),
                           "s_sy": params_src.stride(2), "s_sx": params_src.stride(3), "P": P,
                           "n_tiles_h": H // S, "n_tiles_w": W // S, "n_tiles": nt, "dst_ptr": buf.data_ptr()}, stream)
                vals = launcher.spatial_mlp_values(
                    ids=labels.data_ptr(), params=buf.data_ptr(), out=out.data_ptr(), N=1, H=H, W=W, S=S,
                    n_lab=cfg.n_label_channels, dontcare_ch=-1,
                    params_strides=((H // S) * (W // S) * P, 1, (W // S) * P, P), out_strides=out.stride())
                k.launch(launcher.grid_for(k.meta, N=1, H=H, W=W), vals, stream)

            run_driver()
            torch.cuda.synchronize()
            jit = torch_op.spatial_mlp(labels, params32, cfg, block_p=best.BLOCK_P, iters=best.ITERS,
                                       num_warps=best.num_warps)
            err_ref = (out - ref).abs()
            m = {"max_abs_vs_ref": float(err_ref.max()), "max_abs_vs_jit": float((out - jit).abs().max()),
                 "psnr_db": psnr_u8(torch_op.to_uint8(out), ref_u8), "cubin_triton": k.meta["triton_version"],
                 "hidden_args": len(k.meta["hidden_args"]), "shared": k.meta["shared"]}
            ok = m["max_abs_vs_jit"] <= 1e-3 and m["psnr_db"] >= PSNR_MIN_DB
            rep.add("driver launch", f"{path.name}", **m, status="ok" if ok else "FAILED")
            if not ok:
                rep.failures.append(f"driver launch: {m}")
            drv_kernels["run"] = run_driver
        except Exception as exc:  # noqa: BLE001
            rep.fail("driver launch", "cuModuleLoadData + cuLaunchKernel", exc)
    else:
        rep.add("driver launch", "skipped", status="no GPU (smoke run)")

    # ---- 3. latency of the pixelwise stage ---------------------------------------------------
    try:
        AuthorsForward, full_res_encoding = load_authors()  # noqa: N806
    except Exception as exc:  # noqa: BLE001
        AuthorsForward = None  # noqa: N806
        rep.fail("latency", "authors' forward import", exc)
    for cname, cfg in cfgs.items():
        S = cfg.S  # noqa: N806
        for H, W in sizes:  # noqa: N806
            tag = f"{cname} {H}x{W}"
            labels = make_labels(cfg, 1, H, W, dev, seed=1)
            p32 = make_params(cfg, 1, H // S, W // S, dev, seed=1)
            p16 = p32.half()
            idx = label_channels(labels, cfg)
            times = {}

            def bench(name, fn):
                try:
                    with torch.no_grad():
                        times[name] = time_fn(fn, runs, warm, cuda)
                except Exception as exc:  # noqa: BLE001
                    rep.fail("latency", f"{tag} {name}", exc)

            if AuthorsForward is not None:
                af = AuthorsForward(_GenStub(cfg))
                oh = one_hot(idx, cfg.n_label_channels, dtype=torch.float16)
                af._pe = full_res_encoding(1, H, W, S).to(dev, torch.float16)  # their cached encoding
                bench("authors fp16", lambda: af.pixelwise(oh, p16))
                del oh
            bench("per-tile torch fp16", lambda: pixelwise(idx, p16, cfg))
            if not args.no_compile:
                try:
                    compiled = torch.compile(lambda i, p: pixelwise(i, p, cfg), dynamic=False)
                    bench("torch.compile per-tile fp16", lambda: compiled(idx, p16))
                except Exception as exc:  # noqa: BLE001
                    rep.fail("latency", f"{tag} torch.compile", exc)
            kw = dict(block_p=best.BLOCK_P, iters=best.ITERS, num_warps=best.num_warps, validate=False)
            packed = torch_op.repack_params(p16)
            bench("fused (pre-packed fp16 params)", lambda: torch_op.spatial_mlp(labels, packed, cfg, **kw))
            bench("fused + re-pack (fp16 NCHW params)", lambda: torch_op.spatial_mlp(labels, p16, cfg, **kw))
            bench("fused uint8 out (pre-packed)",
                  lambda: torch_op.spatial_mlp(labels, packed, cfg, out_dtype=torch.uint8, **kw))
            if drv_kernels and cname == "facades13" and (H, W) == sizes[0]:
                bench("driver launcher: re-pack + fused (fp32 params)", lambda: drv_kernels["run"]())
            fused = times.get("fused (pre-packed fp16 params)", {}).get("median_us")
            for name, t in times.items():
                extra = {"x_vs_fused": t["median_us"] / fused} if fused else {}
                rep.add("latency", f"{tag} {name}", **t, **extra)

    # ---- summary -----------------------------------------------------------------------------
    print("\n" + "=" * 110)
    print(" | ".join(f"{k} {v}" for k, v in info.items()))
    print(f"{'section':<14}{'case':<70}{'median us':>12}{'p90 us':>10}{'x fused':>9}  status")
    for r in rep.rows:
        med = f"{r['median_us']:.1f}" if "median_us" in r else ""
        p90 = f"{r['p90_us']:.1f}" if "p90_us" in r else ""
        ratio = f"{r['x_vs_fused']:.2f}" if "x_vs_fused" in r else ""
        status = r.get("status", "") or ""
        if r["section"] in ("correctness", "driver launch") and "status" in r and "max_abs" in str(r):
            status += "  " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()
                                       if k not in ("section", "name", "status"))
        print(f"{r['section']:<14}{r['name'][:69]:<70}{med:>12}{p90:>10}{ratio:>9}  {status}")
    verdict = "FAILED" if rep.failures else "PASSED"
    print(f"{verdict} | {len(rep.failures)} failure(s) | {' '.join(sys.argv)}")
    target = args.json or (Path(os.environ["OUT"]) / "gpu_kernel.json" if os.environ.get("OUT") else None)
    if target:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps({"info": info, "rows": rep.rows, "failures": rep.failures,
                                      "fused_config": {"BLOCK_P": best.BLOCK_P, "ITERS": best.ITERS,
                                                       "num_warps": best.num_warps}}, indent=2))
        print(f"json: {target}")
    return 1 if rep.failures else 0


if __name__ == "__main__":
    sys.exit(main())
