"""Forward speed: our generator vs the authors' forward (benchmarks/authors_forward.py), one run.

    python benchmarks/forward_speed.py [--size 1024] [--runs 7] [--json benchmarks/results/forward_speed_1024.json]

What is timed (wall clock, torch.no_grad, fp32, CPU, batch 1, median over runs after warm-up;
the variants are interleaved inside each run so background load hits both alike):
  * low-res stream -- ours: label ids -> one-hot -> tent -> CNN (`predict_params`);
    theirs: full-res one-hot -> fresh tent module -> CNN. Their one-hot is built by their caller
    (`preprocess_input`), so it is NOT in their time; it is reported on its own line.
  * pixelwise stage -- ours: `pixelwise(labels, params)` (-> N,H,W,3); theirs: PE concat, unfold,
    5-D matmuls, permute back (-> N,3,H,W).
  * total -- one full forward call each, timed on its own (not the sum of the stages).
Peak memory of the pixelwise stage: each variant in a fresh subprocess; inputs (ids or one-hot,
parameter grid) are built and the libraries warmed on a small input, then the kernel's peak-RSS
counter is reset (/proc/self/clear_refs = 5) and the stage runs once at full size; reported is
VmHWM minus VmRSS before the call (output tensor included, the inputs not).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from authors_forward import AuthorsForward, random_generator  # noqa: E402

from asap_deploy.config import preset  # noqa: E402
from asap_deploy.engines.machine import machine_info  # noqa: E402
from asap_deploy.model import label_channels, one_hot, pixelwise  # noqa: E402


def blocky_labels(cfg, size: int, seed: int = 0) -> torch.Tensor:
    """(1, size, size) ids: random 32-pixel blocks of classes plus 5% single-pixel noise."""
    g = torch.Generator().manual_seed(seed)
    n = cfg.n_label_channels
    lab = torch.randint(0, n, (1, size // 32, size // 32), generator=g).repeat_interleave(32, 1).repeat_interleave(32, 2)
    noise = torch.rand(lab.shape, generator=g) < 0.05
    return torch.where(noise, torch.randint(0, n, lab.shape, generator=g), lab)


def machine() -> dict:
    """The doctor's machine description plus what this script reports beside it."""
    info = machine_info()
    info.update(threads=torch.get_num_threads(), load_before=os.getloadavg())
    return info


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(variant: str, size: int) -> None:
    """Runs in a fresh process: prints the peak-RSS delta (MiB) of one pixelwise stage."""
    cfg = preset("facades")
    gen_params = lambda n, s: torch.randn(n, cfg.num_params, s // cfg.S, s // cfg.S) * 0.1  # noqa: E731
    base = AuthorsForward.__new__(AuthorsForward)  # the pixelwise stage needs no weights
    base.cfg, base._pe = cfg, None

    def stage(s: int):
        labels = blocky_labels(cfg, s)
        params = gen_params(1, s)
        if variant == "ours":
            idx = label_channels(labels, cfg)
            return lambda: pixelwise(idx, params, cfg)
        onehot = one_hot(label_channels(labels, cfg), cfg.n_label_channels)
        base.pixelwise(onehot, params)  # build their cached encoding (cached in their steady state)
        return lambda: base.pixelwise(onehot, params)

    with torch.no_grad():
        stage(2 * cfg.S)()  # warm the libraries (thread pools, kernels) on a small input
        run = stage(size)
        before = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        out = run()
        peak = _status_kib("VmHWM")
    del out
    print(json.dumps({"peak_delta_mib": (peak - before) / 1024}))


def measure_memory(variant: str, size: int) -> float:
    res = subprocess.run([sys.executable, __file__, "--memory-child", variant, "--size", str(size)],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_delta_mib"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "forward_speed_1024.json")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-child", choices=["ours", "authors"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.size)
        return

    from rich.console import Console
    from rich.table import Table

    info = machine()
    cfg = preset("facades")
    labels = blocky_labels(cfg, args.size)
    gen = random_generator(cfg, labels)
    base = AuthorsForward(gen)

    with torch.no_grad():
        onehot = base.encode(labels)
        params_ours = gen.predict_params(labels)
        params_theirs = base.lowres(onehot)
        fns = {
            ("ours", "low-res stream"): lambda: gen.predict_params(labels),
            ("ours", "pixelwise stage"): lambda: gen.pixelwise(labels, params_ours),
            ("ours", "total forward"): lambda: gen(labels),
            ("authors", "one-hot (their caller)"): lambda: base.encode(labels),
            ("authors", "low-res stream"): lambda: base.lowres(onehot),
            ("authors", "pixelwise stage"): lambda: base.pixelwise(onehot, params_theirs),
            ("authors", "total forward"): lambda: base(onehot),
            # inside our low-res stream: the tent pre-downsample from the ids (what the model does)
            # vs the full-resolution one-hot + depthwise convs (what the authors' code does)
            ("ours", "tent from ids"): lambda: gen.lowres_input(label_channels(labels, cfg), None),
            ("ours", "one-hot + tent convs"): lambda: gen.pre_downsample(gen.encode(label_channels(labels, cfg), None)),
        }
        idx = label_channels(labels, cfg)
        tent_diff = float((gen.lowres_input(idx, None) - gen.pre_downsample(gen.encode(idx, None))).abs().max())
        ours_img, theirs_img = gen(labels), base(onehot)[0]
        max_diff = float((ours_img - theirs_img).abs().max())
        sat = float((ours_img.abs() > 0.99).float().mean())
        times: dict = {k: [] for k in fns}
        for r in range(args.warmup + args.runs):
            for k, fn in fns.items():
                t = _timed(fn)
                if r >= args.warmup:
                    times[k].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {} if args.no_memory else {v: measure_memory(v, args.size) for v in ("ours", "authors")}
    info["load_after"] = os.getloadavg()

    stages = ["low-res stream", "pixelwise stage", "total forward"]
    table = Table(title=f"ASAP-Net forward, facades preset, {args.size}x{args.size}, batch 1, fp32, CPU: "
                        f"{info['cpu']} ({info['cores']} cores, {info['threads']} torch threads)")
    for col in ("stage", "ours ms", "authors ms", "speed-up", "ours min/max ms", "authors min/max ms"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    rows = []
    for s in stages:
        o, a = med[("ours", s)], med[("authors", s)]
        rows.append({"stage": s, "ours_ms": o * 1e3, "authors_ms": a * 1e3, "speedup": a / o,
                     "ours_ms_all": [t * 1e3 for t in times[("ours", s)]],
                     "authors_ms_all": [t * 1e3 for t in times[("authors", s)]]})
        table.add_row(s, f"{o * 1e3:.0f}", f"{a * 1e3:.0f}", f"{a / o:.2f}x",
                      f"{min(times[('ours', s)]) * 1e3:.0f}/{max(times[('ours', s)]) * 1e3:.0f}",
                      f"{min(times[('authors', s)]) * 1e3:.0f}/{max(times[('authors', s)]) * 1e3:.0f}")
    oh = med[("authors", "one-hot (their caller)")]
    table.add_row("one-hot (their caller; not in their total)", "-", f"{oh * 1e3:.0f}", "", "", "")
    tent_ids, tent_conv = med[("ours", "tent from ids")], med[("ours", "one-hot + tent convs")]
    if mem:
        table.add_row("pixelwise peak memory (MiB, RSS delta)", f"{mem['ours']:.0f}", f"{mem['authors']:.0f}",
                      f"{mem['authors'] / mem['ours']:.1f}x less", "", "")
    console = Console(width=150)
    console.print(table)
    console.print(f"inside our low-res stream, the tent pre-downsample from the ids: {tent_ids * 1e3:.1f} ms; via a "
                  f"full-resolution one-hot + convs: {tent_conv * 1e3:.1f} ms; max diff {tent_diff:.1e}")
    console.print(f"runs {args.runs} after {args.warmup} warm-up; load avg before {info['load_before']}, after "
                  f"{info['load_after']}; max |ours - authors| = {max_diff:.2e}; saturated pixels {sat:.1%}")
    result = {"machine": info, "size": args.size, "runs": args.runs, "warmup": args.warmup, "stages": rows,
              "authors_one_hot_ms": oh * 1e3, "pixelwise_peak_mib": mem, "max_abs_diff": max_diff,
              "saturated_fraction": sat,
              "tent_pre_downsample_ms": {"from_ids": tent_ids * 1e3, "one_hot_and_convs": tent_conv * 1e3,
                                         "max_abs_diff": tent_diff}}
    args.json.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
