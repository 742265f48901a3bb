"""Paired folder datasets (label map [+ instance map] -> photo) for training.

Layouts, detected from the folder names under the data root:
  facades     {split}_label/, {split}_img/                       (split: train | val)
  cityscapes  {split}_labels/ (recursive *_labelIds.png, *_instanceIds.png), {split}_images/
  pix2pixhd   {split}_label/, {split}_inst/, {split}_img/          (split: train | test)
  custom      explicit label / image / instance folders
Pairs are matched by name (known suffixes such as `_gtFine_labelIds` and `_leftImg8bit` removed);
a file without a partner is an error that names it.

Before training, `PairedDataset.check()` reads every pair once (label maps decoded in full: only the
pixels tell whether every id is within label_nc) and raises ONE DataCheckError that counts every
problem and names the bad files, so a bad pair never surfaces at step 5000 of a run.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .config import ModelConfig
from .errors import DatasetError, InputError
from .io import read_instance_map, read_label_map, read_rgb

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
# Name suffixes that differ between the members of one pair (Cityscapes and friends).
_PAIR_SUFFIXES = re.compile(r"(_gtFine|_gtCoarse)?_(labelIds|instanceIds|color|leftImg8bit|labels?|inst|img|image)$")


# How many bad files a DataCheckError message shows (all are counted, and all are on `.problems`).
MAX_SHOWN_PROBLEMS = 10


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file of a data set; `message` starts with the file's path."""

    path: Path
    message: str


class DataCheckError(DatasetError):
    """Every problem found in a data set, in one error (exit 5). The message counts them all and names
    the first MAX_SHOWN_PROBLEMS; `.problems` holds the whole list."""

    def __init__(self, problems: Sequence[Problem], what: str = "the data set", checked: int | None = None):
        self.problems = list(problems)
        files = len({p.path for p in self.problems})
        n = len(self.problems)
        shown = "; ".join(p.message for p in self.problems[:MAX_SHOWN_PROBLEMS])
        more = f"; and {n - MAX_SHOWN_PROBLEMS} more" if n > MAX_SHOWN_PROBLEMS else ""
        where = f" (checked {checked} pair{'s' if checked != 1 else ''})" if checked is not None else ""
        super().__init__(f"{what}: {n} problem{'s' if n != 1 else ''} in {files} file{'s' if files != 1 else ''}"
                         f"{where}: {shown}{more}")


def raise_problems(problems: Sequence[Problem], what: str = "the data set", checked: int | None = None) -> None:
    """Raise a DataCheckError holding `problems` (nothing if there are none)."""
    if problems:
        raise DataCheckError(problems, what, checked)


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


def list_samples(layout: DatasetLayout, problems: list[Problem] | None = None) -> list[Sample]:
    """Match label, image (and instance) files by name. Files without a partner (and names shared by
    two files of one role) are problems: all of them are raised in one DataCheckError, or, when a
    `problems` list is given, appended to it (the matched samples are still returned)."""
    labels = _images(layout.label_dir, layout.label_glob, layout.recursive)
    images = _images(layout.image_dir, "*", layout.recursive)
    if not labels:
        raise DatasetError(f"{layout.label_dir}: no label maps found"
                           + (f" (looking for {layout.label_glob})" if layout.label_glob != "*" else ""))
    found: list[Problem] = []
    by_key: dict[str, dict[str, Path]] = {}
    clashes: set[str] = set()

    def add(paths: Sequence[Path], role: str, root: Path) -> None:
        for p in paths:
            key = pair_key(p, root)
            slot = by_key.setdefault(key, {})
            if role in slot:
                found.append(Problem(p, f"{p}: two {role} files share the name {key!r} (the other is {slot[role]})"))
                clashes.add(key)
                continue
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
            for have in slot.values():  # every file of the incomplete pair is named
                found.append(Problem(have, f"{have}: no matching {' or '.join(missing)} file (pairs are matched by "
                                           f"name: expected a file named like {key!r} in "
                                           f"{', '.join(str(getattr(layout, r + '_dir')) for r in missing)})"))
        elif key not in clashes:
            samples.append(Sample(slot["label"], slot["image"], slot.get("instance")))
    if problems is None:
        raise_problems(found, f"{layout.label_dir.parent} ({layout.split})")
    else:
        problems.extend(found)
    return samples


