"""ONNX Runtime (CPU) vs our PyTorch generator vs the authors' forward, per stage, one run.

Facades preset (13 labels, S=64, the published low-res stream: ~82 M parameters), random weights,
one 1024x1024 label map of random blobs, batch 1, fp32, CPU. The model is exported to a bundle
(fp32 graphs only) and every backend runs the same weights:
  onnxruntime  InferenceSession.run of asap.onnx / predictor.onnx / pixelwise.onnx (uint8 ids in),
               each on the whole map in one run
  onnxruntime-tiled  OnnxRuntimeEngine, what `asap infer` and `asap bench` run: above 2^17 pixels,
               predictor.onnx on the whole map, then pixelwise.onnx in blocks of whole tiles
  torch        our ASAPNetGenerator (weights read back from the bundle), inference_mode
  authors      benchmarks/authors_forward.AuthorsForward on the full-resolution fp32 one-hot their
               generator receives (building that one-hot is not timed, in their favour)
Timing: one warm-up call per item, then --repeats interleaved rounds (every item once per round,
so load from other processes on a shared CPU hits all items alike); median and min wall time
(perf_counter around the call, outputs on the host). Peak memory: each item runs once more in a fresh process that
first warms up at 128x128, then resets the peak-RSS counter (/proc/self/clear_refs) and reports
VmHWM - VmRSS (MiB) around one call at full size. --profile adds ONNX Runtime's per-op-type time.

  python benchmarks/onnx_speed.py [--size 1024] [--repeats 5] [--profile] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


ITEMS = ["onnxruntime:end_to_end", "onnxruntime:predictor", "onnxruntime:pixelwise",
         "onnxruntime-tiled:end_to_end", "onnxruntime-tiled:pixelwise",
         "torch:end_to_end", "torch:predictor", "torch:pixelwise",
         "authors:end_to_end", "authors:predictor", "authors:pixelwise"]


def machine() -> dict:
    """The doctor's machine description plus this script's thread count and load."""
    import torch

    from asap_deploy.engines.machine import machine_info

    info = machine_info()
    info.update(torch_threads=torch.get_num_threads(), load_avg_before=os.getloadavg())
    return info


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class Runner:
    """Builds the callables of every item for one bundle and one label map."""

    def __init__(self, bundle_dir: Path, size: int, seed: int = 0):
        import onnxruntime as ort
        import torch

        from asap_deploy.engines.onnxruntime_engine import OnnxRuntimeEngine
        from asap_deploy.engines.torch_engine import TorchEngine
        from asap_deploy.export.bundle import load_bundle
        from asap_deploy.random_model import random_label_maps
        from asap_deploy.model import label_channels, one_hot
        from authors_forward import AuthorsForward

        self.torch = torch
        self.bundle = load_bundle(bundle_dir)
        cfg = self.cfg = self.bundle.config
        self.model = TorchEngine.from_bundle(self.bundle).model
        self.authors = AuthorsForward(self.model)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.engine = OnnxRuntimeEngine(self.bundle)
        self.sessions = {g: ort.InferenceSession(str(self.bundle.file(g)), opts, providers=["CPUExecutionProvider"])
                         for g in ("asap", "predictor", "pixelwise")}
        self.inputs = {}
        for s in sorted({size, 2 * cfg.S}):
            labels, _ = random_label_maps(cfg, 1, s, s, seed=seed)
            lt = torch.from_numpy(labels)
            with torch.inference_mode():
                params = self.model.predict_params(lt)
                onehot = one_hot(label_channels(lt, cfg), cfg.n_label_channels)
            self.inputs[s] = (labels, lt, params, params.numpy(), onehot)

    def fn(self, item: str, size: int):
        labels, lt, params, params_np, onehot = self.inputs[size]
        torch, m, a, s = self.torch, self.model, self.authors, self.sessions
        backend, stage = item.split(":")
        if backend == "onnxruntime":
            return {"end_to_end": lambda: s["asap"].run(["image"], {"labels": labels}),
                    "predictor": lambda: s["predictor"].run(["params"], {"labels": labels}),
                    "pixelwise": lambda: s["pixelwise"].run(["image"], {"labels": labels, "params": params_np})}[stage]
        if backend == "onnxruntime-tiled":
            return {"end_to_end": lambda: self.engine.run(labels),
                    "pixelwise": lambda: self.engine.pixelwise(labels, params_np)}[stage]

        def no_grad(f):
            def run():
                with torch.inference_mode():
                    return f()
            return run

        if backend == "torch":
            return no_grad({"end_to_end": lambda: m(lt), "predictor": lambda: m.predict_params(lt),
                            "pixelwise": lambda: m.pixelwise(lt, params)}[stage])
        return no_grad({"end_to_end": lambda: a(onehot), "predictor": lambda: a.lowres(onehot),
                        "pixelwise": lambda: a.pixelwise(onehot, params)}[stage])


def memory_child(bundle_dir: str, item: str, size: int) -> None:
    r = Runner(Path(bundle_dir), size)
    r.fn(item, 2 * r.cfg.S)()  # warm libraries, thread pools, the authors' encoding cache at small size
    if item.startswith("onnxruntime-tiled"):  # the small map ran asap.onnx: open the two stage sessions too
        small = r.inputs[2 * r.cfg.S][0]
        r.engine.pixelwise(small, r.engine.predict_params(small))
    if item.startswith("authors"):
        r.fn(item, size)()  # their positional encoding is cached after the first call at a size
    run = r.fn(item, size)
    before = _kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    out = run()
    peak = _kib("VmHWM")
    del out
    print(json.dumps({"peak_delta_mib": (peak - before) / 1024, "rss_before_mib": before / 1024}))


def measure_memory(bundle_dir: Path, item: str, size: int) -> dict:
    res = subprocess.run([sys.executable, __file__, "--memory-child", item, "--bundle", str(bundle_dir),
                          "--size", str(size)], capture_output=True, text=True)
    if res.returncode:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def ort_profile(bundle_dir: Path, size: int) -> dict:
    """Per graph: total node time by op type (ms) over one profiled run, largest first."""
    import onnxruntime as ort

    from asap_deploy.export.bundle import load_bundle

    r = Runner(bundle_dir, size)
    out = {}
    b = load_bundle(bundle_dir, verify=False)
    for g in ("predictor", "pixelwise"):
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tempfile.gettempdir()) / f"asap_ort_{g}")
        sess = ort.InferenceSession(str(b.file(g)), opts, providers=["CPUExecutionProvider"])
        labels, _, _, params_np, _ = r.inputs[size]
        feeds = {"labels": labels} if g == "predictor" else {"labels": labels, "params": params_np}
        sess.run(None, feeds)
        sess.run(None, feeds)
        prof = Path(sess.end_profiling())
        events = json.loads(prof.read_text())
        prof.unlink()
        runs = [e for e in events if e.get("name") == "model_run"]
        last_start = runs[-1]["ts"] if runs else 0
        by_op: dict[str, float] = {}
        for e in events:
            if e.get("cat") == "Node" and e.get("ts", 0) >= last_start and e["name"].endswith("_kernel_time"):
                op = e.get("args", {}).get("op_name", "?")
                by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1000
        out[g] = dict(sorted(((k, round(v, 1)) for k, v in by_op.items()), key=lambda kv: -kv[1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--bundle", help="reuse this bundle instead of exporting a random facades model")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.bundle, args.memory_child, args.size)
        return

    from asap_deploy.config import preset
    from asap_deploy.export.bundle import export_model
    from asap_deploy.random_model import random_generator

    info = {"machine": machine(), "size": args.size, "batch": 1, "precision": "fp32", "preset": "facades"}
    tmp = tempfile.TemporaryDirectory(prefix="asap_onnx_speed_")
    bundle_dir = Path(args.bundle) if args.bundle else Path(tmp.name) / "bundle"
    if not args.bundle:
        t0 = time.perf_counter()
        export_model(random_generator(preset("facades"), seed=0), bundle_dir, fp16=False)
        info["export_s"] = time.perf_counter() - t0
        print(f"exported facades preset bundle in {info['export_s']:.1f} s", file=sys.stderr)
    r = Runner(bundle_dir, args.size)
    fns = {item: r.fn(item, args.size) for item in ITEMS}
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {item: [] for item in ITEMS}
    for rep in range(args.repeats):  # interleaved rounds: load from other processes hits every item alike
        for item in ITEMS:
            t0 = time.perf_counter()
            fns[item]()
            times[item].append(time.perf_counter() - t0)
        print(f"round {rep + 1}/{args.repeats} done, load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    res = {item: {"median_s": statistics.median(ts), "min_s": min(ts), "runs": ts} for item, ts in times.items()}
    for item in ITEMS:
        print(f"{item:24s} median {res[item]['median_s'] * 1000:8.1f} ms  min {res[item]['min_s'] * 1000:8.1f} ms",
              file=sys.stderr)
    del r, fns
    if not args.no_memory:
        for item in ITEMS:
            res[item]["memory"] = measure_memory(bundle_dir, item, args.size)
            print(f"{item:24s} peak +{res[item]['memory'].get('peak_delta_mib', float('nan')):.0f} MiB", file=sys.stderr)
    info["results"] = res
    for stat in ("median_s", "min_s"):
        info[f"speedup_vs_authors_{stat[:-2]}"] = {
            k: res[f"authors:{k.split(':')[1]}"][stat] / v[stat] for k, v in res.items()
            if not k.startswith("authors")}
    if args.profile:
        info["ort_profile_ms"] = ort_profile(bundle_dir, args.size)
    info["machine"]["load_avg_after"] = os.getloadavg()
    text = json.dumps(info, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    tmp.cleanup()


if __name__ == "__main__":
    main()
