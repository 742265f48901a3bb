"""Quality benchmark: held-out PSNR of a small ASAP-Net trained on the synthetic set, versus steps,
next to two position-blind baselines on the same held-out set.

  constant mean colour   every pixel gets the mean colour of the held-out images
  per-class mean colour  every pixel gets its class's mean colour on the held-out images
                         (the best any colour-per-class predictor can score there)

The synthetic textures depend on pixel position, so only a model that uses the positional
encoding can beat the per-class mean. Target: >= 3 dB above it after 10 CPU minutes of training.
Training time counts train steps only (evaluations are excluded). PSNR: 8-bit images, MSE pooled
over the held-out set.

    python benchmarks/quality.py --minutes 10 --threads 1 --md benchmarks/QUALITY.md --json benchmarks/results/quality_10min.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from asap_deploy.data import PairedDataset, find_samples  # noqa: E402
from asap_deploy.app.demo import demo_options  # noqa: E402
from asap_deploy.engines.machine import cpu_model  # noqa: E402
from asap_deploy.io import write_json, write_text  # noqa: E402
from asap_deploy.synthetic_dataset import make_dataset  # noqa: E402
from asap_deploy.train import small_config  # noqa: E402
from asap_deploy.train.evaluate import quality_report  # noqa: E402
from asap_deploy.train.trainer import Trainer  # noqa: E402


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget (train steps only)")
    ap.add_argument("--eval-every", type=int, default=50, help="evaluate every N steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--n-val", type=int, default=50)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--classes", type=int, default=6)
    ap.add_argument("--data", type=Path, default=None, help="where to write the synthetic set (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's choice; 1 is faster on a busy shared machine)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None, help="write the Markdown report here")
    ap.add_argument("--from-json", type=Path, default=None, help="only re-render --md from a saved --json")
    args = ap.parse_args()
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        write_text(args.md, markdown(saved, saved["minutes"]))
        return 0

    if args.threads:
        torch.set_num_threads(args.threads)
    data = args.data or Path(tempfile.mkdtemp(prefix="asap_quality_"))
    make_dataset(data, args.n_train, args.n_val, args.size, args.classes, args.seed)
    cfg = small_config(args.classes, args.size)
    opts = demo_options(minutes=args.minutes, steps=None, seed=args.seed)
    train_set = PairedDataset(find_samples(data, "train")[1], cfg, augment=True)
    val_set = PairedDataset(find_samples(data, "val")[1], cfg)
    trainer = Trainer(cfg, opts, train_set, data / "run")
    load_before = load_avg()
    rows = []
    q = quality_report(trainer.g_raw, val_set, args.classes)
    rows.append({"step": 0, "train_seconds": 0.0, **q})
    print(json.dumps(rows[-1]), flush=True)
    trained = 0.0
    while trained < args.minutes * 60:
        t0 = time.perf_counter()
        for _ in range(args.eval_every):
            trainer.train_step(*trainer.local_batch(trainer.step))
            if trained + time.perf_counter() - t0 >= args.minutes * 60:
                break
        trained += time.perf_counter() - t0
        q = quality_report(trainer.g_raw, val_set, args.classes)
        rows.append({"step": trainer.step, "train_seconds": round(trained, 1), **q})
        print(json.dumps(rows[-1]), flush=True)
    load_after = load_avg()
    final = rows[-1]
    margin = final["psnr_model"] - final["psnr_class_mean"]
    result = {"minutes": args.minutes, "machine": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "load_before": load_before, "load_after": load_after,
              "config": cfg.to_dict(), "options": {k: v for k, v in vars(opts).items()},
              "data": {"n_train": args.n_train, "n_val": args.n_val, "size": args.size,
                       "classes": args.classes, "seed": args.seed},
              "rows": rows, "margin_db": margin, "passed": margin >= 3.0}
    if args.json:
        write_json(args.json, result)
    if args.md:
        write_text(args.md, markdown(result, args.minutes))
    print(f"{'PASSED' if result['passed'] else 'FAILED'}: model {final['psnr_model']:.2f} dB vs per-class mean "
          f"{final['psnr_class_mean']:.2f} dB (margin {margin:+.2f} dB, target >= +3 dB) after "
          f"{final['step']} steps / {final['train_seconds'] / 60:.1f} min")
    return 0 if result["passed"] else 1


def _shown_rows(rows: list[dict]) -> list[dict]:
    """The first row at or after each time mark (and the last): a readable table; the JSON has all."""
    marks = [0, 0.25, 0.5, 1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9]
    shown = []
    for m in marks:
        row = next((r for r in rows if r["train_seconds"] >= m * 60), None)
        if row is not None and row not in shown:
            shown.append(row)
    if rows[-1] not in shown:
        shown.append(rows[-1])
    return shown


def markdown(r: dict, minutes: float) -> str:
    rows = r["rows"]
    base = rows[-1]
    lines = [
        "# Quality: held-out PSNR on the synthetic set",
        "",
        f"Machine: {r['machine']} ({r['cores']} cores, shared with other jobs), torch {r['torch']} CPU, "
        f"{r['threads']} threads. Load average (1/5/15 min) before: {r['load_before']}; after: {r['load_after']}.",
        "",
        f"Data: `asap make-data` seed {r['data']['seed']}: {r['data']['n_train']} training / {r['data']['n_val']} held-out "
        f"pairs, {r['data']['size']}x{r['data']['size']}, {r['data']['classes']} classes. Model: "
        f"`asap_deploy.train.small_config` (S={r['config']['crop_size'] // 16}, MLP width {r['config']['hr_width']}, "
        f"depth {r['config']['hr_depth']}). Training: the `asap demo` recipe (hinge GAN + feature matching x10 + "
        f"L1 x100, TTUR Adam lr 1e-3/1e-3, betas (0, 0.9), discriminator ndf 32, batch 4) for {minutes:g} minutes "
        "of train steps (evaluation time excluded).",
        "",
        "PSNR on 8-bit images, MSE pooled over the held-out set. Baselines on the same held-out set: "
        "constant mean colour, and per-class mean colour (fitted on the held-out set itself: the best any "
        "position-blind per-class colour can do).",
        "",
        "| step | train time (min) | model PSNR (dB) | per-class mean (dB) | constant mean (dB) | model - per-class (dB) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in _shown_rows(rows):
        lines.append(f"| {row['step']} | {row['train_seconds'] / 60:.1f} | {row['psnr_model']:.2f} | "
                     f"{row['psnr_class_mean']:.2f} | {row['psnr_constant_mean']:.2f} | "
                     f"{row['psnr_model'] - row['psnr_class_mean']:+.2f} |")
    lines += ["", f"**Result: {'PASSED' if r['passed'] else 'FAILED'}** - after {base['step']} steps "
              f"({base['train_seconds'] / 60:.1f} min) the model is {r['margin_db']:+.2f} dB above the per-class mean "
              "colour (target: >= +3 dB).", "",
              "Notes:",
              "- Step counts are deterministic for a seed; how many steps fit in the time budget depends on the load "
              "of the shared machine (see the load averages above).",
              "- `--threads 1`: a first attempt with torch's default (2 threads) while other jobs (and this session's "
              "tests) held the cores "
              "made 50 steps in 219 s instead of 11 s: intra-op threads of a small model stall under "
              "oversubscription. `asap demo` therefore defaults to one thread.",
              "- The learning rate is 1e-3 for G and D instead of the paper's TTUR 1e-4 / 4e-4: in a probe with the "
              "paper's rates (same model and data) the held-out PSNR was 14.3 dB after 100 steps with L1 + GAN (18.8 dB "
              "with 1e-3) and 15.2 dB after 150 steps with L1 alone (20.1 dB with 1e-3, L1 + GAN).",
              "- Regression test of the claim (step-bounded, not timed): `tests/test_train_quality.py` (marked slow, "
              "300 steps).",
              "",
              f"Reproduce: `python benchmarks/quality.py --minutes {minutes:g} --threads {r['threads']} --md benchmarks/QUALITY.md "
              "--json benchmarks/results/quality_10min.json` (every evaluation point: `results/quality_10min.json`)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
