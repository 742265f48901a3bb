"""Resolution-free rendering (`asap infer --scale K`) vs running the whole model on a K-times larger
label map, per backend.

    python benchmarks/scale.py [--size 256] [--scales 2 4] [--iterations 3] [--json out.json]

Facades preset (13 labels, S=64, published widths), random weights, one label map of random blobs
at --size x --size. Per backend (torch, onnxruntime; CPU) and K:
  scaled   predictor on the label map at its own size + the pixelwise MLP on the K-times denser
           grid (asap_deploy.app.scale.ScaledRenderer, what `asap infer --scale K` runs), float output
  full     the whole model (engine.generate) on the label map upscaled K times (nearest)
Timing: engines/bench.measure (warm-up, then >= --iterations calls; median reported), the two
variants of one (backend, K) measured back to back; host wall clock, outputs on the host.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--scales", type=float, nargs="+", default=[2.0, 4.0])
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"])
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    from asap_deploy.engines.machine import machine_info
    from asap_deploy.engines import create_engine
    from asap_deploy.engines.bench import BenchOptions, measure, random_bundle
    from asap_deploy.random_model import random_label_maps
    from asap_deploy.app.infer import upscale_nearest
    from asap_deploy.app.scale import ScaledRenderer

    tmp = tempfile.TemporaryDirectory(prefix="asap_scale_")
    bundle = random_bundle(Path(tmp.name) / "b", "facades")
    cfg = bundle.config
    n = args.size
    labels, _ = random_label_maps(cfg, 1, n, n, seed=0)
    opts = BenchOptions(warmup_s=0.0, min_iters=args.iterations, min_seconds=0.0, memory=False)
    res = {"machine": machine_info(), "size": n, "preset": "facades", "S": cfg.S, "iterations": args.iterations,
           "rows": []}
    for backend in args.backends:
        eng = create_engine(backend, bundle)
        rend = ScaledRenderer(eng)
        for k in args.scales:
            big = upscale_nearest(labels[0], int(n * k), int(n * k))[None]

            def scaled():
                p = eng.predict_params(labels)
                return rend.render(p, labels, k, n, n)

            def full():
                return eng.generate(big)

            ms = {name: measure(fn, opts, 1)["median_ms"] for name, fn in (("scaled", scaled), ("full", full))}
            row = {"backend": backend, "K": k, "output": f"{int(n * k)}x{int(n * k)}", "scaled_ms": ms["scaled"],
                   "full_ms": ms["full"], "full_over_scaled": ms["full"] / ms["scaled"]}
            res["rows"].append(row)
            print(f"{backend:12s} K={k:g} -> {row['output']}: scaled {ms['scaled']:8.1f} ms, full model on the "
                  f"{row['output']} map {ms['full']:8.1f} ms ({row['full_over_scaled']:.2f}x)", file=sys.stderr)
        eng.close()
    res["machine"]["load_avg_end"] = list(os.getloadavg())
    text = json.dumps(res, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    tmp.cleanup()


if __name__ == "__main__":
    main()
