"""Label palettes: id <-> RGB colour, for colour label maps in and side-by-side pictures out.

numpy only (no torch, no OpenCV). A palette is a mapping id -> (r, g, b). Decoding a colour image
looks every pixel's colour up in the palette; a colour used by several ids (Cityscapes gives ids
0..4 all black) decodes to the SMALLEST of those ids, and a colour not in the palette is an
InputError naming the colour, how many pixels carry it and where the first one is.

Named palettes:
  cityscapes  the Cityscapes label colours of labelIds 0..33 (the data set's label definitions;
              ids 0-4 share black, 17/18 share grey: decoding them gives 0 and 17)
  facades     the bundle palette of the facades preset (13 ids, `label_palette(13)`): the CMP
              Facade label PNGs are palette (mode P) images whose indices are read directly as
              ids, so no colour table of theirs is needed for them
  ade20k      the bundle palette of the ade20k preset (151 channels, id 255 white): NOT the
              ADE20K colour file; for colour maps drawn with that file pass it as FILE.json
  bundle      (default) the palette stored in the bundle manifest (`labels.palette`)
A palette file is JSON: {"0": [r, g, b], ...}, or {"palette": {...}}, or {"labels": {"palette":
{...}}} (a bundle manifest), or a list [[r, g, b], ...] indexed by id.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from .config import DONTCARE_ID, ModelConfig
from .errors import InputError, UsageError, did_you_mean

# Cityscapes labelIds 0..33 -> colour (the public label definitions of the data set).
CITYSCAPES = {
    0: (0, 0, 0), 1: (0, 0, 0), 2: (0, 0, 0), 3: (0, 0, 0), 4: (0, 0, 0), 5: (111, 74, 0), 6: (81, 0, 81),
    7: (128, 64, 128), 8: (244, 35, 232), 9: (250, 170, 160), 10: (230, 150, 140), 11: (70, 70, 70),
    12: (102, 102, 156), 13: (190, 153, 153), 14: (180, 165, 180), 15: (150, 100, 100), 16: (150, 120, 90),
    17: (153, 153, 153), 18: (153, 153, 153), 19: (250, 170, 30), 20: (220, 220, 0), 21: (107, 142, 35),
    22: (152, 251, 152), 23: (70, 130, 180), 24: (220, 20, 60), 25: (255, 0, 0), 26: (0, 0, 142),
    27: (0, 0, 70), 28: (0, 60, 100), 29: (0, 0, 90), 30: (0, 0, 110), 31: (0, 80, 100), 32: (0, 0, 230),
    33: (119, 11, 32),
}
NAMED = ("cityscapes", "facades", "ade20k")


class Palette:
    """id -> colour, and the reverse lookup for decoding colour label maps."""

    def __init__(self, colours: Mapping[int, tuple[int, int, int]], name: str = "custom"):
        if not colours:
            raise UsageError(f"palette {name!r} is empty")
        self.name = name
        self.colours: dict[int, tuple[int, int, int]] = {}
        for i, c in colours.items():
            i = int(i)
            if not 0 <= i <= 65535:
                raise UsageError(f"palette {name!r}: id {i} is outside 0..65535")
            c = tuple(int(v) for v in c)
            if len(c) != 3 or any(not 0 <= v <= 255 for v in c):
                raise UsageError(f"palette {name!r}: the colour of id {i} must be three values 0..255, got {list(c)}")
            self.colours[i] = c
        # reverse table: packed colour -> smallest id with it, sorted for searchsorted
        rev: dict[int, int] = {}
        for i in sorted(self.colours):
            rev.setdefault(_pack(np.array(self.colours[i]))[()], i)
        self._keys = np.array(sorted(rev), dtype=np.int64)
        self._ids = np.array([rev[k] for k in self._keys], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.colours)

    def to_dict(self) -> dict[str, list[int]]:
        return {str(i): list(c) for i, c in sorted(self.colours.items())}

    def lut(self, size: int | None = None) -> np.ndarray:
        """(size, 3) uint8 colour table; ids without a colour are black."""
        size = size or max(256, max(self.colours) + 1)
        out = np.zeros((size, 3), np.uint8)
        for i, c in self.colours.items():
            if i < size:
                out[i] = c
        return out

    def colourise(self, ids: np.ndarray) -> np.ndarray:
        """(..., ) ids -> (..., 3) uint8 RGB; ids without a colour are black."""
        lut = self.lut(max(256, int(ids.max(initial=0)) + 1))
        return lut[ids.astype(np.int64)]

    def decode(self, rgb: np.ndarray, what: str = "image") -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (H, W) int32 ids; InputError for colours not in the palette."""
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise InputError(f"{what}: expected an RGB image, got shape {rgb.shape}")
        keys = _pack(rgb)
        pos = np.searchsorted(self._keys, keys)
        pos_c = np.minimum(pos, len(self._keys) - 1)
        known = self._keys[pos_c] == keys
        if not known.all():
            bad = ~known
            y, x = (int(v[0]) for v in np.nonzero(bad))
            colours = np.unique(keys[bad])
            shown = ", ".join(str(list(_unpack(c))) for c in colours[:3]) + (" ..." if len(colours) > 3 else "")
            raise InputError(f"{what}: {int(bad.sum())} pixel(s) in {len(colours)} colour(s) not in the {self.name} "
                             f"palette: {shown} (first at x={x}, y={y}); pass the right --palette")
        return self._ids[pos_c].astype(np.int32)


