"""Paired folder datasets (label map [+ instance map] -> photo) for training.

Layouts, detected from the folder names under the data root:
  facades     {split}_label/, {split}_img/                       (split: train | val)
  cityscapes  {split}_labels/ (recursive *_labelIds.png, *_instanceIds.png), {split}_images/
  pix2pixhd   {split}_label/, {split}_inst/, {split}_img/          (split: train | test)
  custom      explicit label / image / instance folders
Pairs are matched by name (known suffixes such as `_gtFine_labelIds` and `_leftImg8bit` removed);
a file without a partner is an error that names it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .config import ModelConfig
from .errors import DatasetError, InputError
from .io import read_instance_map, read_label_map, read_rgb

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Name suffixes that differ between the members of one pair (Cityscapes and friends).
_PAIR_SUFFIXES = re.compile(r"(_gtFine|_gtCoarse)?_(labelIds|instanceIds|color|leftImg8bit|labels?|inst|img|image)$")


@dataclass(frozen=True)
class Sample:
    label: Path
    image: Path
    instance: Path | None = None


@dataclass(frozen=True)
class DatasetLayout:
    name: str
    split: str
    label_dir: Path
    image_dir: Path
    instance_dir: Path | None
    label_glob: str = "*"
    instance_glob: str = "*"
    recursive: bool = False


def pair_key(path: Path, root: Path) -> str:
    """The name both members of a pair share: relative folder + stem without role suffixes."""
    rel = path.relative_to(root)
    stem = _PAIR_SUFFIXES.sub("", rel.stem)
    return str(rel.parent / stem)


def _images(folder: Path, pattern: str = "*", recursive: bool = False) -> list[Path]:
    it = folder.rglob(pattern) if recursive else folder.glob(pattern)
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def detect_layout(root: str | os.PathLike, split: str = "train") -> DatasetLayout:
    """Find which known layout `root` holds for `split` (train, or val/test)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset folder")
    evals = ("val", "test") if split != "train" else ("train",)
    for s in evals:
        if (root / f"{s}_labels").is_dir() and (root / f"{s}_images").is_dir():
            return DatasetLayout("cityscapes", s, root / f"{s}_labels", root / f"{s}_images", root / f"{s}_labels",
                                 "*_labelIds.png", "*_instanceIds.png", recursive=True)
        if (root / f"{s}_label").is_dir() and (root / f"{s}_img").is_dir():
            inst = root / f"{s}_inst"
            if inst.is_dir():
                return DatasetLayout("pix2pixhd", s, root / f"{s}_label", root / f"{s}_img", inst)
            return DatasetLayout("facades", s, root / f"{s}_label", root / f"{s}_img", None)
    found = sorted(p.name for p in root.iterdir() if p.is_dir())
    raise DatasetError(
        f"{root}: no {'/'.join(evals)} split in a known layout. Expected one of: "
        f"{evals[0]}_label/ + {evals[0]}_img/ (facades; + {evals[0]}_inst/ for pix2pixHD), "
        f"{evals[0]}_labels/ + {evals[0]}_images/ (cityscapes), or give --label-dir/--image-dir. "
        f"Found folders: {', '.join(found) or 'none'}"
    )


def custom_layout(label_dir: str | os.PathLike, image_dir: str | os.PathLike,
                  instance_dir: str | os.PathLike | None = None) -> DatasetLayout:
    for d in (label_dir, image_dir, instance_dir):
        if d is not None and not Path(d).is_dir():
            raise DatasetError(f"{d}: no such folder")
    return DatasetLayout("custom", "custom", Path(label_dir), Path(image_dir),
                         Path(instance_dir) if instance_dir else None)


def list_samples(layout: DatasetLayout) -> list[Sample]:
    """Match label, image (and instance) files by name; any file without a partner is an error."""
    labels = _images(layout.label_dir, layout.label_glob, layout.recursive)
    images = _images(layout.image_dir, "*", layout.recursive)
    if not labels:
        raise DatasetError(f"{layout.label_dir}: no label maps found"
                           + (f" (looking for {layout.label_glob})" if layout.label_glob != "*" else ""))
    by_key: dict[str, dict[str, Path]] = {}

    def add(paths: Sequence[Path], role: str, root: Path) -> None:
        for p in paths:
            key = pair_key(p, root)
            slot = by_key.setdefault(key, {})
            if role in slot:
                raise DatasetError(f"{p}: two {role} files share the name {key!r} (the other is {slot[role]})")
            slot[role] = p

    add(labels, "label", layout.label_dir)
    add(images, "image", layout.image_dir)
    roles = ["label", "image"]
    if layout.instance_dir is not None:
        add(_images(layout.instance_dir, layout.instance_glob, layout.recursive), "instance", layout.instance_dir)
        roles.append("instance")
    samples = []
    for key in sorted(by_key):
        slot = by_key[key]
        missing = [r for r in roles if r not in slot]
        if missing:
            have = next(iter(slot.values()))
            raise DatasetError(f"{have}: no matching {' or '.join(missing)} file (pairs are matched by name: "
                               f"expected a file named like {key!r} in "
                               f"{', '.join(str(getattr(layout, r + '_dir')) for r in missing)})")
        samples.append(Sample(slot["label"], slot["image"], slot.get("instance")))
    return samples


def find_samples(root: str | os.PathLike | None = None, split: str = "train", label_dir=None, image_dir=None,
                 instance_dir=None) -> tuple[DatasetLayout, list[Sample]]:
    """Detect the layout (or use the custom folders) and list the matched samples."""
    if label_dir is not None or image_dir is not None:
        if label_dir is None or image_dir is None:
            raise DatasetError("a custom dataset needs both a label folder and an image folder")
        layout = custom_layout(label_dir, image_dir, instance_dir)
    else:
        if root is None:
            raise DatasetError("give a dataset folder or label/image folders")
        layout = detect_layout(root, split)
    return layout, list_samples(layout)


