"""A procedural paired data set whose targets need ASAP-Net's positional encoding.

Label maps: a background class plus random rectangles and ellipses of other classes.
Targets: each class paints a texture whose value depends on the class AND on the absolute pixel
position: a cosine grating (or a checker) with a class-specific period, orientation, phase and
pair of colours. Periods divide S = size // 16 (the tile size of a model trained at this size),
so a pixelwise MLP that sees the positional encoding can reproduce them exactly, while a
per-class colour (no position) cannot do better than the class's mean colour.
Everything is drawn from one seed: the same seed gives the same files, byte for byte.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import OutputError, UsageError
from .io import check_replaceable, staged_dir, write_json, write_png

DATASET_KIND = "data set"  # the ownership marker kind of a make-data folder

# Orientations as (ax, ay): the grating varies along ax*x + ay*y.
_ORIENTATIONS = ((1, 0), (0, 1), (1, 1), (1, -1))


@dataclass(frozen=True)
class ClassTexture:
    period: int
    orientation: tuple[int, int]
    checker: bool
    phase: float
    color_a: tuple[float, float, float]
    color_b: tuple[float, float, float]

    def render(self, h: int, w: int) -> np.ndarray:
        """(h, w, 3) float RGB in [0, 255] at absolute pixel positions (row y, column x)."""
        y, x = np.mgrid[0:h, 0:w].astype(np.float64)
        k = 2 * np.pi / self.period
        if self.checker:
            t = 0.5 + 0.5 * np.cos(k * x + self.phase) * np.cos(k * y + self.phase)
        else:
            ax, ay = self.orientation
            t = 0.5 + 0.5 * np.cos(k * (ax * x + ay * y) + self.phase)
        a, b = np.array(self.color_a), np.array(self.color_b)
        return a + t[..., None] * (b - a)


def class_textures(n_classes: int, size: int, seed: int) -> list[ClassTexture]:
    """One texture per class, drawn from `seed`. Periods are divisors >= 2 of S = size // 16."""
    S = max(2, size // 16)  # noqa: N806
    periods = [p for p in (2, 4, 8, 16, 32, 64) if p <= S and S % p == 0]
    rng = np.random.default_rng([seed, 1])
    out = []
    for c in range(n_classes):
        a = rng.uniform(30, 225, 3)
        # The second colour differs strongly from the first (visible texture) and the mean colours
        # differ between classes (the per-class baseline is a real baseline).
        b = np.clip(a + rng.choice([-1.0, 1.0], 3) * rng.uniform(70, 130, 3), 0, 255)
        period = int(periods[c % len(periods)] if c < len(periods) else rng.choice(periods))
        # At period 2, cos(pi*x + pi/2) is 0 at every integer x: no phase near pi/2 there.
        phases = [0.0, np.pi / 4] if period == 2 else [0.0, np.pi / 2, np.pi / 4]
        out.append(ClassTexture(
            period=period,
            orientation=_ORIENTATIONS[int(rng.integers(len(_ORIENTATIONS)))],
            checker=bool(c % 5 == 4),
            phase=float(rng.choice(phases)),
            color_a=tuple(float(v) for v in a), color_b=tuple(float(v) for v in b)))
    return out


def random_label_map(rng: np.random.Generator, size: int, n_classes: int) -> np.ndarray:
    """(size, size) uint8 ids: a background class and 3..8 rectangles/ellipses of random classes."""
    labels = np.full((size, size), rng.integers(n_classes), dtype=np.uint8)
    y, x = np.mgrid[0:size, 0:size]
    for _ in range(int(rng.integers(3, 9))):
        c = rng.integers(n_classes)
        hh, hw = rng.integers(size // 10 + 1, size // 3 + 2, 2)
        cy, cx = rng.integers(0, size, 2)
        if rng.random() < 0.5:
            mask = (np.abs(y - cy) <= hh) & (np.abs(x - cx) <= hw)
        else:
            mask = ((y - cy) / hh) ** 2 + ((x - cx) / hw) ** 2 <= 1.0
        labels[mask] = c
    return labels


def render_target(labels: np.ndarray, textures: list[ClassTexture]) -> np.ndarray:
    """(H, W) ids -> (H, W, 3) uint8 RGB: every pixel takes its class's texture at its position."""
    h, w = labels.shape
    out = np.zeros((h, w, 3))
    for c in np.unique(labels):
        m = labels == c
        out[m] = textures[int(c)].render(h, w)[m]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def make_dataset(out: str | os.PathLike, n_train: int = 200, n_val: int | None = None, size: int = 64,
                 n_classes: int = 6, seed: int = 0, overwrite: bool = True) -> dict:
    """Write a synthetic set in the facades layout ({train,val}_label/, {train,val}_img/) + dataset.json.

    The set is written whole or not at all (a hidden folder renamed into place). `overwrite=False`
    (the CLI's default) refuses a folder that is not empty; `overwrite=True` replaces an earlier
    data set of ours holding nothing else (io.check_replaceable), never a folder of other files."""
    if size < 32 or size % 16:
        raise UsageError(f"--size must be a multiple of 16 and >= 32 (got {size})")
    if not 2 <= n_classes <= 255:
        raise UsageError(f"--classes must be in 2..255 (got {n_classes})")
    if n_train < 1:
        raise UsageError(f"--n must be >= 1 (got {n_train})")
    n_val = max(1, n_train // 4) if n_val is None else n_val
    if n_val < 1:
        raise UsageError(f"--n-val must be >= 1 (got {n_val})")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise OutputError(f"{out}: already exists and is not empty; pass --overwrite to replace the data set")
    check_replaceable(out, DATASET_KIND, "data set")  # only an earlier set of ours holding nothing else
    textures = class_textures(n_classes, size, seed)
    info = {"kind": "asap-deploy synthetic", "layout": "facades", "size": size, "classes": n_classes,
            "seed": seed, "train": n_train, "val": n_val,
            "suggested_config": {"label_nc": n_classes, "crop_size": size},
            "note": "textures depend on absolute pixel position: train without flips or off-grid crops",
            "textures": [t.__dict__ for t in textures]}
    with staged_dir(out, "data set", DATASET_KIND) as tmp:
        for split, n, stream in (("train", n_train, 2), ("val", n_val, 3)):
            rng = np.random.default_rng([seed, stream])
            for i in range(n):
                labels = random_label_map(rng, size, n_classes)
                write_png(tmp / f"{split}_label" / f"{i:06d}.png", labels)
                write_png(tmp / f"{split}_img" / f"{i:06d}.png", render_target(labels, textures))
        write_json(tmp / "dataset.json", info)
    return info
