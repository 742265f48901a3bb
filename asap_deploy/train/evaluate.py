"""Held-out quality: PSNR of a generator and of two position-blind baselines.

PSNR is computed on the 8-bit images from the mean squared error pooled over every pixel and
channel of the held-out set: 10 log10(255^2 / MSE).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..io import to_uint8


def psnr_from_mse(mse: float, peak: float = 255.0) -> float:
    return float("inf") if mse <= 0 else 10.0 * math.log10(peak * peak / mse)


def _uint8_target(image: torch.Tensor) -> np.ndarray:
    """(3,H,W) float [-1,1] (exactly (u+0.5)/127.5-1 of a uint8 image) -> (H,W,3) uint8."""
    return to_uint8(image.permute(1, 2, 0).numpy())


@torch.no_grad()
def generator_mse(model, dataset, batch_size: int = 8) -> float:
    """Mean squared error (0..255 scale) of the generator's 8-bit output over the dataset."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for b0 in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(b0, min(len(dataset), b0 + batch_size))]
        labels = torch.stack([it[0] for it in items]).to(device)
        inst = None if items[0][1] is None else torch.stack([it[1] for it in items]).to(device)
        fake = model(labels, inst).cpu()
        for f, it in zip(fake, items):
            pred = to_uint8(f.permute(1, 2, 0).numpy()).astype(np.float64)
            diff = pred - _uint8_target(it[2]).astype(np.float64)
            total += float((diff ** 2).sum())
            count += diff.size
    return total / count


def class_colour_stats(dataset, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean colour over all pixels (3,), per-class mean colour (n_classes, 3)) of a dataset's images."""
    sums = np.zeros((n_classes, 3))
    counts = np.zeros(n_classes)
    for i in range(len(dataset)):
        labels, _, image = dataset[i]
        lab = labels.numpy().reshape(-1)
        rgb = _uint8_target(image).reshape(-1, 3).astype(np.float64)
        np.add.at(sums, lab, rgb)
        counts += np.bincount(lab, minlength=n_classes)[:n_classes]
    overall = sums.sum(0) / max(1.0, counts.sum())
    per_class = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], overall)
    return overall, per_class


def baseline_mse(dataset, overall: np.ndarray, per_class: np.ndarray) -> tuple[float, float]:
    """MSE of 'constant mean colour' and of 'per-class mean colour' (colours rounded to 8 bits)."""
    const8, class8 = np.rint(overall), np.rint(per_class)
    tc, tk, count = 0.0, 0.0, 0
    for i in range(len(dataset)):
        labels, _, image = dataset[i]
        target = _uint8_target(image).astype(np.float64)
        tc += float(((target - const8) ** 2).sum())
        tk += float(((target - class8[labels.numpy()]) ** 2).sum())
        count += target.size
    return tc / count, tk / count


def quality_report(model, val_set, n_classes: int) -> dict[str, float]:
    """Held-out PSNR (dB) of the model and of the two baselines."""
    # Fitted on the held-out set itself: the best any position-blind colour can score there.
    overall, per_class = class_colour_stats(val_set, n_classes)
    mse_c, mse_k = baseline_mse(val_set, overall, per_class)
    return {"psnr_model": psnr_from_mse(generator_mse(model, val_set)),
            "psnr_constant_mean": psnr_from_mse(mse_c), "psnr_class_mean": psnr_from_mse(mse_k)}
