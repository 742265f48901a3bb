"""`asap demo`: the whole story on a CPU in a few minutes, as a clear sequence of steps.

1. make a synthetic data set (textures that depend on class and position)
2. train a small ASAP-Net for a bounded time
3. measure held-out PSNR next to the position-blind baselines
4. write label maps, generated images beside their targets, and the loss curve
(Later steps - export, validate, bench - append to `run_demo`.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from .io import to_uint8, write_json, write_png

DEMO_SIZE = 64
DEMO_CLASSES = 6
DEMO_TRAIN, DEMO_VAL = 200, 32
N_SHOWN = 8


def label_palette(n: int) -> np.ndarray:
    """(n, 3) uint8 distinct-ish colours for drawing label maps."""
    rng = np.random.default_rng(12345)
    pal = rng.integers(40, 256, (max(n, 1), 3)).astype(np.uint8)
    pal[0] = (70, 70, 70)
    return pal


def demo_options(minutes: float | None, steps: int | None, seed: int):
    """Training options of the demo: the SPADE recipe plus L1 (weight 100, as the authors' --L1_loss),
    a smaller discriminator, and a higher learning rate, so a CPU gets somewhere in minutes."""
    from .train.trainer import TrainOptions

    return TrainOptions(steps=steps, minutes=minutes, batch_size=4, seed=seed, lr_g=1e-3, lr_d=1e-3,
                        decay_steps=0, lambda_l1=100.0, ndf=32, save_every=10**9, log_every=5)


def run_demo(out: str | Path = "asap_demo", minutes: float | None = 2.0, steps: int | None = None, seed: int = 0,
             on_event: Callable[..., None] | None = None, threads: int | None = 1) -> dict[str, Any]:
    import torch

    if threads:
        torch.set_num_threads(threads)

    from .data import PairedDataset, find_samples
    from .synthetic import make_dataset
    from .train import small_config
    from .train.evaluate import quality_report
    from .train.plot import plot_losses
    from .train.trainer import Trainer

    emit = on_event or (lambda kind, **kw: None)
    out = Path(out)
    files: list[Path] = []

    # 1. data
    emit("stage", text=f"1/4 making a synthetic data set in {out / 'data'}")
    make_dataset(out / "data", DEMO_TRAIN, DEMO_VAL, DEMO_SIZE, DEMO_CLASSES, seed)
    files.append(out / "data")

    # 2. train (a fresh run each time: the demo overwrites its own run folder)
    cfg = small_config(DEMO_CLASSES, DEMO_SIZE)
    opts = demo_options(minutes, steps, seed)
    train_set = PairedDataset(find_samples(out / "data", "train")[1], cfg, augment=True)
    val_set = PairedDataset(find_samples(out / "data", "val")[1], cfg)
    emit("stage", text=f"2/4 training a small ASAP-Net ({cfg.S}x{cfg.S} tiles, MLP {cfg.mlp_channels}) "
                       + (f"for {minutes:g} min" if minutes else f"for {steps} steps"))
    trainer = Trainer(cfg, opts, train_set, out / "run")
    emit("train_start", total=steps)
    summary = trainer.run(on_step=lambda s, total, losses: emit("step", step=s, losses=losses))
    emit("train_end")
    files += [Path(summary["paths"]["generator"]), Path(summary["paths"]["log"])]

    # 3. quality
    emit("stage", text="3/4 measuring held-out PSNR")
    model = trainer.g_raw.eval()
    quality = quality_report(model, val_set, DEMO_CLASSES)
    quality["steps"] = trainer.step
    files.append(write_json(out / "quality.json", quality))

    # 4. pictures: label map | generated | target, one row per held-out sample
    emit("stage", text=f"4/4 writing pictures to {out / 'results'}")
    pal = label_palette(DEMO_CLASSES)
    rows = []
    with torch.no_grad():
        for i in range(min(N_SHOWN, len(val_set))):
            labels, inst, image = val_set[i]
            fake = model(labels[None], None if inst is None else inst[None])[0]
            lab_rgb = pal[labels.numpy()]
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
    return {"quality": quality, "steps": trainer.step, "seconds": summary["seconds"], "files": [str(f) for f in files]}