def _resize(arr: np.ndarray, hw: tuple[int, int], nearest: bool) -> np.ndarray:
    import cv2

    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return cv2.resize(arr, (hw[1], hw[0]), interpolation=interp)


class PairedDataset:
    """A torch-style dataset of (labels int64 (H,W), instances int64 (H,W) or None, image float (3,H,W) in [-1,1]).

    Every image is (optionally) resized to `load_size` (width; height from the aspect ratio), then cropped to the
    training crop (height crop_size/aspect_ratio, width crop_size): a random crop when `augment`, else the centre.
    Index with `ds[i]` (no augmentation) or `ds[(i, seed)]` (augmentation drawn from `seed`, so a run is
    reproducible whatever process or worker loads the sample).
    """

    def __init__(self, samples: Sequence[Sample], cfg: ModelConfig, *, load_size: int | None = None,
                 crop: bool = True, augment: bool = False, flip: bool = False):
        if not samples:
            raise DatasetError("the dataset is empty")
        self.samples = list(samples)
        self.cfg = cfg
        self.load_size = load_size
        self.crop = crop
        self.augment = augment
        self.flip = flip
        self.crop_hw = (int(round(cfg.crop_size / cfg.aspect_ratio)), cfg.crop_size)
        if cfg.instance_edges and any(s.instance is None for s in self.samples):
            raise DatasetError("this model uses instance edges but the dataset has no instance maps "
                               "(cityscapes/pix2pixHD layouts or --instance-dir)")

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Decode and validate sample i: (labels (H,W) int64, instances or None, image (H,W,3) uint8)."""
        s = self.samples[i]
        try:
            labels = read_label_map(s.label)
            image = read_rgb(s.image)
            inst = read_instance_map(s.instance) if s.instance is not None and self.cfg.instance_edges else None
        except InputError as exc:
            raise DatasetError(exc.message) from exc
        if labels.shape != image.shape[:2]:
            raise DatasetError(f"{s.label}: label map is {labels.shape[1]}x{labels.shape[0]} but its image "
                               f"{s.image} is {image.shape[1]}x{image.shape[0]} (WxH)")
        if inst is not None and inst.shape != labels.shape:
            raise DatasetError(f"{s.instance}: instance map is {inst.shape[1]}x{inst.shape[0]} but its label map "
                               f"{s.label} is {labels.shape[1]}x{labels.shape[0]} (WxH)")
        labels = labels.astype(np.int64)
        n = self.cfg.n_label_channels
        invalid = self.cfg.invalid_label_ids(labels)
        if invalid.any():
            bad = np.unique(labels[invalid])
            raise DatasetError(f"{s.label}: label id(s) {', '.join(map(str, bad[:8].tolist()))} out of range: the model "
                               f"has label_nc={self.cfg.label_nc} (ids 0..{n - 1}"
                               + (", or 255 don't care)" if self.cfg.accepts_dontcare_id else ")"))
        return labels, (inst.astype(np.int64) if inst is not None else None), image

    def check(self) -> None:
        """Decode and validate every sample (raises DatasetError naming the first bad file)."""
        for i in range(len(self)):
            self._prepare(i, None)

    def _prepare(self, i: int, seed: int | None):
        labels, inst, image = self.load(i)
        if self.load_size:
            hw = (int(round(self.load_size / self.cfg.aspect_ratio)), self.load_size)
            labels, image = _resize(labels.astype(np.int32), hw, True).astype(np.int64), _resize(image, hw, False)
            if inst is not None:
                inst = _resize(inst.astype(np.int32), hw, True).astype(np.int64)
        H, W = labels.shape  # noqa: N806
        rng = np.random.default_rng(seed) if (self.augment and seed is not None) else None
        if self.crop:
            ch, cw = self.crop_hw
            if H < ch or W < cw:
                raise DatasetError(f"{self.samples[i].label}: {W}x{H} (WxH) is smaller than the training crop "
                                   f"{cw}x{ch}; use --load-size to resize")
            y0 = int(rng.integers(0, H - ch + 1)) if rng is not None else (H - ch) // 2
            x0 = int(rng.integers(0, W - cw + 1)) if rng is not None else (W - cw) // 2
            labels, image = labels[y0:y0 + ch, x0:x0 + cw], image[y0:y0 + ch, x0:x0 + cw]
            inst = inst[y0:y0 + ch, x0:x0 + cw] if inst is not None else None
        if rng is not None and self.flip and rng.random() < 0.5:
            labels, image = labels[:, ::-1], image[:, ::-1]
            inst = inst[:, ::-1] if inst is not None else None
        img = image.astype(np.float32).transpose(2, 0, 1) / 127.5 - 1.0
        return (np.ascontiguousarray(labels), None if inst is None else np.ascontiguousarray(inst),
                np.ascontiguousarray(img))

    def __getitem__(self, key):
        import torch

        i, seed = key if isinstance(key, tuple) else (key, None)
        labels, inst, img = self._prepare(int(i), seed)
        return (torch.from_numpy(labels), None if inst is None else torch.from_numpy(inst), torch.from_numpy(img))


def collate(items):
    """Stack (labels, instances|None, image) samples into a batch."""
    import torch

    labels = torch.stack([it[0] for it in items])
    inst = None if items[0][1] is None else torch.stack([it[1] for it in items])
    return labels, inst, torch.stack([it[2] for it in items])
