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
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

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


# ---- untrusted JSON (palette files, bundle manifests) ------------------------------------------
MAX_PALETTE_FILE_BYTES = 16 << 20  # a 65536-colour palette is ~1.5 MB of JSON
MAX_JSON_DEPTH = 64
_ID_KEY = re.compile(r"[0-9]{1,5}")


class _JsonRefused(ValueError):
    """A JSON value that the standard library accepts and we do not (NaN, Infinity, duplicate keys)."""


def _refuse_constant(token: str):
    raise _JsonRefused(f"{token} is not a number (JSON has no NaN or Infinity)")


def _finite_float(token: str) -> float:
    v = float(token)
    if not math.isfinite(v):
        raise _JsonRefused(f"the number {token[:24]} is out of range (it reads as {v})")
    return v


def _no_duplicate_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _JsonRefused(f"the key {k[:40]!r} appears twice in one object")
        out[k] = v
    return out


def _depth(obj, limit: int) -> int:
    """Nesting depth of a parsed JSON value, stopping once above `limit` (iterative: no recursion)."""
    stack, deepest = [(obj, 1)], 0
    while stack:
        o, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            break
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return deepest


def strict_json(data: bytes | str, what: str, error: type = UsageError) -> Any:
    """Parse untrusted JSON, refusing (`error`, starting with `what`) what Python's json accepts but
    JSON does not mean: NaN/Infinity (also numbers like 1e999 that overflow to infinity),
    duplicate keys, nesting deeper than MAX_JSON_DEPTH, integers too long for Python, bad UTF-8."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        obj = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float,
                         object_pairs_hook=_no_duplicate_keys)
    except _JsonRefused as exc:
        raise error(f"{what}: refused ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise error(f"{what}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except RecursionError as exc:
        raise error(f"{what}: nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, and ints beyond Python's digit limit
        raise error(f"{what}: not valid JSON ({exc})") from exc
    if _depth(obj, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise error(f"{what}: nested more than {MAX_JSON_DEPTH} levels deep")
    return obj


def _json_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def from_json_obj(obj, name: str) -> Palette:
    """A Palette from parsed JSON (file or manifest): ids are decimal strings 0..65535 (or list
    positions), colours exactly three integers 0..255 (not booleans, floats or strings)."""
    if isinstance(obj, dict) and "labels" in obj and isinstance(obj["labels"], dict):
        obj = obj["labels"].get("palette")
    if isinstance(obj, dict) and "palette" in obj:
        obj = obj["palette"]
    if isinstance(obj, list):
        if len(obj) > 65536:
            raise UsageError(f"{name}: a palette has at most 65536 colours (ids 0..65535), got {len(obj)}")
        obj = {str(i): c for i, c in enumerate(obj)}
    if not isinstance(obj, dict):
        raise UsageError(f"{name}: a palette file holds {{\"id\": [r, g, b], ...}} or a list of [r, g, b]")
    colours: dict[int, tuple[int, int, int]] = {}
    for k, c in obj.items():
        if not isinstance(k, str) or not _ID_KEY.fullmatch(k) or int(k) > 65535:
            raise UsageError(f"{name}: not a palette: the id {str(k)[:20]!r} is not a whole number 0..65535")
        if (not isinstance(c, (list, tuple)) or len(c) != 3 or not all(_json_int(v) for v in c)
                or any(not 0 <= v <= 255 for v in c)):
            raise UsageError(f"{name}: not a palette: the colour of id {k} must be three values 0..255 "
                             f"(integers), got {str(c)[:40]}")
        colours[int(k)] = (c[0], c[1], c[2])
    return Palette(colours, name)


def load_palette(spec: str | os.PathLike | None, cfg: ModelConfig | None = None,
                 manifest: Mapping | None = None) -> Palette:
    """--palette: a named palette, a JSON file, or None/'bundle' for the bundle's palette."""
    from asap_deploy.config import preset

    if spec is None or str(spec) == "bundle":
        labels = manifest.get("labels") if isinstance(manifest, Mapping) else None
        if isinstance(labels, Mapping) and labels.get("palette"):
            return from_json_obj(labels["palette"], "bundle")
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
    from .io import read_regular_file

    path = Path(s)
    if not path.exists() and not path.is_symlink():
        raise UsageError(f"--palette {s!r}: no such palette or file{did_you_mean(s, NAMED + ('bundle',))} (named: {', '.join(NAMED)}, bundle, or FILE.json)")
    data = read_regular_file(path, "palette file", MAX_PALETTE_FILE_BYTES, error=UsageError)  # no FIFO/device
    return from_json_obj(strict_json(data, f"{path}: cannot read the palette file", UsageError), str(path))
