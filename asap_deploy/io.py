"""File I/O with validation and atomic writes. No torch here (inference-only installs use it)."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import InputError, OutputError

# Refuse images whose header declares more pixels than this before decoding them.
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024


# Temp files and folders that atomic_path / staged_dir have named and not yet removed. An
# interrupt can land on any bytecode, including between creating a temp path and entering the
# block that removes it; the exit hook removes whatever such a race left behind.
_live_temps: set[Path] = set()


def _remove(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


@atexit.register
def _remove_live_temps() -> None:
    for tmp in list(_live_temps):
        _remove(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it over `path` only if the block succeeds.

    An OSError while creating, writing or renaming (unwritable folder, disk full) becomes an
    OutputError naming `path`; the temporary file is removed on every failure, Ctrl-C and SIGTERM
    included (the temp name is registered before the file exists; see _remove_live_temps).
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}{suffix or path.suffix or '.tmp'}"
    _live_temps.add(tmp)
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # 0o666 through the umask: the result gets the permissions of any new file
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except OSError as exc:
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from exc
        try:
            yield tmp
            os.replace(tmp, path)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc}); nothing was written") from exc
    finally:
        _remove(tmp)
        _live_temps.discard(tmp)


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike, what: str) -> Iterator[Path]:
    """Yield a hidden temporary folder next to `target`; rename it over `target` (replace_dir) only
    if the block succeeds, and remove it on every failure, interrupts included (as atomic_path).
    An OSError (unwritable folder, disk full, file size limit) becomes an OutputError naming
    `target`: typed, and nothing is left behind."""
    target = Path(target)
    tmp = target.parent / f".{target.name}.partial-{secrets.token_hex(6)}"
    _live_temps.add(tmp)
    try:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        except OSError as exc:
            raise OutputError(f"{target}: cannot create the {what} folder ({exc.strerror or exc})") from exc
        try:
            yield tmp
            replace_dir(tmp, target)
        except OSError as exc:
            raise OutputError(f"{target}: cannot write the {what} ({exc.strerror or exc}); nothing was written") from exc
    finally:
        _remove(tmp)
        _live_temps.discard(tmp)


def replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing target is moved aside first and removed after. If the
    second rename fails or is interrupted (Ctrl-C, SIGTERM), the old target is put back."""
    old = None
    try:
        if target.exists():
            old = target.parent / f".{target.name}.old-{secrets.token_hex(6)}"
            os.replace(target, old)
        os.replace(new, target)
    except BaseException:
        if old is not None and old.exists() and not target.exists():
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sigterm_as_interrupt(signum, frame):
    """A SIGTERM handler raising KeyboardInterrupt, so a terminated command cleans up as on Ctrl-C
    (atomic writes remove their temp files; servers stop cleanly)."""
    raise KeyboardInterrupt


def refuse_existing(paths, what: str = "output") -> None:
    """OutputError naming the first of `paths` that exists (commands call this unless --overwrite)."""
    for p in paths:
        if Path(p).exists():
            raise OutputError(f"{p}: the {what} already exists; pass --overwrite to replace it")


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _cv2():
    import cv2

    return cv2


def _header_size(path: Path, max_pixels: int) -> tuple[int, int] | None:
    """(width, height) declared by an image file's header, without decoding pixels (PNG read here,
    other formats through Pillow's lazy open); None if the format is not recognised."""
    size = _png_size(path)
    if size is not None:
        return size
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a base dependency
        return None
    try:
        with Image.open(path) as im:
            return im.size
    except Image.DecompressionBombError as exc:  # more pixels than Pillow itself opens
        raise InputError(f"{path}: the image header declares more pixels than Pillow decodes "
                         f"({2 * (Image.MAX_IMAGE_PIXELS or 0)}; limit {max_pixels}): {exc}") from exc
    except (OSError, SyntaxError, ValueError):
        return None  # not an image Pillow knows: OpenCV decides below


def _png_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from a PNG header, or None if the file is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a photo unchanged with OpenCV (bit depth and channels kept, BGR), with errors naming
    the file. Label and instance maps go through Pillow (read_ids_or_rgb), which keeps palette
    indices."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    size = _header_size(path, max_pixels)  # refuse absurd sizes before any pixel buffer is allocated
    if size is not None and size[0] * size[1] > max_pixels:
        raise InputError(f"{path}: {size[0]}x{size[1]} pixels exceeds the limit of {max_pixels} pixels")
    cv2 = _cv2()
    data = np.fromfile(path, dtype=np.uint8)  # np.fromfile + imdecode: non-ASCII paths work
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None or img.size == 0:
        raise InputError(f"{path}: cannot decode the image (corrupt, truncated or not an image)")
    if img.shape[0] * img.shape[1] > max_pixels:
        raise InputError(f"{path}: {img.shape[1]}x{img.shape[0]} pixels exceeds the limit of {max_pixels} pixels")
    return img


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow is a base dependency
        from .errors import MissingDependencyError

        raise MissingDependencyError("reading label maps needs Pillow: pip install pillow") from exc
    return Image