def find_samples(root: str | os.PathLike | None = None, split: str = "train", label_dir=None, image_dir=None,
                 instance_dir=None, problems: list[Problem] | None = None) -> tuple[DatasetLayout, list[Sample]]:
    """Detect the layout (or use the custom folders) and list the matched samples (see list_samples
    for `problems`)."""
    if label_dir is not None or image_dir is not None:
        if label_dir is None or image_dir is None:
            raise DatasetError("a custom dataset needs both a label folder and an image folder")
        layout = custom_layout(label_dir, image_dir, instance_dir)
    else:
        if root is None:
            raise DatasetError("give a dataset folder or label/image folders")
        layout = detect_layout(root, split)
    return layout, list_samples(layout, problems)


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
                 crop: bool = True, augment: bool = False, flip: bool = False,
                 problems: Sequence[Problem] = (), name: str = "the data set"):
        # `problems`: what listing the files found (files without a partner); check() reports them
        # together with what it finds in the files themselves.
        self.problems = list(problems)
        self.name = name
        if not samples:
            raise_problems(self.problems, name)
            raise DatasetError(f"{name} is empty")
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

    def _bad_ids(self, labels: np.ndarray) -> np.ndarray | None:
        """The distinct ids of `labels` the model does not take, or None (min/max first: one cheap pass
        over the map when every id is fine, which is the common case)."""
        if labels.size == 0 or (int(labels.min()) >= 0 and int(labels.max()) < self.cfg.n_label_channels):
            return None
        invalid = self.cfg.invalid_label_ids(labels)
        return np.unique(labels[invalid]) if invalid.any() else None

    def _ids_message(self, path: Path, bad: np.ndarray) -> str:
        from .config import DONTCARE_ID

        shown = ", ".join(map(str, bad[:8].tolist())) + (f" (and {len(bad) - 8} more)" if len(bad) > 8 else "")
        msg = (f"{path}: label id(s) {shown} out of range: the model has label_nc={self.cfg.label_nc} "
               f"(ids {self.cfg.allowed_label_ids})")
        if DONTCARE_ID in bad.tolist() and self.cfg.contain_dontcare_label is False:
            msg += (f"; {DONTCARE_ID} is the don't-care id, which this config does not take "
                    "(set contain_dontcare_label=true to train with it)")
        return msg

    def _decode(self, s: Sample) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, list[Problem]]:
        """Read one pair with the readers training uses (each file once) and list every problem in it:
        unreadable/corrupt/too large files, label/photo/instance sizes that differ, ids the model does
        not take, a size smaller than the training crop."""
        problems: list[Problem] = []

        def read(path: Path, reader):
            try:
                return reader(path)
            except InputError as exc:
                problems.append(Problem(path, exc.message))
            except OSError as exc:  # e.g. permission denied while reading the header
                problems.append(Problem(path, f"{path}: cannot read the file ({exc.strerror or exc})"))
            return None

        labels = read(s.label, read_label_map)
        image = read(s.image, read_rgb)
        inst = read(s.instance, read_instance_map) if s.instance is not None and self.cfg.instance_edges else None
        if labels is not None and image is not None and labels.shape != image.shape[:2]:
            problems.append(Problem(s.label, f"{s.label}: label map is {labels.shape[1]}x{labels.shape[0]} but its "
                                             f"image {s.image} is {image.shape[1]}x{image.shape[0]} (WxH)"))
        if inst is not None and labels is not None and inst.shape != labels.shape:
            problems.append(Problem(s.instance, f"{s.instance}: instance map is {inst.shape[1]}x{inst.shape[0]} "
                                                f"but its label map {s.label} is "
                                                f"{labels.shape[1]}x{labels.shape[0]} (WxH)"))
        if labels is not None:
            bad = self._bad_ids(labels)
            if bad is not None:
                problems.append(Problem(s.label, self._ids_message(s.label, bad)))
            H, W = labels.shape  # noqa: N806
            ch, cw = self.crop_hw
            if self.crop and not self.load_size and (H < ch or W < cw):
                problems.append(Problem(s.label, f"{s.label}: {W}x{H} (WxH) is smaller than the training crop "
                                                 f"{cw}x{ch}; use --load-size to resize"))
        return labels, inst, image, problems

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """Decode and validate sample i: (labels (H,W) int64, instances or None, image (H,W,3) uint8)."""
        labels, inst, image, problems = self._decode(self.samples[i])
        if problems:
            raise DatasetError("; ".join(p.message for p in problems))
        return labels.astype(np.int64), (inst.astype(np.int64) if inst is not None else None), image

    def _load_hw(self) -> tuple[int, int]:
        return int(round(self.load_size / self.cfg.aspect_ratio)), self.load_size

    def find_problems(self, progress: Callable[[int, int], None] | None = None,
                      workers: int | None = None) -> list[Problem]:
        """Every problem of the data set, in sample order: the pairing problems found when listing, then
        each pair read once (label maps decoded in full for the id check). `progress(done, total)` is
        called after each pair. Decoding runs on `workers` threads (default: up to 8; the decoders
        release the GIL)."""
        if self.crop and self.load_size:
            (h, w), (ch, cw) = self._load_hw(), self.crop_hw
            if h < ch or w < cw:
                from .errors import UsageError

                raise UsageError(f"--load-size {self.load_size} resizes every image to {w}x{h} (WxH), smaller than "
                                 f"the training crop {cw}x{ch}; use --load-size {cw} or more")
        problems = list(self.problems)
        n = len(self.samples)
        for done, found in enumerate(_map_bounded(lambda s: self._decode(s)[3], self.samples, workers), 1):
            problems.extend(found)
            if progress is not None:
                progress(done, n)
        return problems

    def check(self, progress: Callable[[int, int], None] | None = None, workers: int | None = None) -> None:
        """Read every pair once and raise one DataCheckError naming every bad file (see find_problems)."""
        raise_problems(self.find_problems(progress, workers), self.name, len(self))

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


