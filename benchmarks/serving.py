"""Serving and scale-out on this machine: `asap serve` under `asap loadtest` load, with and without
dynamic batching, and `asap infer --ray local` against single-process `asap infer` on the same maps.

    PYTHONPATH=. python benchmarks/serving.py --serve-python /path/to/numpy1-venv/bin/python \\
        [--size 512] [--concurrency 1 4 16] [--ray-maps 200] [--json benchmarks/results/serving.json]

The model is a random facades-preset bundle (S=64, ONNX Runtime CPU, fp32). The server runs
`asap serve --backend onnxruntime` with `--max-batch 8 --max-delay-ms 2` (dynamic batching) or
`--max-batch 1` (none) in the interpreter given by --serve-python: PyTriton's Python-backend stub
needs numpy<2 (`pip install -c constraints.txt -e ".[serve]"` in its own venv); the load generator
and Ray run here. Each concurrency level sends max(32, 4 x concurrency) requests of one size after
8 warm-up requests. Ray: the same maps through `asap infer` (one process) and `asap infer --ray local
--ray-actors 2`, each as a fresh CLI process, wall time including start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode}):\n{log.read_text()[-2000:]}")
        try:
            if client.is_model_ready("asap"):
                return
        except Exception:  # noqa: BLE001 - not listening yet
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not ready in {timeout_s:.0f} s:\n{log.read_text()[-2000:]}")
        time.sleep(0.5)


def serve_and_load(python: str, bundle: Path, max_batch: int, size: int, levels: list[int], tmp: Path) -> list[dict]:
    from asap_deploy.app.loadtest import LoadOptions, run_loadtest

    http, grpc, metrics = free_ports(3)
    log = tmp / f"serve_b{max_batch}.log"
    argv = [python, str(ROOT / "cli.py"), "serve", str(bundle), "--backend", "onnxruntime", "--port", str(http),
            "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--max-batch", str(max_batch),
            "--max-delay-ms", "2"]
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
    rows = []
    try:
        url = f"127.0.0.1:{http}"
        wait_ready(url, proc, log)
        run_loadtest(LoadOptions(url=f"http://{url}", concurrency=2, requests=8, sizes=[(size, size)]))  # warm-up
        for c in levels:
            rep = run_loadtest(LoadOptions(url=f"http://{url}", concurrency=c, requests=max(32, 4 * c),
                                           sizes=[(size, size)], timeout_s=600)).to_dict()
            rep.update(max_batch=max_batch, load_avg=os.getloadavg()[0])
            rows.append(rep)
            lat = rep["latency_ms"]
            print(f"max-batch {max_batch:2d} concurrency {c:2d}: {rep['throughput_rps']:6.2f} req/s, median "
                  f"{lat.get('median', float('nan')):7.1f} ms, p99 {lat.get('p99', float('nan')):7.1f} ms, "
                  f"errors {rep['errors']}", file=sys.stderr)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    return rows


def run_cli(argv: list[str]) -> dict:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, str(ROOT / "cli.py"), *argv, "--json"], capture_output=True, text=True,
                         cwd=ROOT)
    seconds = time.perf_counter() - t0
    out = res.stdout
    report = json.loads(out[out.index("{"):]) if "{" in out else {}
    return {"exit": res.returncode, "wall_s": seconds, "images_written": sum(1 for f in report.get("files", [])
                                                                              if f.get("error") is None),
            "reported_s": report.get("seconds"), "stderr_tail": res.stderr[-400:] if res.returncode else ""}


def ray_vs_local(bundle: Path, n: int, size: int, tmp: Path) -> dict:
    from PIL import Image

    from asap_deploy.config import preset
    from asap_deploy.random_model import random_label_maps

    maps, _ = random_label_maps(preset("facades"), 8, size, size, seed=3)
    (tmp / "maps").mkdir()
    for i in range(n):
        Image.fromarray(maps[i % 8]).save(tmp / "maps" / f"m{i:04d}.png")
    common = [str(tmp / "maps"), "--bundle", str(bundle), "--backend", "onnxruntime"]
    local = run_cli(["infer", *common, "-o", str(tmp / "out_local")])
    ray = run_cli(["infer", *common, "-o", str(tmp / "out_ray"), "--ray", "local", "--ray-actors", "2"])
    same = all((tmp / "out_local" / p.name).read_bytes() == p.read_bytes() for p in (tmp / "out_ray").glob("*.png"))
    for name, r in (("local", local), ("ray", ray)):
        r["images_per_s"] = r["images_written"] / r["wall_s"]
        print(f"{name:5s}: {r['images_written']} maps in {r['wall_s']:.1f} s ({r['images_per_s']:.1f} maps/s), "
              f"exit {r['exit']}", file=sys.stderr)
    return {"maps": n, "size": size, "local": local, "ray": ray, "outputs_identical": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve-python", default=sys.executable, help="interpreter with PyTriton and numpy<2")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--ray-maps", type=int, default=200)
    ap.add_argument("--ray-size", type=int, default=256)
    ap.add_argument("--parts", nargs="+", choices=["serve", "ray"], default=["serve", "ray"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from asap_deploy.engines.machine import machine_info
    from asap_deploy.engines.bench import random_bundle

    with tempfile.TemporaryDirectory(prefix="asap_serving_") as t:
        tmp = Path(t)
        random_bundle(tmp / "bundle", "facades", seed=0)
        result = {"machine": machine_info(), "load_avg_before": os.getloadavg(), "size": args.size,
                  "model": "facades preset, random weights, onnxruntime CPU fp32"}
        if "serve" in args.parts:
            result["serve"] = [row for mb in (8, 1) for row in
                               serve_and_load(args.serve_python, tmp / "bundle", mb, args.size, args.concurrency, tmp)]
        if "ray" in args.parts:
            result["ray"] = ray_vs_local(tmp / "bundle", args.ray_maps, args.ray_size, tmp)
        result["load_avg_after"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