def open_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS):
    """A Pillow image with only its header read (size known, no pixels decoded), after the checks
    that need no pixels: exists, readable, not empty, at most `max_pixels`. InputError naming it."""
    Image = _pil()  # noqa: N806
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        im = Image.open(path)
    except Image.DecompressionBombError as exc:  # the header declares more than 2x Pillow's own limit
        raise InputError(f"{path}: the image header declares more pixels than Pillow decodes "
                         f"({2 * (Image.MAX_IMAGE_PIXELS or 0)}; --max-pixels {max_pixels}): {exc}") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the image ({exc})") from exc
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise InputError(f"{path}: {w}x{h} pixels exceeds the limit of {max_pixels} pixels")
    if w == 0 or h == 0:
        im.close()
        raise InputError(f"{path}: empty image ({w}x{h})")
    return im


def read_ids_or_rgb(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A label or instance map, header checked before any pixel is decoded: (H, W) ids (8-bit
    gray or palette PNG: uint8, the palette indices are the ids; 16-bit: int32), or (H, W, 3) uint8
    RGB for a colour image (one whose pixels are all gray, R = G = B, is read as ids)."""
    Image = _pil()  # noqa: N806
    path = Path(path)
    open_image(path, max_pixels).close()
    try:
        with Image.open(path) as im:
            im.load()
            a = _pil_array(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InputError(f"{path}: cannot decode the image (corrupt or truncated: {exc})") from exc
    if a.ndim == 3 and np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2]):
        a = np.ascontiguousarray(a[..., 0])
    return a


def _pil_array(im) -> np.ndarray:
    mode = im.mode
    if mode in ("P", "PA"):  # palette images: the indices are the ids
        return np.array(im if mode == "P" else im.getchannel(0))
    if mode == "1":
        return np.array(im).astype(np.uint8)
    if mode == "LA":
        return np.array(im.getchannel(0))
    if mode in ("L", "I", "I;16", "I;16B", "I;16L", "I;16N"):
        a = np.array(im)
        return a if a.dtype == np.uint8 else a.astype(np.int32)
    return np.array(im if mode == "RGB" else im.convert("RGB"))


def read_label_map(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A label-id map (8/16-bit gray or palette PNG) -> (H, W) ids; colour maps need a palette
    (infer.decode_label_map)."""
    a = read_ids_or_rgb(path, max_pixels)
    if a.ndim == 3:
        raise InputError(f"{path}: a colour image, expected label ids (8/16-bit gray or palette PNG)")
    return a


def read_instance_map(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An instance-id map (8/16-bit gray) -> (H, W) int32."""
    a = read_ids_or_rgb(path, max_pixels)
    if a.ndim != 2:
        raise InputError(f"{path}: instance maps must be single-channel 8- or 16-bit ids, got {a.shape[2]} channels")
    return a.astype(np.int32)


def read_rgb(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A photo -> (H, W, 3) uint8 RGB."""
    img = read_image(path, max_pixels)
    cv2 = _cv2()
    if img.dtype != np.uint8:
        img = (img / 257).round().astype(np.uint8) if img.dtype == np.uint16 else img.astype(np.uint8)
    if img.ndim == 2:
        return np.repeat(img[..., None], 3, axis=2)
    if img.shape[2] == 4:
        img = img[..., :3]
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def write_png(path: str | os.PathLike, img: np.ndarray) -> Path:
    """Write (H, W) ids or (H, W, 3) RGB uint8 as PNG, atomically."""
    cv2 = _cv2()
    arr = np.ascontiguousarray(img)
    if arr.ndim == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise InputError(f"{path}: could not encode PNG from array of shape {img.shape} and dtype {img.dtype}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.tobytes())
    return Path(path)


def to_uint8(rgb: np.ndarray) -> np.ndarray:
    """[-1, 1] float -> uint8 with (x+1)/2*255, rounded and clipped."""
    return np.clip(np.rint((rgb.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