def _map_bounded(fn, items: Sequence, workers: int | None = None):
    """fn(item) for each item, in order, on a thread pool with a bounded number of tasks in flight
    (memory stays flat for any data set size; an interrupt cancels what has not started)."""
    import collections

    workers = workers or min(8, os.cpu_count() or 1)
    if workers <= 1:
        yield from map(fn, items)
        return
    ex = ThreadPoolExecutor(workers, thread_name_prefix="asap-data-check")
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append(ex.submit(fn, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def check_datasets(datasets: Sequence[PairedDataset], progress: Callable[[int, int], None] | None = None,
                   workers: int | None = None) -> None:
    """Check several data sets (e.g. train and val) in one pass and raise ONE DataCheckError over all of
    them. `progress(done, total)` counts pairs over all the sets."""
    total = sum(len(d) for d in datasets)
    offset = 0
    problems: list[Problem] = []
    for d in datasets:
        base = offset
        problems += d.find_problems(None if progress is None else (lambda k, _n, b=base: progress(b + k, total)),
                                    workers)
        offset += len(d)
    raise_problems(problems, " and ".join(d.name for d in datasets), total)


def collate(items):
    """Stack (labels, instances|None, image) samples into a batch."""
    import torch

    labels = torch.stack([it[0] for it in items])
    inst = None if items[0][1] is None else torch.stack([it[1] for it in items])
    return labels, inst, torch.stack([it[2] for it in items])