def _pack(rgb: np.ndarray) -> np.ndarray:
    a = rgb.astype(np.int64)
    return (a[..., 0] << 16) | (a[..., 1] << 8) | a[..., 2]


def _unpack(k: int) -> tuple[int, int, int]:
    k = int(k)
    return (k >> 16) & 255, (k >> 8) & 255, k & 255


DONTCARE_COLOUR = [255, 255, 255]


def label_palette(n: int) -> list[list[int]]:
    """A distinct RGB colour per label channel 0..n-1 (bit-interleaved colour map: the bits of the
    id are spread over the high bits of R, G and B in turn)."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for bit in range(7, -1, -1):
            r |= (c & 1) << bit
            g |= ((c >> 1) & 1) << bit
            b |= ((c >> 2) & 1) << bit
            c >>= 3
        out.append([r, g, b])
    return out


def bundle_palette(cfg: ModelConfig) -> Palette:
    """The palette every bundle manifest stores for `cfg`: `label_palette`, don't care in white."""
    cols = {i: tuple(c) for i, c in enumerate(label_palette(cfg.n_label_channels))}
    if cfg.accepts_dontcare_id:
        cols[DONTCARE_ID] = tuple(DONTCARE_COLOUR)
    return Palette(cols, "bundle")


def from_json_obj(obj, name: str) -> Palette:
    if isinstance(obj, dict) and "labels" in obj and isinstance(obj["labels"], dict):
        obj = obj["labels"].get("palette")
    if isinstance(obj, dict) and "palette" in obj:
        obj = obj["palette"]
    if isinstance(obj, list):
        obj = {str(i): c for i, c in enumerate(obj)}
    if not isinstance(obj, dict):
        raise UsageError(f"{name}: a palette file holds {{\"id\": [r, g, b], ...}} or a list of [r, g, b]")
    try:
        return Palette({int(k): v for k, v in obj.items()}, name)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{name}: not a palette ({exc})") from exc


def load_palette(spec: str | os.PathLike | None, cfg: ModelConfig | None = None,
                 manifest: Mapping | None = None) -> Palette:
    """--palette: a named palette, a JSON file, or None/'bundle' for the bundle's palette."""
    from asap_deploy.config import preset

    if spec is None or str(spec) == "bundle":
        if manifest is not None and manifest.get("labels", {}).get("palette"):
            return from_json_obj(manifest["labels"]["palette"], "bundle")
        if cfg is None:
            raise UsageError("no model config to take the bundle palette from: pass --palette")
        return bundle_palette(cfg)
    s = str(spec)
    if s == "cityscapes":
        return Palette(CITYSCAPES, "cityscapes")
    if s in ("facades", "ade20k"):
        p = bundle_palette(preset(s))
        p.name = s
        return p
    path = Path(s)
    if not path.is_file():
        raise UsageError(f"--palette {s!r}: no such palette or file{did_you_mean(s, NAMED + ('bundle',))} (named: {', '.join(NAMED)}, bundle, or FILE.json)")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the palette file ({exc})") from exc
    return from_json_obj(obj, str(path))
