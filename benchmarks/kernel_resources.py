"""Registers, spills, shared memory and occupancy of the fused kernel per GPU architecture, without
a GPU: the kernels are compiled ahead of time (plugins/aot.py, as `asap build-engine` does) and
read back: registers from each cubin, spills and stack from ptxas -v re-run on its PTX with
Triton's options (`same cubin`: the re-assembly reproduced the shipped cubin byte for byte),
shared memory from Triton's metadata, occupancy from the per-architecture SM limits
(aot.SM_LIMITS, the CUDA occupancy calculator's rules).

    PYTHONPATH=. python benchmarks/kernel_resources.py [--arch sm_80,sm_86,sm_89,sm_90]
        [--config cityscapes,facades,wide] [--params-dtype fp16] [--out-dtype fp16] [-o DIR]

Configs: the presets by name, and `wide` = cityscapes with hr_width=128, hr_depth=6 (the largest
MLP the kernel takes: shows where the re-reading variant is picked). Writes DIR/kernel_resources.json
and .md (default benchmarks/results). Minutes on 2 cores (one compile per kernel; Triton's cache
makes a second run fast). `--smoke`: one config, one architecture.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def config(name: str):
    from asap_deploy.config import preset

    if name == "wide":
        return preset("cityscapes").replace(hr_width=128, hr_depth=6)
    return preset(name)


def measure(names, archs, params_dtype, out_dtype, progress=print) -> list[dict]:
    from asap_deploy.plugins import aot

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            cfg = config(name)
            (v,) = aot.variants_for([cfg], params_dtypes=[params_dtype], out_dtypes=[out_dtype])
            for cc in archs:
                t0 = time.perf_counter()
                folder = Path(tmp) / f"{name}_sm{cc}"
                aot.compile_kernels([cc], folder, [v], repack_dtypes=[])
                (e,) = aot.load_index(folder)["kernels"]
                meta, cubin, ptx = aot.load_kernel(folder, e)
                r = aot.kernel_resources(meta, cubin, ptx)
                rows.append({"config": name, "S": cfg.S, "hr_width": cfg.hr_width, "hr_depth": cfg.hr_depth,
                             "BLOCK_P": v.spec.BLOCK_P, "ITERS": v.spec.ITERS, "num_warps": v.spec.num_warps,
                             "params_dtype": params_dtype, "out_dtype": out_dtype, **r,
                             "ptx_version": meta.get("ptx_version"), "cuda_version": meta.get("cuda_version"),
                             "compile_s": round(time.perf_counter() - t0, 1)})
                progress(f"{name} sm_{cc}: {r['registers']} registers, {r['spill_store_bytes']} B spill stores, "
                         f"{r['shared_bytes']} B shared, {r['blocks_per_sm']} blocks/SM ({r['occupancy']:.0%})")
    return rows


def markdown(rows: list[dict], env: dict) -> str:
    head = ("| config (S, hr_width x depth) | arch | regs | spill st/ld B | stack B | shared B (limit) | variant | "
            "blocks/SM | warps/SM | occupancy | limited by | same cubin |")
    lines = [f"Fused kernel resources (Triton {env['triton']}, {env['machine']}; no GPU involved). "
             f"Block = {rows[0]['threads'] if rows else '?'} threads, {rows[0]['params_dtype'] if rows else ''} params -> "
             f"{rows[0]['out_dtype'] if rows else ''} RGB.", "", head,
             "|" + "|".join("---" for _ in range(head.count("|") - 1)) + "|"]
    for r in rows:
        lines.append(f"| {r['config']} (S={r['S']}, {r['hr_width']}x{r['hr_depth']}) | {r['ptx_target']} | "
                     f"{r['registers']} | {r['spill_store_bytes']}/{r['spill_load_bytes']} | {r['stack_bytes']} | "
                     f"{r['shared_bytes']:,} ({r['shared_limit']:,}) | {'re-read weights' if r['reload'] else 'default'} | "
                     f"{r['blocks_per_sm']} | {r['warps_per_sm']}/{r['max_warps_per_sm']} | {r['occupancy']:.0%} | "
                     f"{r['limited_by']} | {'yes' if r['same_cubin'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="sm_80,sm_86,sm_89,sm_90")
    ap.add_argument("--config", default="cityscapes,facades,wide")
    ap.add_argument("--params-dtype", default="fp16", choices=["fp16", "fp32"])
    ap.add_argument("--out-dtype", default="fp16", choices=["fp16", "fp32", "u8"])
    ap.add_argument("-o", "--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--smoke", action="store_true", help="cityscapes on sm_80 only (a check of this script)")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import triton

    from asap_deploy.plugins import aot

    archs = [80] if a.smoke else aot.parse_archs(a.arch)
    names = ["cityscapes"] if a.smoke else [n.strip() for n in a.config.split(",") if n.strip()]
    env = {"triton": triton.__version__, "machine": f"{platform.machine()} {platform.node()}",
           "python": platform.python_version()}
    rows = measure(names, archs, a.params_dtype, a.out_dtype, progress=lambda s: print(s, flush=True))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "kernel_resources_smoke" if a.smoke else "kernel_resources"
    (out / f"{stem}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown(rows, env))
    print(markdown(rows, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
