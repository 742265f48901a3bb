"""Load test of `asap infer`: N small label maps (+ one corrupt file) through the real CLI in a fresh
process; peak RSS of that process (os.wait4), images written, the bad file reported, others written.

    PYTHONPATH=. python benchmarks/infer_load.py --counts 100 1000 [--size 64] [--json out.json]

Memory must not grow with the count: inputs are grouped from their headers only and decoded one
batch at a time, so the peak is set by the model and one batch, not by the number of files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_corpus(folder: Path, n: int, size: int, cfg) -> None:
    from PIL import Image

    from asap_deploy.random_model import random_label_maps

    folder.mkdir(parents=True, exist_ok=True)
    maps, _ = random_label_maps(cfg, 16, size, size, seed=1)  # 16 distinct maps, repeated
    for i in range(n):
        Image.fromarray(maps[i % 16]).save(folder / f"map_{i:05d}.png")
    (folder / "map_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)  # one corrupt file among them


def run_infer(inputs: Path, bundle: Path, out: Path, batch: int) -> dict:
    argv = [sys.executable, str(ROOT / "cli.py"), "infer", str(inputs), "--bundle", str(bundle), "-o", str(out),
            "--backend", "onnxruntime", "--batch", str(batch), "--json"]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as so, tempfile.TemporaryFile() as se:
        proc = subprocess.Popen(argv, stdout=so, stderr=se, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (ru_maxrss, KiB)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
        so.seek(0)
        se.seek(0)
        out_b, err_b = so.read(), se.read()
    text = out_b.decode()
    report = json.loads(text[text.index("{"):]) if "{" in text else {}
    return {"exit": proc.returncode, "seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024,
            "report": report, "stderr_tail": err_b.decode()[-500:]}


def prepare(tmp: Path, counts: list[int], size: int) -> None:
    """Bundle + corpora + machine facts, in their own process: torch's memory must not be inherited
    by the measured `asap infer` processes (Linux carries a parent's RSS high-water mark into a
    forked child's ru_maxrss)."""
    from asap_deploy.config import preset
    from asap_deploy.engines.machine import machine_info
    from asap_deploy.engines.bench import random_bundle

    random_bundle(tmp / "bundle", "facades", seed=0)
    for n in counts:
        make_corpus(tmp / f"in{n}", n, size, preset("facades"))
    (tmp / "machine.json").write_text(json.dumps(machine_info()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--prepare", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.prepare:
        prepare(args.prepare, args.counts, args.size)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="asap_load_") as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, __file__, "--prepare", str(tmp), "--size", str(args.size), "--counts",
                        *map(str, args.counts)], check=True, cwd=ROOT)
        bundle = tmp / "bundle"
        for n in args.counts:
            r = run_infer(tmp / f"in{n}", bundle, tmp / f"out{n}", args.batch)
            files = r["report"].get("files", [])
            failed = [f for f in files if f["error"]]
            written = len(list((tmp / f"out{n}").glob("*.png")))
            rows.append({"maps": n, "inputs": n + 1, "written": written, "failed": len(failed),
                         "failed_files": [Path(f["input"]).name for f in failed], "exit": r["exit"],
                         "peak_rss_mib": round(r["peak_rss_mib"], 1), "seconds": round(r["seconds"], 1),
                         "images_per_s": round(r["report"].get("images_per_s", 0), 1)})
            if not files:
                rows[-1]["stderr_tail"] = r["stderr_tail"]
            print(json.dumps(rows[-1]), flush=True)
        machine = json.loads((tmp / "machine.json").read_text())
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    result = {"machine": machine, "platform": platform.platform(), "load_avg_end": load,
              "model": "random facades preset (13 labels, S=64, published widths), fp32 ONNX Runtime CPU",
              "size": args.size, "batch": args.batch, "rows": rows}
    if len(rows) >= 2:
        result["rss_growth_mib"] = round(rows[-1]["peak_rss_mib"] - rows[0]["peak_rss_mib"], 1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "machine")}))


if __name__ == "__main__":
    main()
