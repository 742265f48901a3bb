"""`asap demo`: the whole story on a CPU in a few minutes, as a clear sequence of steps.

1. make a synthetic data set (textures that depend on class and position)
2. train a small ASAP-Net for a bounded time
3. measure held-out PSNR next to the position-blind baselines
4. write label maps, generated images beside their targets, and the loss curve
5. export the ONNX bundle
6. validate ONNX Runtime against the PyTorch reference on the held-out label maps
7. `asap infer` on held-out label maps at their own size and at --scale 2 and 4 (resolution-free
   rendering), next to nearest/bicubic upscaling of the scale-1 image
8. a short `asap bench` at 1024x1024 (the authors' forward as the baseline)
and an index.html (static) that shows it all together.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..io import check_replaceable, claim_files, to_uint8, write_json, write_png

DEMO_SIZE = 64
DEMO_CLASSES = 6
DEMO_TRAIN, DEMO_VAL = 200, 32
N_SHOWN = 8


def demo_options(minutes: float | None, steps: int | None, seed: int):
    """Training options of the demo: the SPADE recipe plus L1 (weight 100, as the authors' --L1_loss),
    a smaller discriminator, and a higher learning rate, so a CPU gets somewhere in minutes."""
    from ..train.trainer import TrainOptions

    return TrainOptions(steps=steps, minutes=minutes, batch_size=4, seed=seed, lr_g=1e-3, lr_d=1e-3,
                        decay_steps=0, lambda_l1=100.0, ndf=32, save_every=10**9, log_every=5)


STAGES = 8
DEMO_KIND = "demo"  # the ownership marker kind of the demo's folder
# What the demo writes in its folder ("name/": the whole sub-folder).
DEMO_OUTPUTS = ("data/", "run/", "results/", "bundle/", "validation/", "infer/", "bench/", "quality.json",
                "results_grid.png", "loss_curve.png", "scale_grid.png", "index.html")
SCALES = (2, 4)
BENCH_SIZE = 1024


def check_demo_args(*, minutes: float, steps: int | None, seed: int, threads: int, bench_size: int,
                    bench_duration: float | None) -> None:
    """`asap demo`'s options and its dependencies, before any work (not after minutes of training)."""
    from ..errors import UsageError, require_module, require_torch
    from ..limits import check_optional, check_range, check_seed, check_threads

    check_range("--minutes", minutes, 0.0, 1440.0, lo_open=True)
    check_optional("--steps", steps, 1, 1_000_000)
    check_seed("--seed", seed)
    check_threads("--threads", threads)
    check_range("--bench-size", bench_size, 16, 4096)
    check_optional("--bench-duration", bench_duration, 0.0, 600.0)
    if bench_size % 16:  # the demo model's S divides 16: checked now, not after minutes of training
        raise UsageError(f"--bench-size must be a multiple of 16 in 16..4096 (got {bench_size})")
    require_torch("asap demo")
    require_module("matplotlib", "asap demo (its loss curve and latency plot)")


def run_demo(out: str | Path = "asap_demo", minutes: float | None = 2.0, steps: int | None = None, seed: int = 0,
             on_event: Callable[..., None] | None = None, threads: int | None = 1,
             bench_size: int = BENCH_SIZE, bench_seconds: float | None = None) -> dict[str, Any]:
    import torch

    if threads:
        torch.set_num_threads(threads)

    from ..data import PairedDataset, check_datasets, find_samples
    from ..synthetic_dataset import make_dataset
    from ..train import small_config
    from ..train.evaluate import quality_report
    from ..train.plot import plot_losses
    from ..train.trainer import Trainer

    emit = on_event or (lambda kind, **kw: None)
    out = Path(out)
    # The demo replaces only an earlier demo of ours holding nothing else; it claims what it is about
    # to write first, so that an interrupted demo's folder is still ours to replace.
    check_replaceable(out, DEMO_KIND, "demo folder")
    claim_files(out, DEMO_KIND, DEMO_OUTPUTS)
    files: list[Path] = []

    # 1. data
    emit("stage", text=f"1/{STAGES} making a synthetic data set in {out / 'data'}")
    make_dataset(out / "data", DEMO_TRAIN, DEMO_VAL, DEMO_SIZE, DEMO_CLASSES, seed)
    files.append(out / "data")

    # 2. train (a fresh run each time: the demo overwrites its own run folder)
    cfg = small_config(DEMO_CLASSES, DEMO_SIZE)
    opts = demo_options(minutes, steps, seed)
    train_set = PairedDataset(find_samples(out / "data", "train")[1], cfg, augment=True)
    val_layout, val_samples = find_samples(out / "data", "val")
    val_set = PairedDataset(val_samples, cfg)
    check_datasets([train_set, val_set])  # every pair before step 1 (its own data, but checked like any other)
    emit("stage", text=f"2/{STAGES} training a small ASAP-Net ({cfg.S}x{cfg.S} tiles, MLP {cfg.mlp_channels}) "
                       + (f"for {minutes:g} min" if minutes else f"for {steps} steps"))
    trainer = Trainer(cfg, opts, train_set, out / "run")
    emit("train_start", total=steps)
    summary = trainer.run(on_step=lambda s, total, losses: emit("step", step=s, losses=losses))
    emit("train_end")
    files += [Path(summary["paths"]["generator"]), Path(summary["paths"]["log"])]

    # 3. quality
    emit("stage", text=f"3/{STAGES} measuring held-out PSNR")
    model = trainer.g_raw.eval()
    quality = quality_report(model, val_set, DEMO_CLASSES)
    quality["steps"] = trainer.step
    files.append(write_json(out / "quality.json", quality))

    # 4. pictures: label map | generated | target, one row per held-out sample
    emit("stage", text=f"4/{STAGES} writing pictures to {out / 'results'}")
    from ..palette import bundle_palette

    palette = bundle_palette(cfg)
    rows = []
    with torch.no_grad():
        for i in range(min(N_SHOWN, len(val_set))):
            labels, inst, image = val_set[i]
            fake = model(labels[None], None if inst is None else inst[None])[0]
            lab_rgb = palette.colourise(labels.numpy())
            gen = to_uint8(fake.permute(1, 2, 0).numpy())
            tgt = to_uint8(image.permute(1, 2, 0).numpy())
            files.append(write_png(out / "results" / f"label_{i:02d}.png", labels.numpy().astype(np.uint8)))
            gap = np.full((lab_rgb.shape[0], 2, 3), 255, np.uint8)
            row = np.concatenate([lab_rgb, gap, gen, gap, tgt], 1)
            files.append(write_png(out / "results" / f"compare_{i:02d}.png", row))
            rows.append(row)
    grid = np.concatenate([np.concatenate([r, np.full((2, r.shape[1], 3), 255, np.uint8)], 0) for r in rows], 0)
    scale = 3  # 64-px images are tiny on screen
    files.append(write_png(out / "results_grid.png", np.repeat(np.repeat(grid, scale, 0), scale, 1)))
    if trainer.history:
        files.append(plot_losses(trainer.history, out / "loss_curve.png"))

    # 5. export
    emit("stage", text=f"5/{STAGES} exporting the ONNX bundle to {out / 'bundle'}")
    from ..export.bundle import export_model, load_bundle

    export_model(model, out / "bundle", source={"checkpoint": str(summary["paths"]["generator"])}, overwrite=True)
    bundle = load_bundle(out / "bundle")
    files.append(out / "bundle")

    # 6. validate ONNX Runtime against the PyTorch reference
    emit("stage", text=f"6/{STAGES} validating ONNX Runtime against PyTorch on the held-out label maps")
    from ..engines import create_engine
    from ..engines.validate import folder_samples, validate

    val_labels = val_layout.label_dir
    samples = folder_samples(cfg, val_labels)
    with create_engine("torch", bundle) as ref, create_engine("onnxruntime", bundle) as ort:
        report = validate(bundle, ref, [ort], samples, "fp32", out / "validation")
    files.append(out / "validation")

    # 7. infer at the maps' own size and resolution-free at K x
    emit("stage", text=f"7/{STAGES} asap infer on held-out label maps at scale 1, {', '.join(map(str, SCALES))}")
    shown = sorted(val_labels.glob("*.png"))[:N_SHOWN // 2]
    scale_runs = infer_scales(shown, out / "bundle", out / "infer")
    files.append(write_png(out / "scale_grid.png", scale_grid(shown, out / "infer", palette)))

    # 8. bench
    emit("stage", text=f"8/{STAGES} asap bench at {bench_size}x{bench_size} (authors' forward as baseline)")
    from ..engines.bench import BenchOptions, run_bench
    from ..engines.bench_report import row_line, settings_text, write_reports

    # asap bench's own defaults (threads included: the training's thread count is not the bench's);
    # only the size, and the duration when asked (--bench-duration), differ
    bench_opts = BenchOptions(sizes=[(bench_size, bench_size)])
    if bench_seconds is not None:
        bench_opts.min_seconds = bench_seconds
    settings = settings_text({"options": asdict(bench_opts), "threads": bench_opts.cpu_threads()})
    emit("note", text=f"settings of `asap bench --size {bench_size}`: {settings}")
    bench = run_bench(bundle, bench_opts, on_row=lambda row, done, total: emit("note", text=row_line(row, done, total)))
    bench_files = write_reports(bench, out / "bench")
    files += list(bench_files.values())

    result = {"quality": quality, "steps": trainer.step, "seconds": summary["seconds"], "bench_size": bench_size,
              "bench_settings": settings_text(bench), "bench_warnings": bench["warnings"],
              "validation": {"passed": report.passed, "report": str(report.report_dir),
                             "precision": report.precision, "thresholds": report.thresholds,
                             "backends": report.to_dict().get("backends", {}),
                             "pictures": [n for row in report.samples for names in row.get("pictures", {}).values()
                                          for n in names]},
              "infer": scale_runs, "bench": bench_rows(bench)}
    files.append(write_index(out, result))
    result["files"] = [str(f) for f in files]
    return result


def infer_scales(labels: list[Path], bundle_dir: Path, out: Path) -> dict[str, Any]:
    """`asap infer` (ONNX Runtime) at scale 1 and every SCALES entry; folder per scale."""
    from .infer import InferOptions, Source, infer

    runs = {}
    for k in (1, *SCALES):
        res = infer(labels, Source(bundle=bundle_dir), InferOptions(out_dir=out / f"scale{k}", scale=None if k == 1 else k,
                                                                    batch_size=len(labels), overwrite=True),
                    backend="onnxruntime")  # overwrite: replaces only PNGs asap wrote (an earlier demo's)
        if res.failed:
            from ..errors import InputError

            raise InputError(f"demo infer at scale {k} failed: {res.failed[0].error}")
        runs[f"scale{k}"] = {"images": len(res.written), "backend": res.backend, "seconds": res.seconds}
    return runs


def scale_columns(k: int) -> list[str]:
    """The column titles of scale_grid."""
    return ["label map", f"scale 1, nearest x{k}", f"scale 1, bicubic x{k}", f"asap infer --scale {k}"]


def scale_grid(labels: list[Path], infer_dir: Path, palette) -> np.ndarray:
    """Under a header naming the columns, one row per map: label map | scale-1 output upscaled
    nearest | bicubic | rendered at scale 4 (`--scale 4`), all at 4x."""
    import cv2

    from ..engines.validate import titled_row
    from ..io import read_label_map, read_rgb

    k = SCALES[-1]
    columns: list[list[np.ndarray]] = [[], [], [], []]
    for p in labels:
        lab = read_label_map(p)
        h, w = lab.shape
        base = read_rgb(infer_dir / "scale1" / p.name)
        cells = [np.repeat(np.repeat(palette.colourise(lab), k, 0), k, 1),
                 cv2.resize(base, (w * k, h * k), interpolation=cv2.INTER_NEAREST),
                 cv2.resize(base, (w * k, h * k), interpolation=cv2.INTER_CUBIC),
                 read_rgb(infer_dir / f"scale{k}" / p.name)]
        for col, cell in zip(columns, cells):
            if col:
                col.append(np.full((4, cell.shape[1], 3), 255, np.uint8))
            col.append(cell)
    return titled_row([np.concatenate(col, 0) for col in columns], scale_columns(k))


def bench_rows(rep: dict) -> list[dict[str, Any]]:
    """The bench report's rows, reduced to what the demo shows."""
    keep = ("backend", "stage", "status", "median_ms", "speedup_vs_authors")
    return [{k: r.get(k) for k in keep} for r in rep.get("rows", [])]


# the validation table: (report key, column title, format, threshold key, "<=" or ">=")
VALIDATION_COLUMNS = (
    ("max_abs", "max abs", ".2e", "max_abs", "<="), ("mean_abs", "mean abs", ".2e", "mean_abs", "<="),
    ("psnr_db", "PSNR dB", ".1f", "psnr_db", ">="), ("differing_share", "differing pixels", ".2%", "differing_share", "<="),
    ("max_levels", "max 8-bit levels", "d", "max_levels", "<="), ("cosine", "parameter cosine", ".6f", "params_cosine", ">="),
)


def validation_table(v: dict[str, Any]) -> str:
    """The validation report as an HTML table: a threshold row, then one row per backend and stage
    (blank where a metric does not apply to the stage)."""
    from html import escape

    t = v.get("thresholds", {})

    def fmt(value, spec: str) -> str:
        return "" if value is None else escape(format(value, spec))

    head = "".join(f"<th>{escape(title)}</th>" for _, title, *_ in VALIDATION_COLUMNS)
    limits = "".join(f"<td>{'' if t.get(tk) is None else escape(op) + ' ' + fmt(t[tk], spec)}</td>"
                     for _, _, spec, tk, op in VALIDATION_COLUMNS)
    rows = [f"<tr><th>backend</th><th>stage</th>{head}<th>result</th></tr>",
            f'<tr class="threshold"><td><i>threshold</i></td><td></td>{limits}<td></td></tr>']
    for name, b in v.get("backends", {}).items():
        for stage, m in b.get("stages", {}).items():
            cells = "".join(f"<td>{fmt(m.get(key), spec)}</td>" for key, _, spec, *_ in VALIDATION_COLUMNS)
            ok = "ok" if not m.get("failures") else "FAIL: " + "; ".join(m["failures"])
            rows.append(f"<tr><td>{escape(name)}</td><td>{escape(stage.replace('_', '-'))}</td>{cells}"
                        f"<td>{escape(ok)}</td></tr>")
    return '<table class="validation">' + "".join(rows) + "</table>"


def write_index(out: Path, result: dict[str, Any]) -> Path:
    """index.html: every picture and report of the demo on one static page."""
    from html import escape

    from ..io import write_text

    q = result["quality"]
    bench_md = (out / "bench" / "report.md").read_text() if (out / "bench" / "report.md").is_file() else ""
    def cell(v, fmt: str) -> str:
        return "" if v is None else format(v, fmt)

    v = result["validation"]
    shown = v.get("pictures", [])[:1]
    picture = "".join(
        f'<p>Label map | PyTorch reference | ONNX Runtime | their difference (8-bit levels x32, black = equal):</p>'
        f'<img src="validation/{escape(n)}" alt="validation grid {escape(n)}">' for n in shown)
    rows = "".join(
        f"<tr><td>{escape(str(r['backend']))}</td><td>{escape(str(r['stage']))}</td><td>{escape(str(r['status']))}</td>"
        f"<td>{cell(r['median_ms'], '.1f')}</td><td>{cell(r['speedup_vs_authors'], '.2f')}</td></tr>"
        for r in result["bench"])
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>asap-deploy demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}} img{{max-width:100%;image-rendering:pixelated}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:3px 8px}} pre{{background:#f4f4f4;padding:8px;overflow:auto}}</style>
</head><body>
<h1>asap-deploy demo</h1>
<p>A small ASAP-Net trained for {result['steps']} steps ({result['seconds']:.0f} s) on a synthetic data set whose
textures depend on class and position.</p>
<h2>Held-out quality</h2>
<table><tr><th>model</th><th>per-class mean colour</th><th>constant mean colour</th></tr>
<tr><td>{q['psnr_model']:.2f} dB</td><td>{q['psnr_class_mean']:.2f} dB</td><td>{q['psnr_constant_mean']:.2f} dB</td></tr></table>
<h2>Label | generated | target</h2><img src="results_grid.png" alt="results grid">
<h2>Loss curve</h2><img src="loss_curve.png" alt="loss curve">
<h2>Validation: ONNX Runtime vs PyTorch</h2>
<p><b>{'PASSED' if v['passed'] else 'FAILED'}</b> ({escape(str(v.get('precision', 'fp32')))} thresholds, worst
value over the held-out label maps); full report: <a href="validation/report.json">validation/report.json</a></p>
{validation_table(v)}
{picture}
<h2>Resolution-free rendering</h2>
<p>Label map | scale-1 output upscaled (nearest) | (bicubic) | the MLP evaluated on a {SCALES[-1]}x denser grid
(<code>asap infer --scale {SCALES[-1]}</code>).</p><img src="scale_grid.png" alt="scale grid">
<h2>Latency at {result['bench_size']}x{result['bench_size']}</h2>
<p>Settings (those of <code>asap bench --size {result['bench_size']}</code>): {escape(result.get('bench_settings', ''))}.</p>
{''.join(f'<p class="warning">warning: {escape(w)}</p>' for w in result.get('bench_warnings', []))}
<table><tr><th>backend</th><th>stage</th><th>status</th><th>median ms</th><th>speed-up vs the authors' forward</th></tr>{rows}</table>
<img src="bench/latency.png" alt="latency chart"><pre>{escape(bench_md)}</pre>
</body></html>
"""
    return write_text(out / "index.html", page)
